"""TopKRouter options of issue 34: DeepSeek-V3's group-limited routing
(`num_expert_groups`, `top_expert_groups`) against a NumPy reference, with
the selection bias and pruning; router jitter; `from_keras_hub` ports
Mixtral's jitter. The router contract, Keras's harness, masking, int8,
pruning and NaN isolation run on the rows `top2_group_limited_sigmoid_bias`
and `top2_jitter` of ROUTER_CASES (tests/conftest.py)."""

import warnings

import keras
import numpy as np
import pytest

from keras_moe import ops as moe_ops
from keras_moe.compression import prune_experts
from keras_moe.layers import SparseMoE, TopKRouter
from tests.conftest import to_numpy, tokens


def numpy_group_limited(scores, bias, num_groups, top_groups, k):
    """DeepSeek-V3's rule, one token at a time (modeling_deepseek_v3's
    `noaux_tc`, with `-inf` for the experts of dropped groups)."""
    n, e = scores.shape
    size = e // num_groups
    choice = scores + bias
    index = np.zeros((n, k), "int64")
    for t in range(n):
        groups = choice[t].reshape(num_groups, size)
        group_scores = np.sort(groups, axis=-1)[:, ::-1][:, : min(2, size)].sum(-1)
        kept = np.argsort(-group_scores, kind="stable")[:top_groups]
        masked = np.full(e, -np.inf)
        for g in kept:
            masked[g * size : (g + 1) * size] = choice[t, g * size : (g + 1) * size]
        index[t] = np.argsort(-masked, kind="stable")[:k]
    weights = np.take_along_axis(scores, index, axis=-1)
    return index, weights / weights.sum(-1, keepdims=True)


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_the_numpy_reference_with_the_selection_bias(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(12, 5)).astype("float32")
    router = TopKRouter(
        8, k=3, score_function="sigmoid", num_expert_groups=4,
        top_expert_groups=2, bias_update_rate=0.01,
        kernel_initializer="glorot_uniform",
    )
    router.build(x.shape)
    bias = rng.normal(size=(8,)).astype("float32") * 0.3
    router.selection_bias.assign(bias)
    routing = router(x)
    scores = 1 / (1 + np.exp(-(x @ to_numpy(router.kernel))))
    index, weights = numpy_group_limited(scores, bias, 4, 2, 3)
    np.testing.assert_array_equal(to_numpy(routing["expert_index"]), index)
    np.testing.assert_allclose(to_numpy(routing["combine_weights"]), weights, atol=1e-6)
    # Every chosen expert lies in at most 2 groups.
    groups = to_numpy(routing["expert_index"]) // 2
    assert max(len(set(row)) for row in groups.tolist()) <= 2


def test_one_group_kept_with_softmax_scores():
    scores = keras.ops.convert_to_tensor(
        np.array([[0.1, 0.5, 0.3, 0.2, 0.9, 0.0]], "float32")
    )
    limited = to_numpy(moe_ops.limit_to_top_groups(scores, 3, 1))
    # Group sums of the top two: 0.6, 0.5, 0.9 -> the third group only.
    np.testing.assert_array_equal(
        limited,
        np.array([[-np.inf, -np.inf, -np.inf, -np.inf, 0.9, 0.0]], "float32"),
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_expert_groups=3), "divide num_experts"),
        (dict(num_expert_groups=0), "num_expert_groups=0"),
        (dict(num_expert_groups=2, top_expert_groups=3), "top_expert_groups=3"),
        (dict(num_expert_groups=4, top_expert_groups=1, k=3), "k=3"),
        (dict(top_expert_groups=1), "needs num_expert_groups"),
        (dict(jitter_noise=1.0), "jitter_noise=1.0"),
        (dict(jitter_noise=-0.1), "jitter_noise=-0.1"),
    ],
)
def test_bad_group_and_jitter_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TopKRouter(8, **dict(dict(k=2), **kwargs))


def test_jitter_scales_the_router_input_in_training_only():
    x = tokens((50, 4))
    router = TopKRouter(4, k=2, jitter_noise=0.1, seed=1)
    router.build(x.shape)
    ratio = to_numpy(router.router_inputs(x, training=True)) / x
    assert 0.9 - 1e-6 <= ratio.min() < 0.95 and 1.05 < ratio.max() <= 1.1 + 1e-6
    np.testing.assert_array_equal(to_numpy(router.router_inputs(x)), x)
    plain = TopKRouter(4, k=2)
    plain.build(x.shape)
    plain.kernel.assign(to_numpy(router.kernel))
    np.testing.assert_allclose(
        to_numpy(router(x)["combine_weights"]), to_numpy(plain(x)["combine_weights"])
    )


def test_pruning_a_group_limited_router():
    moe = SparseMoE(8, 4, capacity_factor=None, name="moe",
                    router=TopKRouter(8, k=2, num_expert_groups=4, top_expert_groups=2))
    inputs = keras.Input((3, 5))
    model = keras.Model(inputs, moe(inputs))
    # One expert of each group: 4 groups of 1, top 2 groups, k = 2.
    router = prune_experts(model, {"moe": [0, 3, 4, 6]}).get_layer("moe").router
    assert (router.num_experts, router.num_expert_groups, router.top_expert_groups) == (4, 4, 2)
    # Two whole groups: 2 groups of 2.
    router = prune_experts(model, {"moe": [2, 3, 6, 7]}).get_layer("moe").router
    assert (router.num_expert_groups, router.top_expert_groups) == (2, 2)
    with pytest.raises(ValueError, match=r"kept per group \[2, 1, 0, 0\]"):
        prune_experts(model, {"moe": [0, 1, 2]})


def test_from_keras_hub_ports_mixtral_jitter():
    pytest.importorskip("keras_hub")
    from keras_hub.src.models.mixtral.mixtral_decoder import MixtralSparseMoeBlock

    from keras_moe.interop import from_keras_hub

    block = MixtralSparseMoeBlock(hidden_dim=8, intermediate_dim=8, num_experts=4,
                                  top_k=2, router_jitter_noise=0.05)
    block.build((None, None, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the old "not ported"
        moe = from_keras_hub(block)
    assert moe.router.jitter_noise == 0.05
    x = tokens((2, 3, 8))
    np.testing.assert_allclose(to_numpy(moe(x)), to_numpy(block(x)[0]), atol=1e-5)
