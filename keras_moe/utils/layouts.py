"""Layouts of a layer's intermediate tensors under the current Keras
distribution (`keras.distribution`).

The layers call `constrain` on the tensors a distribution may lay out (e.g.
`SparseMoE`'s `(E, C, d)` expert buffers); `keras_moe.distribution`
provides the distribution that does (`ExpertParallel`) and re-exports these
functions. They live here, below the layers, so that a layer does not
import the distribution module that sits above it.
"""

import keras


def has_tensor_layout(layer, name):
    """Whether the current distribution lays out the tensor `name` of
    `layer` (see `constrain`), e.g. an expert-parallel `"expert_buffers"`."""
    distribution = keras.distribution.distribution()
    if distribution is None:
        return False
    path = f"{layer.path or layer.name}/{name}"
    return distribution.get_tensor_layout(path) is not None


def constrain(tensor, layer, name):
    """Applies the current distribution's layout for the tensor `name` of
    `layer` (path `"<layer.path>/<name>"`, e.g. `"moe/expert_buffers"`), if
    a distribution is set and has one; otherwise returns `tensor`."""
    distribution = keras.distribution.distribution()
    if distribution is None:
        return tensor
    layout = distribution.get_tensor_layout(f"{layer.path or layer.name}/{name}")
    if layout is None:
        return tensor
    return keras.distribution.distribute_tensor(tensor, layout)
