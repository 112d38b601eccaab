"""Token groups of a `SparseMoE` (modalities, languages, domains): the
per-group balancing and entropy losses and the group x expert load."""

from keras import ops

from keras_moe.layers._routing_ids import ids_per_token
from keras_moe.ops import balancing
from keras_moe.utils import validation as check


def init_group_options(layer, num_groups, group_names, group_balance_weight,
                       local_entropy_weight, global_entropy_weight,
                       global_entropy_threshold):
    """Validates a `SparseMoE`'s group options and sets them on `layer`."""
    layer.num_groups = (
        None
        if num_groups is None
        else check.positive_int("num_groups", num_groups, check.MAX_TASKS)
    )
    layer.group_balance_weight = check.non_negative_float(
        "group_balance_weight", group_balance_weight
    )
    layer.local_entropy_weight = check.non_negative_float(
        "local_entropy_weight", local_entropy_weight
    )
    layer.global_entropy_weight = check.non_negative_float(
        "global_entropy_weight", global_entropy_weight
    )
    layer.global_entropy_threshold = (
        None
        if global_entropy_threshold is None
        else check.non_negative_float(
            "global_entropy_threshold", global_entropy_threshold
        )
    )
    if layer.num_groups is None:
        if group_names is not None or layer.group_balance_weight:
            raise ValueError(
                "group_names and group_balance_weight need num_groups. "
                f"Received: num_groups=None, group_names={group_names!r}, "
                f"group_balance_weight={group_balance_weight}"
            )
        layer.group_names = None
    else:
        layer.group_names = check.task_names(
            group_names, layer.num_groups, label="group"
        )


def group_terms(layer, groups, shape, probs, expert_index, selected, valid,
                training):
    """Adds, in training, `layer`'s per-group Switch loss and LIMoE entropy
    losses (`group_balance_weight`, `local_entropy_weight`,
    `global_entropy_weight`) and returns the `(G, E)` group x expert load of
    the call (or `None` without `num_groups`).

    Args:
        layer: the `SparseMoE` (its group options and `add_loss`).
        groups: the call's `groups=` ids (per example or token), or `None`:
            every token in group 0.
        shape: the inputs' shape `(..., d)`.
        probs: `(N, E)` float32 router probabilities.
        expert_index: `(N, k)` chosen experts.
        selected: `(N, k)` bool pairs that count, or `None`.
        valid: `(N,)` bool tokens that count, or `None`.
        training: training mode (the losses are added in training only).
    """
    entropy_weights = layer.local_entropy_weight or layer.global_entropy_weight
    if layer.num_groups is None and not entropy_weights:
        if groups is not None:
            raise ValueError(
                f"{layer.name}: groups= needs num_groups set in the "
                "constructor. Received: num_groups=None"
            )
        return None
    g = layer.num_groups or 1
    if groups is None:  # every token in group 0
        ids = ops.zeros((ops.shape(probs)[0],), dtype="int32")
    else:
        ids = ids_per_token(layer.name, groups, shape)
    if training and entropy_weights:
        local, global_ = balancing.entropy_losses(
            probs, ids, g, mask=valid, threshold=layer.global_entropy_threshold
        )
        if layer.local_entropy_weight:
            layer.add_loss(layer.local_entropy_weight * local)
        if layer.global_entropy_weight:
            layer.add_loss(layer.global_entropy_weight * global_)
    if layer.num_groups is None:
        return None
    if training and layer.group_balance_weight:
        layer.add_loss(
            layer.group_balance_weight
            * balancing.group_load_balancing_loss(
                probs, expert_index, layer.num_experts, ids, g, mask=valid
            )
        )
    return balancing.group_expert_load(
        expert_index, layer.num_experts, ids, g, mask=valid, selected=selected
    )
