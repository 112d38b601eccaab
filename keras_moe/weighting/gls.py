"""Geometric Loss Strategy (Chennupati et al., 2019)."""

import keras
from keras import ops

from keras_moe.weighting.base import _EPSILON, TaskWeighting, register


@register("gls")
@keras.saving.register_keras_serializable(package="keras_moe")
class GLS(TaskWeighting):
    """Geometric Loss Strategy: the geometric mean of the task losses.

    `total = (prod_t L_t)^(1/T) = exp(mean_t log L_t)`, whose gradient is
    `sum_t total / (T L_t) grad L_t`: each task is weighted by the inverse
    of its own loss (a task whose loss is small gets a large weight), which
    makes the objective invariant to the scale of each loss. The losses
    must be positive (they are clipped at 1e-12). `current_weights()` is
    `total / (T L_t)` of the last training step. Costs nothing beyond the
    plain step.

    Args:
        **kwargs: base `Layer` arguments.

    Example:

    >>> import numpy as np
    >>> gls = GLS()
    >>> round(float(gls(np.array([1.0, 4.0], "float32"))), 4)
    2.0

    References:
        Chennupati, Sistu, Yogamani, Rawashdeh. MultiNet++: Multi-Stream
        Feature Aggregation and Geometric Loss Strategy for Multi-Task
        Learning. CVPR Workshops 2019.
    """

    def build(self, input_shape):
        super().build(input_shape)
        self.last_weights = self._state("last_weights", (self.num_tasks,), "ones")

    def current_weights(self):
        return ops.convert_to_tensor(self.last_weights)

    def call(self, task_losses, training=None):
        return self.weighted_total(task_losses, training=training)[0]

    def weighted_total(self, task_losses, training=None):
        losses = ops.maximum(ops.cast(task_losses, "float32"), _EPSILON)
        total = ops.exp(ops.mean(ops.log(losses)))
        if not training:
            return total, self.current_weights()
        weights = ops.stop_gradient(total / (self.num_tasks * losses))
        self.last_weights.assign(weights)
        return total, weights
