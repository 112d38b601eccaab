"""Homoscedastic-uncertainty weighting (Kendall, Gal and Cipolla, 2018)."""

import keras
from keras import ops

from keras_moe.utils import validation as check
from keras_moe.weighting.base import TaskWeighting, register


# |s| beyond this makes exp(-s) 0 or infinite in float32 (it overflows at
# about 88.7).
MAX_LOG_VARIANCE = 80.0


def _log_variance(value):
    value = check.finite_float("initial_log_variance", value)
    if abs(value) > MAX_LOG_VARIANCE:
        raise ValueError(
            f"initial_log_variance must be in [-{MAX_LOG_VARIANCE:g}, "
            f"{MAX_LOG_VARIANCE:g}] (exp(-s) must be finite in float32). "
            f"Received: initial_log_variance={value!r}"
        )
    return value


@register("uncertainty")
@keras.saving.register_keras_serializable(package="keras_moe")
class UncertaintyWeighting(TaskWeighting):
    """Homoscedastic-uncertainty weighting (Kendall, Gal and Cipolla, 2018).

    Every task gets a trainable log-variance `s_t = log sigma_t^2`, trained
    with the model by the same optimizer, and the total loss is

    `total = sum_t exp(-s_t) L_t + s_t`.

    This is twice Kendall et al.'s objective for regression tasks,
    `sum_t L_t / (2 sigma_t^2) + log sigma_t` with `s = log sigma^2`:
    the factor 2 changes neither the minimiser nor the direction of the
    gradients, only their scale, and the same form is used for every loss
    (the paper's classification form, `L_t / sigma_t^2 + log sigma_t`, has
    the same minimiser up to a factor 2 in the variance). For fixed `L_t`
    the optimum is `exp(s_t) = L_t`: the learned variance tracks the task
    loss (the noise variance for a mean squared error), and noisy tasks are
    down-weighted by `exp(-s_t)`. The `s_t` term keeps the weights from
    collapsing to 0.

    Args:
        initial_log_variance: starting `s_t` in [-80, 80], one number for
            all tasks or a list of one per task (default 0: weight 1).
        **kwargs: base `Layer` arguments.

    Call arguments:
        task_losses: `(T,)` task losses.
        training: unused.

    Returns:
        The scalar total loss.

    Example:

    >>> import numpy as np
    >>> weighting = UncertaintyWeighting(initial_log_variance=[0.0, 1.0])
    >>> total = weighting(np.array([2.0, 2.0], "float32"))
    >>> round(float(keras.ops.convert_to_numpy(total)), 4)
    3.7358

    References:
        Kendall, Gal, Cipolla. Multi-Task Learning Using Uncertainty to
        Weigh Losses for Scene Geometry and Semantics. CVPR 2018.
    """

    def __init__(self, initial_log_variance=0.0, **kwargs):
        super().__init__(**kwargs)
        if isinstance(initial_log_variance, (list, tuple)):
            initial_log_variance = [_log_variance(v) for v in initial_log_variance]
        else:
            initial_log_variance = _log_variance(initial_log_variance)
        self.initial_log_variance = initial_log_variance

    def build(self, input_shape):
        super().build(input_shape)
        initial = self._per_task("initial_log_variance", self.initial_log_variance)
        self.log_variance = self.add_weight(
            name="log_variance",
            shape=(self.num_tasks,),
            initializer=keras.initializers.Constant(initial),
            trainable=True,
            dtype="float32",
        )

    def current_weights(self):
        return ops.exp(-ops.convert_to_tensor(self.log_variance))

    def call(self, task_losses, training=None):
        return self.weighted_total(task_losses, training=training)[0]

    def weighted_total(self, task_losses, training=None):
        task_losses = ops.cast(task_losses, "float32")
        s = ops.convert_to_tensor(self.log_variance)
        weights = ops.exp(-s)
        return ops.sum(weights * task_losses + s), ops.stop_gradient(weights)

    def get_config(self):
        config = super().get_config()
        config.update(initial_log_variance=self.initial_log_variance)
        return config
