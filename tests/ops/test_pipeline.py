"""keras_moe.ops.pipeline: the routed pipeline every routed layer calls.
The layers' tests pin it end to end; these check its pieces directly: every
path of run_plan computes the same function, the token view and the
statistics."""

import keras
import numpy as np
import pytest

from keras_moe.layers import Experts, TopKRouter
from keras_moe.ops import pipeline, planning
from tests.conftest import to_numpy, tokens


def _routed(valid=None, n=10, e=4, k=2):
    x = tokens((n, 6))
    router = TopKRouter(e, k=k)
    routing, capacity = pipeline.route(
        router, x, e, k, None, valid=valid, training=False
    )
    bank = Experts(e, 5, output_dim=3)
    bank.build((e, None, 6))
    return x, routing, capacity, bank


@pytest.mark.parametrize("with_mask", [False, True])
def test_every_path_computes_the_same_function(with_mask):
    valid = np.array([True] * 7 + [False] * 3) if with_mask else None
    x, routing, capacity, bank = _routed(valid)
    weights = routing["combine_weights"]
    outputs = {}
    for path in ("dense", "capacity", "blocks", "grouped"):
        plan, selected = planning.plan_dispatch(
            routing, 4, capacity, valid=valid, path=path, block_size=2
        )
        outputs[path] = to_numpy(pipeline.run_plan(x, plan, weights, bank))
        stats = to_numpy(pipeline.routing_statistics(plan, selected))
        assert stats["dropped_fraction"] == 0.0  # dropless on every path
        np.testing.assert_allclose(stats["expert_load"].sum(), 1.0, atol=1e-6)
    rows = slice(None) if valid is None else valid
    for path in ("capacity", "blocks", "grouped"):
        np.testing.assert_allclose(
            outputs[path][rows], outputs["dense"][rows], atol=1e-5, err_msg=path
        )


def test_token_view_flattens_masks_and_restores():
    x = tokens((2, 3, 4))
    x[1, 2] = np.nan  # a masked token's NaN goes nowhere
    mask = np.array([[True, True, False], [True, True, False]])
    view = pipeline.token_view(x, mask, name="probe")
    assert tuple(view.tokens.shape) == (6, 4)
    np.testing.assert_array_equal(to_numpy(view.valid), mask.reshape(-1))
    assert np.isfinite(to_numpy(view.tokens)).all()
    restored = to_numpy(view.restore(view.tokens[:, :2] + 1.0))
    assert restored.shape == (2, 3, 2)
    np.testing.assert_array_equal(restored[:, 2], 0.0)
    with pytest.raises(ValueError, match="probe: the mask must have"):
        pipeline.token_view(x, mask[:, :2], name="probe")


def test_routing_statistics_count_kept_and_dropped_pairs():
    # 4 tokens, top-1, all to expert 0 with C = 2: half the pairs dropped.
    routing = {"expert_index": np.zeros((4, 1), "int32")}
    capacity = planning.choose_capacity(4, 2, 1, 1.0)
    plan, selected = planning.plan_dispatch(routing, 2, capacity)
    probs = keras.ops.convert_to_tensor(np.full((4, 2), 0.5, "float32"))
    stats = to_numpy(pipeline.routing_statistics(plan, selected, probs))
    np.testing.assert_allclose(stats["expert_load"], [1.0, 0.0])
    np.testing.assert_allclose(stats["dropped_fraction"], 0.5)
    np.testing.assert_allclose(stats["router_entropy"], np.log(2.0), rtol=1e-4)
