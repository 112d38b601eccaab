"""Auxiliary routing losses as pure functions of router outputs.

Routers call these and add `weight * loss` with `Layer.add_loss` in training;
the unweighted values are also returned in the routing so they can be read,
logged or tested.
"""

from keras import ops


def load_balancing_loss(probs, expert_index, num_experts):
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

    Returns:
        A float32 scalar.

    References:
        Fedus, Zoph, Shazeer. Switch Transformers (2021), eq. 4.
        Lepikhin et al. GShard (2020).
    """
    probs = ops.cast(probs, "float32")
    one_hot = ops.one_hot(expert_index, num_experts, dtype="float32")
    fraction = ops.mean(ops.sum(one_hot, axis=1), axis=0)
    fraction = fraction / ops.cast(ops.shape(expert_index)[1], "float32")
    mean_prob = ops.mean(probs, axis=0)
    return num_experts * ops.sum(ops.stop_gradient(fraction) * mean_prob)


def router_z_loss(logits):
    """ST-MoE router z-loss `mean_n (logsumexp_e logits[n, e])^2`.

    Keeps router logits small, which keeps the softmax numerically stable.

    References:
        Zoph et al. ST-MoE (2022), eq. 5.
    """
    z = ops.logsumexp(ops.cast(logits, "float32"), axis=-1)
    return ops.mean(ops.square(z))
