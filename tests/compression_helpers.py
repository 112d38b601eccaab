"""Shared helpers of the compression tests.

On JAX every random initializer compiles once per variable shape (about a
second per MoE layer on 2 cores); these tests build their layers with
`"zeros"` initializers and then draw the weights with NumPy.
"""

import keras
import numpy as np

ZEROS = "zeros"


def randomize(model, seed=0, scale=0.5):
    """Assigns NumPy normal values, `scale / sqrt(fan_in)`, to every float
    trainable variable of `model` (a layer or model); returns `model`."""
    rng = np.random.default_rng(seed)
    for variable in model.trainable_variables:
        if "float" not in str(variable.dtype):
            continue
        shape = tuple(variable.shape)
        fan_in = shape[-2] if len(shape) >= 2 else 1
        value = rng.normal(size=shape) * scale / np.sqrt(fan_in)
        variable.assign(value.astype(variable.dtype))
    return model


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def zeros(cls, *args, **kwargs):
    """`cls(*args, **kwargs)` with `"zeros"` for each of its random
    initializers (then call `randomize` on the built model)."""
    from keras_moe.layers import CGC, PLE, MultiGateMoE, SoftMoE, SparseMoE

    names = ["kernel_initializer"]
    if cls is SparseMoE and "router" not in kwargs:
        names.append("router_kernel_initializer")
    if cls is SoftMoE:
        names.append("slot_initializer")
    if cls in (MultiGateMoE, CGC, PLE):
        names.append("gate_kernel_initializer")
    for name in names:
        kwargs.setdefault(name, ZEROS)
    return cls(*args, **kwargs)
