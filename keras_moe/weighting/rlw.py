"""Random Loss Weighting (Lin et al., 2022)."""

import keras
from keras import ops

from keras_moe.utils import validation as check
from keras_moe.weighting.base import (
    RandomStateMixin,
    TaskWeighting,
    optional_seed,
    register,
    seed_generator,
)

RLW_DISTRIBUTIONS = ("normal", "uniform", "dirichlet")


@register("rlw")
@keras.saving.register_keras_serializable(package="keras_moe")
class RLW(RandomStateMixin, TaskWeighting):
    """Random Loss Weighting: new random task weights at every step.

    Each training step draws `w = softmax(lambda)` with
    `lambda ~ N(0, I_T)` (`distribution="normal"`, the paper's default),
    `lambda ~ U(0, 1)^T` (`"uniform"`), or `w ~ Dirichlet(1, ..., 1)`
    (`"dirichlet"`), and minimises `sum_t w_t L_t`. The weights sum to 1,
    so the total is on the scale of one task loss (an optimizer that is not
    scale-invariant, plain SGD, sees a learning rate `T` times smaller than
    with the fixed sum). Outside training (`evaluate`) the weights are
    their mean, `1 / T`. Costs one `T`-vector draw per step.

    Args:
        distribution: `"normal"`, `"uniform"` or `"dirichlet"`.
        seed: integer seed of the weighting's random generator (saved with
            the model, so a reloaded model draws the same weights).
        **kwargs: base `Layer` arguments.

    Example:

    >>> import numpy as np
    >>> rlw = RLW(seed=0)
    >>> total = rlw(np.array([1.0, 3.0], "float32"), training=True)
    >>> w = keras.ops.convert_to_numpy(rlw.current_weights())
    >>> bool(abs(w.sum() - 1.0) < 1e-6), bool(np.all(w > 0))
    (True, True)

    References:
        Lin, Ye, Xu, Shi, Zhang. Reasonable Effectiveness of Random
        Weighting: A Litmus Test for Multi-Task Learning. TMLR 2022
        (arXiv:2111.10603).
    """

    def __init__(self, distribution="normal", seed=None, **kwargs):
        super().__init__(**kwargs)
        self.distribution = check.one_of(
            "distribution", distribution, RLW_DISTRIBUTIONS
        )
        self.seed = optional_seed(seed)
        self.seed_generator = seed_generator(self, self.seed)

    def build(self, input_shape):
        super().build(input_shape)
        t = self.num_tasks
        self.last_weights = self._state(
            "last_weights", (t,), keras.initializers.Constant(1.0 / t)
        )

    def sample_weights(self):
        """One draw of the `(T,)` weights (advances the generator)."""
        shape = (self.num_tasks,)
        if self.distribution == "dirichlet":
            draws = keras.random.gamma(shape, alpha=1.0, seed=self.seed_generator)
            return draws / ops.sum(draws)
        if self.distribution == "uniform":
            logits = keras.random.uniform(shape, seed=self.seed_generator)
        else:
            logits = keras.random.normal(shape, seed=self.seed_generator)
        return ops.softmax(logits)

    def current_weights(self):
        return ops.convert_to_tensor(self.last_weights)

    def call(self, task_losses, training=None):
        task_losses = ops.cast(task_losses, "float32")
        if training:
            weights = self.sample_weights()
            self.last_weights.assign(weights)
        else:
            weights = ops.full((self.num_tasks,), 1.0 / self.num_tasks)
        return ops.sum(ops.stop_gradient(weights) * task_losses)

    def get_config(self):
        config = super().get_config()
        config.update(distribution=self.distribution, seed=self.seed)
        return config
