"""int8 quantisation of expert banks through Keras' `quantize` hook."""

import doctest
import os
import tempfile
import warnings

import keras
import numpy as np
import pytest

from keras_moe.utils import keras_internals
from keras_moe.compression import weight_bytes
from keras_moe.layers import (
    PLE,
    Experts,
    MultiGateMoE,
    SoftMoE,
    SparseMoE,
)
from keras_moe.layers import experts as experts_module
from tests.conftest import (
    QUANTIZE,
    ZEROS,
    RouterCase,
    layer_cases,
    randomize,
    router_cases,
    to_numpy,
)

WEIGHT_ONLY = keras.quantizers.Int8QuantizationConfig(activation_quantizer=None)


def quantize_rows(x):
    """Keras' AbsMaxQuantizer on the last axis, in NumPy."""
    scale = (127.0 / (np.max(np.abs(x), axis=-1, keepdims=True) + 1e-7)).astype(
        "float32"
    )
    return np.clip(np.round(x * scale), -127, 127), scale


def reference_int8(layer, x, activations):
    """The quantised bank in NumPy, from its int8 kernels and scales."""
    w = {v.path.split("/")[-1]: to_numpy(v) for v in layer.weights}

    def matmul(inputs, name):
        q = w[name].astype("float32")
        scale = w[f"{name}_scale"][:, None, :]
        if not activations:
            return np.einsum("eci,eio->eco", inputs, q) / scale
        q_x, s_x = quantize_rows(inputs)
        return np.einsum("eci,eio->eco", q_x, q) / (s_x * scale)

    act = lambda v: to_numpy(layer.activation(v))  # noqa: E731
    hidden = matmul(x, "kernel_in") + w["bias_in"][:, None]
    if layer.gated:
        hidden = act(matmul(x, "kernel_gate") + w["bias_gate"][:, None]) * hidden
    else:
        hidden = act(hidden)
    return matmul(hidden.astype("float32"), "kernel_out") + w["bias_out"][:, None]


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("activations", [True, False])
def test_bank_shrinks_and_matches_reference(gated, activations):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 12, 64)).astype("float32")
    layer = Experts(4, 128, gated=gated, kernel_initializer=ZEROS)
    layer.build(x.shape)
    randomize(layer, seed=1)
    floats = {v.path.split("/")[-1]: to_numpy(v) for v in layer.weights}
    expected_float = to_numpy(layer(x))
    before = weight_bytes(layer)
    layer.quantize("int8", config=None if activations else WEIGHT_ONLY)

    assert layer.dtype_policy.name == "int8_from_float32"
    assert (layer.inputs_quantizer is not None) == activations
    names = ["kernel_in", "kernel_out"] + (["kernel_gate"] if gated else [])
    for name in names:
        kernel = getattr(layer, name)
        assert kernel.dtype == "int8" and not kernel.trainable
        # Per expert and output channel abs-max scales.
        scale = to_numpy(getattr(layer, f"{name}_scale"))
        w = floats[name]
        np.testing.assert_allclose(
            scale, 127.0 / (np.abs(w).max(axis=1) + 1e-7), rtol=1e-6
        )
        np.testing.assert_array_equal(
            to_numpy(kernel), np.clip(np.round(w * scale[:, None, :]), -127, 127)
        )
    assert sorted(v.name for v in layer.trainable_weights) == sorted(
        ["bias_in", "bias_out"] + (["bias_gate"] if gated else [])
    )
    ratio = before / weight_bytes(layer)
    assert ratio >= 3.5, ratio

    outputs = to_numpy(layer(x))
    np.testing.assert_allclose(
        outputs, reference_int8(layer, x, activations), rtol=1e-4, atol=1e-4
    )
    # Close to the float bank: relative to the output scale.
    error = np.abs(outputs - expected_float).max() / np.abs(expected_float).max()
    assert error < (0.04 if activations else 0.015), error


def _model_with_every_bank():
    init = dict(kernel_initializer=ZEROS)
    gates = dict(init, gate_kernel_initializer=ZEROS)
    inputs = keras.Input((6, 16))
    x = SparseMoE(4, 32, k=2, num_shared_experts=1, router_kernel_initializer=ZEROS,
                  name="moe", **init)(inputs)
    x = x + SoftMoE(2, 16, slot_initializer=ZEROS, name="soft", **init)(x)
    pooled = keras.layers.GlobalAveragePooling1D()(x)
    a, b = MultiGateMoE(2, 4, 16, k=2, name="mmoe", **gates)(pooled)
    c, _ = PLE(2, 2, 1, 1, hidden_dim=16, name="ple", **gates)(b)
    model = keras.Model(inputs, keras.layers.Concatenate()([a, c]))
    return randomize(model)


def _quantize(model, **kwargs):
    with warnings.catch_warnings():  # routers and others are not quantised
        warnings.simplefilter("ignore")
        model.quantize("int8", **kwargs)


def test_model_quantize_reaches_every_bank_and_saves():
    x = np.random.default_rng(1).normal(size=(8, 6, 16)).astype("float32")
    model = _model_with_every_bank()
    banks = [l for l in keras_internals.flatten_layers(model) if isinstance(l, Experts)]
    assert len(banks) == 8
    # The token MoE weight-only, every other bank with int8 activations.
    token_moe = model.get_layer("moe")
    token_banks = [token_moe.experts, token_moe.shared_experts]
    in_token_moe = lambda layer: any(layer is b for b in token_banks)  # noqa: E731
    _quantize(model, config=WEIGHT_ONLY, filters=in_token_moe)
    _quantize(model, filters=lambda layer: not in_token_moe(layer))

    for bank in banks:
        assert bank.quantization_mode == "int8", bank.path
        assert bank.kernel_in.dtype == "int8"
        assert (bank.inputs_quantizer is None) == in_token_moe(bank)
    # Routers and gates stay float.
    routers = [token_moe.router] + model.get_layer("mmoe").routers
    assert all(r.kernel.dtype == "float32" for r in routers)
    assert model.get_layer("soft").slot_kernel.dtype == "float32"
    gates = model.get_layer("ple").levels[0].task_gate_kernel
    assert gates.dtype == "float32"

    outputs = model.predict(x, verbose=0)  # (closeness: the bank test)
    assert np.all(np.isfinite(outputs))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "int8.keras")
        model.save(path)
        reloaded = keras.saving.load_model(path)
    revived = [l for l in keras_internals.flatten_layers(reloaded) if isinstance(l, Experts)]
    assert len(revived) == 8
    for bank in revived:
        assert bank.quantization_mode == "int8", bank.path
        assert (bank.inputs_quantizer is None) == bank.path.startswith("moe/")
    np.testing.assert_array_equal(reloaded.predict(x, verbose=0), outputs)


def test_config_round_trip_of_quantized_layers():
    x = np.random.default_rng(2).normal(size=(4, 5, 8)).astype("float32")
    bank = Experts(4, 16, output_dim=6, gated=True, kernel_initializer=ZEROS)
    bank.build(x.shape)
    randomize(bank)
    bank.quantize("int8", config=WEIGHT_ONLY)
    revived = Experts.from_config(bank.get_config())
    revived.build(x.shape)
    assert revived.kernel_in.dtype == "int8" and revived.inputs_quantizer is None
    revived.set_weights(bank.get_weights())
    np.testing.assert_array_equal(to_numpy(revived(x)), to_numpy(bank(x)))

    # An MoE layer records its banks' policies in its own config.
    moe = SparseMoE(4, 16, k=2, num_shared_experts=1, name="moe",
                    kernel_initializer=ZEROS, router_kernel_initializer=ZEROS)
    moe.build(x.shape)
    moe.experts.quantize("int8")
    config = moe.get_config()
    assert config["dtype"]["class_name"] == "DTypePolicyMap"
    revived = SparseMoE.from_config(config)
    revived.build(x.shape)
    assert revived.experts.quantization_mode == "int8"
    assert revived.experts.kernel_in.dtype == "int8"
    assert revived.shared_experts.quantization_mode is None
    assert revived.get_config() == config
    revived.set_weights(moe.get_weights())  # same variables, same layout


@keras.saving.register_keras_serializable(package="keras_moe_tests")
class OwnBank(keras.layers.Layer):
    """A user layer owning a bank, whose get_config does not record the
    bank's quantisation: the bank converts itself on load."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.bank = Experts(2, 8, kernel_initializer=ZEROS, name="bank")

    def build(self, input_shape):
        self.bank.build(input_shape)

    def call(self, x):
        return self.bank(x)


def test_bank_in_a_foreign_layer_quantizes_itself_on_load():
    x = np.random.default_rng(4).normal(size=(2, 3, 4)).astype("float32")
    inputs = keras.Input((3, 4), batch_size=2)
    model = randomize(keras.Model(inputs, OwnBank(name="own")(inputs)))
    _quantize(model)
    expected = model.predict(x, verbose=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "own.keras")
        model.save(path)
        reloaded = keras.saving.load_model(path)
    assert reloaded.get_layer("own").bank.quantization_mode == "int8"
    np.testing.assert_array_equal(reloaded.predict(x, verbose=0), expected)


def test_fine_tuning_after_quantize():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(32, 4, 8)).astype("float32")
    y = rng.normal(size=(32, 4, 8)).astype("float32")
    inputs = keras.Input((4, 8))
    h = keras.layers.Dense(8, kernel_initializer=ZEROS, name="pre")(inputs)
    moe = SparseMoE(4, 16, kernel_initializer=ZEROS, router_kernel_initializer=ZEROS,
                    name="moe")
    model = randomize(keras.Model(inputs, moe(h)))
    model.compile("adam", "mse")
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    _quantize(model, filters=lambda layer: isinstance(layer, Experts))
    # A new optimizer for the new set of trainable variables.
    model.compile(keras.optimizers.Adam(0.01), "mse")
    bank = model.get_layer("moe").experts
    frozen = to_numpy(bank.kernel_in)
    before = {v.path: to_numpy(v) for v in model.trainable_variables}
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    after = {v.path: to_numpy(v) for v in model.trainable_variables}
    assert "moe/experts/kernel_in" not in after
    # Biases, the router and the layer before the bank train (gradients
    # flow through the int8 matmuls); the int8 kernels do not.
    for path in ("moe/experts/bias_in", "moe/router/kernel", "pre/kernel"):
        assert not np.allclose(before[path], after[path]), path
    np.testing.assert_array_equal(to_numpy(bank.kernel_in), frozen)


def test_mixed_bfloat16_bank():
    x = np.random.default_rng(6).normal(size=(2, 5, 16)).astype("float32")
    layer = Experts(2, 32, kernel_initializer=ZEROS, dtype="mixed_bfloat16")
    layer.build(x.shape)
    randomize(layer)
    expected = to_numpy(layer(x)).astype("float32")
    layer.quantize("int8")
    assert layer.dtype_policy.name == "int8_from_mixed_bfloat16"
    outputs = to_numpy(layer(x)).astype("float32")
    assert np.all(np.isfinite(outputs))
    assert np.abs(outputs - expected).max() < 0.06 * np.abs(expected).max()


def test_errors():
    bank = Experts(2, 8, kernel_initializer=ZEROS)
    with pytest.raises(ValueError, match="isn't yet built"):
        bank.quantize("int8")
    bank.build((2, None, 4))
    with pytest.raises(NotImplementedError, match="only int8.*mode='int4'"):
        bank.quantize("int4")
    bank.quantize("int8")
    with pytest.raises(ValueError, match="already quantized"):
        bank.quantize("int8")
    float_bank = Experts(2, 8, kernel_initializer=ZEROS)
    float_bank.build((2, None, 4))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "float.weights.h5")
        inputs = keras.Input((None, 4), batch_size=2)
        keras.Model(inputs, float_bank(inputs)).save_weights(path)
        target_in = keras.Input((None, 4), batch_size=2)
        target = keras.Model(target_in, bank(target_in))
        with pytest.raises(ValueError, match="cannot load the weights of a float"):
            target.load_weights(path)
    half = Experts(2, 8, kernel_initializer=ZEROS, dtype="float16")
    half.build((2, None, 4))
    with pytest.raises(ValueError, match="float16"):
        half.quantize("int8")


def test_docstring_examples():
    result = doctest.testmod(experts_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_quantized_bank_keeps_the_glu_options_and_expert_scale(tmp_path):
    # Issue 23's expert options: the int8 call applies the clamp, the offset
    # and the per-expert scale, and the scale survives save/load.
    x = np.random.default_rng(3).normal(size=(2, 4, 5)).astype("float32")
    inputs = keras.Input((4, 5))
    moe = SparseMoE(
        4, 6, k=2, gated=True, activation="quick_gelu", glu_limit=0.5,
        glu_linear_offset=1.0, output_scale=True, num_shared_experts=1,
        shared_expert_gate="sigmoid", name="moe",
    )
    model = keras.Model(inputs, moe(inputs))
    moe.experts.expert_scale.assign(np.array([0.5, 2.0, -1.0, 1.5], "float32"))
    expected = model.predict(x, verbose=0)
    _quantize(model, config=WEIGHT_ONLY)
    assert moe.experts.quantization_mode == "int8"
    got = model.predict(x, verbose=0)
    np.testing.assert_allclose(got, expected, atol=0.05 * np.abs(expected).max())
    path = str(tmp_path / "int8.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(
        to_numpy(reloaded.get_layer("moe").experts.expert_scale),
        [0.5, 2.0, -1.0, 1.5],
    )
    np.testing.assert_array_equal(reloaded.predict(x, verbose=0), got)


def _quantizable(model):
    return [
        layer for layer in keras_internals.flatten_layers(model)
        if isinstance(layer, (Experts, keras.layers.Dense))
    ]


@pytest.mark.parametrize(
    "case", router_cases(QUANTIZE) + layer_cases(QUANTIZE)
)
def test_every_layer_family_quantizes_saves_and_loads(case, tmp_path):
    """Every router (in a SparseMoE with a shared expert) and every layer
    family of tests/conftest.py: quantize -> save -> load -> the same
    predictions (issue 22: every saved model loads). Every expert bank and
    Dense layer (a head's, a mixture's gate and attention layers) is int8
    and comes back int8: their policies are in the owner's config (a head's
    came back float before: "Layer 'outputs' expected 2 variables, but
    received 3")."""
    if isinstance(case, RouterCase):
        layer = case.moe(zeros=True, eval_capacity_factor=1.0, num_shared_experts=1)
        x_shape = (2, 6, 8)
        inputs, outputs = case.model(layer, x_shape[1:])
    else:
        x_shape = case.input_shape
        inputs = keras.Input(x_shape[1:], batch_size=x_shape[0])
        outputs = case.make(zeros=True)(inputs)
    if isinstance(outputs, list):
        outputs = keras.layers.Concatenate()(outputs)
    model = randomize(keras.Model(inputs, outputs))
    x = np.random.default_rng(4).normal(size=x_shape).astype("float32")
    data = case.data(x) if isinstance(case, RouterCase) else x
    _quantize(model)
    quantized = _quantizable(model)
    assert quantized and all(l.quantization_mode == "int8" for l in quantized)
    expected = model.predict(data, verbose=0)
    path = str(tmp_path / "int8.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    modes = [l.quantization_mode for l in _quantizable(reloaded)]
    assert modes == ["int8"] * len(quantized)
    np.testing.assert_array_equal(reloaded.predict(data, verbose=0), expected)
