"""Expert activations that Keras has no name for, usable by name.

`Experts` (and every MoE layer that builds one) resolves its `activation`
with `get` and saves it with `serialize`, so these names round-trip through
`get_config` as plain strings:

- `"gelu_approximate"`: the tanh approximation of GELU,
  `0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))`, i.e.
  `keras.activations.gelu(x, approximate=True)` (Gemma's experts; PyTorch's
  `gelu(approximate="tanh")`). Keras' own `"gelu"` is the exact erf form.
- `"quick_gelu"`: `x sigmoid(1.702 x)`, the sigmoid approximation of GELU
  (Hendrycks and Gimpel 2016; CLIP's QuickGELU), the gate activation of
  GPT-OSS's clamped GLU.

Any other identifier goes to `keras.activations.get` / `serialize`.

References:
    Hendrycks, Gimpel. Gaussian Error Linear Units (GELUs) (2016).
"""

import keras
from keras import ops

__all__ = ["gelu_approximate", "get", "quick_gelu", "serialize"]

QUICK_GELU_ALPHA = 1.702


@keras.saving.register_keras_serializable(package="keras_moe")
def gelu_approximate(x):
    """GELU, tanh approximation: `keras.activations.gelu(x, approximate=True)`.

    Example:

    >>> import numpy as np
    >>> round(float(gelu_approximate(np.float32(1.0))), 4)
    0.8412
    """
    return keras.activations.gelu(x, approximate=True)


@keras.saving.register_keras_serializable(package="keras_moe")
def quick_gelu(x):
    """`x * sigmoid(1.702 x)`: GELU's sigmoid approximation (QuickGELU).

    Example:

    >>> import numpy as np
    >>> round(float(quick_gelu(np.float32(1.0))), 4)
    0.8458
    """
    x = ops.convert_to_tensor(x)
    return x * ops.sigmoid(x * QUICK_GELU_ALPHA)


_BY_NAME = {"gelu_approximate": gelu_approximate, "quick_gelu": quick_gelu}


def get(identifier):
    """The activation function for `identifier`: one of this module's names,
    or anything `keras.activations.get` accepts."""
    if isinstance(identifier, str) and identifier in _BY_NAME:
        return _BY_NAME[identifier]
    if identifier in _BY_NAME.values():
        return identifier
    return keras.activations.get(identifier)


def serialize(activation):
    """The config value of `activation`: its name for this module's
    functions, else `keras.activations.serialize(activation)`."""
    for name, function in _BY_NAME.items():
        if activation is function:
            return name
    return keras.activations.serialize(activation)
