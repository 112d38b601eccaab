"""Multi-task models whose task losses are weighted by a learned or adaptive
scheme (uncertainty weighting, GradNorm) inside the ordinary `compile`/`fit`.
"""

import keras
from keras import ops

from keras_moe import _autodiff
from keras_moe import weighting as weighting_module
from keras_moe.utils.keras_internals import (
    aggregate_additional_loss,
    compiled_loss,
    compiled_loss_entries,
    inbound_node,
    keeps_compiled_loss_entries,
    keras_history,
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
        # The losses of the last compute_loss: (T,) and a list of T scalars.
        self.task_losses = None
        self.task_loss_list = None

    def start(self):
        self.values = {}
        self.task_losses = None
        self.task_loss_list = None

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


def _task_names(model, outputs):
    if isinstance(outputs, dict):
        names = sorted(outputs)  # the order of keras.tree.flatten
        flat = [outputs[name] for name in names]
    elif isinstance(outputs, (list, tuple)):
        names = list(model.output_names)
        flat = list(outputs)
    else:
        return list(model.output_names)
    if any(keras.tree.is_nested(output) for output in flat):
        raise ValueError(
            "MultiTaskModel needs one output tensor per task: a list, tuple "
            "or dict of tensors, not a nested structure. Received: "
            f"outputs={keras.tree.map_structure(lambda _: '*', outputs)}"
        )
    if len(set(names)) != len(names):
        raise ValueError(
            "MultiTaskModel needs distinct task (output) names; pass a dict "
            f"of outputs to name them. Received: task names {names}"
        )
    return names


def _ancestor_layers(tensor):
    """Every layer that `tensor` depends on in its functional graph."""
    found, seen_nodes = {}, set()
    stack = [tensor]
    while stack:
        current = stack.pop()
        history = keras_history(current)
        if history is None:
            continue
        operation, node_index = history[0], history[1]
        key = (id(operation), node_index)
        if key in seen_nodes:
            continue
        seen_nodes.add(key)
        found[id(operation)] = operation
        node = inbound_node(operation, node_index)
        stack.extend(keras.tree.flatten(node.input_tensors))
    return found


@keras.saving.register_keras_serializable(package="keras_moe")
class MultiTaskModel(keras.Model):
    """A functional multi-task model whose task losses are weighted by a
    fixed, uncertainty-based or GradNorm scheme, inside `compile`/`fit`.

    Built like a functional `keras.Model`, with one output per task (a list
    or dict of tensors), and compiled as usual with one loss per task. For
    a training step with task losses `L_t` (each already multiplied by its
    `compile(loss_weights=...)` factor, if any), the minimised loss is

    - `task_weighting=None` / `"fixed"`: `sum_t L_t` (plain Keras);
    - `"uncertainty"` / `UncertaintyWeighting(...)`:
      `sum_t exp(-s_t) L_t + s_t`, `s_t` trainable log-variances;
    - `"gradnorm"` / `GradNorm(...)`: `sum_t w_t L_t`, the weights `w_t`
      updated after each step from the task gradient norms on the last
      shared layer;

    plus the losses added with `add_loss` (routing losses, regularizers).
    `fit` logs Keras' usual `loss` and `<task>_loss` (unweighted), and the
    current factor of every task loss as `<task>_weight`
    (`loss_weights_t * weight_t`). The weighting's state is part of the
    model: it saves to and reloads from `.keras`.

    Args:
        inputs: the model inputs (`keras.Input` tensors).
        outputs: a list, tuple or dict of output tensors, one per task. The
            task names are the output layer names (list) or the keys (dict).
        name: the model name.
        task_weighting: `None`/`"fixed"`, `"uncertainty"`, `"gradnorm"`, or
            a `keras_moe.weighting` instance (`UncertaintyWeighting`,
            `GradNorm`, `FixedWeighting`) to set its options.
        **kwargs: other `keras.Model` arguments (e.g. `trainable`).

    Example:

    >>> import numpy as np
    >>> import keras
    >>> x = keras.Input((4,))
    >>> h = keras.layers.Dense(8, activation="relu", name="shared")(x)
    >>> a = keras.layers.Dense(1, name="a")(h)
    >>> b = keras.layers.Dense(1, name="b")(h)
    >>> model = MultiTaskModel(x, [a, b], task_weighting="uncertainty")
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
    """

    def __init__(self, inputs, outputs, name=None, *, task_weighting=None, **kwargs):
        # `task_weighting` is keyword-only so that Keras still treats this
        # class as functional (`(inputs, outputs, name)` constructor): its
        # graph config is saved, and `from_config` passes `task_weighting`
        # back as a keyword argument.
        super().__init__(inputs, outputs, name=name, **kwargs)
        self.task_names = _task_names(self, outputs)
        weighting = weighting_module.get(task_weighting)
        if not weighting.built:
            weighting.build((len(self.task_names),))
        elif weighting.num_tasks != len(self.task_names):
            raise ValueError(
                "task_weighting was built for another number of tasks. "
                f"Received: task_weighting.num_tasks={weighting.num_tasks}, "
                f"tasks={self.task_names}"
            )
        self.task_weighting = weighting
        self._shared_layer_name = None
        if weighting.needs_gradient_norms:
            self._shared_layer_name = self._find_shared_layer(
                getattr(weighting, "shared_layer", None)
            ).name
        self._task_weight_log = _TaskWeightLog(self.task_names)
        self._recorder = None

    # Shared layer ---------------------------------------------------------

    def _find_shared_layer(self, layer_name):
        """The named layer (checked to feed every task), or the last layer
        with trainable weights that every task output depends on."""
        per_task = [_ancestor_layers(output) for output in self.outputs]
        shared_ids = set(per_task[0]).intersection(*per_task[1:])
        if layer_name is not None:
            try:
                layer = self.get_layer(layer_name)
            except ValueError:
                layer = None
            if layer is None:
                raise ValueError(
                    f"GradNorm's shared_layer is not a layer of the model. "
                    f"Received: shared_layer={layer_name!r}, layers="
                    f"{[layer.name for layer in self.layers]}"
                )
            if id(layer) not in shared_ids:
                raise ValueError(
                    "GradNorm's shared_layer must feed every task output. "
                    f"Received: shared_layer={layer_name!r}, tasks="
                    f"{self.task_names}"
                )
            if not layer.trainable_weights:
                raise ValueError(
                    "GradNorm's shared_layer must have trainable weights. "
                    f"Received: shared_layer={layer_name!r}"
                )
            return layer
        candidates = [
            layer
            for layer in self.layers
            if id(layer) in shared_ids and layer.trainable_weights
        ]
        if not candidates:
            raise ValueError(
                "GradNorm needs a layer with trainable weights shared by all "
                f"tasks, and the model has none. Received: tasks="
                f"{self.task_names}"
            )
        return candidates[-1]  # `layers` is in topological order

    @property
    def shared_layer(self):
        """The layer whose weights GradNorm measures (`None` otherwise)."""
        if self._shared_layer_name is None:
            return None
        return self.get_layer(self._shared_layer_name)

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
        self._recorder.start()
        compiled_loss(self)(y, y_pred, sample_weight)  # also logs <task>_loss
        per_task = self._recorder.collect()
        task_losses = ops.stack(per_task)
        self._recorder.task_loss_list = per_task
        self._recorder.task_losses = task_losses
        total = self.task_weighting(task_losses, training=training)
        weights = self.task_weighting.current_weights()
        self._task_weight_log.update_state(
            ops.stop_gradient(weights * self._recorder.constant_weights())
        )
        losses = [total]
        losses.extend(aggregate_additional_loss(loss) for loss in self.losses)
        return losses[0] if len(losses) == 1 else ops.sum(losses)

    def train_step(self, *args):
        if self._recorder is not None and self.task_weighting.needs_gradient_norms:
            return _autodiff.task_gradient_train_step(self, *args)
        return super().train_step(*args)

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
        return config
