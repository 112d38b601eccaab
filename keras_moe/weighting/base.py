"""The two base classes of the task weightings, and the registry of names.

- `TaskWeighting`: maps the `(T,)` task losses of a step to the scalar that
  is minimised (fixed, uncertainty, DWA, RLW, GLS, IMTL-L, FAMO, GradNorm).
- `GradientWeighting`: a gradient-balancing method (MGDA, PCGrad, CAGrad,
  ...). `MultiTaskModel` takes the gradients of the `T` task objectives on
  the shared parameters (or on a shared representation), stacks them into a
  `(T, P)` matrix and asks `combine(grads, task_losses)` for the one
  `(P,)` update of the shared part; every other parameter gets the sum of
  its task gradients.

Both are Keras layers: their state (learned scales, running statistics,
the random generator) is made of variables, so it trains, saves and
reloads with the model. The `register` decorator gives a class its string
name for `MultiTaskModel(task_weighting="name")`; registered names and
class names never change (saved `.keras` files refer to the class name).
"""

import keras
from keras import ops

from keras_moe.utils import validation as check

_EPSILON = 1e-12

# name -> class, filled by `register`; `keras_moe.weighting.get` reads it.
REGISTRY = {}


def register(*names):
    """Class decorator: makes `cls` available as `task_weighting=name` for
    each of `names` (lower case)."""

    def decorate(cls):
        for name in names:
            if name in REGISTRY and REGISTRY[name] is not cls:
                raise ValueError(f"Two task weightings are named {name!r}.")
            REGISTRY[name] = cls
        cls.registered_name = names[0]
        return cls

    return decorate


def optional_seed(value):
    """`None` or an integer seed in [0, 2**32 - 1]."""
    return check.seed("seed", value)


class TaskWeighting(keras.layers.Layer):
    """Base class: maps the task losses `(T,)` to the total loss `()`.

    Subclasses create their state in `build((T,))` and implement
    `current_weights()` (the factor applied to each task loss) and, if the
    total is not `sum_t w_t L_t`, `call`. A weighting that updates its
    state during training does so only when `call` gets `training=True`
    (never in `evaluate`). A weighting that needs the norms of the
    per-task gradients (GradNorm) sets `needs_gradient_norms = True` and
    implements `update(task_losses, grad_norms)`; one that keeps
    statistics per epoch (DWA) sets `epoch_based = True` and implements
    `end_epoch()`, which `MultiTaskModel.fit` calls after every epoch.

    Weightings run in float32 whatever the global dtype policy.
    """

    needs_gradient_norms = False
    needs_task_gradients = False
    epoch_based = False
    registered_name = None

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
        self.num_tasks = check.positive_int("num_tasks", input_shape[0], check.MAX_TASKS)

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

    def _state(self, name, shape, initializer="zeros", dtype="float32"):
        """A non-trainable state variable (saved with the model)."""
        return self.add_weight(
            name=name,
            shape=shape,
            initializer=initializer,
            trainable=False,
            dtype=dtype,
        )

    def current_weights(self):
        """The factor `(T,)` each task loss is multiplied by."""
        return ops.ones((self.num_tasks,), "float32")

    def call(self, task_losses, training=None):
        task_losses = ops.cast(task_losses, "float32")
        return ops.sum(self.current_weights() * task_losses)

    def weighted_total(self, task_losses, training=None):
        """`(total, weights)`: the total loss of the step and the factor of
        each task loss in it, which `MultiTaskModel` logs every step. The
        default calls the layer, then `current_weights()`; a weighting
        that computes its weights in `call` overrides it to return them
        instead of computing (or reading) them a second time."""
        return self(task_losses, training=training), self.current_weights()

    def end_epoch(self):
        """Called by `MultiTaskModel.fit` after every epoch (epoch-based
        weightings only)."""

    def compute_output_shape(self, input_shape):
        return ()


class GradientWeighting(TaskWeighting):
    """Base class of the gradient-balancing methods.

    `MultiTaskModel` computes, in each training step, the gradients of the
    `T` task objectives `o_t = task_objectives(L)_t` (the task losses
    themselves unless a method transforms them, e.g. DB-MTL's `log L_t`)
    with respect to the shared parameters (or the shared representation),
    flattened into a `(T, P)` matrix `G`, and replaces their sum by
    `combine(G, L)`, a `(P,)` vector. Parameters that only one task reaches
    get the sum of the task gradients; `add_loss` losses keep their own
    gradient. `combine` runs in float32 on unscaled gradients (with loss
    scaling, the model divides by the scale before and multiplies after),
    and only in training steps. Its state updates are undone by the model
    when a step has non-finite gradients (a skipped loss-scaled step).

    The total that `call` returns (and `fit` logs as `loss`) is
    `sum_t o_t`: the loss whose plain gradient the method replaces.
    `current_weights()` is the weight of each task gradient in the last
    update, as far as the update is a weighted sum of task gradients (the
    weights of MGDA, IMTL-G, Nash-MTL, ...; the coefficients PCGrad's
    projections amount to; 1 for GradDrop, whose update is not a sum).

    Set `supports_representation = False` in a method whose `combine`
    cannot take the gradients of a representation (state of the size of
    the parameters, e.g. DB-MTL).
    """

    needs_task_gradients = True
    supports_representation = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.num_parameters = None

    def build(self, input_shape):
        super().build(input_shape)
        self.last_weights = self._state("last_weights", (self.num_tasks,), "ones")

    def build_gradient_state(self, num_parameters):
        """Tells the weighting the number `P` of shared parameters (`None` in
        representation mode), before `build`: a method whose state has the
        size of the parameters (DB-MTL) creates it then. Called by
        `MultiTaskModel`; a weighting already built for another `P` raises."""
        if self.built and num_parameters != self.num_parameters and (
            self.num_parameters is not None
        ):
            raise ValueError(
                f"This {type(self).__name__} was built for another model. "
                f"Received: num_parameters={num_parameters}, built for "
                f"{self.num_parameters}"
            )
        if not self.built:
            self.num_parameters = num_parameters

    def task_objectives(self, task_losses):
        """The `(T,)` per-task objectives whose gradients are balanced."""
        return ops.cast(task_losses, "float32")

    def call(self, task_losses, training=None):
        return ops.sum(self.task_objectives(task_losses))

    def current_weights(self):
        return ops.convert_to_tensor(self.last_weights)

    def combine(self, grads, task_losses):
        """The `(P,)` update of the shared part from the `(T, P)` task
        gradients `grads` and the `(T,)` task losses."""
        raise NotImplementedError

    def _record(self, weights):
        self.last_weights.assign(ops.cast(weights, "float32"))


class WeightedGradientWeighting(GradientWeighting):
    """A gradient method whose update is `sum_t w_t g_t` with weights `w`
    computed from the Gram matrix `G G^T` of the task gradients (and the
    losses): subclasses implement `gram_weights(gram, task_losses)`."""

    def gram_weights(self, gram, task_losses):
        raise NotImplementedError

    def combine(self, grads, task_losses):
        grads = ops.cast(grads, "float32")
        weights = self.gram_weights(gram_matrix(grads), task_losses)
        self._record(weights)
        return ops.matmul(weights, grads)


def gram_matrix(grads):
    """`G G^T` of a `(T, P)` matrix of task gradients."""
    return ops.matmul(grads, ops.transpose(grads))


def seed_generator(layer, seed):
    """The layer's random generator; its state is saved with the layer (see
    `RandomStateMixin`)."""
    return keras.random.SeedGenerator(seed, name=f"{layer.name}_seed_generator")


class RandomStateMixin:
    """Saves and restores the state of `self.seed_generator` with the
    layer's own variables, so that a reloaded model draws the same random
    numbers as one that was never saved (Keras does not save the state of
    a layer's `SeedGenerator`)."""

    def save_own_variables(self, store):
        super().save_own_variables(store)
        store["seed_generator_state"] = self.seed_generator.state

    def load_own_variables(self, store):
        state = store["seed_generator_state"]
        own = {k: store[k] for k in store.keys() if k != "seed_generator_state"}
        super().load_own_variables(own)
        self.seed_generator.state.assign(state)
