import keras
import numpy as np
import pytest

from keras_moe.layers import SoftMoE
from keras_moe.testing import run_layer_test
from tests.conftest import numpy_experts, tokens, xla_only


class TokenOffset(keras.layers.Layer):
    def build(self, input_shape):
        self.offset = self.add_weight(shape=input_shape[1:], initializer="zeros")

    def call(self, inputs):
        return inputs + self.offset


def softmax(x, axis):
    z = np.exp(x - x.max(axis, keepdims=True))
    return z / z.sum(axis, keepdims=True)


@pytest.mark.parametrize("normalize", [False, True])
def test_layer_contract(normalize):
    run_layer_test(
        SoftMoE,
        dict(num_experts=3, hidden_dim=8, slots_per_expert=2, output_dim=5,
             normalize=normalize, activation="relu", gated=True, use_bias=False,
             kernel_initializer="he_normal", bias_initializer="ones",
             kernel_regularizer="l2", bias_regularizer="l1",
             slot_initializer="glorot_uniform"),
        tokens((4, 7, 6)),
        expected_output_shape=(4, 7, 5),
        expected_num_trainable_weights=4 + normalize,
        expected_num_non_trainable_weights=1,
    )


def test_matches_numpy_reference():
    x = tokens((2, 5, 4), seed=1)
    layer = SoftMoE(3, 6, slots_per_expert=2, bias_initializer="random_normal")
    y = keras.ops.convert_to_numpy(layer(x))
    logits = x @ keras.ops.convert_to_numpy(layer.slot_kernel)  # (B, T, 6)
    dispatch, combine = softmax(logits, 1), softmax(logits, 2)
    slots = np.einsum("bts,btd->bsd", dispatch, x)  # (B, 6, d)
    per_expert = slots.reshape(2, 3, 2, 4).transpose(1, 0, 2, 3).reshape(3, 4, 4)
    out = numpy_experts(layer.experts, per_expert)  # (E, B*S, o)
    out = out.reshape(3, 2, 2, 4).transpose(1, 0, 2, 3).reshape(2, 6, 4)
    np.testing.assert_allclose(y, np.einsum("bts,bso->bto", combine, out), atol=1e-5)


def test_drops_nothing_and_every_token_gets_gradient():
    x = tokens((3, 9, 4), seed=2)
    inputs = keras.Input((9, 4))
    layer = SoftMoE(4, 8)
    model = keras.Model(inputs, layer(inputs))
    # The gradient reaching each token position, read off the SGD update of
    # a trainable per-position offset added to the input.
    offset = TokenOffset()
    probe_in = keras.Input((9, 4))
    probe_model = keras.Model(probe_in, model(offset(probe_in)))
    probe_model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    probe_model.train_on_batch(x, np.zeros((3, 9, 4), "float32"))
    per_token = np.abs(offset.offset.numpy()).sum(-1)
    assert np.all(per_token > 0), per_token
    # Every token contributes to every slot: the dispatch weights are positive.
    logits = keras.ops.convert_to_numpy(layer.logits(x))
    assert np.all(softmax(logits, 1) > 0)
    stats = layer.routing_stats()
    assert stats["dropped_fraction"] == 0.0
    np.testing.assert_allclose(stats["expert_load"].sum(), 1.0, atol=1e-5)
    # Each token's output depends on every other token of its sequence only.
    y = keras.ops.convert_to_numpy(layer(x))
    x2 = x.copy()
    x2[1, 0] += 1.0
    y2 = keras.ops.convert_to_numpy(layer(x2))
    assert np.abs(y2[1] - y[1]).min() > 0  # all tokens of sequence 1 change
    np.testing.assert_allclose(y2[[0, 2]], y[[0, 2]], atol=1e-6)  # others do not


def test_training_lowers_the_loss():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(128, 6, 8)).astype("float32")
    y = np.tanh(x @ rng.normal(size=(8, 8))).astype("float32")
    inputs = keras.Input((6, 8))
    model = keras.Model(inputs, SoftMoE(4, 32, slots_per_expert=2)(inputs))
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse")
    losses = model.fit(x, y, batch_size=32, epochs=10, verbose=0).history["loss"]
    assert losses[-1] < 0.7 * losses[0], losses


@xla_only
def test_jit_compiled_training():
    inputs = keras.Input((6, 8))
    model = keras.Model(inputs, SoftMoE(4, 16)(inputs))
    model.compile(optimizer="adam", loss="mse", jit_compile=True)
    x = tokens((16, 6, 8))
    history = model.fit(x, x, batch_size=8, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="slots_per_expert=0"):
        SoftMoE(4, 8, slots_per_expert=0)
    with pytest.raises(ValueError, match=r"input_shape=\(4, 8\)"):
        SoftMoE(4, 8)(np.ones((4, 8), "float32"))


def test_integer_inputs_are_cast_to_the_compute_dtype():
    """Issue 22: int32 inputs crashed on torch; on TensorFlow and JAX the
    dispatch weights were cast to int32 (all 0)."""
    x = np.arange(24, dtype="int32").reshape(2, 3, 4) % 5
    layer = SoftMoE(4, 8)
    y = layer(x)
    assert keras.backend.standardize_dtype(y.dtype) == "float32"
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(y),
        keras.ops.convert_to_numpy(layer(x.astype("float32"))),
    )
