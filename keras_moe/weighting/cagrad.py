"""CAGrad: conflict-averse gradient descent (Liu et al., 2021)."""

import keras
from keras import ops

from keras_moe.utils import validation as check
from keras_moe.weighting.base import WeightedGradientWeighting, register

CAGRAD_RESCALES = (0, 1, 2)
_BISECTIONS = 40


def _dual_slope(gram, mean_gram, c, w, d):
    """The derivative of `F(w) = w^T M b + c sqrt(w^T M w + 1e-8)` along
    the direction `d`."""
    gw = ops.matmul(gram, w)
    root = ops.sqrt(ops.maximum(ops.sum(w * gw), 0.0) + 1e-8)
    return ops.sum((mean_gram + c * gw / root) * d)


def _line_minimum(gram, mean_gram, c, start, direction):
    """`s` in [0, 1] minimising the convex `F(start + s direction)`, by
    bisection on its derivative."""

    def halve(_, bounds):
        low, high = bounds[0], bounds[1]
        middle = 0.5 * (low + high)
        rising = _dual_slope(gram, mean_gram, c, start + middle * direction, direction) > 0.0
        return ops.stack([ops.where(rising, low, middle), ops.where(rising, middle, high)])

    bounds = ops.fori_loop(0, _BISECTIONS, halve, ops.convert_to_tensor([0.0, 1.0]))
    return 0.5 * (bounds[0] + bounds[1])


def cagrad_dual_weights(gram, c, iterations=50):
    """`w` on the simplex minimising `g_w . g_0 + c ||g_w||`
    (`g_w = sum_t w_t g_t`, `g_0` the mean gradient): CAGrad's dual
    problem. Exact (bisection) for `T = 2`; Frank-Wolfe with exact line
    search for `T > 2`."""
    gram = ops.cast(gram, "float32")
    t = gram.shape[0]
    mean_gram = ops.mean(gram, axis=1)  # M b, b = 1/T
    if t == 1:
        return ops.ones((1,), "float32")
    if t == 2:
        start = ops.convert_to_tensor([0.0, 1.0])
        s = _line_minimum(gram, mean_gram, c, start, ops.convert_to_tensor([1.0, -1.0]))
        return ops.stack([s, 1.0 - s])

    def step(_, w):
        gw = ops.matmul(gram, w)
        root = ops.sqrt(ops.maximum(ops.sum(w * gw), 0.0) + 1e-8)
        gradient = mean_gram + c * gw / root
        vertex = ops.one_hot(ops.argmin(gradient), t, dtype="float32")
        s = _line_minimum(gram, mean_gram, c, w, vertex - w)
        return w + s * (vertex - w)

    return ops.fori_loop(0, iterations, step, ops.full((t,), 1.0 / t))


def cagrad_weights(gram, c_alpha=0.5, rescale=1, iterations=50):
    """CAGrad's update as weights of the task gradients:
    `d = g_0 + (c / ||g_w||) g_w`, `c = c_alpha ||g_0||`, divided by
    `1 + c_alpha^2` (`rescale=1`), `1 + c_alpha` (2) or 1 (0)."""
    gram = ops.cast(gram, "float32")
    t = gram.shape[0]
    g0_norm = ops.sqrt(ops.maximum(ops.mean(gram), 0.0) + 1e-8)
    c = c_alpha * g0_norm
    w = cagrad_dual_weights(gram, c, iterations)
    gw_norm = ops.sqrt(ops.maximum(ops.sum(w * ops.matmul(gram, w)), 0.0))
    weights = ops.full((t,), 1.0 / t) + (c / (gw_norm + 1e-8)) * w
    if rescale == 1:
        weights = weights / (1.0 + c_alpha**2)
    elif rescale == 2:
        weights = weights / (1.0 + c_alpha)
    return weights


def cagrad_direction(grads, c_alpha=0.5, rescale=1, iterations=50):
    """CAGrad's update of the `(T, P)` task gradients."""
    grads = ops.cast(grads, "float32")
    gram = ops.matmul(grads, ops.transpose(grads))
    return ops.matmul(cagrad_weights(gram, c_alpha, rescale, iterations), grads)


@register("cagrad")
@keras.saving.register_keras_serializable(package="keras_moe")
class CAGrad(WeightedGradientWeighting):
    """CAGrad: the update, within a ball around the mean gradient, that
    most improves the worst task.

    `max_d min_t g_t . d` subject to `||d - g_0|| <= c ||g_0||`
    (`g_0 = mean_t g_t`, `c = c_alpha`). Its dual is
    `min_{w in simplex} g_w . g_0 + c ||g_0|| ||g_w||`
    (`g_w = sum_t w_t g_t`), solved exactly by bisection for 2 tasks and by
    Frank-Wolfe for more; the update is
    `d = g_0 + c ||g_0|| / ||g_w|| g_w`, divided by `1 + c_alpha^2`
    (`rescale=1`, the default), `1 + c_alpha` (2) or not at all (0). With
    `c_alpha = 0` it is the mean gradient; large `c_alpha` moves it to the
    MGDA direction.

    Cost: `T` backward passes (or `T` head passes and one trunk pass in
    representation mode) and a `T x T` problem.

    Args:
        c_alpha: `c >= 0` (default 0.5).
        rescale: 0, 1 or 2 (see above).
        iterations: Frank-Wolfe steps for more than 2 tasks.
        **kwargs: base `Layer` arguments.

    Example:

    >>> import numpy as np
    >>> grads = np.array([[1.0, 0.0], [0.0, 3.0]], "float32")
    >>> cagrad = CAGrad(c_alpha=0.0)
    >>> cagrad.build((2,))
    >>> [float(x) for x in cagrad.combine(grads, np.ones(2, "float32"))]
    [0.5, 1.5]

    References:
        Liu, Liu, Jin, Stone, Liu. Conflict-Averse Gradient Descent for
        Multi-task Learning. NeurIPS 2021.
    """

    def __init__(self, c_alpha=0.5, rescale=1, iterations=50, **kwargs):
        super().__init__(**kwargs)
        self.c_alpha = check.non_negative_float("c_alpha", c_alpha)
        self.rescale = int(check.one_of("rescale", rescale, CAGRAD_RESCALES))
        self.iterations = check.positive_int("iterations", iterations, check.MAX_ITERATIONS)

    def gram_weights(self, gram, task_losses):
        return cagrad_weights(gram, self.c_alpha, self.rescale, self.iterations)

    def get_config(self):
        config = super().get_config()
        config.update(
            c_alpha=self.c_alpha, rescale=self.rescale, iterations=self.iterations
        )
        return config
