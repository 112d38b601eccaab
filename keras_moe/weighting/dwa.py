"""Dynamic Weight Average (Liu, Johns and Davison, 2019)."""

import keras
from keras import ops

from keras_moe.utils import validation as check
from keras_moe.weighting.base import _EPSILON, TaskWeighting, register


@register("dwa")
@keras.saving.register_keras_serializable(package="keras_moe")
class DWA(TaskWeighting):
    """Dynamic Weight Average: weights from the rate at which each task
    loss fell over the last two epochs.

    With `Lbar_t(k)` the mean training loss of task `t` over epoch `k`,
    the weights during epoch `k` are

    `w_t(k) = T softmax_t(r(k-1) / tau)`,  `r_t(k-1) = Lbar_t(k-1) / Lbar_t(k-2)`,

    and `w_t = 1` during the first two epochs. A task whose loss fell less
    (ratio near 1, or above) gets more weight; the weights sum to `T`.
    The total is `sum_t w_t L_t`. `MultiTaskModel.fit` closes each epoch
    (`end_epoch()`); a custom loop calls `model.task_weighting.end_epoch()`
    itself. Costs nothing beyond the plain step.

    Args:
        temperature: `tau > 0`; larger values give more uniform weights
            (default 2, the paper's).
        **kwargs: base `Layer` arguments.

    State: `loss_sum` `(T,)` and `steps` of the current epoch, `history`
    `(2, T)` (the mean losses of the last two epochs), `epochs` (epochs
    closed so far).

    Example:

    >>> import numpy as np
    >>> dwa = DWA()
    >>> for losses in ([1.0, 1.0], [0.5, 0.9], [0.25, 0.9]):
    ...     _ = dwa(np.array(losses, "float32"), training=True)
    ...     dwa.end_epoch()
    >>> [round(float(w), 3) for w in dwa.current_weights()]
    [0.876, 1.124]

    References:
        Liu, Johns, Davison. End-to-End Multi-Task Learning with Attention.
        CVPR 2019.
    """

    epoch_based = True

    def __init__(self, temperature=2.0, **kwargs):
        super().__init__(**kwargs)
        self.temperature = check.positive_float("temperature", temperature)

    def build(self, input_shape):
        super().build(input_shape)
        t = self.num_tasks
        self.loss_sum = self._state("loss_sum", (t,))
        self.steps = self._state("steps", ())
        self.history = self._state("history", (2, t), "ones")
        self.epochs = self._state("epochs", ())

    def current_weights(self):
        history = ops.convert_to_tensor(self.history)
        ratio = history[1] / ops.maximum(history[0], _EPSILON)
        weights = self.num_tasks * ops.softmax(ratio / self.temperature)
        ready = ops.convert_to_tensor(self.epochs) >= 2.0
        return ops.where(ready, weights, ops.ones_like(weights))

    def call(self, task_losses, training=None):
        return self.weighted_total(task_losses, training=training)[0]

    def weighted_total(self, task_losses, training=None):
        task_losses = ops.cast(task_losses, "float32")
        weights = self.current_weights()
        if training:
            self.loss_sum.assign_add(ops.stop_gradient(task_losses))
            self.steps.assign_add(1.0)
        return ops.sum(weights * task_losses), weights

    def end_epoch(self):
        """Moves the mean losses of the epoch into `history`."""
        steps = ops.convert_to_tensor(self.steps)
        seen = steps > 0.0
        mean = ops.convert_to_tensor(self.loss_sum) / ops.maximum(steps, 1.0)
        history = ops.convert_to_tensor(self.history)
        shifted = ops.stack([history[1], mean])
        self.history.assign(ops.where(seen, shifted, history))
        self.epochs.assign(
            ops.convert_to_tensor(self.epochs) + ops.cast(seen, "float32")
        )
        self.loss_sum.assign(ops.zeros_like(mean))
        self.steps.assign(ops.zeros_like(steps))

    def get_config(self):
        config = super().get_config()
        config.update(temperature=self.temperature)
        return config
