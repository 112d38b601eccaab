"""Knowledge distillation of a teacher (e.g. an MoE model) into a student:
`Distiller`, `distillation_loss`."""

import copy

import keras
from keras import ops

from keras_moe.layers.heads import (
    BinaryHead,
    BoxHead,
    ClassificationHead,
    RegressionHead,
)
from keras_moe.utils import validation as check
from keras_moe.utils.keras_internals import (
    aggregate_additional_loss,
    compiled_loss,
    is_graph_model,
    output_items,
    output_structure,
    producing_layer,
)

DISTILLATION_LOSSES = ("kl", "kl_logits", "binary_kl", "binary_kl_logits", "mse", "l1")
_EPSILON = 1e-7


def _log_softmax_from(values, temperature, from_logits):
    values = ops.cast(values, "float32")
    if not from_logits:  # probabilities: log p are logits up to a constant
        values = ops.log(ops.clip(values, _EPSILON, 1.0))
    return ops.log_softmax(values / temperature, axis=-1)


def _binary_logit_from(values, from_logits):
    values = ops.cast(values, "float32")
    if from_logits:
        return values
    p = ops.clip(values, _EPSILON, 1.0 - _EPSILON)
    return ops.log(p) - ops.log(1.0 - p)


def distillation_loss(kind, teacher, student, temperature=1.0):
    """One output's distillation term, averaged over the examples.

    - `"kl"` / `"kl_logits"` (class probabilities / logits):
      `T^2 * KL(softmax(z_t / T) || softmax(z_s / T))` over the last axis,
      with `z = log p` for probabilities (Hinton et al. 2015; the `T^2`
      keeps the gradient scale of the soft term independent of `T`).
    - `"binary_kl"` / `"binary_kl_logits"`: the same for sigmoid outputs,
      per unit, summed over the last axis.
    - `"mse"`: mean squared difference; `"l1"`: mean absolute difference
      (boxes, regression); the temperature does not apply.

    Args:
        kind: one of `DISTILLATION_LOSSES`.
        teacher, student: tensors of the same shape.
        temperature: `T > 0`.

    Returns:
        A float32 scalar.
    """
    check.one_of("distillation loss", kind, DISTILLATION_LOSSES)
    t = check.positive_float("temperature", temperature)
    teacher = ops.stop_gradient(ops.cast(teacher, "float32"))
    student = ops.cast(student, "float32")
    if kind in ("kl", "kl_logits"):
        from_logits = kind == "kl_logits"
        log_t = _log_softmax_from(teacher, t, from_logits)
        log_s = _log_softmax_from(student, t, from_logits)
        kl = ops.sum(ops.exp(log_t) * (log_t - log_s), axis=-1)
        return t * t * ops.mean(kl)
    if kind in ("binary_kl", "binary_kl_logits"):
        from_logits = kind == "binary_kl_logits"
        zt = _binary_logit_from(teacher, from_logits) / t
        zs = _binary_logit_from(student, from_logits) / t
        pt = ops.sigmoid(zt)
        # KL(Bern(pt) || Bern(ps)) with log-sigmoids for stability.
        kl = pt * (ops.log_sigmoid(zt) - ops.log_sigmoid(zs)) + (1.0 - pt) * (
            ops.log_sigmoid(-zt) - ops.log_sigmoid(-zs)
        )
        return t * t * ops.mean(ops.sum(kl, axis=-1))
    if kind == "mse":
        return ops.mean(ops.square(teacher - student))
    return ops.mean(ops.abs(teacher - student))


def _default_distillation_loss(layer):
    if isinstance(layer, ClassificationHead):
        return "kl_logits" if layer.output_mode == "logits" else "kl"
    if isinstance(layer, BinaryHead):
        return "binary_kl_logits" if layer.output_mode == "logits" else "binary_kl"
    if isinstance(layer, BoxHead):
        return "l1"
    if isinstance(layer, RegressionHead):
        return "mse"
    return None


def _output_names(model):
    """`[(name, producing layer)]` of a functional model's outputs, in the
    order of `keras.tree.flatten` of its output structure."""
    try:
        items = output_items(model)
    except ValueError:
        return None
    structure = output_structure(model)
    if isinstance(structure, dict):
        items = sorted(items)  # keras.tree.flatten sorts dict keys
    return [(name, producing_layer(tensor)) for name, tensor in items]


@keras.saving.register_keras_serializable(package="keras_moe")
class Distiller(keras.Model):
    """Knowledge distillation of a teacher (e.g. an MoE model) into a
    student (e.g. a dense model), inside `compile`/`fit`.

    For a batch `x` with targets `y`, student outputs `s_o = student(x)` and
    teacher outputs `t_o = teacher(x, training=False)` (constant), the
    minimised loss is

    `L = (1 - alpha) * sum_o w_o * hard_o(y_o, s_o)
         + alpha * sum_o w_o * D_o(t_o, s_o) + student losses`

    where `hard_o` are the losses given to `compile` (per output, e.g.
    `default_compile_args(student)["loss"]`), `w_o` the `compile`
    `loss_weights` (1 by default), `D_o` the distillation term of output `o`
    (`distillation_loss`: a temperature-softened KL for class
    probabilities, L1 or MSE for boxes and regression) and "student
    losses" those the student adds itself (`add_loss`, regularizers). The
    teacher is frozen (`teacher.trainable = False`); its routing statistics
    still update as it runs. `fit` logs `loss`, the hard `<output>_loss`
    terms, `distillation_loss` (the weighted sum of the `D_o`) and the
    compiled metrics, all computed on the student's outputs. `predict`
    returns the student's outputs; save the student alone with
    `distiller.student.save(path)`.

    Args:
        student: the model to train (any Keras model with the same inputs
            and output structure as the teacher).
        teacher: the trained model to imitate.
        alpha: weight of the distillation terms, in `[0, 1]` (0: labels
            only; 1: teacher only). Default 0.5.
        temperature: `T > 0` of the softened KL terms. Default 2.0.
        distillation_loss: the distillation term of each output: a dict
            `{output name: kind}` (`"kl"`, `"kl_logits"`, `"binary_kl"`,
            `"binary_kl_logits"`, `"mse"`, `"l1"`), or one kind for every
            output. Default: from the student's output layers
            (`ClassificationHead` -> `"kl"` (`"kl_logits"` for logits),
            `BinaryHead` -> `"binary_kl"`, `BoxHead` -> `"l1"`,
            `RegressionHead` -> `"mse"`); other outputs must be named.
        **kwargs: `keras.Model` arguments (`name`).

    Call arguments:
        inputs: the student's inputs. Returns the student's outputs.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> from keras_moe.layers import ClassificationHead, SparseMoE
    >>> inputs = keras.Input((8,))
    >>> h = SparseMoE(4, 16, name="moe")(inputs)
    >>> teacher = keras.Model(inputs, ClassificationHead(3, name="y")(h))
    >>> s_in = keras.Input((8,))
    >>> student = keras.Model(s_in, ClassificationHead(3, name="y")(s_in))
    >>> distiller = Distiller(student, teacher, alpha=0.5, temperature=2.0)
    >>> distiller.compile("adam", loss="sparse_categorical_crossentropy")
    >>> x, y = np.random.rand(32, 8), np.random.randint(0, 3, (32,))
    >>> history = distiller.fit(x, y, epochs=1, verbose=0)
    >>> sorted(history.history)
    ['distillation_loss', 'loss']

    References:
        Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network
        (2015). Fedus, Zoph, Shazeer. Switch Transformers (2021), section 5:
        distilling sparse models into dense ones.
    """

    def __init__(
        self,
        student,
        teacher,
        alpha=0.5,
        temperature=2.0,
        distillation_loss=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        # Deserialising consumes the dict: work on a copy of a config's.
        if isinstance(student, dict):
            student = keras.saving.deserialize_keras_object(copy.deepcopy(student))
        if isinstance(teacher, dict):
            teacher = keras.saving.deserialize_keras_object(copy.deepcopy(teacher))
        for role, model in (("student", student), ("teacher", teacher)):
            if not is_graph_model(model) or not model.built:
                raise ValueError(
                    f"{role} must be a built functional or Sequential Keras "
                    f"model. Received: {role}={model!r}"
                )
        if student is teacher:
            raise ValueError("student and teacher must be different models.")
        self.alpha = check.unit_interval("alpha", alpha)
        self.temperature = check.positive_float("temperature", temperature)
        self.student = student
        self.teacher = teacher
        teacher.trainable = False
        self.output_keys = self._resolve_names()
        self.distillation_loss = self._resolve_losses(distillation_loss)
        self._distillation_tracker = keras.metrics.Mean(name="distillation_loss")
        self._loss_weights = None

    def _resolve_names(self):
        named = _output_names(self.student)
        if named is not None:
            names = [name for name, _ in named]
        else:
            count = len(keras.tree.flatten(self.student.outputs))
            names = [f"output_{i}" for i in range(count)] if count > 1 else ["output"]
        teacher_count = len(keras.tree.flatten(self.teacher.outputs))
        teacher_dict = isinstance(output_structure(self.teacher), dict)
        student_dict = isinstance(output_structure(self.student), dict)
        teacher_named = _output_names(self.teacher)
        if teacher_count != len(names) or (
            teacher_dict
            and student_dict
            and [n for n, _ in teacher_named] != names
        ):
            raise ValueError(
                "The teacher and the student must have the same outputs. "
                f"Received: student outputs {names}, teacher outputs "
                f"{[n for n, _ in teacher_named] if teacher_named else teacher_count}"
            )
        return names

    def _resolve_losses(self, given):
        names = self.output_keys
        if isinstance(given, str):
            check.one_of("distillation_loss", given, DISTILLATION_LOSSES)
            return {name: given for name in names}
        if given is not None and not isinstance(given, dict):
            raise ValueError(
                "distillation_loss must be a kind, a dict {output name: kind} "
                f"or None. Received: distillation_loss={given!r}"
            )
        given = dict(given or {})
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise ValueError(
                f"distillation_loss names outputs the student does not have. "
                f"Received: {unknown}; outputs: {names}"
            )
        layers = dict(_output_names(self.student) or [])
        losses, missing = {}, []
        for name in names:
            kind = given.get(name) or _default_distillation_loss(layers.get(name))
            if kind is None:
                layer = layers.get(name)
                missing.append(
                    f"{name!r} (from {type(layer).__name__})" if layer else repr(name)
                )
                continue
            losses[name] = check.one_of(
                f"distillation_loss[{name!r}]", kind, DISTILLATION_LOSSES
            )
        if missing:
            raise ValueError(
                "Distiller does not know which distillation loss suits the "
                f"outputs {', '.join(missing)}; pass distillation_loss="
                f"{{name: kind}} with kinds from {list(DISTILLATION_LOSSES)}."
            )
        return losses

    def call(self, inputs, training=None):
        return self.student(inputs, training=training)

    def compile(self, optimizer="rmsprop", loss=None, loss_weights=None, **kwargs):
        """`keras.Model.compile` with the student's hard-label losses;
        `loss_weights` weight both the hard and the distillation term of an
        output."""
        super().compile(
            optimizer=optimizer, loss=loss, loss_weights=loss_weights, **kwargs
        )
        self._loss_weights = loss_weights

    def _weight(self, index, name):
        weights = self._loss_weights
        if weights is None:
            return 1.0
        if isinstance(weights, dict):
            return float(weights.get(name, 1.0))
        if isinstance(weights, (list, tuple)):
            return float(weights[index])
        return float(weights)

    def distillation_terms(self, teacher_outputs, student_outputs):
        """`{output name: D_o}`: the unweighted distillation term of every
        output (see `distillation_loss`)."""
        teacher = keras.tree.flatten(teacher_outputs)
        student = keras.tree.flatten(student_outputs)
        if len(teacher) != len(student) or len(student) != len(self.output_keys):
            raise ValueError(
                "The teacher and the student must have the same outputs. "
                f"Received: {len(teacher)} teacher and {len(student)} student "
                f"outputs; student outputs {self.output_keys}"
            )
        return {
            name: distillation_loss(
                self.distillation_loss[name], t, s, self.temperature
            )
            for name, t, s in zip(self.output_keys, teacher, student)
        }

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        teacher_pred = self.teacher(x, training=False)
        terms = self.distillation_terms(teacher_pred, y_pred)
        weighted = [
            self._weight(i, name) * terms[name]
            for i, name in enumerate(self.output_keys)
        ]
        distilled = ops.sum(ops.stack(weighted))
        self._distillation_tracker.update_state(distilled)
        losses = [self.alpha * distilled]
        hard_loss = compiled_loss(self)
        if hard_loss is not None and self.alpha < 1.0:
            hard = hard_loss(y, y_pred, sample_weight)
            if hard is not None:
                losses.append((1.0 - self.alpha) * ops.cast(hard, "float32"))
        losses.extend(
            ops.cast(aggregate_additional_loss(loss), "float32")
            for loss in self.student.losses
        )
        return ops.sum(ops.stack(losses))

    def get_config(self):
        return {
            "name": self.name,
            "student": keras.saving.serialize_keras_object(self.student),
            "teacher": keras.saving.serialize_keras_object(self.teacher),
            "alpha": self.alpha,
            "temperature": self.temperature,
            "distillation_loss": dict(self.distillation_loss),
        }
