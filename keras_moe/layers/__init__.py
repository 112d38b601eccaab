"""Public Keras layers of keras_moe."""

from keras_moe.layers.cgc import CGC
from keras_moe.layers.experts import Experts
from keras_moe.layers.heads import (
    BinaryHead,
    BoxHead,
    ClassificationHead,
    RegressionHead,
    default_compile_args,
)
from keras_moe.layers.mixture import MixtureOfExperts
from keras_moe.layers.mmoe import MultiGateMoE
from keras_moe.layers.ple import PLE
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
from keras_moe.layers.sparse_moe import SparseMoE

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
