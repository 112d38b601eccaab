"""Small tensor helpers shared across packages."""

import numpy as np
from keras import ops


def concrete_values(x):
    """The NumPy value of `x` when it has one (eager), else `None` (traced
    by `tf.function` or `jax.jit`, or symbolic)."""
    try:
        return np.asarray(ops.convert_to_numpy(x))
    except Exception:  # a tracer or a graph tensor has no value yet
        return None


def flat_mask(mask):
    """A token mask of any shape (bool, or numeric: nonzero keeps) as one
    `(N,)` bool entry per token; `None` stays `None`.

    The one place a mask is normalised: the layers' `check.token_mask`, the
    routers and the balancing losses all read masks through it.
    """
    if mask is None:
        return None
    mask = ops.convert_to_tensor(mask)
    if mask.dtype != "bool":
        mask = ops.not_equal(mask, 0)
    return ops.reshape(mask, (-1,))


def softmax(x, axis=-1):
    """`ops.softmax(x, axis)`, also over an axis of size 1 without Keras'
    warning ("did you mean a sigmoid?"): one expert, one token or one slot
    is a legitimate case here (a router pruned to one expert, a sequence of
    one token). The result there is `exp(x - x)`: 1, NaN where `x` is not
    finite, gradient 0, as the softmax itself gives."""
    if x.shape[axis] == 1:
        return ops.exp(x - x)
    return ops.softmax(x, axis=axis)
