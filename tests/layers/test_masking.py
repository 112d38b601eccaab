"""Keras masking: padding is invisible to every routed layer.

Appending masked tokens (padding) to a sequence changes no real token's
output or gradient, no auxiliary loss and no routing statistic, whatever the
padding holds (NaN included); padded positions output zeros; the mask
propagates through `Embedding(mask_zero=True)` models. On every router and
layer family of the case tables in tests/conftest.py.
"""

import keras
import numpy as np
import pytest
from hypothesis import Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from tests.conftest import (
    MASKING,
    SESSION_SEED,
    RouterCase,
    input_gradients,
    layer_cases,
    router_cases,
)

D = 6

# Every router (in a SparseMoE with a finite capacity, where padding could
# take room from real tokens) and every layer family (tests/conftest.py).
CASES = router_cases(MASKING) + layer_cases(MASKING)


def _gradient_cases(params):
    return [p for p in params if p.values[0].mask_gradients]


def _layer(case):
    if isinstance(case, RouterCase):
        return case.moe(capacity_factor=0.75, eval_capacity_factor=0.75)
    return case.make()


def _numpy(tree):
    return [np.asarray(keras.ops.convert_to_numpy(t)) for t in keras.tree.flatten(tree)]


def _stats(layer):
    return {
        name: np.asarray(value, dtype="float64")
        for name, value in layer.routing_stats().items()
        # PLE: the last level's statistics are at the top level too.
        if name not in ("task_names", "levels")
    }


def _call(layer, x, training, mask=None, ids=None):
    """Outputs (a list), routing statistics and the layer's losses."""
    kwargs = {} if mask is None else {"mask": mask}
    if ids is not None:
        kwargs["routing_inputs"] = ids
    outputs = layer(x, training=training, **kwargs)
    losses = [float(keras.ops.convert_to_numpy(loss)) for loss in layer.losses]
    return _numpy(outputs), _stats(layer), losses


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


def _padded_ids(case, rng, batch, length, pad):
    """The routing ids of the real tokens and of the padded batch (None for
    a layer that routes on the tokens)."""
    if case.routing_ids is None:
        return None, None
    ids = np.asarray(case.routing_ids(rng, (batch, length + pad)), "int32")
    return ids[:, :length], ids


@pytest.mark.parametrize("case", CASES)
# No shrinking: each example builds a layer (a second or two on JAX).
@settings(max_examples=3, deadline=None, phases=[Phase.explicit, Phase.generate])
@hypothesis_seed(SESSION_SEED)  # every row draws the same examples (conftest)
@given(
    batch=st.integers(1, 3),
    length=st.integers(1, 6),
    pad=st.integers(1, 4),
    training=st.booleans(),
    poison=st.sampled_from([None, np.nan, np.inf, 1e6]),
    seed=st.integers(0, 2**16),
)
def test_padding_changes_no_real_token(case, batch, length, pad, training, poison, seed):
    rng = np.random.default_rng(seed)
    keras.utils.set_random_seed(seed)
    layer = _layer(case)
    x, padded, mask = _padded(rng, batch, length, pad, poison)
    ids, padded_ids = _padded_ids(case, rng, batch, length, pad)
    # Both calls start from the same state, and a state updated in training
    # (e.g. an aux-loss-free selection bias) is updated the same by both.
    layer.build(x.shape)
    state = _numpy(layer.variables)
    outputs, stats, losses = _call(layer, x, training, ids=ids)
    updated = _numpy(layer.variables)
    for variable, value in zip(layer.variables, state):
        variable.assign(value)
    padded_outputs, padded_stats, padded_losses = _call(
        layer, padded, training, mask, ids=padded_ids
    )
    for a, b in zip(_numpy(layer.variables), updated):
        np.testing.assert_allclose(a, b, atol=1e-6, err_msg="a variable")
    for y, y_padded in zip(outputs, padded_outputs):
        np.testing.assert_allclose(y_padded[:, :length], y, atol=1e-6, rtol=0)
        np.testing.assert_array_equal(y_padded[:, length:], 0.0)
    for name, value in stats.items():
        np.testing.assert_allclose(padded_stats[name], value, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(padded_losses, losses, atol=1e-6)


@pytest.mark.parametrize("case", _gradient_cases(CASES))
def test_padding_changes_no_real_gradient(case):
    """The gradients of the real tokens and of every weight (a task loss
    plus the layer's auxiliary losses) are those without the padding; the
    padding (here NaN) gets a zero gradient. On the rows that ask for it
    (`mask_gradients`): one per path."""
    rng = np.random.default_rng(3)
    layer = _layer(case)
    x, padded, mask = _padded(rng, 2, 4, 3, np.nan)
    ids, padded_ids = _padded_ids(case, rng, 2, 4, 3)
    g, w = input_gradients(
        layer, x, range(2), training=True, weights=True, routing_inputs=ids
    )
    g_padded, w_padded = input_gradients(
        layer, padded, range(2), training=True, mask=mask, weights=True,
        routing_inputs=padded_ids,
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


# The family-level checks run on one configuration per layer family (its
# first masked row in LAYER_FAMILIES; SparseMoE's has a finite capacity).
FAMILIES = layer_cases(MASKING, one_per_family=True)


@pytest.mark.parametrize("case", FAMILIES)
def test_embedding_mask_reaches_the_layer_and_propagates(case):
    """The reproduction of the report: with `Embedding(mask_zero=True)`,
    padded and unpadded token ids give the same pooled prediction (0.014
    apart before masking), and the model trains."""
    moe = case.make()
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


@pytest.mark.parametrize("case", FAMILIES)
def test_a_mask_of_the_wrong_shape_is_a_clear_error(case):
    x = np.ones((2, 3, 4), "float32")
    with pytest.raises(ValueError, match="mask"):
        case.make()(x, mask=np.ones((2, 4), bool))


@pytest.mark.parametrize("case", FAMILIES)
def test_sequence_with_no_real_token_outputs_zeros(case):
    """Every token masked: zeros and finite statistics, no NaN."""
    layer = case.make()
    outputs = layer(np.ones((2, 3, 4), "float32"), mask=np.zeros((2, 3), bool))
    for y in _numpy(outputs):
        np.testing.assert_array_equal(y, 0.0)
    for value in _stats(layer).values():
        assert np.all(np.isfinite(value))
