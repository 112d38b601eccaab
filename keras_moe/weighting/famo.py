"""FAMO: Fast Adaptive Multitask Optimization (Liu et al., 2023)."""

import keras
from keras import ops

from keras_moe.utils import validation as check
from keras_moe.weighting.base import TaskWeighting, register

_LOSS_FLOOR = 1e-8


@register("famo")
@keras.saving.register_keras_serializable(package="keras_moe")
class FAMO(TaskWeighting):
    """FAMO: loss weights that equalise the rate at which the task losses
    fall, learned from the losses alone (no task gradients).

    With logits `xi` (start at 0), `z = softmax(xi)` and
    `D_t = L_t - min_t + 1e-8` (`min_t = 0`: the losses are assumed to be
    >= 0), the minimised objective is

    `total = sum_t z_t log D_t / c`,  `c = sum_t z_t / D_t` (held constant),

    whose gradient is `sum_t w_t grad L_t` with `w_t = z_t / (c D_t)`:
    a step on the weighted log-losses, whose weights `w_t` sum to 1. After each step the logits take one Adam
    step (learning rate `learning_rate`, L2 penalty `weight_decay`) on
    `J_softmax(xi)^T delta`, with `delta_t = log D_t(before) - log D_t(after)`
    the fall of each log-loss: tasks whose loss fell more lose weight.

    The paper evaluates the losses after the step on the same batch (one
    more forward pass). Here `delta` compares the losses of two consecutive
    steps (different batches) and the logits are updated at the start of
    the next step, before its weights are used: no extra forward pass, so
    the cost is that of the plain step, at the price of a noisier `delta`
    (see docs/task_weighting.md). `current_weights()` is
    `z_t / (c D_t)` of the last training step.

    Args:
        learning_rate: step size of the logits' Adam (> 0; default 0.025,
            the paper's).
        weight_decay: L2 penalty on the logits (>= 0; default 1e-3).
        **kwargs: base `Layer` arguments.

    State: `logits`, `moment`, `second_moment` (Adam), `previous_losses`,
    `iterations`, `last_weights`.

    Example:

    >>> import numpy as np
    >>> famo = FAMO()
    >>> _ = famo(np.array([1.0, 1.0], "float32"), training=True)
    >>> _ = famo(np.array([0.5, 1.0], "float32"), training=True)
    >>> [round(float(x), 3) for x in famo.logits.numpy()]
    [-0.025, 0.025]

    References:
        Liu, Feng, Stone, Liu. FAMO: Fast Adaptive Multitask Optimization.
        NeurIPS 2023.
    """

    def __init__(self, learning_rate=0.025, weight_decay=1e-3, **kwargs):
        super().__init__(**kwargs)
        self.learning_rate = check.positive_float("learning_rate", learning_rate)
        self.weight_decay = check.non_negative_float("weight_decay", weight_decay)

    def build(self, input_shape):
        super().build(input_shape)
        t = self.num_tasks
        self.logits = self._state("logits", (t,))
        self.moment = self._state("moment", (t,))
        self.second_moment = self._state("second_moment", (t,))
        self.previous_losses = self._state("previous_losses", (t,), "ones")
        self.iterations = self._state("iterations", ())
        self.last_weights = self._state("last_weights", (t,), "ones")

    def current_weights(self):
        return ops.convert_to_tensor(self.last_weights)

    def _updated_logits(self, losses):
        """One Adam step of the logits on the fall of the log-losses since
        the previous step (none at the first step)."""
        logits = ops.convert_to_tensor(self.logits)
        iterations = ops.convert_to_tensor(self.iterations)
        delta = ops.log(ops.convert_to_tensor(self.previous_losses)) - ops.log(losses)
        z = ops.softmax(logits)
        gradient = z * (delta - ops.sum(z * delta))  # J_softmax^T delta
        gradient = gradient + self.weight_decay * logits
        step = iterations  # Adam's step count: 1 at the first update
        beta_1, beta_2 = 0.9, 0.999
        moment = beta_1 * ops.convert_to_tensor(self.moment) + (1 - beta_1) * gradient
        second = beta_2 * ops.convert_to_tensor(self.second_moment) + (
            1 - beta_2
        ) * ops.square(gradient)
        safe_step = ops.maximum(step, 1.0)
        m_hat = moment / (1 - ops.power(beta_1, safe_step))
        v_hat = second / (1 - ops.power(beta_2, safe_step))
        new_logits = logits - self.learning_rate * m_hat / (ops.sqrt(v_hat) + 1e-8)
        first = ops.equal(iterations, 0.0)
        self.moment.assign(
            ops.where(first, ops.convert_to_tensor(self.moment), moment)
        )
        self.second_moment.assign(
            ops.where(first, ops.convert_to_tensor(self.second_moment), second)
        )
        return ops.where(first, logits, new_logits)

    def call(self, task_losses, training=None):
        task_losses = ops.cast(task_losses, "float32")
        distance = ops.maximum(task_losses, 0.0) + _LOSS_FLOOR
        if training:
            logits = self._updated_logits(ops.stop_gradient(distance))
            self.logits.assign(logits)
        else:
            logits = ops.convert_to_tensor(self.logits)
        z = ops.softmax(logits)
        c = ops.stop_gradient(ops.sum(z / distance))
        if training:
            self.previous_losses.assign(ops.stop_gradient(distance))
            self.iterations.assign_add(1.0)
            self.last_weights.assign(ops.stop_gradient(z / (c * distance)))
        return ops.sum(z * ops.log(distance)) / c

    def get_config(self):
        config = super().get_config()
        config.update(
            learning_rate=self.learning_rate, weight_decay=self.weight_decay
        )
        return config
