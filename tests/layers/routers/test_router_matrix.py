"""Every router, through SparseMoE: mixed precision and XLA-compiled fit,
and the same routing contract."""

import keras
import numpy as np
import pytest

from keras_moe.layers import SparseMoE, TopKRouter
from keras_moe.layers.routers.balanced_assignment import BalancedAssignmentRouter
from keras_moe.layers.routers.dselect_k import DSelectKRouter
from keras_moe.layers.routers.expert_choice import ExpertChoiceRouter
from keras_moe.layers.routers.hash_router import HashRouter
from keras_moe.layers.routers.task_router import TaskRouter
from tests.conftest import xla_only

E = 4
ROUTERS = {
    "top2": (lambda: TopKRouter(E, k=2), False),
    "top1-prioritized-sigmoid-bias": (
        lambda: TopKRouter(E, k=1, batch_prioritized=True, score_function="sigmoid",
                           bias_update_rate=0.01, noisy_gating=True, load_weight=0.1), False),
    "expert_choice": (lambda: ExpertChoiceRouter(E, k=2, z_loss_weight=1e-3), False),
    "balanced_assignment": (lambda: BalancedAssignmentRouter(E), False),
    "dselect_k": (lambda: DSelectKRouter(E, k=2), False),
    "hash": (lambda: HashRouter(E, k=2, vocab_size=16), True),
    "task": (lambda: TaskRouter(E, num_tasks=3, k=2), True),
}


def model_for(name):
    factory, needs_ids = ROUTERS[name]
    x_in = keras.Input((5, 6))
    moe = SparseMoE(E, 8, router=factory())
    if needs_ids:
        ids_in = keras.Input((5,), dtype="int32")
        y = moe(x_in, routing_inputs=ids_in)
        inputs = [x_in, ids_in]
    else:
        y = moe(x_in)
        inputs = x_in
    outputs = keras.layers.Dense(6, dtype="float32")(y)
    return keras.Model(inputs, outputs), needs_ids


def data(needs_ids, n=16):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 5, 6)).astype("float32")
    ids = rng.integers(0, 3, size=(n, 5)).astype("int32")
    return ([x, ids] if needs_ids else x), x


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_mixed_bfloat16_fit(name):
    keras.config.set_dtype_policy("mixed_bfloat16")
    model, needs_ids = model_for(name)
    model.compile(optimizer="adam", loss="mse")
    x, y = data(needs_ids)
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    moe = next(l for l in model.layers if isinstance(l, SparseMoE))
    assert moe.experts.compute_dtype == "bfloat16"
    assert np.isfinite(moe.routing_stats()["expert_load"]).all()


@xla_only
@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_jit_compiled_fit(name):
    """XLA-compiled training lowers the loss, and the compiled predict step
    equals an eager call on the same weights, batch by batch (expert choice
    and balanced assignment route within a batch)."""
    model, needs_ids = model_for(name)
    model.compile(optimizer="adam", loss="mse", jit_compile=True)
    x, y = data(needs_ids)
    history = model.fit(x, y, batch_size=8, epochs=3, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0], losses
    compiled = model.predict(x, batch_size=8, verbose=0)
    starts = range(0, len(y), 8)
    batches = [[a[i:i + 8] for a in x] if needs_ids else x[i:i + 8] for i in starts]
    eager = np.concatenate([keras.ops.convert_to_numpy(model(b)) for b in batches])
    np.testing.assert_allclose(compiled, eager, atol=1e-5)
