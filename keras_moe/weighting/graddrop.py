"""GradDrop: gradient sign dropout (Chen et al., 2020)."""

import keras
from keras import ops

from keras_moe.weighting.base import (
    GradientWeighting,
    RandomStateMixin,
    optional_seed,
    register,
    seed_generator,
)


def graddrop_direction(grads, uniform, leak=0.0):
    """GradDrop's update of the `(T, P)` task gradients.

    For every coordinate `p`, the sign purity
    `P_p = (1 + sum_t g_tp / sum_t |g_tp|) / 2` is the chance of keeping
    the positive components: with `U_p` uniform on `[0, 1)`, the mask is
    `M_tp = [P_p > U_p][g_tp > 0] + [P_p < U_p][g_tp < 0]`, and the update
    is `sum_t (leak + (1 - leak) M_tp) g_tp`: at each coordinate, only the
    components of one sign survive (all of them when they agree).

    Args:
        grads: `(T, P)` task gradients.
        uniform: `(P,)` draws from `U[0, 1)`.
        leak: in `[0, 1]`: the fraction of every gradient always kept.

    Returns:
        `(P,)` update.
    """
    grads = ops.cast(grads, "float32")
    purity = 0.5 * (
        1.0 + ops.sum(grads, axis=0) / (ops.sum(ops.abs(grads), axis=0) + 1e-7)
    )
    uniform = ops.cast(uniform, "float32")
    keep_positive = (purity > uniform)[None, :]
    keep_negative = (purity < uniform)[None, :]
    keep = ops.logical_or(
        ops.logical_and(keep_positive, grads > 0.0),
        ops.logical_and(keep_negative, grads < 0.0),
    )
    mask = leak + (1.0 - leak) * ops.cast(keep, "float32")
    return ops.sum(mask * grads, axis=0)


@register("graddrop")
@keras.saving.register_keras_serializable(package="keras_moe")
class GradDrop(RandomStateMixin, GradientWeighting):
    """GradDrop: at every coordinate of the shared gradient, keep only the
    task components of one sign, chosen at random in proportion to the
    sign purity.

    `P = (1 + sum_t g_t / sum_t |g_t|) / 2` (per coordinate), `U ~ U[0, 1)`,
    mask `M_t = [P > U][g_t > 0] + [P < U][g_t < 0]`, update
    `sum_t (leak + (1 - leak) M_t) g_t`. Where all tasks agree in sign the
    sum is unchanged; where they conflict, one side is dropped. The paper
    applies it to the gradients of an activation layer (use
    `MultiTaskModel(..., representation=...)`; the purity is then taken per
    activation of each example, not summed over the batch as in the paper's
    batch-marginalised form); without a representation it acts on each
    shared parameter. `current_weights()` is 1: the update is not a sum of
    task gradients.

    Cost: `T` backward passes (or `T` head passes and one trunk pass in
    representation mode) and one uniform draw per coordinate.

    Args:
        leak: in `[0, 1]` (default 0): the fraction of each gradient that
            is never dropped.
        seed: integer seed of the random draws (saved with the model).
        **kwargs: base `Layer` arguments.

    Example:

    >>> import numpy as np
    >>> grads = np.array([[1.0, 2.0], [3.0, -2.0]], "float32")
    >>> drop = GradDrop(seed=0)
    >>> drop.build((2,))
    >>> update = keras.ops.convert_to_numpy(drop.combine(grads, np.ones(2)))
    >>> float(update[0]), float(update[1]) in (2.0, -2.0)
    (4.0, True)

    References:
        Chen, Ngiam, Huang, Luong, Kretzschmar, Chai, Anguelov. Just Pick a
        Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout.
        NeurIPS 2020.
    """

    def __init__(self, leak=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(leak, bool) or not isinstance(leak, (int, float)) or not (
            0.0 <= leak <= 1.0
        ):
            raise ValueError(f"leak must be a number in [0, 1]. Received: leak={leak!r}")
        self.leak = float(leak)
        self.seed = optional_seed(seed)
        self.seed_generator = seed_generator(self, self.seed)

    def combine(self, grads, task_losses):
        # The size may be dynamic (a representation's batch dimension).
        uniform = keras.random.uniform((ops.shape(grads)[1],), seed=self.seed_generator)
        return graddrop_direction(grads, uniform, self.leak)

    def get_config(self):
        config = super().get_config()
        config.update(leak=self.leak, seed=self.seed)
        return config
