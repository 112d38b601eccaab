import os

import keras
import numpy as np
import pytest
from keras import ops

from keras_moe.layers import SparseMoE
from keras_moe.layers.routers.dselect_k import DSelectKRouter, smooth_step
from keras_moe.testing import run_layer_test
from tests.conftest import tokens


def numpy_smooth_step(t, gamma):
    t = np.asarray(t, "float64")
    cubic = -2 / gamma**3 * t**3 + 3 / (2 * gamma) * t + 0.5
    return np.where(t <= -gamma / 2, 0.0, np.where(t >= gamma / 2, 1.0, cubic))


def numpy_gate(router, x):
    """DSelect-k by the paper's formulas, with explicit binary codes."""
    e, k, m = router.num_experts, router.k, router.num_bits
    z = x @ ops.convert_to_numpy(router.code_kernel)
    a = x @ ops.convert_to_numpy(router.selector_kernel)
    if router.use_bias:
        z = z + ops.convert_to_numpy(router.code_bias)
        a = a + ops.convert_to_numpy(router.selector_bias)
    s = numpy_smooth_step(z.reshape(-1, k, m), router.gamma)
    codes = (np.arange(2**m)[:, None] >> np.arange(m)[None, :]) & 1  # (2^m, m)
    factors = np.where(codes[None, None], s[:, :, None, :], 1 - s[:, :, None, :])
    r = factors.prod(-1)[..., :e]
    total = r.sum(-1, keepdims=True)
    # A selector with all its mass on codes >= E contributes nothing.
    r = np.where(total > 0, r / np.where(total > 0, total, 1.0), 0.0)
    alpha = np.exp(a - a.max(-1, keepdims=True))
    alpha = alpha / alpha.sum(-1, keepdims=True)
    w = (alpha[..., None] * r).sum(-2)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(r > 0, r * np.log(r), 0.0).sum((-2, -1)).mean()
    return r, alpha, w, entropy


def test_layer_contract():
    run_layer_test(
        DSelectKRouter,
        dict(
            num_experts=6,
            k=3,
            gamma=2.0,
            entropy_weight=0.05,
            kernel_initializer="random_uniform",
            use_bias=False,
            seed=4,
        ),
        tokens((6, 8)),
        expected_output_shape=(6, 3),
        expected_num_trainable_weights=2,
        output_selector=lambda routing: routing["combine_weights"],
    )


def test_layer_contract_default_arguments_3d():
    run_layer_test(
        DSelectKRouter,
        dict(num_experts=4),
        tokens((2, 5, 8)),
        expected_output_shape=(2, 5, 4),
        expected_num_trainable_weights=4,
        output_selector=lambda routing: routing["probs"],
    )


@pytest.mark.parametrize("gamma", [1.0, 0.3, 4.0])
def test_smooth_step_matches_numpy(gamma):
    t = np.linspace(-gamma, gamma, 41).astype("float32")
    got = ops.convert_to_numpy(smooth_step(ops.convert_to_tensor(t), gamma))
    np.testing.assert_allclose(got, numpy_smooth_step(t, gamma), atol=1e-6)
    outside = np.abs(t) >= gamma / 2
    assert set(got[outside].tolist()) <= {0.0, 1.0}  # exact, not approximate
    np.testing.assert_allclose(
        ops.convert_to_numpy(smooth_step(ops.zeros((1,)), gamma)), [0.5], atol=1e-7
    )


@pytest.mark.parametrize("num_experts,k", [(8, 2), (5, 3), (6, 1), (2, 2)])
def test_gate_matches_numpy(num_experts, k):
    router = DSelectKRouter(num_experts, k=k, kernel_initializer="glorot_uniform")
    x = tokens((7, 5), seed=num_experts)
    routing = {key: ops.convert_to_numpy(v) for key, v in router(x).items()}
    r, alpha, w, entropy = numpy_gate(router, x)
    np.testing.assert_allclose(routing["selector_probs"], r, atol=1e-5)
    np.testing.assert_allclose(routing["selector_weights"], alpha, atol=1e-5)
    np.testing.assert_allclose(routing["probs"], w, atol=1e-5)
    np.testing.assert_allclose(routing["entropy_loss"], entropy, rtol=1e-4, atol=1e-5)
    alive = (r.sum(-1) > 0)  # (N, k): selectors not lost on codes >= E
    np.testing.assert_allclose(routing["probs"].sum(-1), (alpha * alive).sum(-1), atol=1e-5)
    index = np.argsort(-routing["probs"], axis=-1, kind="stable")[:, :k]
    np.testing.assert_array_equal(routing["expert_index"], index)
    assert routing["expert_index"].dtype == np.int32
    np.testing.assert_allclose(
        routing["combine_weights"], np.take_along_axis(routing["probs"], index, -1), atol=1e-7
    )


def test_saturated_codes_select_single_experts():
    """With every bit saturated, each selector is one-hot on the expert
    whose binary code the bits spell, and the gate has <= k non-zeros."""
    router = DSelectKRouter(8, k=2, gamma=1.0, use_bias=True)
    router.build((None, 3))
    router.code_kernel.assign(np.zeros((3, 6), "float32"))
    # Selector 0 bits (lsb first) 1,0,1 -> expert 5; selector 1: 0,1,0 -> 2.
    router.code_bias.assign(np.array([3, -3, 3, -3, 3, -3], "float32"))
    router.selector_kernel.assign(np.zeros((3, 2), "float32"))
    router.selector_bias.assign(np.array([np.log(3.0), 0.0], "float32"))
    routing = {key: ops.convert_to_numpy(v) for key, v in router(tokens((4, 3))).items()}
    expected = np.zeros((4, 8), "float32")
    expected[:, 5], expected[:, 2] = 0.75, 0.25
    np.testing.assert_allclose(routing["probs"], expected, atol=1e-6)
    assert (routing["probs"] > 0).sum(-1).max() == 2
    np.testing.assert_array_equal(routing["expert_index"], np.tile([5, 2], (4, 1)))
    assert float(routing["entropy_loss"]) == 0.0


def test_entropy_loss_added_in_training_only():
    router = DSelectKRouter(6, k=2, entropy_weight=0.5)
    x = tokens((5, 4))
    router(x)
    assert len(router.losses) == 0
    routing = router(x, training=True)
    assert len(router.losses) == 1
    entropy = float(ops.convert_to_numpy(routing["entropy_loss"]))
    assert entropy > 0
    np.testing.assert_allclose(ops.convert_to_numpy(router.losses[0]), 0.5 * entropy, rtol=1e-6)


class FixedExpertMixture(keras.layers.Layer):
    """`y = sum_e w_e(g) x A_e`: a gate on `g`, fixed linear experts on `x`."""

    def __init__(self, router, expert_kernels, **kwargs):
        super().__init__(**kwargs)
        self.router = router
        self.expert_kernels = expert_kernels

    def call(self, inputs, training=None):
        gate_inputs, x = inputs
        w = self.router(gate_inputs, training=training)["probs"]
        outputs = ops.einsum("nd,edo->neo", x, ops.convert_to_tensor(self.expert_kernels))
        return ops.einsum("ne,neo->no", w, outputs)


def test_trained_gate_is_exactly_k_sparse():
    """Toy problem: 8 fixed linear experts; the targets of group 0 come from
    expert 2, those of group 1 from expert 5, and the gate sees the group.
    After training, the gate of every example has at most k = 2 non-zero
    weights (exact zeros, thanks to the smooth step), on the right expert."""
    rng = np.random.default_rng(0)
    num_experts = 8
    kernels = rng.normal(size=(num_experts, 6, 3)).astype("float32")
    group = rng.integers(0, 2, size=(256,))
    gate_inputs = np.eye(2, dtype="float32")[group]
    x = rng.normal(size=(256, 6)).astype("float32")
    y = np.where(group[:, None] == 0, x @ kernels[2], x @ kernels[5]).astype("float32")
    router = DSelectKRouter(num_experts, k=2, entropy_weight=0.1, seed=0)
    g_in, x_in = keras.Input((2,)), keras.Input((6,))
    model = keras.Model([g_in, x_in], FixedExpertMixture(router, kernels)([g_in, x_in]))
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    history = model.fit([gate_inputs, x], y, batch_size=64, epochs=40, verbose=0)
    assert history.history["loss"][-1] < 1e-2 * history.history["loss"][0]
    w = ops.convert_to_numpy(router(gate_inputs)["probs"])
    nonzero = (w > 0).sum(-1)
    assert nonzero.min() >= 1 and nonzero.max() <= 2, np.bincount(nonzero)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(w.argmax(-1), np.where(group == 0, 2, 5))


def moe_model():
    inputs = keras.Input((6, 8))
    moe = SparseMoE(
        8, 16, router=DSelectKRouter(8, k=2, entropy_weight=0.01, seed=1), name="moe"
    )
    model = keras.Model(inputs, moe(inputs))
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    return model, moe


def test_sparse_moe_fits_and_saves(tmp_path):
    model, moe = moe_model()
    x = tokens((32, 6, 8), seed=2)
    history = model.fit(x, np.tanh(x), batch_size=8, epochs=3, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    path = os.path.join(str(tmp_path), "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6, rtol=0
    )
    assert isinstance(loaded.get_layer("moe").router, DSelectKRouter)


def test_float32_under_mixed_precision():
    keras.config.set_dtype_policy("mixed_bfloat16")
    router = DSelectKRouter(4, k=2)
    routing = router(np.ones((3, 8), "float32"))
    assert router.compute_dtype == "float32"
    assert keras.backend.standardize_dtype(routing["probs"].dtype) == "float32"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_experts=4, k=5), "k=5, num_experts=4"),
        (dict(num_experts=4, k=0), "k=0"),
        (dict(num_experts=0), "num_experts=0"),
        (dict(num_experts=4, gamma=0.0), "gamma=0.0"),
        (dict(num_experts=4, gamma=float("inf")), "gamma=inf"),
        (dict(num_experts=4, entropy_weight=-1.0), "entropy_weight=-1.0"),
        (dict(num_experts=4, seed=-2), "seed=-2"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DSelectKRouter(**kwargs)
