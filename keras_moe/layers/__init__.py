"""Public Keras layers of keras_moe."""

from keras_moe.layers.experts import Experts
from keras_moe.layers.heads import (
    BinaryHead,
    BoxHead,
    ClassificationHead,
    RegressionHead,
    default_compile_args,
)
from keras_moe.layers.mixture import MixtureOfExperts
from keras_moe.layers.moe import SparseMoE
from keras_moe.layers.multitask import CGC, PLE, MultiGateMoE
from keras_moe.layers.routers import (
    BalancedAssignmentRouter,
    DSelectKRouter,
    ExpertChoiceRouter,
    HashRouter,
    Router,
    RoutingResult,
    TaskRouter,
    TopKRouter,
)
from keras_moe.layers.soft_moe import SoftMoE

__all__ = [
    "BalancedAssignmentRouter",
    "BinaryHead",
    "BoxHead",
    "CGC",
    "ClassificationHead",
    "DSelectKRouter",
    "ExpertChoiceRouter",
    "Experts",
    "HashRouter",
    "MixtureOfExperts",
    "MultiGateMoE",
    "PLE",
    "RegressionHead",
    "Router",
    "RoutingResult",
    "SoftMoE",
    "SparseMoE",
    "TaskRouter",
    "TopKRouter",
    "default_compile_args",
]
