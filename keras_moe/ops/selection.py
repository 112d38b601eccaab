"""Top-k selection that exports from every backend."""

from keras import ops


def top_k(x, k):
    """The `k` largest entries of the last axis, largest first.

    Same result as `keras.ops.top_k(x, k)` (ties go to the lower index), made
    of `k` rounds of `max`, `argmax` and masking. Routers pick few experts (`k` is
    small), so this costs `k` cheap passes over `(..., E)`. It exists because
    JAX lowers `lax.top_k` to a StableHLO `composite` op that TensorFlow
    2.21 cannot deserialize, which breaks `model.export()` of a JAX model;
    `argmax` lowers to a plain reduction that every runtime reads.

    NaN entries rank as `-inf` (below every number), and the `k` indices of
    a row are always distinct, whatever its values: a row of NaN or `-inf`
    gets its first `k` positions. (Compared as they are, a NaN row
    would make every round pick position 0 again, and the token would take
    two slots of one expert.) The values are read from `x` unchanged, NaN
    included.

    Args:
        x: `(..., E)` floating tensor.
        k: a Python int, `1 <= k <= E`.

    Returns:
        `(values, indices)`, each `(..., k)`; `indices` is int32.
    """
    num = ops.shape(x)[-1]
    lowest = ops.convert_to_tensor(float("-inf"), dtype=x.dtype)
    values, indices = [], []
    remaining = ops.where(ops.isnan(x), lowest, x)
    available = ops.ones_like(remaining, dtype="bool")
    for _ in range(k):
        # The first available position holding the maximum: an argmax of an
        # integer mask, because Keras' argmax of floats adds a negative-zero
        # test (Bitcast ops that ONNX converters reject) on TensorFlow and
        # JAX. A taken position holds -inf, so it is tested out by
        # `available` when the rest of the row is -inf too. `initial` lets
        # the max reduce an empty batch (Keras raises on an empty input).
        top = ops.max(remaining, axis=-1, keepdims=True, initial=float("-inf"))
        is_top = ops.logical_and(available, remaining == top)
        index = ops.cast(ops.argmax(ops.cast(is_top, "int32"), axis=-1), "int32")
        # The value through a gather, so that its gradient goes to the chosen
        # entry alone (a max would share it among ties).
        values.append(ops.take_along_axis(x, index[..., None], axis=-1))
        indices.append(index[..., None])
        if len(indices) < k:
            taken = ops.one_hot(index, num, dtype="bool")
            available = ops.logical_and(available, ops.logical_not(taken))
            remaining = ops.where(taken, lowest, remaining)
    return ops.concatenate(values, axis=-1), ops.concatenate(indices, axis=-1)


def top_k_routing(probs, k):
    """Token-choice routing on router probabilities `(..., E)`: the top-`k`
    experts `I` and their weights `w_j = p_{I_j} / sum_{i in I} p_i`
    (renormalised for `k > 1`; for `k = 1` the raw probability, so that the
    task loss trains the router, as in Switch).

    The one top-k routing rule of the package: `Router.top_k_routing` and
    `MixtureOfExperts` call it.

    Returns:
        `(combine_weights, expert_index)`, each `(..., k)`.
    """
    weights, expert_index = top_k(probs, k)
    if k > 1:
        weights = weights / ops.sum(weights, axis=-1, keepdims=True)
    return weights, expert_index
