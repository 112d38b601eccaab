"""keras_moe.upcycling.upcycle: an MoE whose experts start as copies of a
trained FFN computes what the FFN computes (Komatsuzaki et al. 2022)."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_moe.layers import SparseMoE, TopKRouter
from keras_moe.upcycling import upcycle

D, H = 6, 10


def ffn(out=D, use_bias=(True, True), activation="gelu"):
    first = keras.layers.Dense(H, activation=activation, use_bias=use_bias[0])
    second = keras.layers.Dense(out, use_bias=use_bias[1])
    first.build((None, D))
    second.build((None, H))
    rng = np.random.default_rng(0)
    for variable in first.weights + second.weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    return first, second


def tokens(seed=1):
    return np.random.default_rng(seed).normal(size=(3, 4, D)).astype("float32")


@pytest.mark.parametrize(
    "k,out,use_bias",
    [(1, D, (True, False)), (3, 5, (False, False))],
)
def test_upcycled_layer_equals_the_ffn(k, out, use_bias):
    first, second = ffn(out, use_bias)
    moe = upcycle((first, second), num_experts=4, k=k)
    assert isinstance(moe, SparseMoE) and moe.k == k
    assert moe.capacity_factor is None and moe.eval_capacity_factor is None
    x = tokens()
    expected = ops.convert_to_numpy(second(first(x)))
    for training in (False, True):
        got = ops.convert_to_numpy(moe(x, training=training))
        np.testing.assert_allclose(got, expected, atol=1e-6 * max(1, np.abs(expected).max()), rtol=0)
    # The experts are copies, and the router really spreads the tokens.
    kernel = ops.convert_to_numpy(moe.experts.kernel_in)
    assert all(np.array_equal(kernel[e], kernel[0]) for e in range(4))
    assert (moe.routing_stats()["expert_load"] > 0).sum() > 1


def test_upcycle_a_keras_hub_transformer_encoder():
    keras_hub = pytest.importorskip("keras_hub", reason="keras-hub is a test-only extra")
    encoder = keras_hub.layers.TransformerEncoder(intermediate_dim=H, num_heads=2)
    encoder.build((None, 4, D))
    moe = upcycle(encoder, num_experts=3, k=2)
    x = tokens(2)
    expected = encoder._feedforward_output_dense(encoder._feedforward_intermediate_dense(x))
    np.testing.assert_allclose(
        ops.convert_to_numpy(moe(x)), ops.convert_to_numpy(expected), atol=1e-6
    )
    assert moe.get_config()["activation"] == "relu"  # the encoder's default


def test_bad_arguments():
    first, second = ffn()
    with pytest.raises(ValueError, match="two Dense layers"):
        upcycle(first, 4)
    with pytest.raises(ValueError, match="k=5, num_experts=4"):
        upcycle((first, second), 4, k=5)
    nonlinear = keras.layers.Dense(D, activation="relu")
    nonlinear.build((None, H))
    with pytest.raises(ValueError, match="must be linear"):
        upcycle((first, nonlinear), 4)
    with pytest.raises(ValueError, match="not built"):
        upcycle((keras.layers.Dense(H), second), 4)
    # Another router is taken as given.
    moe = upcycle((first, second), 4, k=1, router=TopKRouter(4, k=1, renormalize="always"))
    assert moe.k == 1


def test_activations_docstring_examples():
    # (upcycle's own example is the first test above at other shapes: on
    # JAX each new shape costs seconds of compilation.)
    import doctest

    from keras_moe import activations

    result = doctest.testmod(activations, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
