"""Shared handling of the `routing_inputs=` ids of id-based routers."""

import numpy as np
from keras import ops

from keras_moe.utils.tensors import concrete_values  # noqa: F401  (TaskRouter)


def require_ids(layer, inputs, routing_inputs):
    """Checks that ids were given and match the leading shape of `inputs`."""
    if routing_inputs is None:
        raise ValueError(
            f"{type(layer).__name__} routes on ids: call it as "
            "router(tokens, routing_inputs=ids) with one integer id per token "
            f"(shape {tuple(inputs.shape[:-1])}), or pass "
            "SparseMoE(...)(x, routing_inputs=ids). Received: routing_inputs=None"
        )
    ids_shape = tuple(routing_inputs.shape)
    lead = tuple(inputs.shape[:-1])
    compatible = len(ids_shape) == len(lead) and all(
        a is None or b is None or a == b for a, b in zip(ids_shape, lead)
    )
    if not compatible:
        raise ValueError(
            f"{type(layer).__name__}: routing_inputs must hold one id per "
            f"token, with shape {lead}. Received: routing_inputs shape "
            f"{ids_shape}, inputs shape {tuple(inputs.shape)}"
        )


def as_int32(ids):
    ids = ops.convert_to_tensor(ids)
    if "int" not in str(ids.dtype):
        raise ValueError(
            "routing_inputs must be integer ids. Received: routing_inputs "
            f"with dtype {ids.dtype}"
        )
    return ops.cast(ids, "int32")


def full_rank(value, shape):
    """Whether `routing_inputs` has the inputs' rank: then it is the router's
    inputs `(..., d)`, not ids (ids have one dimension fewer, at least)."""
    value_shape = getattr(value, "shape", None)
    if value_shape is None:
        value_shape = np.shape(value)
    return len(value_shape) == len(shape)


def ids_per_token(layer, ids, shape):
    """Broadcasts ids of one example `(B,)` or one token `(...)` to one id
    per token of inputs of `shape` `(..., d)`, flat: `(N,)`."""
    ids = ops.convert_to_tensor(ids)
    lead = tuple(shape[:-1])
    rank = len(ids.shape)
    if rank > len(lead):
        raise ValueError(
            f"{layer}: routing_inputs must have the leading shape of "
            "the inputs (one id per example or per token). Received: "
            f"routing_inputs shape {tuple(ids.shape)}, inputs "
            f"shape {tuple(shape)}"
        )
    expanded = ops.reshape(ids, tuple(ops.shape(ids)) + (1,) * (len(lead) - rank))
    return ops.reshape(ops.broadcast_to(expanded, lead), (-1,))


def router_tokens(layer, values, shape, dtype):
    """`routing_inputs` of the inputs' shape `(..., d)`, the router's own
    inputs (Gemma 4 routes the raw hidden states), as `(N, d)` tokens."""
    values = ops.cast(values, dtype)
    given, expected = tuple(values.shape), tuple(shape)
    if len(given) != len(expected) or any(
        a is not None and b is not None and a != b for a, b in zip(given, expected)
    ):
        raise ValueError(
            f"{layer}: routing_inputs of the inputs' rank are the "
            "router's inputs and must have the shape of the inputs. Received: "
            f"routing_inputs shape {given}, inputs shape {expected}"
        )
    return ops.reshape(values, (-1, ops.shape(values)[-1]))
