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
