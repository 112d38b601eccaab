"""MGDA: the multiple-gradient descent algorithm (Sener and Koltun, 2018)."""

import keras
from keras import ops

from keras_moe.utils import validation as check
from keras_moe.weighting.base import (
    _EPSILON,
    WeightedGradientWeighting,
    register,
)

MGDA_NORMALIZATIONS = ("none", "l2", "loss", "loss+")


def _two_point(aa, ab, bb, degenerate):
    """`gamma` in [0, 1] minimising `||gamma a + (1 - gamma) b||^2` from the
    inner products `a.a`, `a.b`, `b.b` (`degenerate` when `a == b`)."""
    denominator = aa + bb - 2.0 * ab
    flat = denominator <= _EPSILON * ops.maximum(aa + bb, _EPSILON)
    gamma = (bb - ab) / ops.where(flat, 1.0, denominator)
    return ops.clip(ops.where(flat, degenerate, gamma), 0.0, 1.0)


def min_norm_weights(gram, iterations=100):
    """The weights `w` on the simplex minimising `||sum_t w_t g_t||^2 =
    w^T gram w`: the minimum-norm point of the convex hull of the task
    gradients.

    Exact in closed form for `T = 2`; for `T > 2`, `iterations` steps of
    Frank-Wolfe with exact line search from `w = 1/T` (Sener and Koltun's
    Algorithm 2).

    Args:
        gram: `(T, T)` Gram matrix `G G^T` of the task gradients.
        iterations: Frank-Wolfe steps (`T > 2`).

    Returns:
        `(T,)` weights, `>= 0`, summing to 1.
    """
    gram = ops.cast(gram, "float32")
    t = gram.shape[0]
    if t == 1:
        return ops.ones((1,), "float32")
    if t == 2:
        gamma = _two_point(gram[0, 0], gram[0, 1], gram[1, 1], 0.5)
        return ops.stack([gamma, 1.0 - gamma])
    diagonal = ops.diagonal(gram)

    def step(_, w):
        gw = ops.matmul(gram, w)
        vertex = ops.one_hot(ops.argmin(gw), t, dtype="float32")
        gamma = _two_point(
            ops.sum(w * gw), ops.sum(gw * vertex), ops.sum(diagonal * vertex), 1.0
        )
        return gamma * w + (1.0 - gamma) * vertex

    return ops.fori_loop(0, iterations, step, ops.full((t,), 1.0 / t))


def mgda_weights(gram, task_losses=None, normalization="none", iterations=100):
    """MGDA's task weights: the min-norm weights of the task gradients
    divided by their normalisers (`"l2"`: `||g_t||`, `"loss"`: `L_t`,
    `"loss+"`: `L_t ||g_t||`, `"none"`: 1), applied to the original
    gradients, as in the authors' code."""
    gram = ops.cast(gram, "float32")
    norms = ops.sqrt(ops.maximum(ops.diagonal(gram), _EPSILON))
    if normalization == "none":
        scale = ops.ones_like(norms)
    elif normalization == "l2":
        scale = norms
    else:
        losses = ops.maximum(ops.cast(task_losses, "float32"), _EPSILON)
        scale = losses if normalization == "loss" else losses * norms
    scaled = gram / (scale[:, None] * scale[None, :])
    return min_norm_weights(scaled, iterations)


def mgda_direction(grads, task_losses=None, normalization="none", iterations=100):
    """MGDA's update `sum_t w_t g_t` of the `(T, P)` task gradients (with
    `normalization="none"`, the minimum-norm point of their convex hull)."""
    grads = ops.cast(grads, "float32")
    gram = ops.matmul(grads, ops.transpose(grads))
    weights = mgda_weights(gram, task_losses, normalization, iterations)
    return ops.matmul(weights, grads)


@register("mgda")
@keras.saving.register_keras_serializable(package="keras_moe")
class MGDA(WeightedGradientWeighting):
    """MGDA: step along the minimum-norm point of the convex hull of the
    task gradients (Sener and Koltun, 2018).

    `w* = argmin_{w in simplex} ||sum_t w_t g_t||^2` and the shared update
    is `d = sum_t w*_t g_t`. `d` is a common descent direction: `-d`
    decreases every task loss to first order (`d . g_t >= ||d||^2`), and
    `d = 0` exactly when the point is Pareto-stationary (0 is in the
    hull). Exact for 2 tasks (closed form), Frank-Wolfe for more. With
    `normalization`, the weights are computed on the gradients divided by
    `||g_t||`, `L_t` or `L_t ||g_t||` and applied to the original ones (the
    authors' code). With `MultiTaskModel(..., representation=...)` the
    gradients are those of the shared representation: MGDA-UB, the paper's
    cheap upper bound (one backward pass through the trunk).

    Cost: `T` backward passes (full per-task gradients) or `T` passes
    through the heads and one through the trunk (representation mode),
    plus a `T x T` problem.

    Args:
        normalization: `"none"` (default), `"l2"`, `"loss"` or `"loss+"`.
        iterations: Frank-Wolfe steps for more than 2 tasks.
        **kwargs: base `Layer` arguments.

    Example:

    >>> import numpy as np
    >>> grads = np.array([[1.0, 0.0], [0.0, 1.0]], "float32")
    >>> mgda = MGDA()
    >>> mgda.build((2,))
    >>> [float(x) for x in mgda.combine(grads, np.ones(2, "float32"))]
    [0.5, 0.5]

    References:
        Sener, Koltun. Multi-Task Learning as Multi-Objective Optimization.
        NeurIPS 2018.
    """

    def __init__(self, normalization="none", iterations=100, **kwargs):
        super().__init__(**kwargs)
        self.normalization = check.one_of(
            "normalization", normalization, MGDA_NORMALIZATIONS
        )
        self.iterations = check.positive_int("iterations", iterations, check.MAX_ITERATIONS)

    def gram_weights(self, gram, task_losses):
        return mgda_weights(gram, task_losses, self.normalization, self.iterations)

    def get_config(self):
        config = super().get_config()
        config.update(normalization=self.normalization, iterations=self.iterations)
        return config
