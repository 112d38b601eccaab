"""Shrinking a trained MoE model: measure expert usage, prune experts, distil.

- `expert_usage(model, data)`: every MoE layer's per-expert load, summed
  over a whole dataset (a layer's `routing_stats()` only hold the last
  batch).
- `select_experts(model, keep, usage)` / `prune_experts(model, keep, usage)`:
  a new model in which the chosen MoE layers keep their most-used experts.
- `Distiller(student, teacher)`: trains a (dense) student on the labels and
  on a teacher's outputs, inside `compile`/`fit`.
- int8 quantisation is Keras' own `model.quantize("int8")`, which every
  `Experts` bank implements (see `keras_moe.layers.Experts`);
  `weight_bytes(model, experts_only=True)` measures what it saves.

See docs/compression.md.
"""

import copy
import numbers

import keras
import numpy as np
from keras import ops

from keras_moe.utils import validation as check
from keras_moe.layers.experts import Experts
from keras_moe.layers.heads import (
    BinaryHead,
    BoxHead,
    ClassificationHead,
    RegressionHead,
    _output_items,
)


def weight_bytes(layer, experts_only=False):
    """Bytes of the variables of `layer` (a layer or model): every variable,
    or with `experts_only=True` those of its `Experts` banks (what
    `quantize("int8")` shrinks). Counts `shape x dtype size`; a variable
    shared by several layers is counted once.

    Example:

    >>> from keras_moe.layers import Experts
    >>> bank = Experts(num_experts=4, hidden_dim=128)
    >>> bank.build((4, None, 64))
    >>> before = weight_bytes(bank)
    >>> bank.quantize("int8")
    >>> round(before / weight_bytes(bank), 2)
    3.7
    """
    if experts_only:
        layers = [
            sub
            for sub in layer._flatten_layers(include_self=True)
            if isinstance(sub, Experts)
        ]
    else:
        layers = [layer]
    seen, total = set(), 0
    for sub in layers:
        for variable in sub.weights:
            if id(variable) in seen:
                continue
            seen.add(id(variable))
            total += int(np.prod(variable.shape, dtype="int64")) * np.dtype(
                variable.dtype
            ).itemsize
    return total

# ---------------------------------------------------------------------------
# Expert usage over a dataset
# ---------------------------------------------------------------------------


def _usage_layers(model):
    """The layers under `model` that keep a per-expert `expert_load`."""
    found = {}
    for layer in model._flatten_layers(include_self=False):
        load = getattr(layer, "expert_load", None)
        if isinstance(load, keras.Variable) and callable(
            getattr(layer, "routing_stats", None)
        ):
            if layer.name in found and found[layer.name] is not layer:
                raise ValueError(
                    "expert_usage needs distinct names for the MoE layers. "
                    f"Received: two layers named {layer.name!r}"
                )
            found[layer.name] = layer
    return found


def _inputs_of(element):
    """The model inputs of one dataset element: `x` of `(x, y[, w])`."""
    if isinstance(element, tuple):
        return element[0]
    return element


def _to_numpy(x):
    return keras.tree.map_structure(np.asarray, x)


def _num_examples(x):
    return int(np.shape(keras.tree.flatten(x)[0])[0])


def _batches(data, batch_size, steps):
    """Input batches from arrays (sliced), a `PyDataset`, or any iterable of
    `x` or `(x, y[, w])` elements (`tf.data.Dataset`, generators)."""
    if isinstance(data, keras.utils.PyDataset):
        count = len(data) if steps is None else min(steps, len(data))
        for index in range(count):
            yield _to_numpy(_inputs_of(data[index]))
        return
    x = _inputs_of(data)
    leaves = keras.tree.flatten(x) if isinstance(x, (list, dict)) else [x]
    if all(isinstance(leaf, np.ndarray) for leaf in leaves):
        n = _num_examples(x)
        batch_size = check.positive_int("batch_size", batch_size)
        for step, start in enumerate(range(0, n, batch_size)):
            if steps is not None and step >= steps:
                return
            yield keras.tree.map_structure(
                lambda a: a[start : start + batch_size], x
            )
        return
    for step, element in enumerate(data):
        if steps is not None and step >= steps:
            return
        yield _to_numpy(_inputs_of(element))


def expert_usage(model, data, batch_size=32, steps=None):
    """Per-expert load of every MoE layer of `model`, over a whole dataset.

    Runs `model.predict_on_batch` (inference mode) on every batch of `data`
    and sums each layer's `expert_load` (the share of the routed
    (token, choice) pairs, or of the gate mass, that each expert received in
    that call), weighted by the examples in the batch; so the result is the
    share of the whole dataset's routing that each expert received.

    Args:
        model: a built Keras model containing MoE layers (`SparseMoE`,
            `SoftMoE`, `MultiGateMoE`, `CGC` levels, `MixtureOfExperts`:
            any layer with an `expert_load` statistic).
        data: NumPy inputs (an array, a list or dict of arrays, or a tuple
            `(x, y)`), sliced into batches of `batch_size`; or a
            `keras.utils.PyDataset`, a `tf.data.Dataset` or any iterable of
            `x` or `(x, y[, sample_weight])` batches.
        batch_size: the batch size for NumPy inputs.
        steps: read at most this many batches (default: all).

    Returns:
        `{layer name: float64 array (E,)}`, each summing to 1.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> from keras_moe.layers import SparseMoE
    >>> inputs = keras.Input((4, 8))
    >>> model = keras.Model(inputs, SparseMoE(4, 16, name="moe")(inputs))
    >>> usage = expert_usage(model, np.random.rand(64, 4, 8).astype("float32"))
    >>> usage["moe"].shape, round(float(usage["moe"].sum()), 6)
    ((4,), 1.0)
    """
    layers = _usage_layers(model)
    if not layers:
        raise ValueError(
            "expert_usage found no MoE layer (a layer with an `expert_load` "
            f"statistic) in the model. Received: model={model.name!r}"
        )
    if steps is not None:
        steps = check.positive_int("steps", steps)
    totals = {name: None for name in layers}
    examples = 0
    for x in _batches(data, batch_size, steps):
        n = _num_examples(x)
        if n == 0:
            continue
        model.predict_on_batch(x)
        for name, layer in layers.items():
            load = ops.convert_to_numpy(layer.expert_load).astype("float64")
            totals[name] = n * load if totals[name] is None else totals[name] + n * load
        examples += n
    if not examples:
        raise ValueError("expert_usage received no data (zero batches or examples).")
    usage = {}
    for name, total in totals.items():
        mass = total.sum()
        usage[name] = total / mass if mass > 0 else total
    return usage


# ---------------------------------------------------------------------------
# Expert pruning
# ---------------------------------------------------------------------------


def _is_moe(layer):
    return _has_hooks(layer) or hasattr(layer, "num_experts") or any(
        hasattr(layer, a) for a in ("num_task_experts", "levels")
    )


def _has_hooks(layer):
    return callable(getattr(layer, "pruned_config", None)) and callable(
        getattr(layer, "copy_pruned_weights", None)
    )


def _unsupported_reason(layer):
    if _has_hooks(layer):
        return None
    return (
        f"{type(layer).__name__} {layer.name!r} is not prunable (it has no "
        "pruned_config / copy_pruned_weights hooks; supported: SparseMoE, "
        "MultiGateMoE, SoftMoE and MixtureOfExperts)"
    )


def _is_graph_model(model):
    """A functional or Sequential model (one that Keras rebuilds from a
    config listing its layers)."""
    return isinstance(model, keras.Sequential) or (
        isinstance(model, keras.Model) and hasattr(model, "_outputs_struct")
    )


def _model_layers(model):
    if not _is_graph_model(model):
        raise ValueError(
            "prune_experts needs a functional or Sequential model (it "
            "rebuilds the model from its config). Received: "
            f"{type(model).__name__} {model.name!r}"
        )
    return {layer.name: layer for layer in model.layers}


def select_experts(model, keep, usage=None):
    """The experts that `prune_experts` keeps: `{layer name: sorted indices}`.

    Args:
        model: a functional or Sequential model.
        keep: an int (every MoE layer of the model keeps that many experts),
            or a dict `{layer name: int or list of expert indices}` for the
            layers to prune (the others are copied unchanged).
        usage: `{layer name: (E,) loads}` as returned by `expert_usage`; by
            default each layer's `routing_stats()["expert_load"]`, i.e. the
            last batch it saw (measure a dataset with `expert_usage`).

    Returns:
        `{layer name: list of the kept expert indices, ascending}`: the
        `keep` experts with the largest usage (ties: the lower index).
    """
    layers = _model_layers(model)
    if isinstance(keep, dict):
        requests = dict(keep)
        for name in requests:
            if name not in layers:
                raise ValueError(
                    f"keep names a layer that the model does not have at its "
                    f"top level. Received: {name!r}; MoE layers: "
                    f"{sorted(n for n, l in layers.items() if _is_moe(l))}"
                )
    elif isinstance(keep, numbers.Integral) and not isinstance(keep, bool):
        requests = {name: keep for name, layer in layers.items() if _is_moe(layer)}
        if not requests:
            raise ValueError(
                f"The model has no MoE layer at its top level. Received: "
                f"model={model.name!r}"
            )
    else:
        raise ValueError(
            "keep must be an int or a dict {layer name: int or list of "
            f"expert indices}}. Received: keep={keep!r}"
        )
    reasons = [_unsupported_reason(layers[name]) for name in requests]
    reasons = [reason for reason in reasons if reason is not None]
    if reasons:
        raise ValueError(
            f"prune_experts cannot prune {'; '.join(reasons)}. Pass keep as a "
            "dict naming only the layers to prune."
        )
    selected = {}
    for name, request in requests.items():
        layer = layers[name]
        e = layer.num_experts
        if isinstance(request, (list, tuple, np.ndarray)):
            indices = sorted({int(i) for i in request})
            if not indices or len(indices) != len(request) or not all(
                0 <= i < e for i in indices
            ):
                raise ValueError(
                    f"The experts to keep in {name!r} must be distinct indices "
                    f"in [0, {e}). Received: {list(request)!r}"
                )
            selected[name] = indices
            continue
        count = check.positive_int(f"keep[{name!r}]", request)
        if count > e:
            raise ValueError(
                f"keep must be <= num_experts. Received: keep={count}, "
                f"num_experts={e} ({name!r})"
            )
        if usage is not None and name in usage:
            load = np.asarray(usage[name], "float64")
        else:
            load = np.asarray(layer.routing_stats()["expert_load"], "float64")
            if not load.any():
                raise ValueError(
                    f"{name!r} has no routing statistics yet (it was never "
                    "called); pass usage=expert_usage(model, data)."
                )
        if load.shape != (e,):
            raise ValueError(
                f"usage[{name!r}] must have one value per expert, shape "
                f"({e},). Received: shape {load.shape}"
            )
        order = np.argsort(-load, kind="stable")
        selected[name] = sorted(int(i) for i in order[:count])
    return selected


def prune_experts(model, keep, usage=None):
    """A new model whose MoE layers keep only their most-used experts.

    Each pruned layer keeps `keep` of its `E` experts (the most used ones,
    by `usage`). The work is done by two hooks that every prunable layer
    implements, as Keras layers implement `quantize` for `Model.quantize`:
    `layer.pruned_config(kept)` (the layer's config for the kept experts)
    and `new_layer.copy_pruned_weights(layer, kept)` (copies the weights,
    keeping the kept experts' slices); a layer that owns a router asks the
    router through the same two methods. `prune_experts` rebuilds the model
    from its config with the pruned layer configs, calls the hooks and
    copies every other weight, so the new model predicts, trains (compile
    it first: it is returned uncompiled, with a fresh optimizer) and saves
    like any other.

    What each layer does:

    - `MixtureOfExperts` (default gate only; at least 2 experts kept): the
      kept expert layers are copied whole and the gate's columns sliced.
    - `SparseMoE`, `MultiGateMoE`, `SoftMoE`: the kept experts' kernels and
      biases (int8 values and scales of a quantised bank), the dense gates'
      kernel and bias columns, SoftMoE's slot columns (an expert's slots
      go with it) and the statistics are sliced; shared experts are kept
      whole; routers prune themselves.
    - `TopKRouter`, `ExpertChoiceRouter`, `BalancedAssignmentRouter`,
      `TaskRouter`: the columns of the kernel (and bias, noise kernel,
      selection bias) or of the task logit table are kept; `k` becomes
      `min(k, keep)`.
    - `HashRouter` with a table (`vocab_size`): ids keep their kept experts
      (renumbered); a slot of a dropped expert goes to the least loaded kept
      expert. Without a table (arithmetic hash) it raises a `ValueError`.
    - `DSelectKRouter`: only a prefix of the experts `[0, ..., E' - 1]`
      with `k <= E'` (the selectors address experts by binary code; the
      codes keep their low bits); anything else raises a `ValueError`.
    - `CGC` and `PLE` have no hooks (their experts belong to tasks, the
      same number per task) and raise a `ValueError` naming them.

    What it preserves, with dropless inference (`eval_capacity_factor=None`;
    pruning raises the per-expert capacity of a finite factor): a token
    whose experts are all kept gets exactly the same output with top-`k`
    softmax routing and `k > 1` (weights renormalised over the top `k`) or
    sigmoid scores, task routing with `k > 1`, hash routing (same `k`),
    BASE routing at inference (an argmax), and DSelect-k when all the
    token's selector mass is on kept experts. With Switch routing
    (`k = 1`, weight = raw softmax probability), dense softmax gates and
    expert choice (weights are softmax scores) the weights of the kept
    experts grow, since the softmax is renormalised over fewer experts;
    they are unchanged only if the dropped experts had (nearly) zero
    probability. Other tokens are re-routed to their best kept experts.

    Optimizer state is not carried over: the new model has no optimizer,
    and the slots (e.g. Adam moments) of the removed experts are simply
    gone; compile the pruned model before fine-tuning it.

    Args:
        model: a built functional or Sequential model.
        keep: an int (every MoE layer at the top level of the model keeps
            that many experts), or a dict `{layer name: int or list of
            expert indices to keep}` for the layers to prune.
        usage: `{layer name: (E,) loads}`, e.g. from
            `expert_usage(model, data)`; default: each layer's last-batch
            `routing_stats()`.

    Returns:
        A new, uncompiled Keras model of the same class.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> from keras_moe.layers import SparseMoE
    >>> inputs = keras.Input((4, 8))
    >>> model = keras.Model(inputs, SparseMoE(4, 16, k=2, name="moe")(inputs))
    >>> data = np.random.rand(64, 4, 8).astype("float32")
    >>> small = prune_experts(model, {"moe": 2}, usage=expert_usage(model, data))
    >>> small.get_layer("moe").num_experts, small.predict(data, verbose=0).shape
    (2, (64, 4, 8))
    """
    kept = select_experts(model, keep, usage)
    layers = _model_layers(model)
    configs, reasons = {}, []
    for name, indices in kept.items():
        try:
            configs[name] = layers[name].pruned_config(list(indices))
        except ValueError as error:
            reasons.append(str(error))
    if reasons:
        raise ValueError(f"prune_experts cannot prune: {'; '.join(reasons)}")
    serialized = keras.saving.serialize_keras_object(model)
    serialized.pop("compile_config", None)
    for entry in serialized["config"]["layers"]:
        name = entry["config"].get("name")
        if name in configs:
            # Only the entries the hook changed: the others stay serialized
            # as Keras wrote them.
            original = layers[name].get_config()
            entry["config"] = dict(
                entry["config"],
                **{
                    key: value
                    for key, value in configs[name].items()
                    if key not in original or original[key] != value
                },
            )
    pruned = keras.saving.deserialize_keras_object(serialized)
    for name, layer in layers.items():
        target = pruned.get_layer(name)
        if name in kept:
            target.copy_pruned_weights(layer, list(kept[name]))
        elif layer.weights:
            target.set_weights(layer.get_weights())
    return pruned


# ---------------------------------------------------------------------------
# Distillation
# ---------------------------------------------------------------------------

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
        items = _output_items(model)
    except ValueError:
        return None
    structure = getattr(model, "_outputs_struct", None)
    if isinstance(structure, dict):
        items = sorted(items)  # keras.tree.flatten sorts dict keys
    return [(name, tensor._keras_history[0]) for name, tensor in items]


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
            if not _is_graph_model(model) or not model.built:
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
        teacher_dict = isinstance(getattr(self.teacher, "_outputs_struct", None), dict)
        student_dict = isinstance(getattr(self.student, "_outputs_struct", None), dict)
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
        if self._compile_loss is not None and self.alpha < 1.0:
            hard = self._compile_loss(y, y_pred, sample_weight)
            if hard is not None:
                losses.append((1.0 - self.alpha) * ops.cast(hard, "float32"))
        losses.extend(
            ops.cast(self._aggregate_additional_loss(loss), "float32")
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
