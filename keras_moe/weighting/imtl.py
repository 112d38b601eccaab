"""IMTL: impartial multi-task learning (Liu et al., 2021): the loss part
(IMTL-L), the gradient part (IMTL-G) and both together (IMTL)."""

import keras
from keras import ops

from keras_moe.weighting.base import (
    _EPSILON,
    TaskWeighting,
    WeightedGradientWeighting,
    register,
)


def imtl_g_weights(gram):
    """IMTL-G's weights: `alpha` summing to 1 such that the update
    `d = sum_t alpha_t g_t` has the same projection on every unit task
    gradient `u_t = g_t / ||g_t||`.

    In closed form, with `D = [g_1 - g_t]_{t>1}` and `U = [u_1 - u_t]_{t>1}`:
    `alpha_{2..T} = g_1 U^T (D U^T)^-1`, `alpha_1 = 1 - sum alpha_{2..T}`,
    computed from the Gram matrix. When `D U^T` is singular (parallel
    gradients, where any weights are impartial) the weights are `1/T`.
    """
    gram = ops.cast(gram, "float32")
    t = gram.shape[0]
    if t == 1:
        return ops.ones((1,), "float32")
    norms = ops.sqrt(ops.maximum(ops.diagonal(gram), _EPSILON))
    projections = gram / norms[None, :]  # [i, j] = g_i . u_j
    first = projections[0, 0] - projections[0, 1:]
    system = (
        projections[0, 0]
        - projections[0:1, 1:]
        - projections[1:, 0:1]
        + projections[1:, 1:]
    )
    rest = ops.solve(ops.transpose(system), first[:, None])[:, 0]
    alpha = ops.concatenate([ops.reshape(1.0 - ops.sum(rest), (1,)), rest])
    fine = ops.all(ops.isfinite(alpha))
    return ops.where(fine, alpha, ops.full((t,), 1.0 / t))


class _LossScales:
    """IMTL-L's trainable log-scales `s_t` and the transformed losses
    `exp(s_t) L_t - s_t`."""

    def _build_scales(self):
        self.log_scale = self.add_weight(
            name="log_scale",
            shape=(self.num_tasks,),
            initializer="zeros",
            trainable=True,
            dtype="float32",
        )

    def _scaled(self, task_losses):
        s = ops.convert_to_tensor(self.log_scale)
        return ops.exp(s) * ops.cast(task_losses, "float32") - s


@register("imtl_l")
@keras.saving.register_keras_serializable(package="keras_moe")
class IMTLL(_LossScales, TaskWeighting):
    """IMTL-L: learned loss scales that make the scaled losses equal.

    Every task has a trainable `s_t` (start 0), trained with the model by
    its optimizer, and `total = sum_t exp(s_t) L_t - s_t`. For fixed `L_t`
    the optimum is `exp(s_t) L_t = 1`: every scaled loss is driven to the
    same value. (The same objective as uncertainty weighting with
    `s = -log sigma^2`, from another argument.) Costs nothing beyond the
    plain step.

    Args:
        **kwargs: base `Layer` arguments.

    Example:

    >>> import numpy as np
    >>> imtl = IMTLL()
    >>> float(imtl(np.array([1.0, 2.0], "float32")))
    3.0

    References:
        Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang. Towards Impartial
        Multi-task Learning. ICLR 2021.
    """

    def build(self, input_shape):
        super().build(input_shape)
        self._build_scales()

    def current_weights(self):
        return ops.exp(ops.convert_to_tensor(self.log_scale))

    def call(self, task_losses, training=None):
        return ops.sum(self._scaled(task_losses))


@register("imtl_g")
@keras.saving.register_keras_serializable(package="keras_moe")
class IMTLG(WeightedGradientWeighting):
    """IMTL-G: the update whose projections on all unit task gradients are
    equal, so that no task is favoured.

    `d = sum_t alpha_t g_t` with `sum_t alpha_t = 1` and
    `d . u_1 = d . u_t` for every `t` (`u_t = g_t / ||g_t||`); in closed
    form `alpha_{2..T} = g_1 U^T (D U^T)^-1` with `D = [g_1 - g_t]`,
    `U = [u_1 - u_t]`. The weights can be negative.

    Cost: `T` backward passes (or `T` head passes and one trunk pass in
    representation mode) and a `(T - 1)` linear system.

    Args:
        **kwargs: base `Layer` arguments.

    Example:

    >>> import numpy as np
    >>> grads = np.array([[2.0, 0.0], [0.0, 1.0]], "float32")
    >>> imtl = IMTLG()
    >>> imtl.build((2,))
    >>> [round(float(x), 4) for x in imtl.combine(grads, np.ones(2))]
    [0.6667, 0.6667]

    References:
        Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang. Towards Impartial
        Multi-task Learning. ICLR 2021.
    """

    def gram_weights(self, gram, task_losses):
        return imtl_g_weights(gram)


@register("imtl")
@keras.saving.register_keras_serializable(package="keras_moe")
class IMTL(_LossScales, WeightedGradientWeighting):
    """IMTL: IMTL-L's learned loss scales and IMTL-G's impartial update
    together (the paper's full method).

    The task objectives are `o_t = exp(s_t) L_t - s_t` (trainable `s_t`,
    trained by the model's optimizer on `sum_t o_t`); the shared update is
    IMTL-G's combination of their gradients.

    Cost: as IMTL-G.

    Args:
        **kwargs: base `Layer` arguments.

    References:
        Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang. Towards Impartial
        Multi-task Learning. ICLR 2021.
    """

    def build(self, input_shape):
        super().build(input_shape)
        self._build_scales()

    def task_objectives(self, task_losses):
        return self._scaled(task_losses)

    def gram_weights(self, gram, task_losses):
        return imtl_g_weights(gram)
