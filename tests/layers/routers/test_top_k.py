import keras
import numpy as np
import pytest

from keras_moe import ops as moe_ops
from keras_moe.layers import TopKRouter
from keras_moe.testing import run_layer_test


def numpy_softmax(x):
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def test_layer_contract():
    x = np.random.default_rng(0).normal(size=(6, 8)).astype("float32")
    run_layer_test(
        TopKRouter,
        dict(
            num_experts=5,
            k=3,
            noisy_gating=True,
            renormalize=False,
            use_bias=True,
            load_balance_weight=0.1,
            z_loss_weight=0.001,
            kernel_initializer="he_uniform",
            kernel_regularizer="l2",
            seed=7,
        ),
        x,
        expected_output_shape=(6, 3),
        expected_num_trainable_weights=3,
        output_selector=lambda routing: routing["combine_weights"],
    )


@pytest.mark.parametrize(
    "k,renormalize", [(1, True), (2, True), (3, False), (1, "always"), (2, "always")]
)
def test_matches_numpy(k, renormalize):
    x = np.random.default_rng(1).normal(size=(2, 5, 6)).astype("float32")
    router = TopKRouter(4, k=k, renormalize=renormalize, kernel_initializer="glorot_uniform")
    routing = router(x)
    kernel = keras.ops.convert_to_numpy(router.kernel)
    logits = x @ kernel
    probs = numpy_softmax(logits)
    index = np.argsort(-probs, axis=-1)[..., :k]
    weights = np.take_along_axis(probs, index, axis=-1)
    if renormalize == "always" or (renormalize and k > 1):
        weights = weights / weights.sum(-1, keepdims=True)
    got = {key: keras.ops.convert_to_numpy(v) for key, v in routing.items()}
    np.testing.assert_array_equal(got["expert_index"], index)
    np.testing.assert_allclose(got["combine_weights"], weights, atol=1e-6)
    np.testing.assert_allclose(got["probs"], probs, atol=1e-6)
    assert got["expert_index"].dtype == np.int32


def test_renormalize_always_round_trips_and_bad_values_raise():
    router = TopKRouter(4, k=1, renormalize="always")
    assert TopKRouter.from_config(router.get_config()).renormalize == "always"
    with pytest.raises(ValueError, match="renormalize=.yes."):
        TopKRouter(4, k=1, renormalize="yes")


def test_load_balancing_loss_by_hand():
    # 4 tokens, 2 experts, top-1: 3 tokens to expert 0, 1 to expert 1.
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]], "float32")
    index = np.array([[0], [0], [0], [1]], "int32")
    # f = (0.75, 0.25), P = (0.65, 0.35): L = 2 * (0.75*0.65 + 0.25*0.35) = 1.15
    loss = moe_ops.load_balancing_loss(probs, index, 2)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loss), 1.15, rtol=1e-6)
    # Uniform routing gives exactly 1.
    uniform = moe_ops.load_balancing_loss(
        np.full((4, 4), 0.25, "float32"), np.array([[0, 1], [2, 3], [0, 2], [1, 3]]), 4
    )
    np.testing.assert_allclose(keras.ops.convert_to_numpy(uniform), 1.0, rtol=1e-6)


def test_router_z_loss_by_hand():
    logits = np.array([[0.0, 0.0], [np.log(3.0), 0.0]], "float32")
    # logsumexp = log 2 and log 4: mean of squares.
    expected = (np.log(2.0) ** 2 + np.log(4.0) ** 2) / 2
    got = keras.ops.convert_to_numpy(moe_ops.router_z_loss(logits))
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_losses_added_only_in_training():
    x = np.random.default_rng(2).normal(size=(8, 4)).astype("float32")
    router = TopKRouter(4, k=2, load_balance_weight=0.5, z_loss_weight=0.25)
    routing = router(x, training=False)
    assert len(router.losses) == 0
    routing = router(x, training=True)
    balance = keras.ops.convert_to_numpy(routing["load_balance_loss"])
    z = keras.ops.convert_to_numpy(routing["z_loss"])
    got = sorted(float(keras.ops.convert_to_numpy(v)) for v in router.losses)
    np.testing.assert_allclose(got, sorted([0.5 * balance, 0.25 * z]), rtol=1e-6)


def test_noise_only_in_training():
    x = np.random.default_rng(3).normal(size=(64, 4)).astype("float32")
    router = TopKRouter(4, k=1, noisy_gating=True, seed=1)
    a = keras.ops.convert_to_numpy(router(x)["logits"])
    b = keras.ops.convert_to_numpy(router(x)["logits"])
    np.testing.assert_array_equal(a, b)
    c = keras.ops.convert_to_numpy(router(x, training=True)["logits"])
    assert not np.allclose(a, c)


def test_float32_under_mixed_precision():
    keras.config.set_dtype_policy("mixed_bfloat16")
    router = TopKRouter(4, k=2)
    routing = router(np.ones((3, 8), "float32"))
    assert router.compute_dtype == "float32"
    assert keras.backend.standardize_dtype(routing["probs"].dtype) == "float32"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_experts=4, k=0), "k=0"),
        (dict(num_experts=4, k=5), "k=5, num_experts=4"),
        (dict(num_experts=0), "num_experts=0"),
        (dict(num_experts=4, load_balance_weight=-1.0), "load_balance_weight=-1.0"),
        (dict(num_experts=4, z_loss_weight=float("nan")), "z_loss_weight=nan"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TopKRouter(**kwargs)


def test_rank1_input():
    with pytest.raises(ValueError, match="rank >= 2"):
        TopKRouter(4)(np.ones((8,), "float32"))


@pytest.mark.parametrize("k", [2, 4])
def test_nan_and_inf_tokens_get_distinct_experts(k):
    """Issue 22: a NaN token was routed to one expert twice
    (`expert_index=[0, 0]`), taking two of its slots."""
    x = np.random.default_rng(4).normal(size=(5, 6)).astype("float32")
    x[1] = np.nan
    x[3, 0] = np.inf
    x[4, 2] = -np.inf
    router = TopKRouter(4, k=k)
    index = keras.ops.convert_to_numpy(router(x)["expert_index"])
    for row in index:
        assert len(set(row.tolist())) == k, index
    # The finite tokens' routing is their own.
    clean = keras.ops.convert_to_numpy(router(x[[0, 2]])["expert_index"])
    np.testing.assert_array_equal(index[[0, 2]], clean)


# ------------------------------------------- issue 23: Gemma 4's router input


def test_layer_contract_with_input_norm_and_scale():
    x = np.random.default_rng(0).normal(size=(6, 8)).astype("float32")
    run_layer_test(
        TopKRouter,
        dict(
            num_experts=5,
            k=2,
            input_norm="rms",
            input_norm_epsilon=1e-3,
            input_multiplier=0.25,
            learned_input_scale=True,
        ),
        x,
        expected_output_shape=(6, 2),
        expected_num_trainable_weights=2,  # kernel, input_scale
        output_selector=lambda routing: routing["combine_weights"],
    )


def test_input_norm_and_scale_match_numpy():
    x = np.random.default_rng(1).normal(size=(2, 5, 6)).astype("float32") * 3
    router = TopKRouter(
        4, k=2, input_norm="rms", input_norm_epsilon=1e-2, input_multiplier=6**-0.5,
        learned_input_scale=True, kernel_initializer="glorot_uniform",
    )
    router.build(x.shape)
    scale = np.random.default_rng(2).normal(size=(6,)).astype("float32")
    router.input_scale.assign(scale)
    normed = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-2) * 6**-0.5 * scale
    logits = normed @ keras.ops.convert_to_numpy(router.kernel)
    got = keras.ops.convert_to_numpy(router(x)["logits"])
    np.testing.assert_allclose(got, logits, atol=1e-5)
    # The defaults leave the input alone.
    plain = TopKRouter(4, k=2)
    plain.build(x.shape)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(plain(x)["logits"]),
        x @ keras.ops.convert_to_numpy(plain.kernel),
        atol=1e-5,
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(input_norm="layer"), "input_norm='layer'"),
        (dict(input_norm_epsilon=0.0), "input_norm_epsilon=0.0"),
        (dict(input_multiplier=float("inf")), "input_multiplier=inf"),
    ],
)
def test_bad_input_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TopKRouter(4, **kwargs)
