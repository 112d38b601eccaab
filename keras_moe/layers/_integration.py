"""How a `MixtureOfExperts` integrates the outputs of its experts: a
weighted sum, a max, or attention over the chosen experts' outputs."""

import math

from keras import ops


def integrate(layer, flat, gathered, weights, keep):
    """Mixes `(B, S, O)` expert outputs with `(B, S)` gate weights, by
    `layer.integration`; returns `(mixed, attention weights or None)`."""
    dtype = gathered.dtype
    kept_weights = ops.where(keep, weights, 0.0)
    if layer.integration == "weighted_sum":
        return ops.einsum(
            "ns,nso->no", ops.cast(kept_weights, dtype), gathered
        ), None
    if layer.integration == "max":
        values = ops.cast(kept_weights, dtype)[..., None] * gathered
        # Dropped pairs get a value below every kept one (finite, no
        # gradient); an example with no kept pair outputs zeros.
        floor = ops.stop_gradient(ops.min(values, axis=1, keepdims=True) - 1.0)
        values = ops.where(keep[..., None], values, floor)
        mixed = ops.max(values, axis=1)
        any_kept = ops.any(keep, axis=1)[:, None]
        return ops.where(any_kept, mixed, ops.zeros_like(mixed)), None
    if layer.attention_query is None:  # k = 1: alpha = 1
        attention = ops.cast(kept_weights, "float32")
        mixed = ops.einsum("ns,nso->no", ops.cast(attention, dtype), gathered)
        return mixed, attention
    query = layer.attention_query(flat)  # (B, a)
    keys = layer.attention_key(gathered)  # (B, S, a)
    scores = ops.einsum("na,nsa->ns", query, keys) / math.sqrt(layer.attention_dim)
    scores = ops.cast(scores, "float32") + ops.log(
        ops.maximum(ops.cast(weights, "float32"), 1e-9)
    )
    scores = ops.where(keep, scores, -1e9)
    alpha = ops.softmax(scores, axis=-1)
    mass = ops.sum(kept_weights, axis=-1, keepdims=True)
    attention = alpha * mass
    mixed = ops.einsum("ns,nso->no", ops.cast(attention, dtype), gathered)
    return mixed, attention
