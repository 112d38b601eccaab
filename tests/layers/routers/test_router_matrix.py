"""Every router (`ROUTER_CASES` in tests/conftest.py), through SparseMoE:
mixed precision and XLA-compiled fit."""

import keras
import numpy as np
import pytest

from keras_moe.layers import SparseMoE
from tests.conftest import MIXED_BFLOAT16, XLA, router_cases, xla_only

E = 4


def model_for(case):
    inputs, y = case.model(case.moe(E, 8), (5, 6))
    outputs = keras.layers.Dense(6, dtype="float32")(y)
    return keras.Model(inputs, outputs)


def data(case, n=16):
    x = np.random.default_rng(0).normal(size=(n, 5, 6)).astype("float32")
    return case.data(x), x


@pytest.mark.parametrize("case", router_cases(MIXED_BFLOAT16))
def test_mixed_bfloat16_fit(case):
    keras.config.set_dtype_policy("mixed_bfloat16")
    model = model_for(case)
    model.compile(optimizer="adam", loss="mse")
    x, y = data(case)
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    moe = next(l for l in model.layers if isinstance(l, SparseMoE))
    assert moe.experts.compute_dtype == "bfloat16"
    assert np.isfinite(moe.routing_stats()["expert_load"]).all()


@xla_only
@pytest.mark.parametrize("case", router_cases(XLA))
def test_jit_compiled_fit(case):
    """XLA-compiled training lowers the loss, and the compiled predict step
    equals an eager call on the same weights, batch by batch (expert choice
    and balanced assignment route within a batch)."""
    model = model_for(case)
    model.compile(optimizer="adam", loss="mse", jit_compile=True)
    x, y = data(case)
    history = model.fit(x, y, batch_size=8, epochs=3, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0], losses
    compiled = model.predict(x, batch_size=8, verbose=0)
    starts = range(0, len(y), 8)
    batches = [keras.tree.map_structure(lambda a: a[i:i + 8], x) for i in starts]
    eager = np.concatenate([keras.ops.convert_to_numpy(model(b)) for b in batches])
    np.testing.assert_allclose(compiled, eager, atol=1e-5)
