"""Helpers shared by the multi-task layers (`MultiGateMoE`, `CGC`, `PLE`):
gate initializers, telemetry and input checks."""

import keras
from keras import ops

from keras_moe.layers.routers import default_router_initializer
from keras_moe.utils import validation as check


def gate_initializer(value):
    return check.initializer(
        "gate_kernel_initializer", value or default_router_initializer()
    )


def fresh_initializer(initializer, offset):
    """A new instance of `initializer` for the `offset`-th of several
    weights: Keras initializers reuse their seed, so one instance would
    give same-shaped weights (e.g. the gates of two tasks) equal values. A
    seeded initializer gets `seed + offset`."""
    config = keras.initializers.serialize(initializer)
    inner = config.get("config") if isinstance(config, dict) else None
    seed = inner.get("seed") if isinstance(inner, dict) else None
    if offset and isinstance(seed, int):
        config = dict(config, config=dict(inner, seed=seed + offset))
    return keras.initializers.deserialize(config)


def normalize_rows(mass):
    """Rows of `mass` divided by their sums (rows of zeros stay zeros)."""
    total = ops.sum(mass, axis=-1, keepdims=True)
    return mass / ops.maximum(total, 1e-12)


def stats_to_numpy(layer, names):
    stats = {
        name: ops.convert_to_numpy(getattr(layer, name)) for name in names
    }
    for name, value in stats.items():
        if value.ndim == 0:
            stats[name] = float(value)
    return stats


def as_compute_dtype(layer, x):
    """`x` in the layer's compute dtype: integer inputs become floats on
    every backend (torch's einsum would not promote them), as Keras'
    normalization layers do."""
    return ops.cast(x, layer.compute_dtype)


def check_last_dim(layer, shape, expected):
    if shape[-1] != expected:
        raise ValueError(
            f"{layer.name}: the last input dimension must be {expected}, as "
            f"when the layer was built. Received: input shape {tuple(shape)}"
        )


def check_call_input(layer, shape, expected):
    """A token layer's call input: rank >= 2 with the last dimension it was
    built for, `expected`."""
    check.token_input_shape(type(layer).__name__, tuple(shape))
    check_last_dim(layer, tuple(shape), expected)
