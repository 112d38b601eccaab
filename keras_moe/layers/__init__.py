"""Public Keras layers of keras_moe."""

from keras_moe.layers.experts import Experts
from keras_moe.layers.moe import SparseMoE
from keras_moe.layers.routers import TopKRouter
from keras_moe.layers.soft_moe import SoftMoE

__all__ = ["Experts", "SoftMoE", "SparseMoE", "TopKRouter"]
