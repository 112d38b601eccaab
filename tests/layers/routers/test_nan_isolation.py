"""Issue 32, defect 1: one token's NaN or Inf stays in that token, on every
router family, with a capacity and dropless, in training and in inference.

`BalancedAssignmentRouter` standardised its affinities over the whole call
and solved one transport problem over all tokens, so one NaN feature made
every affinity NaN: TensorFlow raised in the dispatch plan's scatter
(`indices[11] = [-4]`), JAX and torch left most of the other tokens without
an expert (`expert_index = -1`, output 0). The other routers are here so
that a new router cannot bring that back. (The lead will fold the router
list into the ROUTER_CASES table of tests/conftest.py.)
"""

import keras
import numpy as np
import pytest

from keras_moe.layers import SparseMoE, TopKRouter
from keras_moe.layers.routers.balanced_assignment import BalancedAssignmentRouter
from keras_moe.layers.routers.dselect_k import DSelectKRouter
from keras_moe.layers.routers.expert_choice import ExpertChoiceRouter
from keras_moe.layers.routers.hash_router import HashRouter
from keras_moe.layers.routers.task_router import TaskRouter

E, N, D = 4, 12, 6
BAD = 5  # the token with one non-finite feature

# name: (router factory, takes routing_inputs ids)
ROUTERS = {
    "top2": (lambda: TopKRouter(E, k=2), False),
    "top1-prioritized-sigmoid-noisy": (
        lambda: TopKRouter(E, k=1, batch_prioritized=True, score_function="sigmoid",
                           bias_update_rate=0.01, noisy_gating=True, load_weight=0.1,
                           seed=0),
        False,
    ),
    "expert_choice": (lambda: ExpertChoiceRouter(E, k=2), False),
    "balanced_assignment": (lambda: BalancedAssignmentRouter(E), False),
    "dselect_k": (lambda: DSelectKRouter(E, k=2), False),
    "hash": (lambda: HashRouter(E, k=2, vocab_size=16), True),
    "task": (lambda: TaskRouter(E, num_tasks=3, k=2), True),
}


@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("capacity_factor", [1.25, None], ids=["capacity", "dropless"])
@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_one_non_finite_token_stays_in_its_token(name, training, capacity_factor, value):
    factory, needs_ids = ROUTERS[name]
    moe = SparseMoE(E, 8, router=factory(), capacity_factor=capacity_factor,
                    eval_capacity_factor=capacity_factor)
    x = np.random.default_rng(0).normal(size=(N, D)).astype("float32")
    x[BAD, 2] = value
    kwargs = {"routing_inputs": np.arange(N, dtype="int32") % 3} if needs_ids else {}
    y, routing = moe(x, training=training, return_routing=True, **kwargs)
    y = keras.ops.convert_to_numpy(y)
    others = np.arange(N) != BAD
    assert np.all(np.isfinite(y[others])), y
    index = keras.ops.convert_to_numpy(routing["expert_index"])[others]
    assert np.all((index >= 0) & (index < E)), index
    # Every other token still reaches an expert: none of them lost its
    # routing to the bad token (dropless keeps every pair; with the
    # capacity, at most what the capacity drops).
    keep = keras.ops.convert_to_numpy(routing["keep"])[others]
    assert np.any(keep, axis=-1).mean() >= (1.0 if capacity_factor is None else 0.5)
    assert np.all(np.isfinite(moe.routing_stats()["expert_load"]))
