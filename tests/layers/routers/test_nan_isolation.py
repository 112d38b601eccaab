"""Issue 32, defect 1: one token's NaN or Inf stays in that token, on every
router family, with a capacity and dropless, in training and in inference.

`BalancedAssignmentRouter` standardised its affinities over the whole call
and solved one transport problem over all tokens, so one NaN feature made
every affinity NaN: TensorFlow raised in the dispatch plan's scatter
(`indices[11] = [-4]`), JAX and torch left most of the other tokens without
an expert (`expert_index = -1`, output 0). The other routers are here so
that a new router cannot bring that back. Every row of ROUTER_CASES (tests/conftest.py) runs it.
"""

import keras
import numpy as np
import pytest

from tests.conftest import NAN_ISOLATION, router_cases

E, N, D = 4, 12, 6
BAD = 5  # the token with one non-finite feature


@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("capacity_factor", [1.25, None], ids=["capacity", "dropless"])
@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("case", router_cases(NAN_ISOLATION))
def test_one_non_finite_token_stays_in_its_token(case, training, capacity_factor, value):
    moe = case.moe(E, 8, capacity_factor=capacity_factor,
                   eval_capacity_factor=capacity_factor)
    x = np.random.default_rng(0).normal(size=(N, D)).astype("float32")
    x[BAD, 2] = value
    kwargs = case.call_kwargs((N,))
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
