"""Argument checks that raise a `ValueError` naming the bad value."""

import numbers

import keras


def positive_int(name, value):
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value <= 0
    ):
        raise ValueError(
            f"{name} must be a positive integer. Received: {name}={value!r}"
        )
    return int(value)


def non_negative_int(name, value):
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value < 0
    ):
        raise ValueError(
            f"{name} must be an integer >= 0. Received: {name}={value!r}"
        )
    return int(value)


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


def non_negative_float(name, value):
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not value >= 0
        or value == float("inf")
    ):
        raise ValueError(
            f"{name} must be a finite number >= 0. Received: {name}={value!r}"
        )
    return float(value)


def capacity_factor(name, value):
    """A capacity factor is a finite number > 0, or None (dropless)."""
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not value > 0
        or value == float("inf")
    ):
        raise ValueError(
            f"{name} must be a finite number > 0, or None for dropless "
            f"routing. Received: {name}={value!r}"
        )
    return float(value)


def one_of(name, value, allowed):
    if value not in allowed:
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
    if input_shape[-1] is None:
        raise ValueError(
            f"{layer} needs a known last (feature) dimension. Received: "
            f"input_shape={input_shape}"
        )
    return input_shape
