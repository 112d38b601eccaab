"""Keras masking: padding is invisible to every routed layer.

Appending masked tokens (padding) to a sequence changes no real token's
output or gradient, no auxiliary loss and no routing statistic, whatever the
padding holds (NaN included); padded positions output zeros; the mask
propagates through `Embedding(mask_zero=True)` models.
"""

import keras
import numpy as np
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from keras_moe.layers import (
    CGC,
    PLE,
    BalancedAssignmentRouter,
    DSelectKRouter,
    ExpertChoiceRouter,
    MultiGateMoE,
    SoftMoE,
    SparseMoE,
    TopKRouter,
)
from tests.conftest import input_gradients

D = 6

# Every routed layer family, with a finite capacity (where padding could take
# room from real tokens) and dropless.
FAMILIES = {
    "topk_capacity": lambda: SparseMoE(
        4, 8, k=2, capacity_factor=0.75, eval_capacity_factor=0.75,
        router=TopKRouter(4, k=2, z_loss_weight=0.1, importance_weight=0.1),
    ),
    "topk_dropless_shared": lambda: SparseMoE(
        4, 8, k=2, capacity_factor=None, num_shared_experts=1, z_loss_weight=0.1
    ),
    "prioritized": lambda: SparseMoE(
        4, 8, capacity_factor=1.0, eval_capacity_factor=1.0,
        router=TopKRouter(4, k=1, batch_prioritized=True),
    ),
    "expert_choice": lambda: SparseMoE(
        4, 8, capacity_factor=1.0, eval_capacity_factor=1.0,
        router=ExpertChoiceRouter(4, k=2, z_loss_weight=0.1),
    ),
    "balanced_assignment": lambda: SparseMoE(
        4, 8, capacity_factor=1.0, eval_capacity_factor=1.0,
        router=BalancedAssignmentRouter(4),
    ),
    "mmoe_sparse_capacity": lambda: MultiGateMoE(
        2, 4, 8, k=2, capacity_factor=0.75, eval_capacity_factor=0.75
    ),
    "mmoe_mixed_routers": lambda: MultiGateMoE(
        2, 4, 8, capacity_factor=1.0, eval_capacity_factor=1.0,
        routers=[DSelectKRouter(4, k=2, entropy_weight=0.1), ExpertChoiceRouter(4)],
    ),
    "mmoe_dense": lambda: MultiGateMoE(2, 4, 8),
    "cgc_shared_output": lambda: CGC(2, 1, 2, 8, shared_output=True, k=2),
    "ple": lambda: PLE(2, num_levels=2, hidden_dim=8),
    "soft_moe": lambda: SoftMoE(4, 8, slots_per_expert=2),
}


def _numpy(tree):
    return [np.asarray(keras.ops.convert_to_numpy(t)) for t in keras.tree.flatten(tree)]


def _call(layer, x, training, mask=None):
    """Outputs (a list), routing statistics and the layer's losses."""
    kwargs = {} if mask is None else {"mask": mask}
    outputs = layer(x, training=training, **kwargs)
    stats = {
        name: np.asarray(value, dtype="float64")
        for name, value in layer.routing_stats().items()
        # PLE: the last level's statistics are at the top level too.
        if name not in ("task_names", "levels")
    }
    losses = [float(keras.ops.convert_to_numpy(loss)) for loss in layer.losses]
    return _numpy(outputs), stats, losses


def _padded(rng, batch, length, pad, poison):
    """Real tokens `x`, `x` with `pad` padding tokens appended (one set to
    `poison`), and the mask of the padded batch."""
    x = rng.normal(size=(batch, length, D)).astype("float32")
    padding = rng.normal(size=(batch, pad, D)).astype("float32") * 10
    if poison is not None:
        padding[rng.integers(batch), rng.integers(pad)] = poison
    mask = np.concatenate(
        [np.ones((batch, length), bool), np.zeros((batch, pad), bool)], axis=1
    )
    return x, np.concatenate([x, padding], axis=1), mask


@pytest.mark.parametrize("family", sorted(FAMILIES))
# No shrinking: each example builds a layer (a second or two on JAX).
@settings(max_examples=3, deadline=None, phases=[Phase.explicit, Phase.generate])
@given(
    batch=st.integers(1, 3),
    length=st.integers(1, 6),
    pad=st.integers(1, 4),
    training=st.booleans(),
    poison=st.sampled_from([None, np.nan, np.inf, 1e6]),
    seed=st.integers(0, 2**16),
)
def test_padding_changes_no_real_token(
    family, batch, length, pad, training, poison, seed
):
    rng = np.random.default_rng(seed)
    keras.utils.set_random_seed(seed)
    layer = FAMILIES[family]()
    x, padded, mask = _padded(rng, batch, length, pad, poison)
    outputs, stats, losses = _call(layer, x, training)
    padded_outputs, padded_stats, padded_losses = _call(layer, padded, training, mask)
    for y, y_padded in zip(outputs, padded_outputs):
        np.testing.assert_allclose(y_padded[:, :length], y, atol=1e-6, rtol=0)
        np.testing.assert_array_equal(y_padded[:, length:], 0.0)
    for name, value in stats.items():
        np.testing.assert_allclose(padded_stats[name], value, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(padded_losses, losses, atol=1e-6)


@pytest.mark.parametrize(
    "family",
    ["topk_capacity", "topk_dropless_shared", "expert_choice",
     "mmoe_mixed_routers", "mmoe_dense", "soft_moe"],
)
def test_padding_changes_no_real_gradient(family):
    """The gradients of the real tokens and of every weight (a task loss
    plus the layer's auxiliary losses) are those without the padding; the
    padding (here NaN) gets a zero gradient."""
    rng = np.random.default_rng(3)
    layer = FAMILIES[family]()
    x, padded, mask = _padded(rng, 2, 4, 3, np.nan)
    g, w = input_gradients(layer, x, range(2), training=True, weights=True)
    g_padded, w_padded = input_gradients(
        layer, padded, range(2), training=True, mask=mask, weights=True
    )
    np.testing.assert_allclose(g_padded[:, :4], g, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(g_padded[:, 4:], 0.0)
    for a, b in zip(w_padded, w):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def _pooled_model(moe):
    """Token ids -> Embedding(mask_zero) -> MoE -> masked mean pool -> Dense."""
    ids = keras.Input((None,), dtype="int32")
    x = keras.layers.Embedding(20, D, mask_zero=True)(ids)
    y = moe(x)
    if isinstance(y, list):
        y = keras.layers.Concatenate()(y)
    pooled = keras.layers.GlobalAveragePooling1D()(y)
    return keras.Model(ids, keras.layers.Dense(3)(pooled))


@pytest.mark.parametrize(
    "make",
    [
        lambda: SparseMoE(4, 8, k=2, capacity_factor=0.75, eval_capacity_factor=0.75),
        lambda: SoftMoE(4, 8),
        lambda: MultiGateMoE(2, 4, 8, k=1, eval_capacity_factor=1.0),
        lambda: PLE(2, num_levels=2, hidden_dim=8),
    ],
    ids=["sparse_moe", "soft_moe", "multi_gate_moe", "ple"],
)
def test_embedding_mask_reaches_the_layer_and_propagates(make):
    """The reproduction of the report: with `Embedding(mask_zero=True)`,
    padded and unpadded token ids give the same pooled prediction (0.014
    apart before masking), and the model trains."""
    moe = make()
    model = _pooled_model(moe)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 20, size=(4, 5)).astype("int32")
    padded = np.concatenate([ids, np.zeros((4, 3), "int32")], axis=1)
    expected = model.predict(ids, verbose=0)
    np.testing.assert_allclose(model.predict(padded, verbose=0), expected, atol=1e-6)
    # The mask propagates: the layer's output carries it.
    embedded = model.layers[1](keras.ops.convert_to_tensor(padded))
    out = moe(embedded)
    out = out[0] if isinstance(out, list) else out
    masks = moe.compute_mask(embedded, padded != 0)
    for mask in masks if isinstance(masks, list) else [masks]:
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(mask), padded != 0)
    assert tuple(out.shape[:2]) == padded.shape
    model.compile(optimizer="adam", loss="mse")
    history = model.fit(padded, rng.normal(size=(4, 3)), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


@pytest.mark.parametrize(
    "layer",
    [SparseMoE(2, 4), SoftMoE(2, 4), MultiGateMoE(2, 2, 4), CGC(2, 1, 1, 4)],
    ids=["sparse_moe", "soft_moe", "multi_gate_moe", "cgc"],
)
def test_a_mask_of_the_wrong_shape_is_a_clear_error(layer):
    x = np.ones((2, 3, 4), "float32")
    with pytest.raises(ValueError, match="mask"):
        layer(x, mask=np.ones((2, 4), bool))


def test_sequence_with_no_real_token_outputs_zeros():
    """Every token masked: zeros and finite statistics, no NaN."""
    for layer in (SparseMoE(2, 4, eval_capacity_factor=1.0), SoftMoE(2, 4)):
        y = keras.ops.convert_to_numpy(
            layer(np.ones((2, 3, 4), "float32"), mask=np.zeros((2, 3), bool))
        )
        np.testing.assert_array_equal(y, 0.0)
        for value in layer.routing_stats().values():
            assert np.all(np.isfinite(value))
