"""Top-k selection that exports from every backend."""

from keras import ops


def top_k(x, k):
    """The `k` largest entries of the last axis, largest first.

    Same result as `keras.ops.top_k(x, k)` (ties go to the lower index), made
    of `k` rounds of `argmax` and masking. Routers pick few experts (`k` is
    small), so this costs `k` cheap passes over `(..., E)`. It exists because
    JAX lowers `lax.top_k` to a StableHLO `composite` op that TensorFlow
    2.21 cannot deserialize, which breaks `model.export()` of a JAX model;
    `argmax` lowers to a plain reduction that every runtime reads.

    Args:
        x: `(..., E)` floating tensor.
        k: a Python int, `1 <= k <= E`.

    Returns:
        `(values, indices)`, each `(..., k)`; `indices` is int32.
    """
    num = ops.shape(x)[-1]
    lowest = ops.convert_to_tensor(float("-inf"), dtype=x.dtype)
    values, indices = [], []
    remaining = x
    for _ in range(k):
        index = ops.cast(ops.argmax(remaining, axis=-1), "int32")
        values.append(ops.take_along_axis(x, index[..., None], axis=-1))
        indices.append(index[..., None])
        if len(indices) < k:
            taken = ops.one_hot(index, num, dtype="bool")
            remaining = ops.where(taken, lowest, remaining)
    return ops.concatenate(values, axis=-1), ops.concatenate(indices, axis=-1)
