"""Public Keras layers of keras_moe."""

from keras_moe.layers.balanced_assignment import BalancedAssignmentRouter
from keras_moe.layers.dselect_k import DSelectKRouter
from keras_moe.layers.expert_choice import ExpertChoiceRouter
from keras_moe.layers.experts import Experts
from keras_moe.layers.hash_router import HashRouter
from keras_moe.layers.moe import SparseMoE
from keras_moe.layers.routers import TopKRouter
from keras_moe.layers.soft_moe import SoftMoE
from keras_moe.layers.task_router import TaskRouter

__all__ = [
    "BalancedAssignmentRouter",
    "DSelectKRouter",
    "ExpertChoiceRouter",
    "Experts",
    "HashRouter",
    "SoftMoE",
    "SparseMoE",
    "TaskRouter",
    "TopKRouter",
]
