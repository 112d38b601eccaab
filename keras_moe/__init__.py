"""keras_moe: Mixture-of-Experts and multi-task layers for Keras 3.

Real sparse (capacity-based, static-shape) token dispatch on TensorFlow, JAX
and PyTorch.
"""

__version__ = "0.1.0"

from keras_moe import activations, callbacks, layers, ops  # noqa: E402
from keras_moe import boxes, losses, metrics  # noqa: E402
from keras_moe import models, weighting  # noqa: E402
from keras_moe import distribution  # noqa: E402
from keras_moe import compression  # noqa: E402
from keras_moe import interop, upcycling  # noqa: E402  (no keras_hub import)


def __getattr__(name):
    # SavedModel / ONNX export, imported on first use so that
    # `python -m keras_moe.export` does not find itself already imported.
    if name in ("export_saved_model", "export_onnx"):
        from keras_moe import export

        return getattr(export, name)
    raise AttributeError(f"module 'keras_moe' has no attribute {name!r}")


__all__ = [
    "activations",
    "boxes",
    "callbacks",
    "distribution",
    "export_onnx",
    "export_saved_model",
    "interop",
    "layers",
    "losses",
    "metrics",
    "models",
    "ops",
    "upcycling",
    "weighting",
    "__version__",
]
