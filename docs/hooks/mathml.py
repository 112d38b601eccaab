"""MkDocs hook: renders the site's formulas to MathML at build time.

`pymdownx.arithmatex` (generic mode) wraps each `$...$` in
`<span class="arithmatex">\\(...\\)</span>` and each `$$...$$` block in
`<div class="arithmatex">\\[...\\]</div>`. This hook replaces their TeX by
MathML (latex2mathml, the `docs` extra), which every current browser
renders natively: the pages need no JavaScript and no network for their
math, so the site also reads offline. A formula that does not convert fails
the build with its TeX quoted. Without latex2mathml installed the build
still succeeds, says so once and leaves the formulas as TeX.
"""

import html
import logging
import re

try:
    from latex2mathml.converter import convert
except ImportError:  # the docs extra is not installed
    convert = None

log = logging.getLogger("mkdocs.hooks.mathml")

_MATH = re.compile(
    r'<(?P<tag>span|div) class="arithmatex">\s*'
    r"(?:\\\((?P<inline>.*?)\\\)|\\\[(?P<block>.*?)\\\])\s*</(?P=tag)>",
    re.DOTALL,
)


def _render(match):
    block = match.group("block") is not None
    tex = html.unescape(match.group("block") if block else match.group("inline")).strip()
    try:
        mathml = convert(tex, display="block" if block else "inline")
    except Exception as error:  # a formula we cannot show: stop the build
        raise ValueError(f"cannot convert the formula {tex!r} to MathML: {error}") from error
    tag = match.group("tag")
    return f'<{tag} class="arithmatex">{mathml}</{tag}>'


def on_config(config, **kwargs):
    if convert is None:
        log.info("latex2mathml is not installed (pip install -e \".[docs]\"): "
                 "the formulas stay as TeX")
    return config


def on_page_content(content, **kwargs):
    if convert is None:
        return content
    return _MATH.sub(_render, content)
