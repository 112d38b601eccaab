"""More or fewer experts for a trained `SparseMoE`.

`add_experts` gives a trained `SparseMoE` more experts without changing its
outputs at insertion: the new experts are kept out of the routing at first
by the auxiliary-loss-free selection bias of `TopKRouter` (Wang et al.
2024), see its docstring. `merge_experts` gives it fewer, by averaging
groups of experts weighted by their usage (MC-SMoE, Li et al. 2024; an
approximation, see its docstring). Both return a new layer and leave the
old one unchanged. `keras_moe.upcycling` re-exports both.

References:
    Wang et al. Auxiliary-Loss-Free Load Balancing Strategy for
    Mixture-of-Experts (2024). Li et al. Merge, Then Compress: Demystify
    Efficient SMoE with Hints from Its Routing Policy (ICLR 2024).
"""

import keras
import numpy as np
from keras import ops

from keras_moe.layers.routers import TopKRouter
from keras_moe.layers.sparse_moe import SparseMoE
from keras_moe.utils import validation as check

__all__ = ["add_experts", "merge_experts"]

ADD_EXPERTS_INITS = ("copy", "random")


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


MERGE_ROUTER_RULES = ("logsumexp", "max")


def _merge_groups(moe, groups, num_experts, usage):
    """The groups (lists of old indices, ordered by their first member)."""
    e = moe.num_experts
    if (groups is None) == (num_experts is None):
        raise ValueError(
            "merge_experts needs either groups or num_experts (not both). "
            f"Received: groups={groups!r}, num_experts={num_experts!r}"
        )
    if groups is not None:
        if not isinstance(groups, (list, tuple)) or not groups:
            raise ValueError(
                "groups must be a non-empty list of lists of expert indices. "
                f"Received: groups={groups!r}"
            )
        groups = [sorted(int(i) for i in group) for group in groups]
        members = [i for group in groups for i in group]
        if any(not group for group in groups) or sorted(members) != list(range(e)):
            raise ValueError(
                f"groups must split the experts 0..{e - 1}: every expert in "
                f"exactly one non-empty group. Received: groups={groups!r}"
            )
        return sorted(groups)
    count = check.positive_int("num_experts", num_experts)
    if count > e:
        raise ValueError(
            "num_experts must be <= the layer's num_experts. Received: "
            f"num_experts={count}, moe.num_experts={e}"
        )
    # MC-SMoE's grouping: the most used experts lead the groups; every other
    # expert joins the leader whose router column is the most similar
    # (cosine), a proxy for routing the same tokens.
    leaders = [int(i) for i in np.argsort(-usage, kind="stable")[:count]]
    kernel = np.asarray(ops.convert_to_numpy(moe.router.kernel), "float64")
    unit = kernel / np.maximum(np.linalg.norm(kernel, axis=0, keepdims=True), 1e-12)
    groups = {leader: [leader] for leader in leaders}
    for expert in range(e):
        if expert in groups:
            continue
        similarity = unit[:, leaders].T @ unit[:, expert]
        groups[leaders[int(np.argmax(similarity))]].append(expert)
    return sorted(sorted(group) for group in groups.values())


def merge_experts(moe, groups=None, num_experts=None, usage=None, router="logsumexp"):
    """A copy of a trained `SparseMoE` whose experts are merged in groups.

    Each group `G` of experts becomes one expert whose weights are the
    usage-weighted average of the group's weights (MC-SMoE's merge, Li et
    al. 2024):

    `theta_G = sum_{e in G} a_e theta_e`,  `a_e = u_e / sum_{f in G} u_f`

    for every expert weight `theta` (`kernel_in`, `kernel_gate`,
    `kernel_out`, the biases, `expert_scale`), with `u` the experts' usage
    (equal weights in a group that was never used). The router (a
    `TopKRouter`) gets one column per group: the usage-weighted average
    `w_G = sum a_e w_e` of the group's kernel (and noise kernel, selection
    bias) columns, and a bias that gives the merged expert the group's
    routing mass: with `router="logsumexp"` (default)
    `b_G = log sum_{e in G} exp(b_e)`, so that when the group's columns are
    equal `exp(x w_G + b_G) = sum_{e in G} exp(x w_e + b_e)`: the merged
    expert's softmax probability is the sum of its members'; with
    `router="max"`, `b_G = max_{e in G} b_e` (the probability of one
    member). The new router has a bias (`use_bias=True`) and
    `k = min(k, number of groups)`; shared experts and everything else are
    copied.

    **An approximation.** No merge keeps the outputs in general:
    `FFN(x; sum a_e theta_e) != sum a_e FFN(x; theta_e)` (the activation
    is non-linear, and hidden units of different experts need not be
    aligned: MC-SMoE permutes them first, which this function does not),
    and a linear router cannot reproduce `log sum_e exp(x w_e + b_e)` for
    different columns. What holds exactly (and is tested):

    - groups of identical experts with identical router columns, in a
      layer that picks every expert (`k = E`, weights renormalised: the
      dense mixture `sum_e p_e FFN_e`), merged with `"logsumexp"`: the
      outputs are unchanged (the merged layer has `k = ` the number of
      groups, and each merged expert the summed probability of its group);
    - experts that are all equal (an upcycled layer), whose top-`k`
      weights still sum to 1 after the merge (`renormalize="always"`, as
      `upcycle` sets): the outputs are unchanged for any grouping;
    - merging into one expert gives the FFN whose weights are the
      usage-weighted average of all experts.

    With top-`k` routing in general the selection changes (a merged
    expert's score is its group's, which may now outrank other experts).
    Fine-tune after merging (compile the new model: optimizer state is not
    carried over).

    Args:
        moe: a built `SparseMoE` routed by a `TopKRouter` (its default router
            or a custom one), with float expert banks.
        groups: a list of lists of expert indices that splits the experts
            (each expert in exactly one group); group `i` of the sorted list
            (ordered by first member) becomes expert `i`.
        num_experts: instead of `groups`: how many experts to merge into.
            The `num_experts` most used experts lead the groups and every
            other expert joins the leader with the most similar router
            column (cosine similarity), as MC-SMoE groups experts around
            dominant ones.
        usage: `(E,)` expert usage (e.g. `expert_usage(model, data)[name]`);
            default: the layer's last-call `expert_load` (equal weights if it
            was never called).
        router: `"logsumexp"` or `"max"`, the rule for the merged router
            bias (see above).

    Returns:
        A new built `SparseMoE` (the old layer is unchanged) with one expert
        per group.

    Example:

    >>> import numpy as np
    >>> from keras.ops import convert_to_numpy
    >>> from keras_moe.layers import SparseMoE
    >>> moe = SparseMoE(8, 16, k=2, eval_capacity_factor=None)
    >>> x = np.random.rand(2, 3, 6).astype("float32")
    >>> _ = moe(x)
    >>> merged = merge_experts(moe, num_experts=4)
    >>> merged.num_experts, merged.k, convert_to_numpy(merged(x)).shape
    (4, 2, (2, 3, 6))

    References:
        Li, Zhang, Yadav, Sung, Cheng, Bansal, Chen. Merge, Then Compress:
        Demystify Efficient SMoE with Hints from Its Routing Policy
        (MC-SMoE, ICLR 2024).
    """
    if not isinstance(moe, SparseMoE) or not moe.built:
        raise ValueError(f"merge_experts needs a built SparseMoE. Received: moe={moe!r}")
    rule = check.one_of("router", router, MERGE_ROUTER_RULES)
    old_router = moe.router
    if type(old_router) is not TopKRouter:
        raise ValueError(
            "merge_experts combines the columns of a TopKRouter. Received: "
            f"router={type(old_router).__name__}"
        )
    if moe.experts.quantization_mode is not None:
        raise ValueError("merge_experts needs float expert banks, not int8 ones.")
    e = moe.num_experts
    if usage is None:
        usage = np.asarray(ops.convert_to_numpy(moe.expert_load), "float64")
    usage = np.asarray(usage, "float64")
    if usage.shape != (e,) or not np.isfinite(usage).all() or (usage < 0).any():
        raise ValueError(
            f"usage must hold one non-negative value per expert, shape ({e},). "
            f"Received: usage={usage.tolist()!r}"
        )
    groups = _merge_groups(moe, groups, num_experts, usage)
    count = len(groups)
    # (M, E) averaging weights a_e, and the (M, E) group indicator.
    weights = np.zeros((count, e))
    member = np.zeros((count, e))
    for g, group in enumerate(groups):
        u = usage[group]
        weights[g, group] = u / u.sum() if u.sum() > 0 else 1.0 / len(group)
        member[g, group] = 1.0

    k = min(moe.k, count)
    router_config = dict(
        old_router.get_config(),
        num_experts=count,
        k=k,
        use_bias=old_router.use_bias or rule == "logsumexp",
    )
    config = moe.get_config()
    for name in ("noisy_gating", "load_balance_weight", "z_loss_weight",
                 "router_kernel_initializer", "router"):
        config.pop(name, None)
    config.update(num_experts=count, k=k, router=TopKRouter.from_config(router_config))
    merged = SparseMoE.from_config(config)
    merged.build((None, moe.experts.kernel_in.shape[1]))

    def merge(value, axis, how):
        value = np.moveaxis(np.asarray(value, "float64"), axis, 0)
        flat = value.reshape(e, -1)
        if how == "sum":
            out = member @ flat
        elif how == "logsumexp":
            out = np.stack(
                [np.logaddexp.reduce(flat[group], axis=0) for group in groups]
            )
        elif how == "max":
            out = np.stack([flat[group].max(axis=0) for group in groups])
        else:
            out = weights @ flat
        return np.moveaxis(out.reshape((count,) + value.shape[1:]), 0, axis)

    old_variables = {_relative(v, moe): v for v in moe.variables}
    router_bias = f"{_relative(old_router.kernel, moe).rsplit('/', 1)[0]}/bias"
    for variable in merged.variables:
        key = _relative(variable, merged)
        if key in old_variables:
            value = np.asarray(ops.convert_to_numpy(old_variables[key]))
        elif key == router_bias:  # the router had no bias: zeros
            value = np.zeros((e,), "float32")
        else:
            continue
        shape = tuple(variable.shape)
        if value.shape != shape:
            axes = [a for a, (s, t) in enumerate(zip(value.shape, shape)) if s != t]
            if len(axes) != 1 or value.shape[axes[0]] != e:
                raise ValueError(
                    f"Cannot merge {variable.path}: {value.shape} -> {shape}"
                )
            how = "average"
            if key == router_bias:
                how = rule
            elif key == "expert_load":
                how = "sum"
            value = merge(value, axes[0], how)
        variable.assign(np.asarray(value).astype(variable.dtype))
    return merged
