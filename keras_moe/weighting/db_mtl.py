"""DB-MTL: dual-balancing multi-task learning (Lin et al., 2023)."""

import keras
from keras import ops

from keras_moe.utils import validation as check
from keras_moe.weighting.base import GradientWeighting, register

_LOG_FLOOR = 1e-8


def db_mtl_direction(grads, buffer, step, beta=0.9, beta_sigma=0.0):
    """DB-MTL's update from the `(T, P)` gradients of the log-losses.

    `buffer <- grads + beta / step^beta_sigma (buffer - grads)` (a moving
    average of each task's gradient), then every task's averaged gradient
    is scaled to the largest norm: `alpha_t = max_k ||b_k|| / ||b_t||` and
    the update is `sum_t alpha_t b_t`.

    Returns:
        `(update (P,), new buffer (T, P), alpha (T,))`.
    """
    grads = ops.cast(grads, "float32")
    rate = beta / ops.power(ops.cast(step, "float32"), beta_sigma)
    buffer = grads + rate * (ops.cast(buffer, "float32") - grads)
    norms = ops.sqrt(ops.sum(buffer * buffer, axis=1))
    alpha = ops.max(norms) / (norms + 1e-8)
    return ops.matmul(alpha, buffer), buffer, alpha


@register("db_mtl")
@keras.saving.register_keras_serializable(package="keras_moe")
class DBMTL(GradientWeighting):
    """DB-MTL: balance the loss scales with a log transform, and the
    gradient magnitudes by scaling every task gradient to the largest.

    The task objectives are `log(L_t + 1e-8)` (loss-scale balancing: a
    task's gradient no longer grows with its loss' units); their gradients
    `g_t` on the shared parameters are averaged over steps
    (`b_t <- g_t + beta / k^beta_sigma (b_t - g_t)` at step `k`) and the
    shared update is `sum_t (max_k ||b_k|| / ||b_t||) b_t`
    (gradient-magnitude balancing). The task-specific parameters get the
    gradients of the log-losses. Needs the full per-task gradients on the
    shared parameters (a moving average of the size of the parameters:
    `T x P` floats of state); it has no representation mode.

    Cost: `T` backward passes and `T x P` floats of state.

    Args:
        beta: the moving average's rate (default 0.9).
        beta_sigma: its decay with the step (default 0).
        num_parameters: the number of shared parameters `P`; set by
            `MultiTaskModel` (saved in the config so that a reloaded
            weighting has its `(T, P)` state).
        **kwargs: base `Layer` arguments.

    State: `buffer` `(T, P)`, `iterations`.

    References:
        Lin, Ye, Zhang. Dual-Balancing for Multi-Task Learning.
        arXiv:2308.12029, 2023.
    """

    supports_representation = False

    def __init__(self, beta=0.9, beta_sigma=0.0, num_parameters=None, **kwargs):
        super().__init__(**kwargs)
        if num_parameters is not None:
            num_parameters = check.positive_int(
                "num_parameters", num_parameters, check.MAX_WEIGHT_ELEMENTS
            )
        self.num_parameters = num_parameters
        beta = check.non_negative_float("beta", beta)
        if beta >= 1.0:
            raise ValueError(f"beta must be in [0, 1). Received: beta={beta!r}")
        self.beta = beta
        self.beta_sigma = check.non_negative_float("beta_sigma", beta_sigma)
        self.buffer = None

    def build(self, input_shape):
        super().build(input_shape)
        self.iterations = self._state("iterations", ())
        if self.num_parameters is not None:
            self.buffer = self._state("buffer", (self.num_tasks, self.num_parameters))

    def build_from_config(self, config):
        # On load, `MultiTaskModel` builds it once the shared parameters are
        # known (`build_gradient_state` compares their number first, so an
        # edited `num_parameters` fails before allocating its buffer).
        # Keras marks a deserialized layer built whatever this does; the
        # flag below lets `build_gradient_state` undo that.
        if self.num_parameters is None:
            super().build_from_config(config)
        else:
            self._build_deferred = True

    def build_gradient_state(self, num_parameters):
        if num_parameters is None:
            raise ValueError(
                "DB-MTL keeps a moving average of the full task gradients "
                "and has no representation mode: use it without "
                "MultiTaskModel(representation=...)."
            )
        if self.num_parameters is not None and num_parameters != self.num_parameters:
            # Checked before the `(T, P)` buffer exists: an edited file
            # fails here instead of allocating a buffer of its size.
            raise ValueError(
                "This DBMTL was made for another model. Received: "
                f"num_parameters={self.num_parameters!r}, the model has "
                f"{num_parameters} shared parameters"
            )
        if getattr(self, "_build_deferred", False):
            self._build_deferred = False
            self.built = False  # the model builds it now
        if self.built and self.buffer is None:
            # Built (e.g. by `from_config`) without a size: the buffer
            # cannot be added any more, so the saved state would not load.
            raise ValueError(
                "This DBMTL was built without the number of shared "
                "parameters, so it has no gradient buffer. Received: "
                f"num_parameters={self.num_parameters!r}, the model has "
                f"{num_parameters}"
            )
        super().build_gradient_state(num_parameters)

    def task_objectives(self, task_losses):
        return ops.log(ops.cast(task_losses, "float32") + _LOG_FLOOR)

    def combine(self, grads, task_losses):
        if self.buffer is None:
            raise ValueError(
                "DB-MTL needs the number of shared parameters before it is "
                "built: use it through MultiTaskModel(task_weighting=...)."
            )
        step = ops.convert_to_tensor(self.iterations) + 1.0
        update, buffer, alpha = db_mtl_direction(
            grads, ops.convert_to_tensor(self.buffer), step, self.beta, self.beta_sigma
        )
        self.buffer.assign(buffer)
        self.iterations.assign(step)
        self._record(alpha)
        return update

    def get_config(self):
        config = super().get_config()
        config.update(
            beta=self.beta, beta_sigma=self.beta_sigma, num_parameters=self.num_parameters
        )
        return config
