"""GradVac: gradient vaccine (Wang et al., 2021)."""

import keras
from keras import ops

from keras_moe.utils import validation as check
from keras_moe.weighting.base import (
    GradientWeighting,
    RandomStateMixin,
    gram_matrix,
    optional_seed,
    register,
    seed_generator,
)
from keras_moe.weighting.pcgrad import random_orders


def gradvac_weights(gram, targets, orders, beta):
    """GradVac's update as a weighted sum of the task gradients, and the
    new similarity targets.

    For each task `i`, `g_i' = g_i`; for each `j != i` in the order
    `orders[i]`: `phi = cos(g_i', g_j)`; if `phi < phi_hat_ij`,
    `g_i' += g_j ||g_i'|| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2))
    / (||g_j|| sqrt(1 - phi_hat^2))`, which sets `cos(g_i', g_j)` to
    `phi_hat_ij`; then `phi_hat_ij <- (1 - beta) phi_hat_ij + beta phi`. As
    for PCGrad, every `g_i'` is a combination of the `g_k`, so this runs on
    the Gram matrix.

    Args:
        gram: `(T, T)` Gram matrix `G G^T`.
        targets: `(T, T)` similarity targets `phi_hat` (EMA state).
        orders: `(T, T)` integer permutations.
        beta: EMA rate of the targets, in `[0, 1]`.

    Returns:
        `(weights (T,), new targets (T, T))`; the update is `weights^T G`.
    """
    gram = ops.cast(gram, "float32")
    targets = ops.cast(targets, "float32")
    t = gram.shape[0]
    eye = ops.eye(t, dtype="float32")
    diagonal = ops.diagonal(gram)
    total = ops.zeros((t,), "float32")
    new_targets = targets
    for i in range(t):
        c = eye[i]
        for k in range(t):
            j = orders[i, k]
            e = ops.one_hot(j, t, dtype="float32")
            cg = ops.matmul(c, gram)
            norm_i = ops.sqrt(ops.maximum(ops.sum(cg * c), 0.0))
            norm_j = ops.sqrt(ops.maximum(ops.sum(diagonal * e), 0.0))
            phi = ops.clip(ops.sum(cg * e) / (norm_i * norm_j + 1e-8), -1.0, 1.0)
            target = ops.clip(ops.sum(targets[i] * e), -1.0, 1.0)
            other = ops.not_equal(j, i)
            root_target = ops.sqrt(1.0 - target**2)
            scale = (
                norm_i
                * (target * ops.sqrt(1.0 - phi**2) - phi * root_target)
                / (norm_j * root_target + 1e-8)
            )
            c = c + ops.where(ops.logical_and(other, phi < target), scale, 0.0) * e
            change = ops.where(other, beta * (phi - target), 0.0)
            new_targets = new_targets + change * eye[i][:, None] * e[None, :]
        total = total + c
    return total, new_targets


@register("gradvac")
@keras.saving.register_keras_serializable(package="keras_moe")
class GradVac(RandomStateMixin, GradientWeighting):
    """GradVac: raise the cosine similarity of every pair of task gradients
    to a target learned as its moving average.

    PCGrad only acts when two gradients conflict (`cos < 0`); GradVac keeps
    a target `phi_hat_ij` per ordered pair (EMA of the observed cosine,
    rate `beta`) and, whenever `cos(g_i', g_j) < phi_hat_ij`, adds the
    multiple of `g_j` that lifts the cosine to the target. With targets at
    0 this is PCGrad. The update is `sum_i g_i'`. The targets here are
    model-wide (the paper also has per-layer ones).

    Cost: as PCGrad (`T` backward passes, `O(T^2 P)` beyond them).

    Args:
        beta: EMA rate of the targets (default 0.01, the paper's).
        seed: integer seed of the random task order (saved with the model).
        **kwargs: base `Layer` arguments.

    State: `targets` `(T, T)`.

    Example:

    >>> import numpy as np
    >>> grads = np.array([[1.0, 1.0], [-1.0, 0.0]], "float32")
    >>> gradvac = GradVac(seed=0)
    >>> gradvac.build((2,))
    >>> [float(x) for x in gradvac.combine(grads, np.ones(2, "float32"))]
    [-0.5, 1.5]

    References:
        Wang, Tsvetkov, Firat, Cao. Gradient Vaccine: Investigating and
        Improving Multi-task Optimization in Massively Multilingual Models.
        ICLR 2021.
    """

    def __init__(self, beta=0.01, seed=None, **kwargs):
        super().__init__(**kwargs)
        beta = check.non_negative_float("beta", beta)
        if beta > 1.0:
            raise ValueError(f"beta must be in [0, 1]. Received: beta={beta!r}")
        self.beta = beta
        self.seed = optional_seed(seed)
        self.seed_generator = seed_generator(self, self.seed)

    def build(self, input_shape):
        super().build(input_shape)
        self.targets = self._state("targets", (self.num_tasks, self.num_tasks))

    def combine(self, grads, task_losses):
        grads = ops.cast(grads, "float32")
        orders = random_orders(self.num_tasks, self.seed_generator)
        weights, targets = gradvac_weights(
            gram_matrix(grads), ops.convert_to_tensor(self.targets), orders, self.beta
        )
        self.targets.assign(targets)
        self._record(weights)
        return ops.matmul(weights, grads)

    def get_config(self):
        config = super().get_config()
        config.update(beta=self.beta, seed=self.seed)
        return config
