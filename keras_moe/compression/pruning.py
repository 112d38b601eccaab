"""Expert pruning: a new model in which chosen MoE layers keep their
most-used experts (`select_experts`, `prune_experts`)."""

import numbers

import keras
import numpy as np

from keras_moe.compression.usage import expert_usage  # noqa: F401  (its example)
from keras_moe.utils import validation as check
from keras_moe.utils.keras_internals import is_graph_model


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


def _model_layers(model):
    if not is_graph_model(model):
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

