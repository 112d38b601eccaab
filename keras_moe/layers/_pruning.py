"""The expert-pruning hooks that layers implement (shared helpers).

A layer that owns or routes to experts can be pruned by
`keras_moe.compression.prune_experts` when it implements two methods, as a
Keras layer implements `quantize` for `Model.quantize`:

- `pruned_config(kept)`: its `get_config()` for the experts `kept` only
  (`kept`: a sorted list of distinct old expert indices), or a
  `ValueError` saying why it cannot be pruned to them.
- `copy_pruned_weights(source, kept)`: called on the new layer (built from
  `pruned_config(kept)`), copies every weight of `source` (the original
  layer), keeping along every expert axis the entries of the `kept`
  experts, in order: expert `kept[i]` of `source` becomes expert `i`.

A layer that owns a router asks the router for its part through the same
two methods; `keras_moe.layers.Router` implements them for any router
whose weights have the experts along an axis of size `E`, so every router
subclass is prunable unless it says otherwise. The helpers below do the
slicing that most layers need.
"""

import keras
import numpy as np
from keras import ops

from keras_moe.utils import keras_internals


def variable_name(variable):
    return variable.path.split("/")[-1]


def take_along_changed_axes(value, old_shape, new_shape, mapping, where):
    """`value` with every axis whose size changes from `old_shape` to
    `new_shape` indexed by `mapping[old size]` (the kept indices)."""
    for axis, (a, b) in enumerate(zip(old_shape, new_shape)):
        if a == b:
            continue
        indices = mapping.get(a)
        if indices is None or len(indices) != b:
            raise ValueError(
                f"Cannot prune the weight {where} of shape {tuple(old_shape)} "
                f"to {tuple(new_shape)}"
            )
        value = np.take(value, indices, axis=axis)
    return value


def _sublayers(layer, attributes):
    found = []
    for name in attributes:
        value = getattr(layer, name, None)
        found.extend(value if isinstance(value, (list, tuple)) else [value])
    return [sub for sub in found if sub is not None]


def copy_sliced(target, source, mapping, exclude=()):
    """Assigns every weight of `source` to the same weight of `target`,
    slicing each axis whose size differs by `mapping` (`{old axis size:
    kept indices}`). The weights of the sublayers named in `exclude`
    (attribute names, e.g. `("router",)`: sublayers that copy their own
    weights through their hooks) are skipped on both sides."""

    def own(layer):
        skip = {id(v) for sub in _sublayers(layer, exclude) for v in sub.weights}
        return [v for v in layer.weights if id(v) not in skip]

    old, new = own(source), own(target)
    old_names = [variable_name(v) for v in old]
    new_names = [variable_name(v) for v in new]
    if old_names != new_names:
        raise ValueError(
            f"Cannot map the weights of {source.name!r} onto its pruned copy: "
            f"{old_names} vs {new_names}"
        )
    for a, b in zip(old, new):
        value = take_along_changed_axes(
            ops.convert_to_numpy(a), a.shape, b.shape, mapping, a.path
        )
        b.assign(value)


def copy_quantization_state(target, source):
    """Quantised `Experts` banks: keep the activation mode of the source's
    banks (it is not part of the layer's config)."""
    for old, new in zip(
        keras_internals.flatten_layers(source), keras_internals.flatten_layers(target)
    ):
        if getattr(old, "quantization_mode", None) and hasattr(old, "inputs_quantizer"):
            new.inputs_quantizer = old.inputs_quantizer
            new.quantization_config = old.quantization_config


def router_config(router, kept, **changes):
    """A router's `get_config()` for `len(kept)` experts, with `k` capped at
    that count (when the router has a `k` argument) and `changes`."""
    config = router.get_config()
    count = len(kept)
    config["num_experts"] = count
    if "k" in config:
        config["k"] = min(config["k"], count)
    config.update(changes)
    return config


def serialized_pruned_router(router, kept):
    """`keras.saving.serialize_keras_object(router)` for the pruned router."""
    serialized = keras.saving.serialize_keras_object(router)
    serialized = dict(serialized)
    serialized["config"] = pruning_hook(router, "pruned_config")(kept)
    return serialized


def pruning_hook(layer, name):
    """`layer.<name>`, or a `ValueError` if the layer has no pruning hooks."""
    method = getattr(layer, name, None)
    if method is None:
        raise ValueError(
            f"{type(layer).__name__} {layer.name!r} is not prunable: it has no "
            "pruned_config / copy_pruned_weights methods (every subclass of "
            "keras_moe.layers.Router has them: subclass it, or implement the "
            "two methods)"
        )
    return method
