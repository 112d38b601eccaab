"""Per-group (e.g. per-modality) routing statistics and balancing losses:
`keras_moe.ops.group_load_balancing_loss`, `entropy_losses`,
`group_expert_load`, and `SparseMoE(num_groups=...)`."""

import keras
import numpy as np
import pytest

from keras_moe import ops as moe_ops
from keras_moe.layers import ExpertChoiceRouter, SparseMoE
from keras_moe.testing import run_layer_test
from tests.conftest import tokens


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _routing(rng, n, e, k):
    probs = rng.dirichlet(np.ones(e), size=n).astype("float32")
    index = np.argsort(-probs, axis=1)[:, :k].astype("int32")
    return probs, index


def test_one_group_is_the_switch_loss_and_groups_are_balanced_separately():
    rng = np.random.default_rng(0)
    probs, index = _routing(rng, 12, 4, 2)
    one = moe_ops.group_load_balancing_loss(probs, index, 4, np.zeros(12, "int32"), 1)
    switch = moe_ops.load_balancing_loss(probs, index, 4)
    np.testing.assert_allclose(_np(one), _np(switch), rtol=1e-6)

    # Globally balanced, but each group on one expert: the Switch loss sees
    # nothing wrong, the per-group loss does (E = 2: 1 is uniform, 2 worst).
    probs = np.array([[0.9, 0.1]] * 4 + [[0.1, 0.9]] * 4, "float32")
    index = np.array([[0]] * 4 + [[1]] * 4, "int32")
    groups = np.array([0] * 4 + [1] * 4, "int32")
    np.testing.assert_allclose(_np(moe_ops.load_balancing_loss(probs, index, 2)), 1.0)
    per_group = moe_ops.group_load_balancing_loss(probs, index, 2, groups, 2)
    np.testing.assert_allclose(_np(per_group), 2 * 0.9, rtol=1e-6)


def test_group_statistics_against_numpy_with_a_mask_and_an_absent_group():
    rng = np.random.default_rng(1)
    probs, index = _routing(rng, 10, 3, 2)
    groups = rng.integers(0, 2, 10).astype("int32")  # group 2 never appears
    mask = rng.random(10) > 0.3
    load = _np(moe_ops.group_expert_load(index, 3, groups, 3, mask=mask))
    for g in range(3):
        rows = index[(groups == g) & mask].reshape(-1)
        expected = np.bincount(rows, minlength=3) / max(rows.size, 1)
        np.testing.assert_allclose(load[g], expected, atol=1e-6)
    # The loss is the mean over the groups present, of the per-group loss.
    expected = []
    for g in (0, 1):
        rows = (groups == g) & mask
        f = np.bincount(index[rows].reshape(-1), minlength=3) / (2 * rows.sum())
        expected.append(3 * np.sum(f * probs[rows].mean(0)))
    got = moe_ops.group_load_balancing_loss(probs, index, 3, groups, 3, mask=mask)
    np.testing.assert_allclose(_np(got), np.mean(expected), rtol=1e-5)


def test_entropy_losses_against_numpy():
    rng = np.random.default_rng(2)
    probs, _ = _routing(rng, 8, 4, 1)
    groups = np.array([0, 0, 0, 1, 1, 1, 1, 1], "int32")
    entropy = lambda p: -np.sum(p * np.log(p + 1e-9), axis=-1)  # noqa: E731
    local, global_ = moe_ops.entropy_losses(probs, groups, 2)
    np.testing.assert_allclose(_np(local), entropy(probs).mean(), rtol=1e-5)
    means = [probs[groups == g].mean(0) for g in (0, 1)]
    np.testing.assert_allclose(
        _np(global_), np.mean([-entropy(m) for m in means]), rtol=1e-5
    )
    tau = float(np.log(4))  # above every entropy: max(0, tau - H) > 0
    _, thresholded = moe_ops.entropy_losses(probs, groups, 2, threshold=tau)
    np.testing.assert_allclose(
        _np(thresholded), np.mean([tau - entropy(m) for m in means]), rtol=1e-5
    )
    _, off = moe_ops.entropy_losses(probs, groups, 2, threshold=0.0)
    assert float(_np(off)) == 0.0


def test_sparse_moe_with_groups_layer_contract():
    run_layer_test(
        SparseMoE,
        dict(
            num_experts=4, hidden_dim=8, k=2, num_groups=2,
            group_names=["image", "audio"], group_balance_weight=0.05,
            local_entropy_weight=0.01, global_entropy_weight=0.02,
            global_entropy_threshold=0.5,
        ),
        tokens((2, 6, 8)),
        expected_output_shape=(2, 6, 8),
    )


@pytest.mark.parametrize("router", [None, "expert_choice"])
def test_sparse_moe_group_statistics_and_losses(router):
    kwargs = {} if router is None else {"router": ExpertChoiceRouter(4, k=2)}
    moe = SparseMoE(4, 8, num_groups=2, group_balance_weight=0.1,
                    local_entropy_weight=0.01, **kwargs)
    x = tokens((2, 6, 5))
    groups = np.array([0, 0, 0, 1, 1, 1])[None].repeat(2, 0)
    mask = np.ones((2, 6), bool)
    mask[:, -1] = False  # padding is in no group's statistic
    _, routing = moe(
        x, groups=groups, mask=mask, training=True, return_routing=True
    )
    # Switch (top-k only), per-group balance and local entropy losses.
    assert len(moe.losses) == (2 if router else 3)
    assert all(np.isfinite(float(_np(loss))) for loss in moe.losses)
    stats = moe.routing_stats()
    assert stats["group_names"] == ["group_0", "group_1"]
    load = stats["group_expert_load"]
    np.testing.assert_allclose(load, _np(routing["group_expert_load"]))
    np.testing.assert_allclose(load.sum(axis=1), 1.0, rtol=1e-6)
    # Per example ids broadcast over the tokens.
    moe(x, groups=np.array([1, 1]))
    np.testing.assert_array_equal(moe.routing_stats()["group_expert_load"][0], 0.0)


def test_group_arguments_are_checked():
    with pytest.raises(ValueError, match="num_groups"):
        SparseMoE(2, 4, group_balance_weight=0.1)
    with pytest.raises(ValueError, match="group_names"):
        SparseMoE(2, 4, num_groups=2, group_names=["a"])
    with pytest.raises(ValueError, match="num_groups"):
        SparseMoE(2, 4)(tokens((2, 4)), groups=np.zeros(2, "int32"))


def test_routing_monitor_records_and_plots_the_group_expert_table(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib")
    from keras_moe.callbacks import RoutingMonitor

    x_in = keras.Input((6, 5))
    g_in = keras.Input((6,), dtype="int32")
    moe = SparseMoE(4, 8, num_groups=2, group_names=["image", "audio"], name="moe")
    model = keras.Model([x_in, g_in], moe(x_in, groups=g_in))
    model.compile(optimizer="sgd", loss="mse")
    groups = np.array([[0, 0, 0, 1, 1, 1]] * 8, "int32")
    monitor = RoutingMonitor(plot_dir=str(tmp_path), log_scalars=False)
    model.fit([tokens((8, 6, 5)), groups], tokens((8, 6, 5), seed=1),
              epochs=2, batch_size=4, verbose=0, callbacks=[monitor])
    record = monitor.history["moe"]
    assert record["group_expert_load"].shape == (2, 2, 4)
    assert record["group_names"] == ["image", "audio"]
    np.testing.assert_allclose(record["group_expert_load"].sum(-1), 1.0, rtol=1e-6)
    assert (tmp_path / "moe_group_expert.png").exists()
