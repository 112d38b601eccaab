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

`add_experts` gives a trained `SparseMoE` more experts without changing
its outputs at insertion (see its docstring for how).

References:
    Komatsuzaki, Puigcerver, Lee-Thorp, Riquelme Ruiz, Mustafa, Ainslie, Tay,
    Dehghani, Houlsby. Sparse Upcycling: Training Mixture-of-Experts from
    Dense Checkpoints (2022). Wang et al. Auxiliary-Loss-Free Load Balancing
    Strategy for Mixture-of-Experts (2024).
"""

import keras
import numpy as np
from keras import ops

from keras_moe.layers import _validation as check
from keras_moe.layers.moe import SparseMoE
from keras_moe.layers.routers import TopKRouter

__all__ = ["add_experts", "upcycle"]

ADD_EXPERTS_INITS = ("copy", "random")

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


def _relative(variable, layer):
    """A variable's path below `layer` (e.g. `experts/kernel_in`)."""
    prefix = f"{layer.path}/"
    path = variable.path
    return path[len(prefix):] if path.startswith(prefix) else path


def add_experts(moe, num_new, bias_update_rate=None, init="copy"):
    """A copy of a trained `SparseMoE` with `num_new` more experts, whose
    outputs at insertion are the old layer's.

    The new experts are kept out of the routing at first by the
    auxiliary-loss-free selection bias of `TopKRouter` (Wang et al. 2024):
    selection ranks `s_e + beta_e`, with scores `s` in `[0, 1]`, and the
    new experts start with `beta_new = min(beta_old) - 2`, so no token picks
    them. The combine weights are the scores of the chosen experts,
    renormalised. Sigmoid scores do not change with the new columns.
    Softmax scores of the old experts shrink by a per-token factor, but
    their ratios do not, so the weights are unchanged. The selection, which
    ranks `s + beta`, is unchanged only if the old experts' biases are all
    equal, e.g. before the bias has moved; a softmax router whose biases
    differ raises a `ValueError`. So every token's output is what it was.
    In training, a new expert's
    bias rises by `bias_update_rate` per step while it gets no tokens (the
    rule that balances every expert), so after about
    `(max(beta) - min(beta) + 2) / bias_update_rate` steps the new experts
    start to receive tokens and train.

    The outputs are unchanged when no token is dropped: always in a
    dropless call (the inference default). With a capacity, `C` depends on
    `E`. The load-balancing loss is computed over the new `E` and changes.

    Args:
        moe: a built `SparseMoE` routed by a `TopKRouter` whose top-`k`
            weights are renormalised (`k > 1`, `renormalize="always"`, or
            sigmoid scores). A softmax Switch router (`k = 1`, raw
            probability) would change every output. A softmax router's
            selection biases must be equal.
        num_new: how many experts to add (>= 1).
        bias_update_rate: the router's `bias_update_rate` in the new layer;
            default: the router's own, which must then be > 0 (otherwise
            the new experts would never be picked).
        init: the new experts' weights: `"copy"` (default; new expert `i`
            copies old expert `i mod E`, as upcycling does) or `"random"`
            (the bank's initializers). The router's new columns are always
            freshly initialised.

    Returns:
        A new built `SparseMoE` (the old layer is unchanged) with
        `E + num_new` experts and the old weights.

    Example:

    >>> import numpy as np
    >>> from keras.ops import convert_to_numpy
    >>> from keras_moe.layers import SparseMoE, TopKRouter
    >>> moe = SparseMoE(4, 8, capacity_factor=None,
    ...                 router=TopKRouter(4, k=2, bias_update_rate=0.01))
    >>> x = np.random.rand(2, 3, 6).astype("float32")
    >>> before = convert_to_numpy(moe(x))
    >>> bigger = add_experts(moe, 2)
    >>> bigger.num_experts, bool(np.allclose(convert_to_numpy(bigger(x)), before, atol=1e-6))
    (6, True)
    """
    if not isinstance(moe, SparseMoE) or not moe.built:
        raise ValueError(f"add_experts needs a built SparseMoE. Received: moe={moe!r}")
    num_new = check.positive_int("num_new", num_new)
    init = check.one_of("init", init, ADD_EXPERTS_INITS)
    router = moe.router
    if type(router) is not TopKRouter:
        raise ValueError(
            "add_experts keeps new experts out of the routing with "
            "TopKRouter's selection bias. Received: router="
            f"{type(router).__name__}"
        )
    rate = router.bias_update_rate if bias_update_rate is None else (
        check.positive_float("bias_update_rate", bias_update_rate)
    )
    if not rate:
        raise ValueError(
            "The new experts enter the routing through the router's "
            "selection bias, which moves only with bias_update_rate > 0. "
            "Received: router.bias_update_rate=0.0; pass bias_update_rate"
        )
    renormalized = router.score_function == "sigmoid" or router.renormalize == "always" or (
        router.renormalize and router.k > 1
    )
    if not renormalized:
        raise ValueError(
            "With unrenormalised softmax weights every output would change "
            "(each weight is a probability over all experts). Received: "
            f"k={router.k}, renormalize={router.renormalize!r}; use "
            "renormalize='always'"
        )
    if moe.experts.quantization_mode is not None:
        raise ValueError("add_experts needs float expert banks, not int8 ones.")
    old_bias = (
        np.asarray(ops.convert_to_numpy(router.selection_bias))
        if router.selection_bias is not None
        else np.zeros((moe.num_experts,), "float32")
    )
    if router.score_function == "softmax" and np.ptp(old_bias) > 0:
        raise ValueError(
            "New softmax columns shrink every old score by a per-token "
            "factor, which reorders s + beta when the old experts' selection "
            "biases differ, so some outputs would change. Received: "
            f"selection_bias={old_bias.tolist()}; add experts before the "
            "bias moves, or use score_function='sigmoid'"
        )

    old_e = moe.num_experts
    new_e = old_e + num_new
    router_config = dict(
        router.get_config(), num_experts=new_e, bias_update_rate=rate
    )
    config = moe.get_config()
    for name in ("noisy_gating", "load_balance_weight", "z_loss_weight",
                 "router_kernel_initializer", "router"):
        config.pop(name, None)
    config.update(num_experts=new_e, router=TopKRouter.from_config(router_config))
    bigger = SparseMoE.from_config(config)
    d = moe.experts.kernel_in.shape[1]
    bigger.build((None, d))

    old_variables = {_relative(v, moe): v for v in moe.variables}
    expert_banks = ("experts/",)
    for variable in bigger.variables:
        key = _relative(variable, bigger)
        if key not in old_variables:
            continue
        value = np.asarray(ops.convert_to_numpy(old_variables[key]))
        fresh = np.asarray(ops.convert_to_numpy(variable))
        for axis, (a, b) in enumerate(zip(value.shape, fresh.shape)):
            if a == b:
                continue
            if (a, b) != (old_e, new_e):
                raise ValueError(
                    f"Cannot grow {variable.path}: {value.shape} -> {fresh.shape}"
                )
            if init == "copy" and key.startswith(expert_banks):
                extra = np.take(value, np.arange(num_new) % old_e, axis=axis)
            else:
                extra = np.take(fresh, np.arange(old_e, new_e), axis=axis)
            value = np.concatenate([value, extra], axis=axis)
        variable.assign(value)
    bigger.router.selection_bias.assign(
        np.concatenate([old_bias, np.full((num_new,), old_bias.min() - 2.0)]).astype(
            "float32"
        )
    )
    return bigger
