import keras
import numpy as np
import pytest

from keras_moe.layers import Experts
from keras_moe.testing import run_layer_test
from tests.conftest import numpy_experts


@pytest.mark.parametrize("gated", [False, True])
def test_layer_contract(gated):
    x = np.random.default_rng(0).normal(size=(4, 6, 8)).astype("float32")
    run_layer_test(
        Experts,
        dict(
            num_experts=4,
            hidden_dim=12,
            output_dim=5,
            activation="relu",
            gated=gated,
            use_bias=True,
            kernel_initializer="he_normal",
            bias_initializer="ones",
            kernel_regularizer="l2",
            bias_regularizer="l1",
        ),
        x,
        expected_output_shape=(4, 6, 5),
        expected_num_trainable_weights=6 if gated else 4,
    )


@pytest.mark.parametrize("gated,use_bias", [(False, True), (True, False), (True, True)])
def test_matches_numpy_loop(gated, use_bias):
    x = np.random.default_rng(1).normal(size=(3, 7, 5)).astype("float32")
    layer = Experts(
        3, 9, activation="silu", gated=gated, use_bias=use_bias, bias_initializer="random_normal"
    )
    y = keras.ops.convert_to_numpy(layer(x))
    np.testing.assert_allclose(y, numpy_experts(layer, x), atol=1e-5, rtol=1e-5)
    assert y.shape == (3, 7, 5)


def test_experts_differ_and_have_dense_layer_variance():
    layer = Experts(16, 256)
    layer.build((16, None, 64))
    w = keras.ops.convert_to_numpy(layer.kernel_in)
    # Glorot uniform for one (64 -> 256) expert: var = 2 / (64 + 256).
    np.testing.assert_allclose(w.var(), 2 / (64 + 256), rtol=0.05)
    assert not np.allclose(w[0], w[1])


def test_regularizers_add_losses():
    layer = Experts(2, 4, kernel_regularizer="l2")
    layer(np.ones((2, 3, 5), "float32"))
    assert len(layer.losses) == 2


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_experts=0, hidden_dim=4), "num_experts=0"),
        (dict(num_experts=2, hidden_dim=-1), "hidden_dim=-1"),
        (dict(num_experts=2.5, hidden_dim=4), "num_experts=2.5"),
        (dict(num_experts=2, hidden_dim=4, output_dim=0), "output_dim=0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Experts(**kwargs)


def test_bad_inputs():
    with pytest.raises(ValueError, match="rank-3"):
        Experts(2, 4)(np.ones((2, 5), "float32"))
    with pytest.raises(ValueError, match="num_experts=2"):
        Experts(2, 4)(np.ones((3, 5, 6), "float32"))


# ------------------------------------------- issue 23: options of real models


def test_layer_contract_with_the_clamped_glu_and_output_scale():
    x = np.random.default_rng(0).normal(size=(3, 4, 5)).astype("float32")
    run_layer_test(
        Experts,
        dict(
            num_experts=3,
            hidden_dim=6,
            activation="quick_gelu",
            gated=True,
            glu_limit=0.5,
            glu_linear_offset=1.0,
            output_scale=True,
        ),
        x,
        expected_output_shape=(3, 4, 5),
        expected_num_trainable_weights=7,  # 3 kernels, 3 biases, the scale
    )


def test_clamped_glu_and_output_scale_match_numpy_on_buffers_and_blocks():
    # A small limit so that the clamp cuts both branches; the dropless
    # block path (call_blocks) must compute the same function as call.
    x = np.random.default_rng(1).normal(size=(3, 4, 5)).astype("float32")
    layer = Experts(
        3, 6, activation="gelu_approximate", gated=True, glu_limit=0.3,
        glu_linear_offset=1.0, output_scale=True, bias_initializer="random_normal",
    )
    layer.build(x.shape)
    layer.expert_scale.assign(np.array([0.5, 2.0, -1.0], "float32"))
    expected = numpy_experts(layer, x)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), expected, atol=1e-5)
    rows = layer.call_blocks(x.reshape(12, 5), np.array([0, 1, 2], "int32"), 4)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(rows).reshape(3, 4, -1), expected, atol=1e-5
    )


def test_named_activations():
    from keras_moe import activations

    x = np.linspace(-3, 3, 7).astype("float32")
    for name, expected in (
        ("gelu_approximate", keras.activations.gelu(x, approximate=True)),
        ("quick_gelu", x / (1 + np.exp(-1.702 * x))),
    ):
        layer = Experts(2, 3, activation=name)
        assert layer.get_config()["activation"] == name
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(layer.activation(x)),
            keras.ops.convert_to_numpy(expected),
            atol=1e-6,
        )
        assert activations.get(name) is layer.activation
    assert Experts(2, 3, activation="gelu").get_config()["activation"] == "gelu"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(gated=True, glu_limit=0), "glu_limit=0"),
        (dict(gated=True, glu_limit=float("inf")), "glu_limit=inf"),
        (dict(glu_limit=7.0), "gated=True"),
        (dict(glu_linear_offset=1.0), "gated=True"),
        (dict(gated=True, glu_linear_offset=float("nan")), "glu_linear_offset=nan"),
    ],
)
def test_bad_glu_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Experts(2, 4, **kwargs)
