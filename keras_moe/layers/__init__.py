"""Public Keras layers of keras_moe."""

from keras_moe.layers.experts import Experts
from keras_moe.layers.moe import SparseMoE
from keras_moe.layers.routers import TopKRouter

__all__ = ["Experts", "SparseMoE", "TopKRouter"]
