"""Fixed weighting: the plain sum of the task losses (LibMTL's EW)."""

import keras

from keras_moe.weighting.base import TaskWeighting, register


@register("fixed", "ew")
@keras.saving.register_keras_serializable(package="keras_moe")
class FixedWeighting(TaskWeighting):
    """Fixed weighting: the plain sum of the task losses, `sum_t L_t`.

    With `MultiTaskModel`, `L_t` already includes the constant factor of
    `compile(loss_weights=...)`, so this is exactly Keras' own weighted sum.

    Args:
        **kwargs: base `Layer` arguments.

    Call arguments:
        task_losses: `(T,)` task losses.
        training: unused.

    Returns:
        The scalar total loss.

    Example:

    >>> import numpy as np
    >>> float(FixedWeighting()(np.array([1.0, 2.5], "float32")))
    3.5
    """
