"""UPGrad: unconflicting projection of gradients (Quinton and Rey, 2024)."""

import keras
from keras import ops

from keras_moe.utils import validation as check
from keras_moe.weighting.base import WeightedGradientWeighting, register


def dual_cone_weights(gram, preferences, iterations=20):
    """For each row `u_i` of `preferences` `(T, T)`, the `v_i` minimising
    `v^T M v` subject to `v >= u_i` (element-wise), by projected
    coordinate descent (`iterations` sweeps over the `T` coordinates;
    exact after one sweep for `T = 2`). `G^T v_i` is the projection of
    `G^T u_i` onto the dual cone of the task gradients.

    Returns:
        `(T, T)`: row `i` is `v_i`.
    """
    m = ops.cast(gram, "float32")
    lower = ops.cast(preferences, "float32")
    t = m.shape[0]
    diagonal = ops.maximum(ops.diagonal(m), 1e-12)
    eye = ops.eye(t, dtype="float32")

    def sweep(_, v):
        for k in range(t):
            slope = ops.matmul(v, m)[:, k]
            column = ops.maximum(lower[:, k], v[:, k] - slope / diagonal[k])
            v = v + (column - v[:, k])[:, None] * eye[k][None, :]
        return v

    return ops.fori_loop(0, iterations, sweep, lower)


def upgrad_weights(gram, norm_eps=1e-4, reg_eps=1e-4, iterations=20):
    """UPGrad's weights: `sum_i v_i`, `v_i` the dual-cone projection
    weights of `e_i / T` for the Gram matrix normalised by its trace plus
    `reg_eps I` (a trace below `norm_eps` counts as 0)."""
    gram = ops.cast(gram, "float32")
    t = gram.shape[0]
    trace = ops.sum(ops.diagonal(gram))
    normalised = ops.where(
        trace < norm_eps, ops.zeros_like(gram), gram / ops.maximum(trace, 1e-12)
    )
    eye = ops.eye(t, dtype="float32")
    v = dual_cone_weights(normalised + reg_eps * eye, eye / t, iterations)
    return ops.sum(v, axis=0)


def upgrad_direction(grads, norm_eps=1e-4, reg_eps=1e-4, iterations=20):
    """UPGrad's update of the `(T, P)` task gradients."""
    grads = ops.cast(grads, "float32")
    gram = ops.matmul(grads, ops.transpose(grads))
    return ops.matmul(upgrad_weights(gram, norm_eps, reg_eps, iterations), grads)


@register("upgrad")
@keras.saving.register_keras_serializable(package="keras_moe")
class UPGrad(WeightedGradientWeighting):
    """UPGrad: project each (scaled) task gradient onto the dual cone of
    all task gradients, and average.

    For each task `i`, `g_i / T` is projected onto the dual cone
    `{d : d . g_t >= 0 for all t}`; the projection is `G^T v_i` with
    `v_i = argmin_{v >= e_i / T} v^T G G^T v` (a small quadratic program on
    the normalised Gram matrix, solved by projected coordinate descent).
    The update `d = sum_i G^T v_i` has a non-negative inner product with
    every task gradient: no task's loss increases to first order, and where
    the gradients do not conflict it is their mean.

    Cost: `T` backward passes (or `T` head passes and one trunk pass in
    representation mode) and `T` small quadratic programs.

    Args:
        norm_eps: a Gram trace below this counts as zero.
        reg_eps: ridge added to the normalised Gram matrix.
        iterations: coordinate-descent sweeps.
        **kwargs: base `Layer` arguments.

    Example:

    >>> import numpy as np
    >>> grads = np.array([[1.0, 0.0], [-1.0, 1.0]], "float32")
    >>> upgrad = UPGrad(reg_eps=0.0)
    >>> upgrad.build((2,))
    >>> update = keras.ops.convert_to_numpy(upgrad.combine(grads, np.ones(2)))
    >>> [round(float(x), 4) for x in update]
    [0.25, 0.75]

    References:
        Quinton, Rey. Jacobian Descent for Multi-Objective Optimization.
        arXiv:2406.16232, 2024.
    """

    def __init__(self, norm_eps=1e-4, reg_eps=1e-4, iterations=20, **kwargs):
        super().__init__(**kwargs)
        self.norm_eps = check.non_negative_float("norm_eps", norm_eps)
        self.reg_eps = check.non_negative_float("reg_eps", reg_eps)
        self.iterations = check.positive_int("iterations", iterations, check.MAX_ITERATIONS)

    def gram_weights(self, gram, task_losses):
        return upgrad_weights(gram, self.norm_eps, self.reg_eps, self.iterations)

    def get_config(self):
        config = super().get_config()
        config.update(
            norm_eps=self.norm_eps, reg_eps=self.reg_eps, iterations=self.iterations
        )
        return config
