"""Pure tensor functions: token dispatch/combine and routing losses."""

from keras_moe.ops.balancing import (
    cv_squared,
    entropy_losses,
    group_expert_load,
    group_load_balancing_loss,
    load_balancing_loss,
    noisy_top_k_load,
    router_z_loss,
)
from keras_moe.ops.dispatching import (
    DispatchPlan,
    combine,
    compute_capacity,
    dense_gates,
    dispatch,
    expert_counts,
    make_dispatch_plan,
    plan_from_positions,
)
from keras_moe.ops.dropless import (
    BlockPlan,
    block_combine,
    block_dispatch,
    default_block_size,
    gather_experts,
    make_block_plan,
    row_budget,
    run_blocks,
)
from keras_moe.ops.grouped import grouped_kernel_available, grouped_matmul
from keras_moe.ops.selection import top_k

__all__ = [
    "BlockPlan",
    "DispatchPlan",
    "block_combine",
    "block_dispatch",
    "default_block_size",
    "gather_experts",
    "grouped_kernel_available",
    "grouped_matmul",
    "make_block_plan",
    "row_budget",
    "run_blocks",
    "combine",
    "cv_squared",
    "entropy_losses",
    "group_expert_load",
    "group_load_balancing_loss",
    "compute_capacity",
    "dense_gates",
    "dispatch",
    "expert_counts",
    "load_balancing_loss",
    "make_dispatch_plan",
    "noisy_top_k_load",
    "plan_from_positions",
    "router_z_loss",
    "top_k",
]
