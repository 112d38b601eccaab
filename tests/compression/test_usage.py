"""Expert usage over a dataset, and the bytes of a model's weights
(keras_moe.compression.usage)."""

import keras
import numpy as np
import pytest

from keras_moe import compression
from keras_moe.compression import expert_usage
from keras_moe.layers import Experts, SparseMoE
from tests.conftest import moe_model, to_numpy, zeros


def test_expert_usage_counts_every_batch():
    rng = np.random.default_rng(0)
    x = rng.random((40, 4, 8)).astype("float32")  # batches of 16, 16 and 8
    model = moe_model(zeros(SparseMoE, 6, 8, k=2, eval_capacity_factor=None, name="moe"))
    usage = expert_usage(model, x, batch_size=16)
    # Reference: the router's choices for all 160 tokens at once.
    routing = model.get_layer("moe").router(x.reshape(-1, 8))
    counts = np.bincount(to_numpy(routing["expert_index"]).ravel(), minlength=6)
    np.testing.assert_allclose(usage["moe"], counts / counts.sum(), atol=1e-6)
    # A generator of (x, y) batches gives the same; steps limits it.
    batches = ((x[i : i + 16], None) for i in range(0, 40, 16))
    np.testing.assert_allclose(expert_usage(model, batches)["moe"], usage["moe"])
    first = expert_usage(model, x, batch_size=16, steps=1)["moe"]
    index = to_numpy(model.get_layer("moe").router(x[:16].reshape(-1, 8))["expert_index"])
    np.testing.assert_allclose(first, np.bincount(index.ravel(), minlength=6) / 128)
    with pytest.raises(ValueError, match="no MoE layer"):
        expert_usage(moe_model(keras.layers.Dense(3)), x)


def test_weight_bytes_counts_the_banks():
    bank = zeros(Experts, 2, 8)
    bank.build((2, None, 4))
    expected = 4 * (2 * 4 * 8 + 2 * 8 + 2 * 8 * 4 + 2 * 4)
    model = moe_model(zeros(SparseMoE, 2, 8, name="moe"), shape=(3, 4))
    assert compression.weight_bytes(bank) == expected
    assert compression.weight_bytes(model, experts_only=True) == expected
    assert compression.weight_bytes(model) > expected  # + router + statistics
