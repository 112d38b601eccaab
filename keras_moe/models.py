"""Multi-task models trained with a task weighting or a gradient-balancing
method (`keras_moe.weighting`) inside the ordinary `compile`/`fit`.

`MultiTaskModel` reads the per-task losses from Keras' compiled loss,
combines them with its `task_weighting`, and, for the methods that need
task gradients, finds the parameters the tasks share (or takes a shared
representation) and hands the per-backend step of `keras_moe._autodiff`
what it needs.
"""

import math

import keras
from keras import ops

from keras_moe import _autodiff
from keras_moe import _task_graph as task_graph
from keras_moe import weighting as weighting_module
from keras_moe.utils.keras_internals import (
    aggregate_additional_loss,
    compiled_loss,
    compiled_loss_entries,
    keeps_compiled_loss_entries,
    set_compiled_loss_entries,
)


class _TaskWeightLog(keras.metrics.Metric):
    """Reports the current factor of every task loss as `<task>_weight`.

    A metric (not a read of the weighting's variables in `compute_metrics`)
    so that the value reaches the logs from inside compiled train steps on
    every backend (on JAX, variables are only read through the step state).
    """

    def __init__(self, task_names, name="task_weights"):
        super().__init__(name=name, dtype="float32")
        self.task_names = list(task_names)
        self.value = self.add_variable(
            shape=(len(self.task_names),), initializer="zeros", name="value"
        )

    def update_state(self, weights):
        self.value.assign(ops.cast(weights, "float32"))

    def result(self):
        value = ops.convert_to_tensor(self.value)
        return {f"{task}_weight": value[t] for t, task in enumerate(self.task_names)}


class _TaskLossRecorder:
    """Collects the per-task losses that Keras' compiled loss computes.

    `compile` wraps each loss function of the compiled loss (after Keras
    builds it) so that each call records its unweighted value; the model
    then reads the losses per task instead of their sum. The per-output
    `<task>_loss` logs and metrics stay Keras' own.
    """

    def __init__(self, num_tasks):
        self.num_tasks = num_tasks
        self.values = {}
        self.entries = []  # (task index, constant loss weight) per loss
        # The losses of the last compute_loss: (T,) and a list of T scalars;
        # the task objectives of a gradient method (a list of T scalars) and
        # the sum of the `add_loss` losses (None without any).
        self.task_losses = None
        self.task_loss_list = None
        self.objective_list = None
        self.additional_loss = None

    def start(self):
        self.values = {}
        self.task_losses = None
        self.task_loss_list = None
        self.objective_list = None
        self.additional_loss = None

    def wrap(self, index, task, loss_fn, loss_weight):
        self.entries.append((task, loss_weight))

        def recorded(y_true, y_pred, sample_weight=None):
            value = loss_fn(y_true, y_pred, sample_weight)
            self.values[index] = value
            return value

        return recorded

    def constant_weights(self):
        """`(T,)` the `loss_weights` factor of each task, for logging (the
        first one, if a task has several losses)."""
        weights = [None] * self.num_tasks
        for task, weight in self.entries:
            if weights[task] is None:
                weights[task] = 1.0 if weight is None else float(weight)
        return ops.convert_to_tensor(
            [1.0 if w is None else w for w in weights], "float32"
        )

    def collect(self):
        per_task = [None] * self.num_tasks
        for index, (task, weight) in enumerate(self.entries):
            value = ops.cast(self.values[index], "float32")
            if weight is not None:
                value = value * weight
            per_task[task] = value if per_task[task] is None else per_task[task] + value
        return [ops.zeros((), "float32") if v is None else v for v in per_task]


class _EndEpoch(keras.callbacks.Callback):
    """Closes the epoch of an epoch-based weighting (DWA) in `fit`."""

    def __init__(self, weighting):
        super().__init__()
        self.weighting = weighting

    def on_epoch_end(self, epoch, logs=None):
        self.weighting.end_epoch()


@keras.saving.register_keras_serializable(package="keras_moe")
class MultiTaskModel(keras.Model):
    """A functional multi-task model trained with a task weighting or a
    gradient-balancing method, inside `compile`/`fit`.

    Built like a functional `keras.Model`, with one output per task (a list
    or dict of tensors), and compiled as usual with one loss per task. For
    a training step with task losses `L_t` (each already multiplied by its
    `compile(loss_weights=...)` factor, if any):

    - a loss-based weighting (`None`/`"fixed"`, `"uncertainty"`, `"dwa"`,
      `"rlw"`, `"gls"`, `"imtl_l"`, `"famo"`) minimises its total, e.g.
      `sum_t L_t` (plain Keras) or `sum_t exp(-s_t) L_t + s_t`;
    - `"gradnorm"` minimises `sum_t w_t L_t`, the weights updated after
      each step from the task gradient norms on the last shared layer;
    - a gradient method (`"mgda"`, `"pcgrad"`, `"graddrop"`, `"gradvac"`,
      `"cagrad"`, `"imtl_g"`, `"imtl"`, `"nash_mtl"`, `"aligned_mtl"`,
      `"upgrad"`, `"db_mtl"`) replaces the gradient of the shared
      parameters by its combination of the task gradients
      (`keras_moe.weighting`); the other parameters get the sum of their
      task gradients.

    The losses added with `add_loss` (routing losses, regularizers) are
    added unchanged. `fit` logs Keras' usual `loss` and `<task>_loss`
    (unweighted), and the current factor of every task loss as
    `<task>_weight` (`loss_weights_t * weight_t`; for a gradient method,
    the weight of the task gradient in the update of the previous step).
    The weighting's state is part of the model: it saves to and reloads
    from `.keras`.

    The shared parameters of a gradient method are, by default, those of
    every layer that two or more task outputs depend on (found by walking
    the functional graph); `shared_layers` names them instead. With
    `representation`, the task gradients are taken with respect to the
    output of one shared layer instead (MGDA-UB's "representation"
    gradients, `T` backward passes through the heads and one through the
    trunk instead of `T` full ones), and the combined gradient is sent
    back through the trunk.

    Args:
        inputs: the model inputs (`keras.Input` tensors).
        outputs: a list, tuple or dict of output tensors, one per task. The
            task names are the output layer names (list) or the keys (dict).
        name: the model name.
        task_weighting: a name from `keras_moe.weighting.WEIGHTINGS`, `None`
            (fixed), or a `keras_moe.weighting` instance to set its options.
        shared_layers: for a gradient method, the names of the layers whose
            trainable weights are the shared parameters (default: found
            automatically).
        representation: for a gradient method, the name of a layer every
            task depends on, whose output is the shared representation, or
            `True` for the last such layer; `None` (default) balances the
            gradients of the shared parameters.
        **kwargs: other `keras.Model` arguments (e.g. `trainable`).

    Example:

    >>> import numpy as np
    >>> import keras
    >>> x = keras.Input((4,))
    >>> h = keras.layers.Dense(8, activation="relu", name="shared")(x)
    >>> a = keras.layers.Dense(1, name="a")(h)
    >>> b = keras.layers.Dense(1, name="b")(h)
    >>> model = MultiTaskModel(x, [a, b], task_weighting="pcgrad")
    >>> [v.path for v in model.shared_variables]
    ['shared/kernel', 'shared/bias']
    >>> model.compile("adam", loss={"a": "mse", "b": "mse"})
    >>> data = np.random.rand(32, 4).astype("float32")
    >>> history = model.fit(data, {"a": data[:, :1], "b": data[:, 1:2]},
    ...                     epochs=1, verbose=0)
    >>> sorted(k for k in history.history if k.endswith("_weight"))
    ['a_weight', 'b_weight']

    References:
        Kendall, Gal, Cipolla. Multi-Task Learning Using Uncertainty to
        Weigh Losses for Scene Geometry and Semantics. CVPR 2018.
        Chen, Badrinarayanan, Lee, Rabinovich. GradNorm: Gradient
        Normalization for Adaptive Loss Balancing in Deep Multitask
        Networks. ICML 2018.
        Sener, Koltun. Multi-Task Learning as Multi-Objective Optimization.
        NeurIPS 2018.
    """

    def __init__(
        self,
        inputs,
        outputs,
        name=None,
        *,
        task_weighting=None,
        shared_layers=None,
        representation=None,
        **kwargs,
    ):
        # The keyword-only arguments keep Keras treating this class as
        # functional (`(inputs, outputs, name)` constructor): its graph
        # config is saved, and `from_config` passes them back as keywords.
        super().__init__(inputs, outputs, name=name, **kwargs)
        self.task_names = task_graph.task_names(self, outputs)
        weighting = weighting_module.get(task_weighting)
        self.shared_layers = task_graph.layer_names("shared_layers", shared_layers)
        if representation is not None and representation is not True and not (
            isinstance(representation, str) and representation
        ):
            raise ValueError(
                "representation must be a layer name, True (the last layer "
                "every task depends on) or None. Received: "
                f"representation={representation!r}"
            )
        if (self.shared_layers or representation is not None) and not (
            weighting.needs_task_gradients
        ):
            raise ValueError(
                "shared_layers and representation are for the gradient "
                f"methods; {type(weighting).__name__} does not use them. "
                f"Received: shared_layers={shared_layers!r}, "
                f"representation={representation!r}"
            )
        if self.shared_layers and representation is not None:
            raise ValueError(
                "Give shared_layers or representation, not both. Received: "
                f"shared_layers={shared_layers!r}, "
                f"representation={representation!r}"
            )
        self.representation = representation
        self._shared_layer_name = None
        self._shared_ids = frozenset()
        self._split = None
        if weighting.needs_gradient_norms:
            self._shared_layer_name = task_graph.find_shared_layer(
                self, getattr(weighting, "shared_layer", None)
            ).name
        if weighting.needs_task_gradients:
            if representation is not None:
                if not weighting.supports_representation:
                    weighting.build_gradient_state(None)  # raises
                self._split = task_graph.split_at_representation(self, representation)
                weighting.build_gradient_state(None)
            else:
                shared = task_graph.find_shared_variables(self, self.shared_layers)
                self._shared_ids = frozenset(id(v) for v in shared)
                weighting.build_gradient_state(
                    sum(int(math.prod(v.shape)) for v in shared)
                )
        if not weighting.built:
            weighting.build((len(self.task_names),))
        elif weighting.num_tasks != len(self.task_names):
            raise ValueError(
                "task_weighting was built for another number of tasks. "
                f"Received: task_weighting.num_tasks={weighting.num_tasks}, "
                f"tasks={self.task_names}"
            )
        self.task_weighting = weighting
        self._task_weight_log = _TaskWeightLog(self.task_names)
        self._recorder = None

    # Shared layers ----------------------------------------------------------

    @property
    def shared_layer(self):
        """The layer whose weights GradNorm measures (`None` otherwise)."""
        if self._shared_layer_name is None:
            return None
        return self.get_layer(self._shared_layer_name)

    @property
    def shared_variables(self):
        """The shared parameters a gradient method balances (empty
        otherwise, and in representation mode)."""
        return [v for v in self.trainable_variables if id(v) in self._shared_ids]

    @property
    def representation_layer(self):
        """The layer whose output is the shared representation (`None`
        without representation mode)."""
        return None if self._split is None else self.get_layer(self._split.layer_name)

    # Compile and losses ---------------------------------------------------

    def _check_losses(self, loss):
        names = self.task_names
        if isinstance(loss, dict):
            given = sorted(k for k, v in loss.items() if v is not None)
            if given != sorted(names):
                raise ValueError(
                    "MultiTaskModel needs one loss per task in "
                    f"compile(loss=...): keys {names}. Received: "
                    f"loss keys={sorted(loss)}, loss={loss!r}"
                )
        elif isinstance(loss, (list, tuple)):
            if len(loss) != len(names) or any(v is None for v in loss):
                raise ValueError(
                    "MultiTaskModel needs one loss per task in "
                    f"compile(loss=...), {len(names)} for tasks {names}. "
                    f"Received: len(loss)={len(loss)}, loss={loss!r}"
                )

    def compile(self, optimizer="rmsprop", loss=None, loss_weights=None, **kwargs):
        """`keras.Model.compile`, with one loss per task (a dict keyed by
        task name, a list in output order, or one loss for all tasks)."""
        if loss is not None:
            self._check_losses(loss)
            if not isinstance(loss, (dict, list, tuple)) and len(self.task_names) > 1:
                # One loss for every task; as a dict, `loss_weights` may
                # then be a list or a dict (Keras rejects that for one loss).
                loss = {name: loss for name in self.task_names}
        super().compile(
            optimizer=optimizer, loss=loss, loss_weights=loss_weights, **kwargs
        )
        self._recorder = None
        if compiled_loss(self) is not None:
            self._recorder = self._record_task_losses(compiled_loss(self))

    def compile_from_config(self, config):
        # Keras skips `compile` on load when a model overrides it; this one
        # only adds checks and the task-loss hook, so reloading compiles.
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if getattr(self, "optimizer", None) is not None and self.built:
            self.optimizer.build(self.trainable_variables)

    def _record_task_losses(self, compile_loss):
        """Hooks Keras' compiled loss so that each loss function records
        its value (see `_TaskLossRecorder`). Relies on Keras 3's
        `CompileLoss` keeping `(path, loss, loss_weights, name)` entries in
        `_flat_losses` once built."""
        if not keeps_compiled_loss_entries(compile_loss):
            raise NotImplementedError(
                "MultiTaskModel needs Keras 3's CompileLoss internals "
                f"(`_flat_losses`); this Keras ({keras.__version__}) has none."
            )
        recorder = _TaskLossRecorder(len(self.task_names))
        task_names = self.task_names
        build = compile_loss.build

        def task_of(path):
            if not path:
                return 0
            key = path[0]
            return key if isinstance(key, int) else task_names.index(key)

        def build_and_record(y_true, y_pred):
            build(y_true, y_pred)
            recorder.entries = []
            entries = []
            for index, entry in enumerate(compiled_loss_entries(compile_loss)):
                path, loss_fn, loss_weight = entry[0], entry[1], entry[2]
                wrapped = recorder.wrap(index, task_of(path), loss_fn, loss_weight)
                entries.append(entry._replace(loss=wrapped))
            set_compiled_loss_entries(compile_loss, entries)

        compile_loss.build = build_and_record
        return recorder

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        """Keras' compiled per-task losses, combined by `task_weighting`,
        plus the `add_loss` losses."""
        if self._recorder is None:
            return super().compute_loss(
                x, y, y_pred, sample_weight, training=training
            )
        recorder = self._recorder
        recorder.start()
        compiled_loss(self)(y, y_pred, sample_weight)  # also logs <task>_loss
        per_task = recorder.collect()
        task_losses = ops.stack(per_task)
        recorder.task_loss_list = per_task
        recorder.task_losses = task_losses
        weighting = self.task_weighting
        if weighting.needs_task_gradients:
            objectives = weighting.task_objectives(task_losses)
            recorder.objective_list = [objectives[t] for t in range(len(per_task))]
            total = ops.sum(objectives)
            weights = weighting.current_weights()
        else:
            total, weights = weighting.weighted_total(task_losses, training=training)
        self._task_weight_log.update_state(
            ops.stop_gradient(weights * recorder.constant_weights())
        )
        additional = [aggregate_additional_loss(loss) for loss in self.losses]
        if additional:
            recorder.additional_loss = (
                additional[0] if len(additional) == 1 else ops.sum(additional)
            )
            total = total + recorder.additional_loss
        return total

    def train_step(self, *args):
        weighting = self.task_weighting
        if self._recorder is not None and (
            weighting.needs_gradient_norms or weighting.needs_task_gradients
        ):
            return _autodiff.task_gradient_train_step(self, *args)
        return super().train_step(*args)

    def fit(self, *args, **kwargs):
        """`keras.Model.fit`; an epoch-based weighting (DWA) closes its
        epochs through a callback added here."""
        if self.task_weighting.epoch_based:
            end_epoch = _EndEpoch(self.task_weighting)
            if len(args) > 5:  # callbacks given by position
                args = list(args)
                args[5] = list(args[5] or []) + [end_epoch]
            else:
                kwargs["callbacks"] = list(kwargs.get("callbacks") or []) + [end_epoch]
        return super().fit(*args, **kwargs)

    # Inspection and serialization ------------------------------------------

    def task_weights(self):
        """The current factor of every task loss, `{task: float}` (without
        the constant `loss_weights`)."""
        weights = ops.convert_to_numpy(self.task_weighting.current_weights())
        return {task: float(w) for task, w in zip(self.task_names, weights)}

    def get_config(self):
        config = super().get_config()
        config["task_weighting"] = keras.saving.serialize_keras_object(
            self.task_weighting
        )
        if self.shared_layers is not None:
            config["shared_layers"] = list(self.shared_layers)
        if self.representation is not None:
            config["representation"] = self.representation
        return config
