"""Imports point down only (issue 20; the table in CONTRIBUTING.md).

Every module of the package is parsed (no import runs) and each of its
imports, those inside functions included, is checked:

- it may import a module of its own row or of a row above it in `ROWS`,
  never of a row below (the package root, which re-exports everything, is
  the only exception);
- it may import a private module or name (`_x`) only from its own package
  or a package that contains it: `keras_moe.layers._pruning` is for
  `keras_moe.layers` and its subpackages, not for `keras_moe.boxes`.
"""

import ast
import pathlib

import keras_moe

PACKAGE = pathlib.Path(keras_moe.__file__).parent

# From the bottom up: each row may import the rows before it.
ROWS = (
    ("utils", ("keras_moe.utils",)),
    ("ops", ("keras_moe.ops", "keras_moe.activations", "keras_moe.boxes")),
    ("task losses and metrics", ("keras_moe.losses", "keras_moe.metrics")),
    ("layers", ("keras_moe.layers",)),
    ("models", ("keras_moe.models", "keras_moe.weighting", "keras_moe._autodiff")),
    (
        "tools",
        (
            "keras_moe.callbacks",
            "keras_moe.plotting",
            "keras_moe.compression",
            "keras_moe.export",
            "keras_moe.distribution",
            "keras_moe.interop",
            "keras_moe.resizing",
            "keras_moe.upcycling",
            "keras_moe.testing",
        ),
    ),
)


def _module_names():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("keras_moe",) + path.relative_to(PACKAGE).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        yield ".".join(parts), path, is_package


MODULES = {name: (path, is_package) for name, path, is_package in _module_names()}


def _row(module):
    """The index in `ROWS` of `module` (None for the package root)."""
    if module == "keras_moe":
        return None
    for index, (_, prefixes) in enumerate(ROWS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(
        f"{module} is in no row of ROWS in tests/test_layering.py: add it to "
        "the row it belongs to (and to the table in CONTRIBUTING.md)"
    )


def _package_of(module):
    return module if MODULES[module][1] else module.rsplit(".", 1)[0]


def _imports(module):
    """`(line, imported module, imported name or None)` of every import of
    `module` into keras_moe."""
    path, is_package = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = _package_of(module)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "keras_moe" or alias.name.startswith("keras_moe."):
                    yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package, up `level - 1`
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if not (source == "keras_moe" or source.startswith("keras_moe.")):
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in MODULES:  # `from package import module`
                    yield node.lineno, submodule, None
                else:
                    yield node.lineno, source, alias.name


def _private_owner(target, name):
    """The package that a private module or name of the import belongs to,
    or None if nothing private is imported."""
    parts = target.split(".")
    for depth in range(1, len(parts)):
        if parts[depth].startswith("_"):
            owner = ".".join(parts[:depth])
            return owner if owner in MODULES and MODULES[owner][1] else _package_of(owner)
    if name is not None and name.startswith("_") and name != "*":
        return _package_of(target)
    return None


def test_every_module_has_a_row():
    for module in MODULES:
        _row(module)


def test_imports_point_down_and_private_stays_in_its_package():
    upward, private = [], []
    for module in MODULES:
        row = _row(module)
        package = _package_of(module)
        for line, target, name in _imports(module):
            where = f"{MODULES[module][0].relative_to(PACKAGE.parent)}:{line}"
            target_row = _row(target)
            if row is not None and (target_row is None or target_row > row):
                upward.append(
                    f"{where}: {module} ({ROWS[row][0]}) imports {target} "
                    f"({'the package root' if target_row is None else ROWS[target_row][0]})"
                )
            owner = _private_owner(target, name)
            if owner is not None and not (
                package == owner or package.startswith(owner + ".")
            ):
                imported = target if name is None else f"{target}.{name}"
                private.append(
                    f"{where}: {module} imports {imported}, private to {owner}"
                )
    assert not upward, "imports that point up:\n" + "\n".join(upward)
    assert not private, "private imports across packages:\n" + "\n".join(private)


def test_the_checks_catch_what_they_should():
    # The rule above, on made-up imports (no file is needed).
    assert _row("keras_moe.layers.sparse_moe") > _row("keras_moe.ops.planning")
    assert _row("keras_moe.distribution") > _row("keras_moe.layers")
    assert _private_owner("keras_moe.layers._routing_ids", None) == "keras_moe.layers"
    assert _private_owner("keras_moe.layers.heads", "_output_items") == "keras_moe.layers"
    assert _private_owner("keras_moe.layers.heads", "BoxHead") is None
    assert _private_owner("keras_moe._autodiff", None) == "keras_moe"


def test_private_keras_api_stays_in_one_module():
    """`keras.src` is imported only by `keras_moe.utils.keras_internals`,
    the one module that holds the private Keras API keras_moe relies on."""
    found = []
    for module, (path, _) in MODULES.items():
        if module == "keras_moe.utils.keras_internals":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            if any(n == "keras.src" or n.startswith("keras.src.") for n in names):
                found.append(f"{module}:{node.lineno}")
    assert not found, "keras.src imported outside utils/keras_internals: " + ", ".join(found)


def test_every_module_has_a_docstring_and_at_most_500_lines():
    """One concept per module: each says what it holds, and none grows past
    500 lines (split it by concept instead)."""
    undocumented, long = [], []
    for module, (path, _) in MODULES.items():
        source = path.read_text(encoding="utf-8")
        if not ast.get_docstring(ast.parse(source, str(path))):
            undocumented.append(module)
        lines = source.count("\n")
        if lines > 500:
            long.append(f"{module} ({lines} lines)")
    assert not undocumented, "modules without a docstring: " + ", ".join(undocumented)
    assert not long, "modules over 500 lines: " + ", ".join(long)


BACKENDS = ("tensorflow", "jax", "jaxlib", "torch")


def test_backend_code_in_ops_lives_in_ops_backends():
    """The ops are portable (`keras.ops`); a backend kernel lives in
    `keras_moe/ops/backends/<backend>.py`, the one place in `keras_moe.ops`
    that may import a backend framework."""
    found = []
    for module, (path, _) in MODULES.items():
        if not module.startswith("keras_moe.ops") or module.startswith(
            "keras_moe.ops.backends"
        ):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            if any(n.split(".")[0] in BACKENDS for n in names):
                found.append(f"{module}:{node.lineno}")
    assert not found, "backend imports outside keras_moe/ops/backends: " + ", ".join(found)
