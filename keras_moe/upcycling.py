"""Sparse upcycling, and more experts for a trained MoE layer.

Komatsuzaki et al. (2022) initialise every expert of an MoE layer as a copy
of a trained dense model's feed-forward block, and the router at random.
Training then continues from that state instead of from scratch. `upcycle`
does this for a two-layer FFN: a pair of `keras.layers.Dense` layers, or the
feed-forward block of a keras-hub `TransformerEncoder`.

At initialisation the upcycled layer computes what the FFN computes. All
experts are equal, and the router's `k` weights sum to 1
(`TopKRouter(renormalize="always")`), so `sum_j w_j FFN(x) = FFN(x)`
whichever experts it picks. The layer is dropless (`capacity_factor=None`),
so no token is dropped.

`add_experts` and `merge_experts` (in `keras_moe.resizing`, re-exported
here) give a trained `SparseMoE` more or fewer experts.

References:
    Komatsuzaki, Puigcerver, Lee-Thorp, Riquelme Ruiz, Mustafa, Ainslie, Tay,
    Dehghani, Houlsby. Sparse Upcycling: Training Mixture-of-Experts from
    Dense Checkpoints (2022). Wang et al. Auxiliary-Loss-Free Load Balancing
    Strategy for Mixture-of-Experts (2024). Li et al. Merge, Then Compress:
    Demystify Efficient SMoE with Hints from Its Routing Policy (ICLR 2024).
"""

import keras
import numpy as np
from keras import ops

from keras_moe.layers.routers import TopKRouter
from keras_moe.layers.sparse_moe import SparseMoE
from keras_moe.resizing import (  # noqa: F401 (re-exported)
    ADD_EXPERTS_INITS,
    MERGE_ROUTER_RULES,
    add_experts,
    merge_experts,
)
from keras_moe.utils import validation as check

__all__ = ["add_experts", "merge_experts", "upcycle"]

_LINEAR = (None, keras.activations.linear)


def _dense_pair(ffn):
    """`(first, second)` Dense layers of `ffn`."""
    if (
        type(ffn).__name__ == "TransformerEncoder"
        and type(ffn).__module__.startswith("keras_hub.")
    ):
        return ffn._feedforward_intermediate_dense, ffn._feedforward_output_dense
    if (
        isinstance(ffn, (list, tuple))
        and len(ffn) == 2
        and all(isinstance(layer, keras.layers.Dense) for layer in ffn)
    ):
        return tuple(ffn)
    raise ValueError(
        "upcycle needs a feed-forward block: two Dense layers `(first, "
        "second)` or a keras-hub TransformerEncoder. Received: "
        f"ffn={ffn!r}"
    )


def upcycle(ffn, num_experts, k=2, **kwargs):
    """A `SparseMoE` whose experts all start as copies of a trained FFN.

    The FFN computes `y = act(x W1 + b1) W2 + b2`. It is two built
    `keras.layers.Dense` layers, the first with the activation and the
    second linear, or the feed-forward block of a keras-hub
    `TransformerEncoder`. Each expert `e` of the returned layer starts with
    `W1[e] = W1`, `b1[e] = b1`, `W2[e] = W2`, `b2[e] = b2`. A missing bias
    becomes a zero bias. The router is a fresh `TopKRouter(num_experts, k,
    renormalize="always")`, whose `k` weights sum to 1. At initialisation
    the layer's outputs therefore equal the FFN's (to float32 rounding) for
    any routing. Training then makes the experts diverge (Komatsuzaki et al.
    2022).

    For a `TransformerEncoder`, the returned layer replaces its
    `_feedforward_intermediate_dense` followed by its
    `_feedforward_output_dense`; the layer norms, dropout and residual stay
    the encoder's.

    Args:
        ffn: two built `Dense` layers `(first, second)`, or a built keras-hub
            `TransformerEncoder`.
        num_experts: `E`, the number of experts.
        k: experts per token (default 2).
        **kwargs: other `SparseMoE` arguments, e.g. `capacity_factor=1.25`
            to train with a capacity, which drops tokens, so the layer stops
            equalling the FFN in training; `name`. `router=` replaces the
            default router. Keep the weights of its top-k choices summing to
            1 (`renormalize="always"`) if the outputs must equal the FFN's.

    Returns:
        A built `SparseMoE`, dropless by default.

    Example:

    >>> import keras, numpy as np
    >>> first = keras.layers.Dense(32, activation="gelu")
    >>> second = keras.layers.Dense(16)
    >>> x = np.random.rand(4, 16).astype("float32")
    >>> y = keras.ops.convert_to_numpy(second(first(x)))
    >>> moe = upcycle((first, second), num_experts=8, k=2)
    >>> bool(np.allclose(keras.ops.convert_to_numpy(moe(x)), y, atol=1e-6))
    True

    References:
        Komatsuzaki et al. Sparse Upcycling: Training Mixture-of-Experts
        from Dense Checkpoints (2022).
    """
    first, second = _dense_pair(ffn)
    num_experts = check.positive_int("num_experts", num_experts)
    k = check.k_for_experts(k, num_experts)
    for layer in (first, second):
        if not layer.built:
            raise ValueError(
                f"upcycle copies trained weights and needs built layers. "
                f"Received: {layer.name!r}, not built"
            )
    if second.activation not in _LINEAR:
        raise ValueError(
            "The second Dense layer of the FFN must be linear (the expert "
            "activation sits between the two). Received: activation="
            f"{keras.activations.serialize(second.activation)!r} on "
            f"{second.name!r}"
        )
    d, hidden = first.kernel.shape
    if second.kernel.shape[0] != hidden:
        raise ValueError(
            "The FFN's layers do not chain: the first has "
            f"{hidden} units, the second {second.kernel.shape[0]} inputs."
        )
    out = second.kernel.shape[1]
    use_bias = bool(first.use_bias or second.use_bias)
    options = dict(
        num_experts=num_experts,
        hidden_dim=int(hidden),
        k=k,
        output_dim=None if out == d else int(out),
        activation=keras.activations.serialize(first.activation),
        use_bias=use_bias,
        capacity_factor=None,
        eval_capacity_factor=None,
        dtype=first.dtype_policy,
    )
    options.update(kwargs)
    if "router" not in kwargs:
        options["router"] = TopKRouter(num_experts, k=k, renormalize="always")
    moe = SparseMoE(**options)
    moe.build((None, d))

    def copies(value):
        value = np.asarray(ops.convert_to_numpy(value))
        return np.broadcast_to(value, (num_experts,) + value.shape).copy()

    experts = moe.experts
    experts.kernel_in.assign(copies(first.kernel))
    experts.kernel_out.assign(copies(second.kernel))
    if use_bias:
        for variable, layer, size in (
            (experts.bias_in, first, hidden),
            (experts.bias_out, second, out),
        ):
            bias = layer.bias if layer.use_bias else np.zeros((size,), "float32")
            variable.assign(copies(bias))
    return moe
