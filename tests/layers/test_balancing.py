"""Router options and balancing methods: formulas by hand, and that each
balancing method really evens the expert load on a skewed input."""

import math

import keras
import numpy as np
import pytest

from keras_moe import ops as moe_ops
from keras_moe.layers import SparseMoE, TopKRouter
from keras_moe.testing import run_layer_test


def to_np(x):
    return keras.ops.convert_to_numpy(x)


def test_cv_squared_by_hand():
    assert float(to_np(moe_ops.cv_squared(np.ones(4, "float32")))) == 0.0
    # mean 1, population variance 1.
    np.testing.assert_allclose(to_np(moe_ops.cv_squared(np.array([2.0, 0.0]))), 1.0, rtol=1e-6)


def test_noisy_top_k_load_matches_numpy():
    rng = np.random.default_rng(0)
    clean = rng.normal(size=(6, 4)).astype("float32")
    std = rng.uniform(0.5, 1.5, size=(6, 4)).astype("float32")
    noisy = (clean + std * rng.normal(size=(6, 4))).astype("float32")
    k = 2
    expected = np.zeros(4)
    for n in range(6):
        for e in range(4):
            others = np.delete(noisy[n], e)
            threshold = np.sort(others)[::-1][k - 1]  # k-th largest of the others
            z = (clean[n, e] - threshold) / std[n, e]
            expected[e] += 0.5 * (1 + math.erf(z / math.sqrt(2)))
    got = to_np(moe_ops.noisy_top_k_load(clean, noisy, std, k))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_sigmoid_scores_match_numpy():
    x = np.random.default_rng(1).normal(size=(7, 5)).astype("float32")
    router = TopKRouter(6, k=2, score_function="sigmoid", kernel_initializer="glorot_uniform")
    routing = router(x)
    s = 1 / (1 + np.exp(-(x @ to_np(router.kernel))))
    index = np.argsort(-s, axis=-1)[:, :2]
    top = np.take_along_axis(s, index, -1)
    np.testing.assert_array_equal(to_np(routing["expert_index"]), index)
    np.testing.assert_allclose(to_np(routing["combine_weights"]), top / top.sum(-1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(to_np(routing["probs"]), s / s.sum(-1, keepdims=True), atol=1e-6)


def test_importance_loss_by_hand():
    router = TopKRouter(4, k=1, importance_weight=1.0, kernel_initializer="glorot_uniform")
    x = np.random.default_rng(2).normal(size=(9, 3)).astype("float32")
    routing = router(x)
    index, weights = to_np(routing["expert_index"]), to_np(routing["combine_weights"])
    importance = np.zeros(4)
    np.add.at(importance, index[:, 0], weights[:, 0])
    expected = importance.var() / importance.mean() ** 2
    np.testing.assert_allclose(to_np(routing["importance_loss"]), expected, rtol=1e-5)


def test_router_options_layer_contract():
    run_layer_test(
        TopKRouter,
        dict(num_experts=4, k=2, score_function="sigmoid", noisy_gating=True,
             batch_prioritized=True, load_balance_weight=0.0, importance_weight=0.1,
             load_weight=0.1, z_loss_weight=0.01, bias_update_rate=0.05, seed=2),
        np.random.default_rng(3).normal(size=(8, 6)).astype("float32"),
        expected_output_shape=(8, 2),
        expected_num_trainable_weights=2,
        expected_num_non_trainable_weights=1,  # the selection bias
        output_selector=lambda routing: routing["combine_weights"],
    )


def test_load_loss_needs_noise():
    with pytest.raises(ValueError, match="load_weight=0.1"):
        TopKRouter(4, load_weight=0.1)
    with pytest.raises(ValueError, match="score_function='relu'"):
        TopKRouter(4, score_function="relu")


def test_batch_prioritized_keeps_the_most_confident_tokens():
    x = np.random.default_rng(4).normal(size=(64, 6)).astype("float32") + 1.0
    layer = SparseMoE(4, 8, router=TopKRouter(4, k=1, batch_prioritized=True),
                      eval_capacity_factor=0.5)
    _, routing = layer(x, return_routing=True)
    index, keep = to_np(routing["expert_index"])[:, 0], to_np(routing["keep"])[:, 0]
    score = to_np(routing["probs"]).max(-1)
    assert (~keep).any()
    for e in range(4):
        kept, dropped = score[(index == e) & keep], score[(index == e) & ~keep]
        if len(kept) and len(dropped):
            assert kept.min() >= dropped.max()


def test_selection_bias_moves_only_in_training_and_toward_balance():
    router = TopKRouter(4, k=1, bias_update_rate=0.1, load_balance_weight=0.0)
    x = np.random.default_rng(5).normal(size=(32, 3)).astype("float32") + 2.0
    router(x)
    assert np.all(to_np(router.selection_bias) == 0)
    index = to_np(router(x, training=True)["expert_index"])[:, 0]
    load = np.bincount(index, minlength=4) / 32
    expected = 0.1 * np.sign(load.mean() - load)
    np.testing.assert_allclose(to_np(router.selection_bias), expected, atol=1e-6)


def load_cv(layer, x):
    layer(x)
    load = layer.routing_stats()["expert_load"]
    return load.std() / load.mean()


def skewed_tokens(seed=0, n=512, d=8):
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=d)
    return (direction + 0.3 * rng.normal(size=(n, d))).astype("float32")


def train_and_measure(router, steps=60, x=None):
    """Load CV before/after `steps` training steps of a SparseMoE on skewed
    tokens whose task is easy (reconstruct the input), plus the layer."""
    x = skewed_tokens() if x is None else x
    inputs = keras.Input((8,))
    layer = SparseMoE(8, 16, router=router, capacity_factor=None, eval_capacity_factor=None)
    model = keras.Model(inputs, layer(inputs))
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    before = load_cv(layer, x)
    model.fit(x, x, batch_size=64, epochs=steps // 8, verbose=0)
    return before, load_cv(layer, x), layer


def test_balance_loss_halves_load_cv():
    before, after, _ = train_and_measure(
        TopKRouter(8, k=2, load_balance_weight=1.0, kernel_initializer="glorot_uniform"))
    assert after <= 0.5 * before, (before, after)


def test_aux_loss_free_bias_halves_load_cv():
    before, after, layer = train_and_measure(
        TopKRouter(8, k=2, load_balance_weight=0.0, bias_update_rate=0.02,
                   kernel_initializer="glorot_uniform"))
    assert after <= 0.5 * before, (before, after)
    assert np.abs(to_np(layer.router.selection_bias)).max() > 0


def test_z_loss_lowers_mean_abs_logit():
    # Centred tokens: the logits are x W, so only a smaller W lowers |logits|.
    x = np.random.default_rng(1).normal(size=(512, 8)).astype("float32")

    def mean_abs_logit(z_loss_weight):
        keras.utils.set_random_seed(7)
        router = TopKRouter(8, k=2, load_balance_weight=0.0, z_loss_weight=z_loss_weight,
                            kernel_initializer=keras.initializers.RandomNormal(stddev=0.5))
        _, _, layer = train_and_measure(router, steps=40, x=x)
        return np.abs(to_np(layer.router(x)["logits"])).mean()

    with_z, without = mean_abs_logit(0.1), mean_abs_logit(0.0)
    assert with_z < 0.75 * without, (with_z, without)
