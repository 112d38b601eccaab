"""How much a trained MoE model uses its experts, and what its weights
weigh: `expert_usage`, `weight_bytes`."""

import keras
import numpy as np
from keras import ops

from keras_moe.layers.experts import Experts
from keras_moe.utils import validation as check
from keras_moe.utils.keras_internals import flatten_layers


def weight_bytes(layer, experts_only=False):
    """Bytes of the variables of `layer` (a layer or model): every variable,
    or with `experts_only=True` those of its `Experts` banks (what
    `quantize("int8")` shrinks). Counts `shape x dtype size`; a variable
    shared by several layers is counted once.

    Example:

    >>> from keras_moe.layers import Experts
    >>> bank = Experts(num_experts=4, hidden_dim=128)
    >>> bank.build((4, None, 64))
    >>> before = weight_bytes(bank)
    >>> bank.quantize("int8")
    >>> round(before / weight_bytes(bank), 2)
    3.7
    """
    if experts_only:
        layers = [
            sub
            for sub in flatten_layers(layer, include_self=True)
            if isinstance(sub, Experts)
        ]
    else:
        layers = [layer]
    seen, total = set(), 0
    for sub in layers:
        for variable in sub.weights:
            if id(variable) in seen:
                continue
            seen.add(id(variable))
            total += int(np.prod(variable.shape, dtype="int64")) * np.dtype(
                variable.dtype
            ).itemsize
    return total

# ---------------------------------------------------------------------------
# Expert usage over a dataset
# ---------------------------------------------------------------------------


def _usage_layers(model):
    """The layers under `model` that keep a per-expert `expert_load`."""
    found = {}
    for layer in flatten_layers(model, include_self=False):
        load = getattr(layer, "expert_load", None)
        if isinstance(load, keras.Variable) and callable(
            getattr(layer, "routing_stats", None)
        ):
            if layer.name in found and found[layer.name] is not layer:
                raise ValueError(
                    "expert_usage needs distinct names for the MoE layers. "
                    f"Received: two layers named {layer.name!r}"
                )
            found[layer.name] = layer
    return found


def _inputs_of(element):
    """The model inputs of one dataset element: `x` of `(x, y[, w])`."""
    if isinstance(element, tuple):
        return element[0]
    return element


def _to_numpy(x):
    return keras.tree.map_structure(np.asarray, x)


def _num_examples(x):
    return int(np.shape(keras.tree.flatten(x)[0])[0])


def _batches(data, batch_size, steps):
    """Input batches from arrays (sliced), a `PyDataset`, or any iterable of
    `x` or `(x, y[, w])` elements (`tf.data.Dataset`, generators)."""
    if isinstance(data, keras.utils.PyDataset):
        count = len(data) if steps is None else min(steps, len(data))
        for index in range(count):
            yield _to_numpy(_inputs_of(data[index]))
        return
    x = _inputs_of(data)
    leaves = keras.tree.flatten(x) if isinstance(x, (list, dict)) else [x]
    if all(isinstance(leaf, np.ndarray) for leaf in leaves):
        n = _num_examples(x)
        batch_size = check.positive_int("batch_size", batch_size)
        for step, start in enumerate(range(0, n, batch_size)):
            if steps is not None and step >= steps:
                return
            yield keras.tree.map_structure(
                lambda a: a[start : start + batch_size], x
            )
        return
    for step, element in enumerate(data):
        if steps is not None and step >= steps:
            return
        yield _to_numpy(_inputs_of(element))


def expert_usage(model, data, batch_size=32, steps=None):
    """Per-expert load of every MoE layer of `model`, over a whole dataset.

    Runs `model.predict_on_batch` (inference mode) on every batch of `data`
    and sums each layer's `expert_load` (the share of the routed
    (token, choice) pairs, or of the gate mass, that each expert received in
    that call), weighted by the examples in the batch; so the result is the
    share of the whole dataset's routing that each expert received.

    Args:
        model: a built Keras model containing MoE layers (`SparseMoE`,
            `SoftMoE`, `MultiGateMoE`, `CGC` levels, `MixtureOfExperts`:
            any layer with an `expert_load` statistic).
        data: NumPy inputs (an array, a list or dict of arrays, or a tuple
            `(x, y)`), sliced into batches of `batch_size`; or a
            `keras.utils.PyDataset`, a `tf.data.Dataset` or any iterable of
            `x` or `(x, y[, sample_weight])` batches.
        batch_size: the batch size for NumPy inputs.
        steps: read at most this many batches (default: all).

    Returns:
        `{layer name: float64 array (E,)}`, each summing to 1.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> from keras_moe.layers import SparseMoE
    >>> inputs = keras.Input((4, 8))
    >>> model = keras.Model(inputs, SparseMoE(4, 16, name="moe")(inputs))
    >>> usage = expert_usage(model, np.random.rand(64, 4, 8).astype("float32"))
    >>> usage["moe"].shape, round(float(usage["moe"].sum()), 6)
    ((4,), 1.0)
    """
    layers = _usage_layers(model)
    if not layers:
        raise ValueError(
            "expert_usage found no MoE layer (a layer with an `expert_load` "
            f"statistic) in the model. Received: model={model.name!r}"
        )
    if steps is not None:
        steps = check.positive_int("steps", steps)
    totals = {name: None for name in layers}
    examples = 0
    for x in _batches(data, batch_size, steps):
        n = _num_examples(x)
        if n == 0:
            continue
        model.predict_on_batch(x)
        for name, layer in layers.items():
            load = ops.convert_to_numpy(layer.expert_load).astype("float64")
            totals[name] = n * load if totals[name] is None else totals[name] + n * load
        examples += n
    if not examples:
        raise ValueError("expert_usage received no data (zero batches or examples).")
    usage = {}
    for name, total in totals.items():
        mass = total.sum()
        usage[name] = total / mass if mass > 0 else total
    return usage
