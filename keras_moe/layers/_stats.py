"""Routing statistics kept in a layer's non-trainable state."""

from keras import ops


def statistic(layer, name, shape):
    """A float32, non-trainable, zero-initialised variable of `layer` for a
    routing statistic that `call` assigns, so it updates inside compiled
    `fit`/`predict` on every backend.

    `autocast=False`: under a mixed dtype policy, torch's `assign` would write
    into an autocast copy (Keras 3.15) and the value would be lost.
    `aggregation="mean"`: under `tf.distribute.MirroredStrategy` each replica
    assigns the statistic of its share of the batch, and the variable holds
    their mean (for equal shares, the statistic of the whole batch).
    """
    return layer.add_weight(
        name=name,
        shape=shape,
        initializer="zeros",
        dtype="float32",
        trainable=False,
        autocast=False,
        aggregation="mean",
    )


def record(layer, **values):
    """Assigns each routing statistic `name=value` of this call to the
    layer's variable of that name (float32, no gradient)."""
    for name, value in values.items():
        getattr(layer, name).assign(ops.stop_gradient(ops.cast(value, "float32")))
