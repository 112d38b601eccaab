"""Model-graph surgery for `RoutingMonitor`'s class x expert tables: the
input a routed layer sees, a probe layer that counts its routing, and the
checks of the class data and layer names it is given."""

import inspect

import keras
import numpy as np

from keras_moe.utils.keras_internals import inbound_nodes


def _has_return_routing(layer):
    try:
        return "return_routing" in inspect.signature(layer.call).parameters
    except (TypeError, ValueError):
        return False


def _is_token_layer(layer):
    """A single-task MoE layer whose call can return its routing (so a class
    x expert table can be computed): `SparseMoE`, `MixtureOfExperts`."""
    return _has_return_routing(layer) and not hasattr(layer, "num_tasks")


def _expert_labels(layer, num_experts):
    """Expert names for plots: `CGC`/`PLE` columns are `<task>:<i>` for the
    task experts and `shared:<i>`; plain numbers otherwise."""
    names = getattr(layer, "task_names", None)
    m = getattr(layer, "num_task_experts", None)
    s = getattr(layer, "num_shared_experts", None)
    if names and isinstance(m, int) and isinstance(s, int):
        labels = [f"{t}:{i}" for t in names for i in range(m)]
        labels += [f"shared:{i}" for i in range(s)]
        if len(labels) == num_experts:
            return labels
    return [str(e) for e in range(num_experts)]


def _model_chain(model, layer):
    """`[model, nested model, ...]` down to the model whose own layers
    include `layer`, or None."""
    children = getattr(model, "layers", None) or []
    if any(child is layer for child in children):
        return [model]
    for child in children:
        if isinstance(child, keras.Model):
            chain = _model_chain(child, layer)
            if chain:
                return [model] + chain
    return None


def _call_input(layer, owner):
    """The symbolic input tensor of `layer`'s one call in its model's graph."""
    nodes = inbound_nodes(layer)
    if not nodes:
        raise ValueError(
            f"RoutingMonitor(class_data=...) runs the model up to the input of "
            f"{layer.name!r}, which needs a functional or Sequential model. "
            f"Received: {type(owner).__name__} {owner.name!r}, in which "
            f"{layer.name!r} has no symbolic call (a subclassed model?)"
        )
    if len(nodes) != 1:
        raise ValueError(
            f"RoutingMonitor(class_data=...): {layer.name!r} is called "
            f"{len(nodes)} times in the model graph; a class x expert table "
            "needs a layer that is called once"
        )
    tensors = nodes[0].arguments.keras_tensors
    if len(tensors) != 1:
        raise ValueError(
            f"RoutingMonitor(class_data=...): {layer.name!r} takes "
            f"{len(tensors)} symbolic tensors (e.g. `routing_inputs`); a class "
            "x expert table needs a layer called on one input tensor"
        )
    return tensors[0]


def _feature_function(model, layer, batch_size):
    """`x -> the input of layer` for the model input `x`, as NumPy: the
    model (and the nested models it goes through) cut at the layer's input."""
    chain = _model_chain(model, layer)
    if chain is None:
        raise ValueError(
            f"RoutingMonitor(class_data=...): {layer.name!r} is not a layer of "
            f"the model {model.name!r} nor of a model nested in it"
        )
    stages = []
    for parent, child in zip(chain, chain[1:] + [layer]):
        tensor = _call_input(child, parent)
        if any(tensor is x for x in parent.inputs) and len(parent.inputs) == 1:
            stages.append(None)  # the child reads the parent's input as is
        else:
            stages.append(keras.Model(parent.inputs, tensor))

    def features(x):
        for stage in stages:
            if stage is not None:
                x = stage.predict(x, batch_size=batch_size, verbose=0)
        return np.asarray(x)

    return features


class _RoutingCounts(keras.layers.Layer):
    """Per example, how many of its (token, choice) assignments `moe` sends
    to each expert in inference (`(B, E)`; the gate mass for a dense
    mixture). A private probe: wrapped in a `keras.Model` it runs compiled
    by `predict`, in batches, on every backend."""

    def __init__(self, moe, num_experts, **kwargs):
        super().__init__(**kwargs)
        self.moe = moe
        self.num_experts = num_experts

    def call(self, inputs):
        ops = keras.ops
        _, routing = self.moe(inputs, training=False, return_routing=True)
        batch = ops.shape(inputs)[0]
        e = self.num_experts
        if getattr(self.moe, "k", 0) is None and "probs" in routing:
            probs = ops.cast(routing["probs"], "float32")
            return ops.sum(ops.reshape(probs, (batch, -1, e)), axis=1)
        index = ops.reshape(routing["expert_index"], (batch, -1))
        hot = ops.one_hot(index, e, dtype="float32")
        router = getattr(self.moe, "router", None)
        if getattr(router, "assigns_positions", False) and "keep" in routing:
            # Expert-choice-like routers: only the pairs the experts picked.
            keep = ops.reshape(routing["keep"], (batch, -1))
            hot = hot * ops.cast(keep, "float32")[:, :, None]
        return ops.sum(hot, axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_experts)


def _name_list(name, value):
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise ValueError(
            f"{name} must be a list of layer names. Received: {name}={value!r}"
        )
    return list(value)


def _class_data(class_data, class_names):
    """Validated `(x, labels)` (labels: int64 class ids) and class names."""
    if class_data is None:
        if class_names is not None:
            raise ValueError(
                "class_names needs class_data=(x, labels). Received: "
                f"class_names={class_names!r}, class_data=None"
            )
        return None, None
    if not isinstance(class_data, (tuple, list)) or len(class_data) != 2:
        raise ValueError(
            "class_data must be a pair (x, labels). Received: "
            f"class_data of type {type(class_data).__name__}"
        )
    x, labels = class_data
    labels = np.asarray(labels)
    if labels.ndim == 2:  # one-hot rows, or a column of class ids
        labels = labels.argmax(axis=1) if labels.shape[1] > 1 else labels[:, 0]
    numeric = np.issubdtype(labels.dtype, np.number) and not np.issubdtype(
        labels.dtype, np.complexfloating
    )
    if labels.ndim != 1 or not numeric or not np.all(labels == np.round(labels)):
        raise ValueError(
            "class_data labels must be one integer class per example (or "
            f"one-hot rows). Received: labels of shape {labels.shape} and "
            f"dtype {labels.dtype}"
        )
    num_examples = len(keras.tree.flatten(x)[0])
    if len(labels) != num_examples:
        raise ValueError(
            "class_data must have one label per example. Received: "
            f"{num_examples} examples and {len(labels)} labels"
        )
    if len(labels) == 0 or labels.min() < 0:
        raise ValueError(
            "class_data labels must be class ids >= 0 (and not empty). "
            f"Received: labels with minimum {labels.min() if len(labels) else None}"
        )
    num_classes = int(labels.max()) + 1
    if class_names is None:
        class_names = [str(c) for c in range(num_classes)]
    else:
        class_names = [str(name) for name in class_names]
        if len(class_names) < num_classes:
            raise ValueError(
                "class_names must name every class in the labels. Received: "
                f"{len(class_names)} class_names for labels up to "
                f"{num_classes - 1}"
            )
    return (x, labels.astype("int64")), class_names
