"""Every example's model: int8 quantize -> save `.keras` -> load -> the same
predictions (issue 22: every saved model loads, quantized ones included).

The models are built at small sizes, with random weights (training is not
the point here), by the model-building functions of the experiment runners
in `benchmarks/` (the examples' models: `tests/test_examples.py` checks that
each example and its runner build the same model), and for
`examples/mnist_sparse_moe.py`, which has no runner, by the example's own
`build_model`: only the example's imports and definitions run, not its
script body.
"""

import ast
import importlib.util
import os
import types
import warnings

import keras
import numpy as np
import pytest

from keras_moe.utils import keras_internals

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _runner(name):
    spec = importlib.util.spec_from_file_location(
        f"benchmark_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _example_definitions(name):
    """The imports, functions and classes of `examples/<name>.py`, run
    without the rest of the script (which trains)."""
    path = os.path.join(ROOT, "examples", f"{name}.py")
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    kept = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef)
    tree.body = [node for node in tree.body if isinstance(node, kept)]
    namespace = {"__name__": f"example_{name}", "__file__": path}
    exec(compile(tree, path, "exec"), namespace)
    return types.SimpleNamespace(**namespace)


def _cifar():
    return _runner("cifar_multitask").build_model(
        width=0.25, experts=4, hidden=16, task_experts=2, task_hidden=8
    )


def _census(name):
    def build():
        module = _runner("census_mmoe")
        args = types.SimpleNamespace(
            embedding_dim=2, dropout=0.0, capacity_factor=1.25
        )
        return module.build_models(name, 20, args)[0][0]

    return build


def _mnist_sparse_moe():
    return _example_definitions("mnist_sparse_moe").build_model(4, 2, dim=16, hidden_dim=16)


def _mnist_experts():
    return _runner("mnist_experts").build_model(3, 2, "attention")


def _random_inputs(model, rng):
    """Random data in the structure of the model's inputs (ids < 20)."""

    def draw(tensor):
        shape = (2,) + tuple(tensor.shape[1:])
        if "int" in str(tensor.dtype):
            return rng.integers(0, 20, size=shape).astype(str(tensor.dtype))
        return rng.uniform(0, 1, size=shape).astype("float32")

    return keras.tree.map_structure(draw, model.input)


@pytest.mark.parametrize(
    "build",
    [_cifar, _census("mmoe"), _census("mmoe_sparse"), _census("ple"),
     _mnist_sparse_moe, _mnist_experts],
    ids=["cifar_multitask", "census_mmoe", "census_mmoe_sparse", "census_ple",
         "mnist_sparse_moe", "mnist_experts"],
)
def test_example_model_quantizes_saves_and_loads(build, tmp_path):
    model = build()
    rng = np.random.default_rng(0)
    x = _random_inputs(model, rng)
    with warnings.catch_warnings():  # layers without an int8 form stay float
        warnings.simplefilter("ignore")
        model.quantize("int8")
    quantized = [
        l for l in keras_internals.flatten_layers(model) if l.quantization_mode == "int8"
    ]
    assert quantized, "nothing was quantized"
    expected = model.predict(x, verbose=0)
    path = str(tmp_path / "int8.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    got = reloaded.predict(x, verbose=0)
    for a, b in zip(keras.tree.flatten(got), keras.tree.flatten(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
