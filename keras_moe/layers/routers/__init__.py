"""Routers: who sends which token to which expert, one router a file."""

from keras_moe.layers.routers.balanced_assignment import BalancedAssignmentRouter
from keras_moe.layers.routers.dselect_k import DSelectKRouter
from keras_moe.layers.routers.expert_choice import ExpertChoiceRouter
from keras_moe.layers.routers.hash_router import HashRouter
from keras_moe.layers.routers.task_router import TaskRouter
from keras_moe.layers.routers.top_k import (
    INPUT_NORMS,
    SCORE_FUNCTIONS,
    TopKRouter,
    accepts_mask,
    default_router_initializer,
    routing_output_spec,
)

__all__ = [
    "BalancedAssignmentRouter",
    "DSelectKRouter",
    "ExpertChoiceRouter",
    "HashRouter",
    "TaskRouter",
    "TopKRouter",
]
