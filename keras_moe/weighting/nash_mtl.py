"""Nash-MTL: multi-task learning as a bargaining game (Navon et al., 2022)."""

import keras
from keras import ops

from keras_moe.utils import validation as check
from keras_moe.weighting.base import (
    _EPSILON,
    WeightedGradientWeighting,
    register,
)

_RIDGE = 1e-6


def nash_weights(gram, iterations=25):
    """The Nash bargaining weights: `alpha > 0` with `M alpha = 1 / alpha`,
    `M` the Gram matrix divided by its Frobenius norm.

    `alpha` is the minimiser of the strictly convex, self-concordant
    `f(a) = a^T M a / 2 - sum_t log a_t` (its gradient is `M a - 1/a`),
    found by damped Newton steps (`a += delta / (1 + lambda)`, `lambda` the
    Newton decrement, full steps once `lambda < 1/4`), which never leave
    `a > 0`. A ridge of 1e-6 keeps `f` bounded below when the gradients are
    linearly dependent. A small solver of our own (keras.ops only, fixed
    iterations, so it compiles with XLA); the authors solve a sequence of
    convex programs with cvxpy.
    """
    gram = ops.cast(gram, "float32")
    t = gram.shape[0]
    scale = ops.sqrt(ops.sum(gram * gram))
    eye = ops.eye(t, dtype="float32")
    m = gram / ops.maximum(scale, _EPSILON) + _RIDGE * eye

    def newton(_, a):
        gradient = ops.matmul(m, a) - 1.0 / a
        hessian = m + eye / (a * a)[:, None]
        delta = -ops.solve(hessian, gradient[:, None])[:, 0]
        decrement = ops.sqrt(ops.maximum(-ops.sum(gradient * delta), 0.0))
        step = ops.where(decrement < 0.25, 1.0, 1.0 / (1.0 + decrement))
        return ops.maximum(a + step * delta, _EPSILON)

    return ops.fori_loop(0, iterations, newton, ops.ones((t,), "float32"))


def nash_direction(grads, iterations=25, max_norm=1.0):
    """Nash-MTL's update `sum_t alpha_t g_t` of the `(T, P)` task gradients,
    its norm clipped to `max_norm` (no clipping when 0)."""
    grads = ops.cast(grads, "float32")
    gram = ops.matmul(grads, ops.transpose(grads))
    direction = ops.matmul(nash_weights(gram, iterations), grads)
    return clip_norm(direction, max_norm)


def clip_norm(direction, max_norm):
    if not max_norm:
        return direction
    norm = ops.sqrt(ops.sum(direction * direction))
    return direction * ops.minimum(1.0, max_norm / ops.maximum(norm, _EPSILON))


@register("nash_mtl")
@keras.saving.register_keras_serializable(package="keras_moe")
class NashMTL(WeightedGradientWeighting):
    """Nash-MTL: the update chosen as the Nash bargaining solution among
    the tasks.

    `d = sum_t alpha_t g_t` with `alpha > 0` solving
    `(G G^T) alpha = 1 / alpha` (element-wise), i.e.
    `alpha_t (g_t . d) = 1` for every task: each task's share of the
    improvement is the same in the bargaining sense, and the solution is
    invariant to the scale of each task's gradient. As in the authors'
    code, the Gram matrix is divided by its Frobenius norm first, and the
    norm of the shared update is clipped to `max_norm` (1.0; 0 disables).
    Solved by a small damped-Newton solver of our own (`nash_weights`),
    with keras.ops only.

    Cost: `T` backward passes (or `T` head passes and one trunk pass in
    representation mode) and `iterations` `T x T` solves.

    Args:
        iterations: Newton steps (default 25).
        max_norm: clip the update's norm (> 0), or 0 to keep it.
        **kwargs: base `Layer` arguments.

    Example:

    >>> import numpy as np
    >>> grads = np.array([[1.0, 0.0], [0.0, 2.0]], "float32")
    >>> nash = NashMTL(max_norm=0.0)
    >>> nash.build((2,))
    >>> update = keras.ops.convert_to_numpy(nash.combine(grads, np.ones(2)))
    >>> [round(float(x), 3) for x in update]
    [2.031, 2.031]

    References:
        Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik, Fetaya.
        Multi-Task Learning as a Bargaining Game. ICML 2022.
    """

    def __init__(self, iterations=25, max_norm=1.0, **kwargs):
        super().__init__(**kwargs)
        self.iterations = check.positive_int("iterations", iterations, check.MAX_ITERATIONS)
        self.max_norm = check.non_negative_float("max_norm", max_norm)

    def gram_weights(self, gram, task_losses):
        return nash_weights(gram, self.iterations)

    def combine(self, grads, task_losses):
        return clip_norm(super().combine(grads, task_losses), self.max_norm)

    def get_config(self):
        config = super().get_config()
        config.update(iterations=self.iterations, max_norm=self.max_norm)
        return config
