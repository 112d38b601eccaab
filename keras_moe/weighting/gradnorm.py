"""GradNorm (Chen et al., 2018): task weights that balance the norms of
the task gradients on the last shared layer."""

import keras
from keras import ops

from keras_moe.utils import validation as check
from keras_moe.weighting.base import _EPSILON, TaskWeighting, register

GRADNORM_OPTIMIZERS = ("adam", "sgd")

# With additive steps (`log_weights=False`), GradNorm keeps every weight at
# least this large before renormalising, so that a weight never reaches 0
# (or goes negative) and the sum stays > 0.
_MIN_WEIGHT = 1e-4


@register("gradnorm")
@keras.saving.register_keras_serializable(package="keras_moe")
class GradNorm(TaskWeighting):
    """GradNorm: adaptive task weights that balance gradient norms (Chen et
    al., 2018).

    The total loss is `sum_t w_t L_t` with non-trainable weights `w_t`
    (starting at 1). After every training step, with `W` the weights of the
    last layer shared by all tasks, `g_t = ||grad_W L_t||` and
    `G_t = w_t g_t = ||grad_W (w_t L_t)||`:

    - relative inverse training rate: `r_t = Ltilde_t / mean(Ltilde)`, with
      `Ltilde_t = L_t / L_t(0)` and `L_t(0)` the task loss of the first
      training step;
    - target: `G_mean r_t^alpha` (held constant), `G_mean = mean_t G_t`;
    - GradNorm loss `L_grad = sum_t |G_t - G_mean r_t^alpha|`, whose
      gradient is `dL_grad/dw_t = sign(G_t - target_t) g_t`;
    - `w_t` takes one optimizer step on `L_grad` (Adam, or plain gradient
      descent with `weight_optimizer="sgd"`) and is renormalised so that
      `sum_t w_t = T`.

    By default (`log_weights=True`) the step is taken on `log w_t` (the
    gradient is `w_t dL_grad/dw_t`), so a step multiplies a weight by about
    `exp(+-learning_rate)`: weights that must differ by orders of magnitude
    (task losses on different scales) get there in proportionally many
    steps and never overshoot to 0. `log_weights=False` is the paper's
    additive step on `w_t` (weights kept >= 1e-4); near `w = 1` both are
    the same.

    Tasks whose gradients dominate the shared layer get smaller weights,
    tasks that train slower (larger `r_t`) get larger ones; `alpha` sets how
    strongly the training rates are equalised (0: only the gradient norms).
    The per-task gradients need backend autodiff, which `MultiTaskModel`
    does in its `train_step` on every backend; the weights do not change
    outside `fit`/`train_on_batch`.

    State (non-trainable variables, saved with the model): `task_weights`
    `(T,)`, `initial_losses` `(T,)`, `grad_norms` `(T,)` (the `g_t` of the
    last step), `iterations`, and the Adam moments `moment` and
    `second_moment`.

    Args:
        alpha: asymmetry `alpha >= 0`: how strongly the training rates
            are equalised (0: only the gradient norms; default 1.5).
        learning_rate: step size of the weight update (> 0).
        shared_layer: name of the shared layer whose weights `W` are used;
            default: the last layer with trainable weights that every task
            output depends on.
        weight_optimizer: `"adam"` (default; steps of about
            `learning_rate` whatever the scale of the gradient norms) or
            `"sgd"`.
        log_weights: step on `log w_t` (default True) or on `w_t`.
        **kwargs: base `Layer` arguments.

    Call arguments:
        task_losses: `(T,)` task losses.
        training: unused (the weights are updated by `update`).

    Returns:
        The scalar total loss.

    Example:

    >>> import numpy as np
    >>> gradnorm = GradNorm(alpha=1.0, learning_rate=0.1)
    >>> float(gradnorm(np.array([1.0, 2.0], "float32")))
    3.0
    >>> gradnorm.update(np.array([1.0, 2.0], "float32"),
    ...                 np.array([1.0, 10.0], "float32"))
    >>> [round(float(w), 2) for w in gradnorm.task_weights.numpy()]
    [1.1, 0.9]

    References:
        Chen, Badrinarayanan, Lee, Rabinovich. GradNorm: Gradient
        Normalization for Adaptive Loss Balancing in Deep Multitask
        Networks. ICML 2018.
    """

    needs_gradient_norms = True

    def __init__(
        self,
        alpha=1.5,
        learning_rate=0.025,
        shared_layer=None,
        weight_optimizer="adam",
        log_weights=True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.alpha = check.non_negative_float("alpha", alpha)
        self.learning_rate = check.positive_float("learning_rate", learning_rate)
        if shared_layer is not None and not (
            isinstance(shared_layer, str) and shared_layer
        ):
            raise ValueError(
                "shared_layer must be the name of a layer, or None to use "
                f"the last layer shared by all tasks. Received: "
                f"shared_layer={shared_layer!r}"
            )
        self.shared_layer = shared_layer
        self.weight_optimizer = check.one_of(
            "weight_optimizer", weight_optimizer, GRADNORM_OPTIMIZERS
        )
        self.log_weights = check.boolean("log_weights", log_weights)

    def build(self, input_shape):
        super().build(input_shape)
        t = self.num_tasks

        def state(name, shape, initializer="zeros"):
            return self.add_weight(
                name=name,
                shape=shape,
                initializer=initializer,
                trainable=False,
                dtype="float32",
            )

        self.task_weights = state("task_weights", (t,), "ones")
        self.initial_losses = state("initial_losses", (t,))
        self.grad_norms = state("grad_norms", (t,))
        self.iterations = state("iterations", ())
        self.moment = state("moment", (t,))
        self.second_moment = state("second_moment", (t,))

    def current_weights(self):
        return ops.convert_to_tensor(self.task_weights)

    def update(self, task_losses, grad_norms):
        """One GradNorm step on the weights.

        Args:
            task_losses: `(T,)` task losses `L_t` of the step.
            grad_norms: `(T,)` norms `g_t = ||grad_W L_t||` of the gradients
                of the (unweighted) task losses on the shared weights `W`.
        """
        losses = ops.stop_gradient(ops.cast(task_losses, "float32"))
        g = ops.stop_gradient(ops.cast(grad_norms, "float32"))
        t = float(self.num_tasks)
        iterations = ops.convert_to_tensor(self.iterations)
        initial = ops.where(
            ops.equal(iterations, 0.0), losses, ops.convert_to_tensor(self.initial_losses)
        )
        ratio = losses / ops.maximum(initial, _EPSILON)
        inverse_rate = ratio / ops.maximum(ops.mean(ratio), _EPSILON)
        w = ops.convert_to_tensor(self.task_weights)
        norms = w * g
        target = ops.mean(norms) * ops.power(inverse_rate, self.alpha)
        gradient = ops.sign(norms - target) * g  # dL_grad / dw
        if self.log_weights:
            gradient = gradient * w  # dL_grad / dlog(w)
        step = iterations + 1.0
        if self.weight_optimizer == "adam":
            beta_1, beta_2 = 0.9, 0.999
            moment = beta_1 * ops.convert_to_tensor(self.moment) + (1 - beta_1) * gradient
            second = beta_2 * ops.convert_to_tensor(self.second_moment) + (
                1 - beta_2
            ) * ops.square(gradient)
            m_hat = moment / (1 - ops.power(beta_1, step))
            v_hat = second / (1 - ops.power(beta_2, step))
            delta = self.learning_rate * m_hat / (ops.sqrt(v_hat) + 1e-7)
            self.moment.assign(moment)
            self.second_moment.assign(second)
        else:
            delta = self.learning_rate * gradient
        if self.log_weights:
            w = w * ops.exp(-delta)
        else:
            w = ops.maximum(w - delta, _MIN_WEIGHT)
        w = w * (t / ops.sum(w))
        self.task_weights.assign(w)
        self.initial_losses.assign(initial)
        self.grad_norms.assign(g)
        self.iterations.assign(step)

    def get_config(self):
        config = super().get_config()
        config.update(
            alpha=self.alpha,
            learning_rate=self.learning_rate,
            shared_layer=self.shared_layer,
            weight_optimizer=self.weight_optimizer,
            log_weights=self.log_weights,
        )
        return config
