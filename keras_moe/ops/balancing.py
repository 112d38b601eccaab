"""Auxiliary routing losses as pure functions of router outputs.

Routers call these and add `weight * loss` with `Layer.add_loss` in training;
the unweighted values are also returned in the routing so they can be read,
logged or tested.
"""

from keras import ops

from keras_moe.ops import selection
from keras_moe.utils import replicas
from keras_moe.utils.tensors import flat_mask


def token_weights(mask):
    """`(N,)` float32 weights of the tokens a `mask` keeps (1) and drops (0),
    or `None` for no mask. `mask`: any shape with `N` elements, bool or
    numeric (nonzero keeps)."""
    mask = flat_mask(mask)
    return None if mask is None else ops.cast(mask, "float32")


def masked_mean(values, mask=None):
    """Mean over the leading axis of `values` `(N, ...)`, over the tokens
    of `mask` `(N,)` only (all of them for `None`; 0 if there is none).

    A dropped token's row is replaced by zeros before the sum, never
    multiplied by 0: a NaN in a padded or masked token stays out. Under data
    parallelism the sum and the count are those of all replicas
    (`keras_moe.utils.replicas`): the mean of the global batch.
    """
    values = ops.convert_to_tensor(values)
    weights = token_weights(mask)
    if weights is None:
        total = ops.sum(values, axis=0)
        count = ops.cast(ops.shape(values)[0], values.dtype)
    else:
        shape = (-1,) + (1,) * (len(values.shape) - 1)
        keep = ops.reshape(weights > 0, shape)
        total = ops.sum(ops.where(keep, values, ops.zeros_like(values)), axis=0)
        count = ops.cast(ops.sum(weights), values.dtype)
    # Under data parallelism, sums over the replicas: the global batch's mean.
    total = replicas.cross_replica_sum(total)
    count = replicas.cross_replica_sum(count)
    return total / ops.maximum(count, 1.0)  # an empty batch gives 0, not NaN


def mean_entropy(probs, mask=None):
    """Mean entropy (nats) of the router distributions `probs` `(..., N, E)`
    of `N` tokens, over the tokens of `mask` `(N,)` only (then averaged over
    any leading axes, e.g. `T` tasks' routers)."""
    probs = ops.cast(probs, "float32")
    entropy = -ops.sum(probs * ops.log(probs + 1e-9), axis=-1)  # (..., N)
    return ops.mean(masked_mean(ops.moveaxis(entropy, -1, 0), mask))


def load_balancing_loss(probs, expert_index, num_experts, mask=None):
    """Switch Transformer load-balancing loss, generalised to top-k.

    `L = E * sum_e f_e * P_e`, where `f_e` is the fraction of the `N k`
    (token, choice) assignments routed to expert `e` (before any capacity
    cut) and `P_e = mean_n probs[n, e]` is the mean router probability. `L` is
    1 for perfectly uniform routing and grows with imbalance; its gradient
    flows through `P` only.

    Args:
        probs: `(N, E)` router probabilities (taken before top-k).
        expert_index: `(N, k)` chosen experts.
        num_experts: `E`.
        mask: optional `(N,)` bool: the tokens that count (e.g. not
            padding); `f` and `P` are means over them only.

    Returns:
        A float32 scalar.

    References:
        Fedus, Zoph, Shazeer. Switch Transformers (2021), eq. 4.
        Lepikhin et al. GShard (2020).
    """
    probs = ops.cast(probs, "float32")
    one_hot = ops.one_hot(expert_index, num_experts, dtype="float32")
    fraction = masked_mean(ops.sum(one_hot, axis=1), mask)
    fraction = fraction / ops.cast(ops.shape(expert_index)[1], "float32")
    mean_prob = masked_mean(probs, mask)
    return num_experts * ops.sum(ops.stop_gradient(fraction) * mean_prob)


def router_z_loss(logits, mask=None):
    """ST-MoE router z-loss `mean_n (logsumexp_e logits[n, e])^2`.

    Keeps router logits small, which keeps the softmax numerically stable.
    With a `mask` `(N,)`, the mean is over the tokens it keeps.

    References:
        Zoph et al. ST-MoE (2022), eq. 5.
    """
    z = ops.logsumexp(ops.cast(logits, "float32"), axis=-1)
    return masked_mean(ops.square(z), mask)


def token_sum(values):
    """Sum over the leading (token) axis of `values` `(N, ...)`, over every
    data-parallel replica (`keras_moe.utils.replicas`): the global batch's
    per-expert importance or load, which `cv_squared` then compares."""
    return replicas.cross_replica_sum(ops.sum(values, axis=0))


def cv_squared(values):
    """Squared coefficient of variation `var(v) / mean(v)^2` of a vector.

    Shazeer et al. (2017) use it on the per-expert importance and load: 0
    when all experts are equal. Returns 0 for a vector of zeros.
    """
    values = ops.cast(values, "float32")
    mean = ops.mean(values)
    return ops.var(values) / (ops.square(mean) + 1e-10)


def noisy_top_k_load(clean_logits, noisy_logits, noise_std, k, mask=None):
    """Smooth per-expert load estimate of noisy top-k gating.

    `load_e = sum_n P(n, e)`, where `P(n, e) = Phi((clean_ne - t_ne) /
    std_ne)` is the probability that expert `e` stays in token `n`'s top-k
    when only its own noise is re-drawn, and `t_ne` is the k-th largest noisy
    logit of the other experts (the (k+1)-th overall if `e` is in the top-k,
    else the k-th). Differentiable in the router and noise weights.

    Args:
        clean_logits, noisy_logits, noise_std: `(N, E)`.
        k: experts per token.
        mask: optional `(N,)` bool: the tokens that count.

    Returns:
        `(E,)` float32, summed over the data-parallel replicas.

    References:
        Shazeer et al. Outrageously Large Neural Networks (2017), app. A.
    """
    clean_logits = ops.convert_to_tensor(clean_logits)
    noisy_logits = ops.convert_to_tensor(noisy_logits)
    noise_std = ops.convert_to_tensor(noise_std)
    num_experts = ops.shape(clean_logits)[-1]
    weights = token_weights(mask)
    keep = None if weights is None else (weights > 0)[:, None]
    if k >= num_experts:  # every expert is always chosen
        ones = ops.ones_like(clean_logits, dtype="float32")
        if keep is not None:
            ones = ops.where(keep, ones, 0.0)
        return token_sum(ones)
    top, _ = selection.top_k(noisy_logits, k + 1)
    kth = top[:, k - 1 : k]  # k-th largest: threshold for experts outside
    next_ = top[:, k : k + 1]  # (k+1)-th: threshold for experts inside
    inside = noisy_logits >= kth
    threshold = ops.where(inside, next_, kth)
    z = (clean_logits - threshold) / noise_std
    prob_in = ops.cast(0.5 * (1.0 + ops.erf(z / 2.0**0.5)), "float32")
    if keep is not None:
        prob_in = ops.where(keep, prob_in, ops.zeros_like(prob_in))
    return token_sum(prob_in)


def _group_matrix(groups, num_groups, mask=None):
    """`(N, G)` float32 one-hot of each token's group (zero rows for masked
    tokens and for ids outside `[0, G)`), and the `(G,)` token counts."""
    groups = ops.reshape(ops.cast(groups, "int32"), (-1,))
    one_hot = ops.one_hot(groups, num_groups, dtype="float32")
    weights = token_weights(mask)
    if weights is not None:
        one_hot = ops.where(weights[:, None] > 0, one_hot, 0.0)
    return one_hot, ops.sum(one_hot, axis=0)


def _mean_over_present(values, counts):
    """Mean of the per-group `values` over the groups with a token."""
    present = counts > 0
    total = ops.sum(ops.where(present, values, ops.zeros_like(values)))
    return total / ops.maximum(ops.sum(ops.cast(present, "float32")), 1.0)


def group_expert_load(
    expert_index, num_experts, groups, num_groups, mask=None, selected=None
):
    """`(G, E)`: the share of group `g`'s (token, choice) assignments routed
    to expert `e` (rows of groups with no token are 0).

    The modality x expert table of LIMoE: which experts each group (a
    modality, a task, a language) uses. `selected` `(N, k)` bool marks the
    assignments that count (e.g. those an expert-choice router made);
    default: all.
    """
    member, _ = _group_matrix(groups, num_groups, mask)
    return _group_load(member, expert_index, num_experts, selected)


def _group_load(member, expert_index, num_experts, selected=None):
    """`group_expert_load` from the `(N, G)` membership matrix."""
    one_hot = ops.one_hot(expert_index, num_experts, dtype="float32")
    if selected is not None:
        one_hot = ops.where(ops.cast(selected, "bool")[..., None], one_hot, 0.0)
    routed = ops.matmul(ops.transpose(member), ops.sum(one_hot, axis=1))  # (G, E)
    return routed / ops.maximum(ops.sum(routed, axis=1, keepdims=True), 1.0)


def group_load_balancing_loss(
    probs, expert_index, num_experts, groups, num_groups, mask=None
):
    """The Switch load-balancing loss within each group, averaged over the
    groups present in the batch:

    `L = mean_g E sum_e f_{g,e} P_{g,e}`

    with `f_{g,e}` the share of group `g`'s assignments routed to expert `e`
    and `P_{g,e}` the mean router probability of expert `e` over group `g`'s
    tokens. Each group is balanced on its own, so one group (e.g. the
    modality with more tokens) cannot take every expert while the global
    load still looks balanced. 1 when every group routes uniformly.

    Args:
        probs: `(N, E)` router probabilities.
        expert_index: `(N, k)` chosen experts.
        num_experts: `E`.
        groups: `(N,)` int group of each token, in `[0, G)`.
        num_groups: `G`.
        mask: optional `(N,)` bool: tokens that count.

    References:
        Fedus, Zoph, Shazeer. Switch Transformers (2021), eq. 4.
        Mustafa et al. Multimodal Contrastive Learning with LIMoE (2022),
        which balances per modality.
    """
    member, counts = _group_matrix(groups, num_groups, mask)
    probs = ops.cast(probs, "float32")
    if mask is not None:  # a NaN in a masked token stays out
        probs = ops.where(token_weights(mask)[:, None] > 0, probs, 0.0)
    fraction = _group_load(member, expert_index, num_experts)
    mean_prob = ops.matmul(ops.transpose(member), probs) / ops.maximum(
        counts, 1.0
    )[:, None]
    per_group = num_experts * ops.sum(ops.stop_gradient(fraction) * mean_prob, axis=1)
    return _mean_over_present(per_group, counts)


def entropy_losses(probs, groups=None, num_groups=1, mask=None, threshold=None):
    """LIMoE's local and global entropy losses, per group.

    - local: `mean_n H(p_n)`, the mean entropy of each token's routing
      distribution; minimising it makes each token confident.
    - global: `mean_g -H(pbar_g)`, with `pbar_g` the mean routing
      distribution over group `g`'s tokens; minimising it spreads each group
      over many experts. With a `threshold` `tau`, `max(0, tau - H(pbar_g))`
      instead (LIMoE's thresholded version: no push once a group's
      distribution is spread enough).

    Args:
        probs: `(N, E)` router probabilities.
        groups: optional `(N,)` int group per token (default: one group).
        num_groups: `G`.
        mask: optional `(N,)` bool: tokens that count.
        threshold: optional float `tau` (nats) for the global loss.

    Returns:
        `(local, global)` float32 scalars.

    References:
        Mustafa et al. Multimodal Contrastive Learning with LIMoE: the
        Language-Image Mixture of Experts (NeurIPS 2022), section 3.
    """
    probs = ops.cast(probs, "float32")
    if groups is None:
        groups = ops.zeros((ops.shape(probs)[0],), dtype="int32")
        num_groups = 1
    member, counts = _group_matrix(groups, num_groups, mask)
    keep = ops.sum(member, axis=1) > 0  # (N,): tokens of a group, unmasked
    probs = ops.where(keep[:, None], probs, 0.0)
    token_entropy = -ops.sum(probs * ops.log(probs + 1e-9), axis=-1)
    local = ops.sum(token_entropy) / ops.maximum(ops.sum(counts), 1.0)
    mean = ops.matmul(ops.transpose(member), probs) / ops.maximum(counts, 1.0)[:, None]
    group_entropy = -ops.sum(mean * ops.log(mean + 1e-9), axis=-1)  # (G,)
    if threshold is None:
        per_group = -group_entropy
    else:
        per_group = ops.maximum(float(threshold) - group_entropy, 0.0)
    return local, _mean_over_present(per_group, counts)
