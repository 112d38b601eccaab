"""Every `>>>` example in the package's docstrings runs, on every backend.

The modules are found by scanning the package, so a new module's examples
are run without being listed here.
"""

import doctest
import importlib
import pathlib

import pytest

import keras_moe

PACKAGE = pathlib.Path(keras_moe.__file__).parent
MODULES = sorted(
    ".".join(("keras_moe",) + path.relative_to(PACKAGE).with_suffix("").parts)
    for path in PACKAGE.rglob("*.py")
    if ">>>" in path.read_text(encoding="utf-8")
)


def test_the_scan_finds_the_modules_with_examples():
    assert "keras_moe.layers.sparse_moe" in MODULES and len(MODULES) >= 20


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name.replace(".__init__", ""))
    result = doctest.testmod(
        module,
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
        report=False,
    )
    assert result.attempted > 0, f"{name}: no example found"
    assert result.failed == 0, f"{name}: {result.failed} example(s) failed"
