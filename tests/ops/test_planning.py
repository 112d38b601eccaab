"""keras_moe.ops.planning: the capacity, path and plan rules that
SparseMoE, MultiGateMoE and MixtureOfExperts share (through
keras_moe.ops.pipeline). The layers' own tests pin its numerics end to end;
these check its rules directly."""

import numpy as np

from keras_moe.ops import dispatching, dropless, planning
from tests.conftest import to_numpy


def test_capacity_factor_follows_training():
    assert planning.capacity_factor_for(True, 1.25, None) == 1.25
    assert planning.capacity_factor_for(False, 1.25, None) is None
    assert planning.capacity_factor_for(None, 1.25, 2.0) == 2.0


def test_capacity_and_the_capacity_granted_to_valid_tokens():
    capacity = planning.choose_capacity(10, 4, 2, 1.0)
    assert capacity == planning.Capacity(1.0, 5, None)
    assert capacity.granted == 5
    valid = np.array([True] * 6 + [False] * 4)
    masked = planning.choose_capacity(
        10, 4, 2, 1.0, num_valid=planning.count_valid(valid)
    )
    assert masked.capacity == 5  # the buffers keep their size from N
    assert int(to_numpy(masked.granted)) == 3  # ceil(2 * 6 / 4)
    # Dropless: C = N, and no limit even with a mask.
    dropless_capacity = planning.choose_capacity(
        10, 4, 2, None, num_valid=planning.count_valid(valid)
    )
    assert dropless_capacity == planning.Capacity(None, 10, None)


class _Placing:
    assigns_positions = True


class _DuckTyped:  # no assigns_positions attribute at all
    k = 1


def test_only_routers_that_place_tokens_get_a_capacity():
    capacity = planning.Capacity(1.0, 4, None)
    assert planning.router_capacity(_Placing(), capacity) == 4
    assert planning.router_capacity(_DuckTyped(), capacity) is None
    assert not planning.assigns_positions(_DuckTyped())


def test_plan_dispatch_is_the_plan_of_the_ops():
    rng = np.random.default_rng(0)
    index = np.stack([rng.permutation(5)[:2] for _ in range(12)]).astype("int32")
    priority = rng.random(12).astype("float32")
    capacity = planning.choose_capacity(12, 5, 2, 0.75)
    plan, selected = planning.plan_dispatch(
        {"expert_index": index, "priority": priority}, 5, capacity
    )
    expected = dispatching.make_dispatch_plan(
        index, 5, capacity.capacity, priority=priority
    )
    assert selected is None
    for key in ("position", "keep", "slot"):
        np.testing.assert_array_equal(to_numpy(plan[key]), to_numpy(expected[key]))
    assert plan["path"] == "capacity"
    # Dropless blocks when asked for (and only then); single rows for the
    # grouped matmul.
    for path, block_size in (("blocks", 4), ("grouped", 1)):
        blocks, _ = planning.plan_dispatch(
            {"expert_index": index},
            5,
            planning.choose_capacity(12, 5, 2, None),
            path=path,
            block_size=4,
        )
        assert isinstance(blocks, dropless.BlockPlan) and blocks["capacity"] == 12
        assert blocks["path"] == path and blocks["block_size"] == block_size


class _Bank:
    def __init__(self, paths):
        self.dispatch_paths = paths


def test_choose_path_is_the_one_place_the_path_is_chosen(monkeypatch):
    float_bank = _Bank(("capacity", "grouped", "blocks"))
    int8_bank = _Bank(("capacity",))
    choose = planning.choose_path
    assert choose(None, dispatch="dense") == "dense"
    assert choose(1.25, dispatch="dense") == "dense"
    assert choose(1.25, [_DuckTyped()], float_bank) == "capacity"
    assert choose(None, [_Placing()], float_bank) == "capacity"
    assert choose(None, [_DuckTyped()], float_bank, sharded=True) == "capacity"
    assert choose(None, [_DuckTyped()], int8_bank) == "capacity"
    assert choose(None, [_DuckTyped()], lambda buffers: buffers) == "capacity"
    monkeypatch.setattr(planning.grouped, "grouped_kernel_available", lambda: False)
    assert choose(None, [_DuckTyped()], float_bank) == "blocks"
    monkeypatch.setattr(planning.grouped, "grouped_kernel_available", lambda: True)
    assert choose(None, [_DuckTyped()], float_bank) == "grouped"
    assert choose(None, [_DuckTyped()], _Bank(("capacity", "blocks"))) == "blocks"
    assert choose(1.0, [_DuckTyped()], float_bank) == "capacity"


def test_token_order_places_earlier_tokens_first():
    # Token 0 picks experts (1, 0), token 1 picks (0, 1); expert 0 has one
    # row. Choice-major (GShard): token 1's first choice wins expert 0.
    # Token-major (causal): token 0's second choice, placed first, wins.
    index = np.array([[1, 0], [0, 1]], "int32")
    capacity = planning.choose_capacity(2, 2, 2, 0.5)  # C = 1
    assert capacity.capacity == 1
    keep = {}
    for order in ("choice", "token"):
        plan, _ = planning.plan_dispatch(
            {"expert_index": index}, 2, capacity, order=order
        )
        keep[order] = to_numpy(plan["keep"])
    np.testing.assert_array_equal(keep["choice"], [[True, False], [True, False]])
    np.testing.assert_array_equal(keep["token"], [[True, True], [False, False]])


def test_masked_tokens_are_not_selected():
    index = np.array([[0, 1], [1, 2], [2, 0]], "int32")
    valid = np.array([True, False, True])
    _, selected = planning.plan_dispatch(
        {"expert_index": index},
        3,
        planning.choose_capacity(3, 3, 2, 1.0, planning.count_valid(valid)),
        valid=valid,
    )
    np.testing.assert_array_equal(
        to_numpy(selected), [[True, True], [False, False], [True, True]]
    )


def test_task_routings_of_one_width_share_one_capacity_token_major():
    # Two tasks, 4 tokens, 1 choice each, all to expert 0: C = ceil(8 / 2 *
    # 0.5) = 2 rows of expert 0 go to the first two pseudo-tokens, i.e.
    # token 0 of both tasks (token-major: no task is favoured).
    routing = {
        "expert_index": np.zeros((4, 1), "int32"),
        "combine_weights": np.ones((4, 1), "float32"),
    }
    plan, selected, weights = planning.plan_task_dispatch(
        [routing, routing], [1, 1], 2, 4, 0.5, path="capacity"
    )
    assert selected is None and tuple(weights.shape) == (8, 1)
    keep = to_numpy(plan["keep"])[:, 0]
    np.testing.assert_array_equal(keep, [1, 1, 0, 0, 0, 0, 0, 0])
    real = planning.pseudo_token_plan(plan, 4, 2)
    assert to_numpy(real["slot_token"]).max() <= 4  # N marks an empty row
