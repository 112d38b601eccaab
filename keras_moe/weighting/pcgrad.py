"""PCGrad: projecting conflicting gradients (Yu et al., 2020)."""

import keras
from keras import ops

from keras_moe.weighting.base import (
    _EPSILON,
    GradientWeighting,
    RandomStateMixin,
    gram_matrix,
    optional_seed,
    register,
    seed_generator,
)


def random_orders(num_tasks, seed):
    """`(T, T)` int32: row `i` a random permutation of the tasks, the order
    in which task `i`'s gradient is projected."""
    draws = keras.random.uniform((num_tasks, num_tasks), seed=seed)
    return ops.cast(ops.argsort(draws, axis=-1), "int32")


def pcgrad_projections(gram, orders):
    """PCGrad's projected gradients as combinations of the task gradients.

    For each task `i`, `g_i' = g_i`, then for each `j != i` in the order
    `orders[i]`: if `g_i' . g_j < 0`, `g_i' -= (g_i' . g_j) / ||g_j||^2 g_j`
    (the component of `g_i'` along a conflicting `g_j` is removed). Every
    `g_i'` stays a combination `sum_k C_ik g_k`, so the projections run on
    the Gram matrix only.

    Args:
        gram: `(T, T)` Gram matrix `G G^T`.
        orders: `(T, T)` integer permutations (see `random_orders`).

    Returns:
        `(T, T)` coefficients `C`: `g_i' = C[i] @ G`.
    """
    gram = ops.cast(gram, "float32")
    t = gram.shape[0]
    eye = ops.eye(t, dtype="float32")
    diagonal = ops.diagonal(gram)
    rows = []
    for i in range(t):
        c = eye[i]
        for k in range(t):
            j = orders[i, k]
            e = ops.one_hot(j, t, dtype="float32")
            dot = ops.sum(ops.matmul(c, gram) * e)
            norm_sq = ops.sum(diagonal * e)
            conflict = ops.logical_and(
                ops.logical_and(dot < 0.0, norm_sq > _EPSILON),
                ops.not_equal(j, i),
            )
            coefficient = ops.where(conflict, dot / ops.maximum(norm_sq, _EPSILON), 0.0)
            c = c - coefficient * e
        rows.append(c)
    return ops.stack(rows)


def pcgrad_weights(gram, orders):
    """PCGrad's update `sum_i g_i'` as weights of the task gradients: the
    column sums of `pcgrad_projections`."""
    return ops.sum(pcgrad_projections(gram, orders), axis=0)


def pcgrad_direction(grads, orders):
    """PCGrad's update `sum_i g_i'` of the `(T, P)` task gradients."""
    grads = ops.cast(grads, "float32")
    return ops.matmul(pcgrad_weights(gram_matrix(grads), orders), grads)


@register("pcgrad")
@keras.saving.register_keras_serializable(package="keras_moe")
class PCGrad(RandomStateMixin, GradientWeighting):
    """PCGrad: remove from each task gradient its components along the
    other tasks' gradients it conflicts with, then sum.

    For each task `i` and each other task `j` in a random order: if
    `g_i' . g_j < 0`, `g_i' <- g_i' - (g_i' . g_j / ||g_j||^2) g_j`. The
    update is `sum_i g_i'`. For two tasks no conflicting component remains:
    `g_1' . g_2 >= 0` and `g_2' . g_1 >= 0`. Implemented on the `T x T`
    Gram matrix (the projections keep every `g_i'` a combination of the
    `g_k`), so its cost beyond the task gradients is `O(T^2 P)`.

    Cost: `T` backward passes (or `T` head passes and one trunk pass in
    representation mode).

    Args:
        seed: integer seed of the random projection order (saved with the
            model).
        **kwargs: base `Layer` arguments.

    Example:

    >>> import numpy as np
    >>> grads = np.array([[1.0, 1.0], [-1.0, 0.0]], "float32")
    >>> pcgrad = PCGrad(seed=0)
    >>> pcgrad.build((2,))
    >>> [float(x) for x in pcgrad.combine(grads, np.ones(2, "float32"))]
    [-0.5, 1.5]

    References:
        Yu, Kumar, Gupta, Levine, Hausman, Finn. Gradient Surgery for
        Multi-Task Learning. NeurIPS 2020.
    """

    def __init__(self, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.seed = optional_seed(seed)
        self.seed_generator = seed_generator(self, self.seed)

    def combine(self, grads, task_losses):
        grads = ops.cast(grads, "float32")
        orders = random_orders(self.num_tasks, self.seed_generator)
        weights = pcgrad_weights(gram_matrix(grads), orders)
        self._record(weights)
        return ops.matmul(weights, grads)

    def get_config(self):
        config = super().get_config()
        config.update(seed=self.seed)
        return config
