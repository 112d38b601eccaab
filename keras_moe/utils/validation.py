"""Argument checks that raise a `ValueError` naming the bad value.

Besides the type of each argument, the sizes have ceilings (issue 32): a
`.keras` file whose config was edited to an absurd size fails here, in the
constructor or in `build`, with the argument's name, instead of allocating
gigabytes (or aborting the process) before Keras finds that the weights do
not fit. The ceilings are far above any model these layers are used for;
`docs/guarantees.md` lists them with their tests.
"""

import math
import numbers

import keras
import numpy as np

from keras_moe.utils.tensors import flat_mask

# Ceilings of the size arguments (see the module docstring).
MAX_EXPERTS = 2**16  # experts of a bank or slots per expert (DeepSeek-V3: 256)
MAX_WIDTH = 2**18  # hidden / output / head widths (the widest FFNs: ~2**16)
MAX_CLASSES = 2**20  # classes of a ClassificationHead
MAX_TASKS = 1024  # tasks of a multi-task layer (a gate and an output each)
MAX_TASK_IDS = 2**20  # rows of a TaskRouter's (tasks, experts) table
MAX_LEVELS = 16  # PLE levels, head hidden layers (PLE's paper: 1-3 levels)
MAX_VOCAB = 2**22  # HashRouter table rows (LLM vocabularies: ~2**18)
MAX_ITERATIONS = 2**14  # solver iterations of a task weighting (defaults: 25-100)
# Elements of any one weight: XLA and TensorFlow index tensors with int32
# (JAX aborted the process on a larger SoftMoE slot kernel).
MAX_WEIGHT_ELEMENTS = 2**31 - 1
MAX_SEED = 2**32 - 1


def positive_int(name, value, maximum=None):
    """An int >= 1 (not a bool), at most `maximum` if given."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value <= 0
    ):
        raise ValueError(
            f"{name} must be a positive integer. Received: {name}={value!r}"
        )
    return _at_most(name, int(value), maximum)


def non_negative_int(name, value, maximum=None):
    """An int >= 0 (not a bool), at most `maximum` if given."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value < 0
    ):
        raise ValueError(
            f"{name} must be an integer >= 0. Received: {name}={value!r}"
        )
    return _at_most(name, int(value), maximum)


def _at_most(name, value, maximum):
    if maximum is not None and value > maximum:
        raise ValueError(
            f"{name} must be at most {maximum:,} (a ceiling far above real "
            f"models; an edited file?). Received: {name}={value!r}"
        )
    return value


def boolean(name, value):
    """A real boolean: `True` or `False` (a NumPy bool too). Strings such as
    "False" or "no", numbers and None are refused: `bool("False")` is True."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ValueError(
        f"{name} must be True or False. Received: {name}={value!r} "
        f"(of type {type(value).__name__})"
    )


def seed(name, value):
    """A seed: None or an int in [0, 2**32 - 1] (not a bool, a float or a
    string)."""
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or not 0 <= value <= MAX_SEED
    ):
        raise ValueError(
            f"{name} must be None or an integer in [0, {MAX_SEED}]. "
            f"Received: {name}={value!r}"
        )
    return int(value)


def initializer(name, value):
    """`keras.initializers.get(value)`, whose error names `name`."""
    return _keras_object(name, value, keras.initializers.get, "initializer")


def regularizer(name, value):
    """`keras.regularizers.get(value)` (None stays None), whose error
    names `name`."""
    return _keras_object(name, value, keras.regularizers.get, "regularizer")


def _keras_object(name, value, get, kind):
    example = "'glorot_uniform'" if kind == "initializer" else "'l2'"
    try:
        return get(value)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"{name} must be a Keras {kind}: a name such as {example}, a "
            f"config dict or an instance. Received: {name}={value!r} ({error})"
        ) from None


def weight_elements(layer, weight, shape, **arguments):
    """Refuses a weight of `shape` with more than `MAX_WEIGHT_ELEMENTS`
    elements before it is allocated, naming the `arguments` (name=value)
    that set its size."""
    count = math.prod(int(n) for n in shape)
    if count > MAX_WEIGHT_ELEMENTS:
        given = ", ".join(f"{k}={v!r}" for k, v in arguments.items())
        raise ValueError(
            f"{layer}: the weight {weight!r} would have shape {tuple(shape)}, "
            f"{count:,} elements, more than the {MAX_WEIGHT_ELEMENTS:,} a "
            f"tensor can index. Received: {given}"
        )


def router_layer(router, num_experts):
    """A router: a Keras layer with `num_experts` and `k` (see
    `keras_moe.layers.routers`)."""
    if not isinstance(router, keras.layers.Layer) or not all(
        hasattr(router, a) for a in ("num_experts", "k")
    ):
        raise ValueError(
            "router must be a router layer (with `num_experts` and `k`), e.g. "
            f"TopKRouter(num_experts=...). Received: router={router!r}"
        )
    if router.num_experts != num_experts:
        raise ValueError(
            "The router must have as many experts as the layer. Received: "
            f"router.num_experts={router.num_experts}, num_experts={num_experts}"
        )


def _real(name, value, accept, requirement):
    """A real number (not a bool) for which `accept(value)` holds (NaN fails
    every comparison); `requirement` completes "{name} must be ..."."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not accept(value)
    ):
        raise ValueError(
            f"{name} must be {requirement}. Received: {name}={value!r}"
        )
    return float(value)


def non_negative_float(name, value):
    return _real(name, value, lambda v: 0 <= v < math.inf, "a finite number >= 0")


def positive_float(name, value):
    """A finite number > 0, e.g. a learning rate."""
    return _real(name, value, lambda v: 0 < v < math.inf, "a finite number > 0")


def finite_float(name, value):
    """Any finite number."""
    return _real(name, value, lambda v: abs(v) < math.inf, "a finite number")


def capacity_factor(name, value):
    """A capacity factor is a finite number > 0, or None (dropless)."""
    if value is None:
        return None
    return _real(
        name,
        value,
        lambda v: 0 < v < math.inf,
        "a finite number > 0, or None for dropless routing",
    )


# Rows of one dropless block. Every expert's group is padded to whole
# blocks, so a call computes up to `E (block_size - 1)` padding rows on top
# of its `N k` pairs: 16 x the largest block the layers pick by themselves
# (256; MegaBlocks uses 128).
MAX_BLOCK_SIZE = 4096


def block_size(name, value):
    """A dropless block size is a positive int up to `MAX_BLOCK_SIZE`, or
    None (chosen per shape)."""
    if value is None:
        return None
    return positive_int(name, value, maximum=MAX_BLOCK_SIZE)


def one_of(name, value, allowed):
    # A boolean equals 1 or 0 but is no choice among numbers.
    boolean = isinstance(value, bool) and not any(isinstance(a, bool) for a in allowed)
    if boolean or value not in allowed:
        raise ValueError(
            f"{name} must be one of {sorted(allowed)}. Received: {name}={value!r}"
        )
    return value


def k_for_experts(k, num_experts):
    k = positive_int("k", k)
    if k > num_experts:
        raise ValueError(
            "k must be <= num_experts. "
            f"Received: k={k}, num_experts={num_experts}"
        )
    return k


def token_input_shape(layer, input_shape):
    """Inputs of a token layer: rank >= 2 with a known feature dimension."""
    input_shape = tuple(input_shape)
    if len(input_shape) < 2:
        raise ValueError(
            f"{layer} expects inputs of rank >= 2, (..., dim), e.g. "
            "(batch, dim) or (batch, tokens, dim). Received: "
            f"input_shape={input_shape}"
        )
    if input_shape[-1] is None or input_shape[-1] == 0:
        raise ValueError(
            f"{layer} needs a known, nonzero last (feature) dimension. "
            f"Received: input_shape={input_shape}"
        )
    return input_shape


def unit_interval(name, value):
    """A number in [0, 1], e.g. an IoU threshold."""
    return _real(name, value, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def dropout_rate(name, value):
    """A dropout rate: a number in [0, 1)."""
    return _real(name, value, lambda v: 0 <= v < 1, "a number in [0, 1)")


def task_names(names, num_tasks, label="task"):
    """`None` -> `["task_0", ...]`; otherwise `num_tasks` distinct strings.
    `label="group"` checks `group_names` against `num_groups`."""
    arg, count = f"{label}_names", f"num_{label}s"
    if names is None:
        return [f"{label}_{t}" for t in range(num_tasks)]
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise ValueError(
            f"{arg} must be a list of strings, one per {label}. Received: "
            f"{arg}={names!r}"
        )
    names = list(names)
    if len(names) != num_tasks:
        raise ValueError(
            f"{arg} must have one name per {label}. Received: "
            f"len({arg})={len(names)}, {count}={num_tasks}"
        )
    if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(
        names
    ):
        raise ValueError(
            f"{arg} must be distinct non-empty strings. Received: "
            f"{arg}={names!r}"
        )
    return names


def int_per_level(name, value, num_levels, allow_none=False):
    """An int (or None) for every level, or a list of one per level.
    Returns the list of per-level values."""
    if isinstance(value, (list, tuple)):
        if len(value) != num_levels:
            raise ValueError(
                f"{name} must be one value or a list of one value per level. "
                f"Received: len({name})={len(value)}, num_levels={num_levels}"
            )
        values = list(value)
    else:
        values = [value] * num_levels
    return [
        None if (v is None and allow_none) else positive_int(name, v) for v in values
    ]


def layer_list(name, layers, min_count):
    """A list (or tuple) of at least `min_count` Keras layers; returns a list."""
    if not isinstance(layers, (list, tuple)) or not all(
        isinstance(layer, keras.layers.Layer) for layer in layers
    ):
        raise ValueError(
            f"{name} must be a list of Keras layers or models. Received: "
            f"{name}={layers!r}"
        )
    if len(layers) < min_count:
        raise ValueError(
            f"{name} must hold at least {min_count} layers. Received: "
            f"len({name})={len(layers)}"
        )
    return list(layers)


def token_mask(layer, mask, inputs):
    """A Keras mask of `inputs.shape[:-1]` (bool or numeric: nonzero keeps)
    as `(N,)` bool, one entry per token; `None` stays `None`. `layer` is the
    layer's name for the error message."""
    if mask is None:
        return None
    ops = keras.ops
    mask = ops.convert_to_tensor(mask)
    expected = tuple(inputs.shape[:-1])
    if len(mask.shape) != len(expected) or any(
        m is not None and e is not None and m != e
        for m, e in zip(mask.shape, expected)
    ):
        raise ValueError(
            f"{layer}: the mask must have the inputs' shape without the last "
            f"axis, {expected}. Received: mask shape {tuple(mask.shape)}"
        )
    return flat_mask(mask)
