"""SavedModel (and ONNX) export from every backend with keras_moe.export.

On TensorFlow and JAX `export_saved_model` uses Keras' `model.export`; on
torch it exports from a TensorFlow subprocess via a `.keras` file. The
subprocess route is also forced (`in_subprocess=True`) on every backend for
the tests of custom-layer modules and error reporting.
"""

import doctest
import importlib.util
import os
import runpy
import tempfile
import textwrap

import keras
import numpy as np
import pytest

import keras_moe
from keras_moe import export as export_lib
from keras_moe.layers import (
    CGC,
    BoxHead,
    ClassificationHead,
    MultiGateMoE,
    RegressionHead,
    SoftMoE,
    SparseMoE,
    default_compile_args,
)

tf = pytest.importorskip("tensorflow")

TASKS = ("class", "box", "score")


def multitask_model():
    """Tokens -> SparseMoE (finite eval capacity) -> pooled -> sparse MMoE ->
    class, box and score heads (a dict of outputs)."""
    inputs = keras.Input((6, 8), name="tokens")
    x = keras.layers.Dense(16, name="embed")(inputs)
    x = x + SparseMoE(num_experts=4, hidden_dim=16, k=2, name="token_moe")(x)
    pooled = keras.layers.GlobalAveragePooling1D()(x)
    per_task = MultiGateMoE(num_tasks=3, num_experts=4, hidden_dim=16, k=2,
                            task_names=list(TASKS), name="task_moe")(pooled)
    outputs = {
        "class": ClassificationHead(3, name="class")(per_task[0]),
        "box": BoxHead(name="box")(per_task[1]),
        "score": RegressionHead(1, name="score")(per_task[2]),
    }
    return keras.Model(inputs, outputs, name="multitask")


def multitask_data(n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6, 8)).astype("float32")
    center = rng.uniform(0.3, 0.7, (n, 2))
    half = rng.uniform(0.05, 0.2, (n, 2))
    y = {
        "class": rng.integers(0, 3, (n,)),
        "box": np.concatenate([center - half, center + half], 1).astype("float32"),
        "score": rng.normal(size=(n, 1)).astype("float32"),
    }
    return x, y


def max_difference(served, expected):
    assert set(served) == set(expected), (set(served), set(expected))
    return max(float(np.max(np.abs(np.asarray(served[k]) - expected[k])))
               for k in expected)


@pytest.fixture
def clean_tmp(tmp_path, monkeypatch):
    """A fresh temp dir for `tempfile` (and the export subprocess)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


def leftovers(tmp):
    """What is left in `tmp`, except the source files that TensorFlow's
    autograph writes there for every traced function (its own, not ours)."""
    return sorted(f for f in os.listdir(tmp)
                  if not f.startswith("__autograph_generated_file"))


def test_trained_multitask_model_serves_the_same_outputs(tmp_path, clean_tmp):
    model = multitask_model()
    model.compile(optimizer="adam", **default_compile_args(model))
    x, y = multitask_data(32)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)

    path = keras_moe.export_saved_model(model, tmp_path / "saved_model")
    assert path == str(tmp_path / "saved_model")
    assert leftovers(clean_tmp) == []  # no leftover .keras file or dir
    artifact = tf.saved_model.load(path)

    # Same batch as `predict` (the token MoE's finite eval capacity makes a
    # prediction depend on its batch); the batch dimension is dynamic.
    expected = model.predict(x[:16], batch_size=16, verbose=0)
    assert max_difference(artifact.serve(tf.constant(x[:16])), expected) <= 1e-5

    # The serving signature (what TF Serving calls): named inputs and outputs.
    signature = artifact.signatures["serving_default"]
    _, inputs = signature.structured_input_signature
    assert list(inputs) == ["tokens"]
    assert inputs["tokens"].shape.as_list() == [None, 6, 8]
    assert set(signature.structured_outputs) == set(TASKS)
    expected = model.predict(x[16:19], batch_size=3, verbose=0)
    assert max_difference(signature(tokens=tf.constant(x[16:19])), expected) <= 1e-5


def test_two_named_inputs_serve_by_name(tmp_path):
    """A multimodal model (a dict of two named inputs of different ranks,
    the tokens of both through one SparseMoE) exports with one signature
    input per name, and serves by name, from every backend."""
    image = keras.Input((4, 8), name="image")
    audio = keras.Input((6,), name="audio")
    a = keras.layers.Reshape((3, 2))(audio)
    a = keras.layers.Dense(8)(a)
    tokens = keras.layers.Concatenate(axis=1)([image, a])  # (B, 7, 8)
    moe = SparseMoE(4, 16, k=2, eval_capacity_factor=None, name="moe")
    pooled = keras.layers.GlobalAveragePooling1D()(moe(tokens))
    model = keras.Model({"image": image, "audio": audio},
                        {"y": keras.layers.Dense(3, name="y")(pooled)})
    rng = np.random.default_rng(0)
    x = {"image": rng.normal(size=(5, 4, 8)).astype("float32"),
         "audio": rng.normal(size=(5, 6)).astype("float32")}
    expected = model.predict(x, verbose=0)

    path = keras_moe.export_saved_model(model, tmp_path / "saved_model")
    artifact = tf.saved_model.load(path)
    signature = artifact.signatures["serving_default"]
    _, inputs = signature.structured_input_signature
    assert sorted(inputs) == ["audio", "image"]
    assert inputs["image"].shape.as_list() == [None, 4, 8]
    assert inputs["audio"].shape.as_list() == [None, 6]
    served = signature(image=tf.constant(x["image"]), audio=tf.constant(x["audio"]))
    assert max_difference(served, expected) <= 1e-5
    served = artifact.serve({"image": tf.constant(x["image"][:2]),
                             "audio": tf.constant(x["audio"][:2])})
    assert max_difference(served, {"y": expected["y"][:2]}) <= 1e-5


SCRIPT = textwrap.dedent('''
    import keras


    @keras.saving.register_keras_serializable(package="keras_moe_test_export")
    class ScriptScale(keras.layers.Layer):
        """A custom layer defined in a user's script (its module is __main__)."""

        def __init__(self, factor=2.0, **kwargs):
            super().__init__(**kwargs)
            self.factor = factor

        def call(self, inputs):
            return inputs * self.factor

        def get_config(self):
            return {**super().get_config(), "factor": self.factor}
''')


def test_subprocess_route_imports_the_scripts_custom_layers(tmp_path, clean_tmp):
    script = tmp_path / "train_script.py"
    script.write_text(SCRIPT)
    # As if the model had been built in that script, run as __main__.
    scale = runpy.run_path(str(script), run_name="__main__")["ScriptScale"]
    inputs = keras.Input((6, 8), name="tokens")
    x = scale(factor=3.0, name="scale")(inputs)
    x = SparseMoE(4, 16, k=2, eval_capacity_factor=None, name="moe")(x)
    model = keras.Model(inputs, {"y": keras.layers.GlobalAveragePooling1D()(x)})
    x_data, _ = multitask_data(4)

    with pytest.raises(ValueError, match=r"modules=\[__file__\]"):
        keras_moe.export_saved_model(model, tmp_path / "no", in_subprocess=True)
    assert not (tmp_path / "no").exists()

    path = keras_moe.export_saved_model(model, tmp_path / "saved_model",
                                        modules=[str(script)], in_subprocess=True)
    assert leftovers(clean_tmp) == []
    artifact = tf.saved_model.load(path)  # keep it: it owns the variables
    served = artifact.serve(tf.constant(x_data))
    expected = model.predict(x_data, verbose=0)
    assert max_difference(served, expected) <= 1e-5


def test_subprocess_error_output_is_in_the_exception(tmp_path, clean_tmp):
    # Registered only when this test runs: importing this module (which the
    # subprocess does, found from the config) does not register it.
    @keras.saving.register_keras_serializable(package="keras_moe_test_export")
    class UnimportableScale(keras.layers.Layer):
        def call(self, inputs):
            return inputs * 2.0

    inputs = keras.Input((3,), name="x")
    model = keras.Model(inputs, UnimportableScale()(inputs))
    with pytest.raises(RuntimeError) as error:
        keras_moe.export_saved_model(model, tmp_path / "saved_model",
                                     in_subprocess=True)
    message = str(error.value)
    assert "KERAS_BACKEND=tensorflow subprocess failed" in message
    assert "UnimportableScale" in message  # the child's own error text
    assert not (tmp_path / "saved_model").exists()
    assert leftovers(clean_tmp) == []


def test_clear_errors_before_any_export(tmp_path, monkeypatch):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="in_subprocess must be None, True or False"):
        keras_moe.export_saved_model(model, tmp_path / "a", in_subprocess="yes")
    with pytest.raises(ValueError, match="modules must be a list"):
        keras_moe.export_saved_model(model, tmp_path / "a", modules="my_layers")
    with pytest.raises(ValueError, match="timeout must be > 0"):
        keras_moe.export_saved_model(model, tmp_path / "a", timeout=0)
    with pytest.raises(ValueError, match="model must be a keras.Model"):
        keras_moe.export_saved_model(keras.layers.Dense(2), tmp_path / "a")
    unbuilt = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="must be built"):
        keras_moe.export_saved_model(unbuilt, tmp_path / "a")

    monkeypatch.setattr(export_lib, "_tensorflow_available", lambda: False)
    with pytest.raises(ImportError, match=r"needs TensorFlow.*keras-moe\[tensorflow\]"):
        keras_moe.export_saved_model(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_input_signature_survives_json():
    signature = [{"tokens": keras.InputSpec(shape=(None, 6, 8), dtype="float32",
                                            name="tokens"),
                  "ids": keras.KerasTensor((None, 6), dtype="int32", name="ids")}]
    data = export_lib._spec_to_json(signature)
    back = export_lib._spec_from_json(data)
    assert back[0]["tokens"].shape == (None, 6, 8)
    assert back[0]["tokens"].name == "tokens"
    assert back[0]["ids"].shape == (None, 6) and back[0]["ids"].dtype == "int32"
    with pytest.raises(ValueError, match="input_signature must be a structure"):
        export_lib._spec_to_json([object()])


# ---------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------

_ONNX_PACKAGES = {"tensorflow": "tf2onnx", "jax": "jax2onnx", "torch": "onnxscript"}
_onnx_missing = [p for p in ("onnx", "onnxruntime", _ONNX_PACKAGES.get(
    keras.backend.backend(), "onnx")) if importlib.util.find_spec(p) is None]
needs_onnx = pytest.mark.skipif(
    bool(_onnx_missing),
    reason=f"the onnx extra is not installed (missing: {_onnx_missing})",
)


def dense_gated_model():
    """The layers that convert to ONNX on every backend (docs/export.md):
    SoftMoE, dense-gated MMoE, a single-input CGC level and the heads, with
    relu (tf2onnx has no Erfc, which exact GELU needs)."""
    tokens = keras.Input((6, 8), name="tokens")
    x = keras.layers.Dense(16, activation="relu")(tokens)
    x = x + SoftMoE(num_experts=4, hidden_dim=16, activation="relu", name="soft")(x)
    pooled = keras.layers.GlobalAveragePooling1D()(x)
    a, b = MultiGateMoE(num_tasks=2, num_experts=4, hidden_dim=16, name="mmoe")(pooled)
    c, d = CGC(num_tasks=2, num_task_experts=1, num_shared_experts=1, hidden_dim=16,
               name="cgc")(pooled)
    a, b = keras.layers.Add()([a, c]), keras.layers.Add()([b, d])
    return keras.Model(tokens, {"class": ClassificationHead(3, name="class")(a),
                                "box": BoxHead(name="box")(b)})


@needs_onnx
def test_onnx_export_of_dense_gated_layers_matches_predict(tmp_path):
    import onnxruntime

    model = dense_gated_model()
    x, _ = multitask_data(4)
    path = keras_moe.export_onnx(model, tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (onnx_input,) = session.get_inputs()
    assert onnx_input.shape[1:] == [6, 8]
    assert not isinstance(onnx_input.shape[0], int)  # dynamic batch
    # These layers do not depend on the batch: one `predict`, sliced.
    expected = model.predict(x, verbose=0)
    for n in (4, 3):
        outputs = session.run(None, {onnx_input.name: x[:n]})
        # The converters name outputs differently; match them by shape
        # (class (B, 3) and box (B, 4) differ).
        by_shape = {v[:n].shape: v[:n] for v in expected.values()}
        assert sorted(o.shape for o in outputs) == sorted(by_shape)
        for output in outputs:
            np.testing.assert_allclose(output, by_shape[output.shape], atol=1e-5)


def sparse_routing_model():
    inputs = keras.Input((6, 8), name="tokens")
    outputs = SparseMoE(4, 16, k=2, activation="relu", eval_capacity_factor=None)(inputs)
    return keras.Model(inputs, outputs)


@needs_onnx
@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="only tf2onnx converts top-k routing (jax2onnx and torch.onnx: "
    "docs/export.md, ONNX table)",
)
def test_onnx_export_of_top_k_routing_matches_predict(tmp_path):
    import onnxruntime

    model = sparse_routing_model()
    x, _ = multitask_data(4)
    path = keras_moe.export_onnx(model, tmp_path / "sparse.onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {session.get_inputs()[0].name: x})
    np.testing.assert_allclose(output, model.predict(x, verbose=0), atol=1e-5)


@needs_onnx
@pytest.mark.skipif(
    keras.backend.backend() == "tensorflow", reason="tf2onnx converts top-k routing"
)
def test_onnx_export_of_top_k_routing_fails_clearly(tmp_path):
    """jax2onnx and torch.onnx cannot convert SparseMoE's top-k routing
    (docs/export.md): a RuntimeError that points there, and no file."""
    path = tmp_path / "sparse.onnx"
    with pytest.raises(RuntimeError, match="docs/export.md"):
        keras_moe.export_onnx(sparse_routing_model(), path)
    assert not path.exists()


@needs_onnx
def test_docstring_examples_run():
    result = doctest.testmod(export_lib, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, result
