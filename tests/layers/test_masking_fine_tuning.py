"""The masking property (tests/layers/test_masking.py) for the random
training options of issue 34: router jitter and expert dropout (with LoRA
banks). LoRA banks and group-limited routing are rows of the case tables in
tests/conftest.py, which tests/layers/test_masking.py runs.

In inference, appending padding changes no real token's output, loss or
statistic. In training, jitter and dropout draw random numbers, so the
padded call is compared with an identical layer (same seeds, same weights)
on the same padded shape whose padding holds other values (NaN, Inf):
what the padding holds reaches no real token, and padded positions output
zeros.
"""

import keras
import numpy as np
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from keras_moe.layers import MultiGateMoE, SparseMoE, TopKRouter
from keras_moe.layers.expert_bank import expert_banks

D = 6

FAMILIES = {
    "jitter_capacity": lambda: SparseMoE(
        4, 8, k=2, capacity_factor=0.75, eval_capacity_factor=0.75,
        router=TopKRouter(4, k=2, jitter_noise=0.2, z_loss_weight=0.1),
    ),
    "expert_dropout_dropless": lambda: SparseMoE(
        4, 8, k=2, capacity_factor=None, expert_dropout=0.3, z_loss_weight=0.1
    ),
    "mmoe_lora_dropout": lambda: MultiGateMoE(
        2, 4, 8, k=2, capacity_factor=0.75, eval_capacity_factor=0.75,
        lora_rank=2, expert_dropout=0.3,
    ),
}


def _make(family, seed):
    """The layer, built, with random LoRA factors (B = 0 would hide them);
    the same `seed` gives the same layer, weights and random streams."""
    keras.utils.set_random_seed(seed)
    layer = FAMILIES[family]()
    layer.build((None, None, D))
    rng = np.random.default_rng(seed)
    for bank in expert_banks(layer):
        if bank.lora_enabled:
            for v in (bank.lora_kernel_a, bank.lora_kernel_b):
                v.assign(rng.normal(size=v.shape).astype("float32") * 0.3)
    return layer


def _call(layer, x, training, mask=None):
    kwargs = {} if mask is None else {"mask": mask}
    outputs = keras.tree.flatten(layer(x, training=training, **kwargs))
    outputs = [np.asarray(keras.ops.convert_to_numpy(y)) for y in outputs]
    stats = {
        k: np.asarray(v, "float64")
        for k, v in layer.routing_stats().items()
        if k != "task_names"
    }
    losses = [float(keras.ops.convert_to_numpy(loss)) for loss in layer.losses]
    return outputs, stats, losses


def _padding(rng, batch, pad, poison):
    values = rng.normal(size=(batch, pad, D)).astype("float32") * 10
    if poison is not None:
        values[rng.integers(batch), rng.integers(pad)] = poison
    return values


def _assert_same(a, b, length=None):
    outputs, stats, losses = a
    other_outputs, other_stats, other_losses = b
    for y, z in zip(outputs, other_outputs):
        if length is None:
            np.testing.assert_allclose(y, z, atol=1e-6, rtol=0)
        else:
            np.testing.assert_allclose(y[:, :length], z, atol=1e-6, rtol=0)
    for name in stats:
        np.testing.assert_allclose(stats[name], other_stats[name], atol=1e-6,
                                   err_msg=name)
    np.testing.assert_allclose(losses, other_losses, atol=1e-6)


@pytest.mark.parametrize("family", sorted(FAMILIES))
# No shrinking: each example builds one or two layers (seconds on JAX).
@settings(max_examples=2, deadline=None, phases=[Phase.explicit, Phase.generate])
@given(
    batch=st.integers(1, 3),
    length=st.integers(1, 5),
    pad=st.integers(1, 3),
    poison=st.sampled_from([np.nan, np.inf, 1e6]),
    seed=st.integers(0, 2**16),
)
def test_padding_reaches_no_real_token(family, batch, length, pad, poison, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, length, D)).astype("float32")
    mask = np.concatenate(
        [np.ones((batch, length), bool), np.zeros((batch, pad), bool)], axis=1
    )
    padded = np.concatenate([x, _padding(rng, batch, pad, poison)], axis=1)
    # Inference: the padded call equals the unpadded one on the real tokens.
    layer = _make(family, seed)
    plain = _call(layer, x, False)
    masked = _call(layer, padded, False, mask)
    _assert_same(masked, plain, length)
    for y in masked[0]:
        np.testing.assert_array_equal(y[:, length:], 0.0)
    # Training (random jitter and dropout): two identical layers on padded
    # batches that differ only in their padding compute the same thing.
    other = np.concatenate([x, _padding(rng, batch, pad, None)], axis=1)
    first = _call(_make(family, seed), padded, True, mask)
    second = _call(_make(family, seed), other, True, mask)
    _assert_same(first, second)
    for y in first[0]:
        assert np.all(np.isfinite(y))
        np.testing.assert_array_equal(y[:, length:], 0.0)
