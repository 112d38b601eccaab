"""Shared handling of the `routing_inputs=` ids of id-based routers."""

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
