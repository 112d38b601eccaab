"""Routers: who sends which token to which expert.

`base.py` holds the contract, the `Router` base class and the
`RoutingResult` it returns; every other module holds one router.
"""

from keras_moe.layers.routers.balanced_assignment import BalancedAssignmentRouter
from keras_moe.layers.routers.base import (
    Router,
    RoutingResult,
    accepts_mask,
    default_router_initializer,
    routing_output_spec,
)
from keras_moe.layers.routers.dselect_k import DSelectKRouter
from keras_moe.layers.routers.expert_choice import ExpertChoiceRouter
from keras_moe.layers.routers.hash_router import HashRouter
from keras_moe.layers.routers.task_router import TaskRouter
from keras_moe.layers.routers.top_k import INPUT_NORMS, SCORE_FUNCTIONS, TopKRouter

__all__ = [
    "BalancedAssignmentRouter",
    "DSelectKRouter",
    "ExpertChoiceRouter",
    "HashRouter",
    "Router",
    "RoutingResult",
    "TaskRouter",
    "TopKRouter",
]
