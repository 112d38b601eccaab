"""Task loss weightings for multi-task models: fixed, uncertainty, GradNorm.

A task weighting turns the vector of the `T` task losses `L = (L_1..L_T)` of
a training step into the one scalar that is minimised. It is a Keras layer
(it owns its state as variables, so it trains, saves and reloads with the
model); `keras_moe.models.MultiTaskModel(..., task_weighting=...)` plugs it
into `compile`/`fit`. Each class documents its math; see
`docs/task_weighting.md` for when to use which.
"""

import keras
from keras import ops

from keras_moe.utils import validation as check

WEIGHTINGS = ("fixed", "uncertainty", "gradnorm")
GRADNORM_OPTIMIZERS = ("adam", "sgd")

_EPSILON = 1e-12
# With additive steps (`log_weights=False`), GradNorm keeps every weight at
# least this large before renormalising, so that a weight never reaches 0
# (or goes negative) and the sum stays > 0.
_MIN_WEIGHT = 1e-4


class TaskWeighting(keras.layers.Layer):
    """Base class: maps the task losses `(T,)` to the total loss `()`.

    Subclasses create their state in `build((T,))` and implement
    `current_weights()` (the factor applied to each task loss) and, if the
    total is not `sum_t w_t L_t`, `call`. A weighting that needs the norms
    of the per-task gradients (GradNorm) sets `needs_gradient_norms = True`
    and implements `update(task_losses, grad_norms)`; `MultiTaskModel` calls
    it after each training step.

    Weightings run in float32 whatever the global dtype policy.
    """

    needs_gradient_norms = False

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.num_tasks = None

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) != 1 or input_shape[0] is None:
            raise ValueError(
                f"{type(self).__name__} takes the vector of task losses, of "
                f"shape (num_tasks,). Received: input_shape={input_shape}"
            )
        self.num_tasks = check.positive_int("num_tasks", input_shape[0])

    def _per_task(self, name, value):
        """A number for every task, or a list of one number per task."""
        if isinstance(value, (list, tuple)):
            if len(value) != self.num_tasks:
                raise ValueError(
                    f"{name} must be one number or one number per task. "
                    f"Received: len({name})={len(value)}, "
                    f"num_tasks={self.num_tasks}"
                )
            return list(value)
        return [value] * self.num_tasks

    def current_weights(self):
        """The factor `(T,)` each task loss is multiplied by."""
        return ops.ones((self.num_tasks,), "float32")

    def call(self, task_losses, training=None):
        task_losses = ops.cast(task_losses, "float32")
        return ops.sum(self.current_weights() * task_losses)

    def compute_output_shape(self, input_shape):
        return ()


@keras.saving.register_keras_serializable(package="keras_moe")
class FixedWeighting(TaskWeighting):
    """Fixed weighting: the plain sum of the task losses, `sum_t L_t`.

    With `MultiTaskModel`, `L_t` already includes the constant factor of
    `compile(loss_weights=...)`, so this is exactly Keras' own weighted sum.

    Args:
        **kwargs: base `Layer` arguments.

    Call arguments:
        task_losses: `(T,)` task losses.
        training: unused.

    Returns:
        The scalar total loss.

    Example:

    >>> import numpy as np
    >>> float(FixedWeighting()(np.array([1.0, 2.5], "float32")))
    3.5
    """


@keras.saving.register_keras_serializable(package="keras_moe")
class UncertaintyWeighting(TaskWeighting):
    """Homoscedastic-uncertainty weighting (Kendall, Gal and Cipolla, 2018).

    Every task gets a trainable log-variance `s_t = log sigma_t^2`, trained
    with the model by the same optimizer, and the total loss is

    `total = sum_t exp(-s_t) L_t + s_t`.

    This is twice Kendall et al.'s objective for regression tasks,
    `sum_t L_t / (2 sigma_t^2) + log sigma_t` with `s = log sigma^2`:
    the factor 2 changes neither the minimiser nor the direction of the
    gradients, only their scale, and the same form is used for every loss
    (the paper's classification form, `L_t / sigma_t^2 + log sigma_t`, has
    the same minimiser up to a factor 2 in the variance). For fixed `L_t`
    the optimum is `exp(s_t) = L_t`: the learned variance tracks the task
    loss (the noise variance for a mean squared error), and noisy tasks are
    down-weighted by `exp(-s_t)`. The `s_t` term keeps the weights from
    collapsing to 0.

    Args:
        initial_log_variance: starting `s_t`, one number for all tasks or
            a list of one per task (default 0: weight 1).
        **kwargs: base `Layer` arguments.

    Call arguments:
        task_losses: `(T,)` task losses.
        training: unused.

    Returns:
        The scalar total loss.

    Example:

    >>> import numpy as np
    >>> weighting = UncertaintyWeighting(initial_log_variance=[0.0, 1.0])
    >>> total = weighting(np.array([2.0, 2.0], "float32"))
    >>> round(float(keras.ops.convert_to_numpy(total)), 4)
    3.7358

    References:
        Kendall, Gal, Cipolla. Multi-Task Learning Using Uncertainty to
        Weigh Losses for Scene Geometry and Semantics. CVPR 2018.
    """

    def __init__(self, initial_log_variance=0.0, **kwargs):
        super().__init__(**kwargs)
        if isinstance(initial_log_variance, (list, tuple)):
            initial_log_variance = [
                check.finite_float("initial_log_variance", v)
                for v in initial_log_variance
            ]
        else:
            initial_log_variance = check.finite_float(
                "initial_log_variance", initial_log_variance
            )
        self.initial_log_variance = initial_log_variance

    def build(self, input_shape):
        super().build(input_shape)
        initial = self._per_task("initial_log_variance", self.initial_log_variance)
        self.log_variance = self.add_weight(
            name="log_variance",
            shape=(self.num_tasks,),
            initializer=keras.initializers.Constant(initial),
            trainable=True,
            dtype="float32",
        )

    def current_weights(self):
        return ops.exp(-ops.convert_to_tensor(self.log_variance))

    def call(self, task_losses, training=None):
        task_losses = ops.cast(task_losses, "float32")
        s = ops.convert_to_tensor(self.log_variance)
        return ops.sum(ops.exp(-s) * task_losses + s)

    def get_config(self):
        config = super().get_config()
        config.update(initial_log_variance=self.initial_log_variance)
        return config


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


_BY_NAME = {
    "fixed": FixedWeighting,
    "uncertainty": UncertaintyWeighting,
    "gradnorm": GradNorm,
}


def get(identifier):
    """A `TaskWeighting` from `None`/`"fixed"`, `"uncertainty"`,
    `"gradnorm"`, a weighting instance, or its serialized config."""
    if identifier is None:
        return FixedWeighting()
    if isinstance(identifier, TaskWeighting):
        return identifier
    if isinstance(identifier, dict):
        weighting = keras.saving.deserialize_keras_object(identifier)
        if isinstance(weighting, TaskWeighting):
            return weighting
    if isinstance(identifier, str) and identifier.lower() in _BY_NAME:
        return _BY_NAME[identifier.lower()]()
    raise ValueError(
        f"task_weighting must be one of {list(WEIGHTINGS)}, None, or a "
        "TaskWeighting instance (e.g. GradNorm(alpha=1.0)). Received: "
        f"task_weighting={identifier!r}"
    )
