"""keras_moe: Mixture-of-Experts and multi-task layers for Keras 3.

Real sparse (capacity-based, static-shape) token dispatch on TensorFlow, JAX
and PyTorch.
"""

__version__ = "0.1.0"

from keras_moe import callbacks, layers, ops  # noqa: E402
from keras_moe import boxes, losses, metrics  # noqa: E402
from keras_moe import models, weighting  # noqa: E402
from keras_moe import distribution  # noqa: E402

__all__ = [
    "boxes",
    "callbacks",
    "distribution",
    "layers",
    "losses",
    "metrics",
    "models",
    "ops",
    "weighting",
    "__version__",
]
