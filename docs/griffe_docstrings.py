"""A griffe extension for the API reference (mkdocs.yml loads it): it adapts
keras_moe's Keras-style docstrings to griffe's Google-style parser before
they are parsed. The docstrings themselves stay as they are.

- `Example:` followed by an unindented block (the Keras convention: a blank
  line, then `>>>` lines or a code fence) becomes an indented `Examples:`
  section, so doctests render as code, not as Markdown quotes.
- `Call arguments:` (the arguments of `call`, a Keras convention) renders as
  a titled box with one bullet per argument, name in bold.
- In `Args:`, a group of names wrapped over two lines
  (`kernel_initializer, bias_initializer,` / `bias_regularizer: ...`) is
  joined into one item (`a, b, c: ...`), as griffe reads one line per name.
"""

import re

from griffe import Extension

_TITLE = re.compile(r"^([A-Z][A-Za-z ]*):\s*$")
_ITEM = re.compile(r"^(\*{0,2}[\w./ ,*]+?):(\s.*)?$")


def _is_title(line):
    return bool(_TITLE.match(line))


def _block_end(lines, start):
    """The index of the next top-level section title after `start`
    (outside code fences)."""
    in_fence = False
    for j in range(start, len(lines)):
        if lines[j].lstrip().startswith("```"):
            in_fence = not in_fence
        elif not in_fence and _is_title(lines[j]):
            return j
    return len(lines)


def _examples(lines, i):
    """Rewrites an `Example:` title at `i` with an unindented body."""
    body_start = i + 1
    while body_start < len(lines) and not lines[body_start].strip():
        body_start += 1
    if body_start >= len(lines) or lines[body_start].startswith(" "):
        return lines, i + 1  # already a Google-style section
    end = _block_end(lines, body_start)
    body = [("    " + line) if line.strip() else "" for line in lines[body_start:end]]
    while body and not body[-1]:
        body.pop()
    rest = lines[end:]
    return lines[:i] + ["Examples:"] + body + ([""] if rest else []) + rest, i + 1 + len(body)


def _call_arguments(lines, i):
    """Turns the items under `Call arguments:` into a Markdown list."""
    j = i + 1
    out = []
    while j < len(lines) and (not lines[j].strip() or lines[j].startswith(" ")):
        line = lines[j]
        match = _ITEM.match(line[4:]) if line.startswith("    ") and not line.startswith(
            "     ") else None
        if match:
            rest = (match.group(2) or "").strip()
            out.append(f"    - **`{match.group(1)}`** – {rest}")
        elif line.startswith("        "):
            out.append("      " + line.strip())
        else:
            out.append(line)
        j += 1
    return lines[:i + 1] + out + lines[j:], j


def _join_wrapped_names(lines, i):
    """In the `Args:` block at `i`, joins `a, b,` + `c: text` item lines."""
    j = i + 1
    while j < len(lines) and (not lines[j].strip() or lines[j].startswith(" ")):
        line = lines[j]
        is_item = line.startswith("    ") and not line.startswith("     ")
        if (is_item and ":" not in line and line.rstrip().endswith(",")
                and j + 1 < len(lines)):
            lines = lines[:j] + [line.rstrip() + " " + lines[j + 1].strip()] + lines[j + 2:]
            continue
        j += 1
    return lines, j


def rewrite(text):
    """The docstring `text` adapted to griffe's Google parser (see the
    module docstring)."""
    lines = text.split("\n")
    i = 0
    in_fence = False
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        title = None if in_fence else (_TITLE.match(line) or [None, None])[1]
        if title == "Example" or title == "Examples":
            lines, i = _examples(lines, i)
        elif title == "Call arguments":
            lines, i = _call_arguments(lines, i)
        elif title in ("Args", "Arguments"):
            lines, i = _join_wrapped_names(lines, i)
        else:
            i += 1
    return "\n".join(lines)


class KerasDocstrings(Extension):
    """Rewrites every docstring with `rewrite` when griffe creates the
    object (before the docstring is parsed)."""

    def on_instance(self, *, obj, **kwargs):
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
