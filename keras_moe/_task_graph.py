"""The functional graph of a multi-task model: its tasks, the layers and
variables the tasks share, and its split at a shared representation.

Helpers of `keras_moe.models.MultiTaskModel` (private to the package).
"""

import keras

from keras_moe.utils.keras_internals import (
    inbound_node,
    inbound_nodes,
    keras_history,
    output_structure,
)


def task_names(model, outputs):
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


def layer_names(name, value):
    """None, or a non-empty list of layer names."""
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value or not all(
        isinstance(v, str) and v for v in value
    ):
        raise ValueError(
            f"{name} must be a non-empty list of layer names, or None. "
            f"Received: {name}={value!r}"
        )
    return list(value)


def ancestor_layers(tensor):
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


class Holder:
    """Holds Keras objects without Keras tracking them as the model's own
    (the representation mode's two sub-models share the model's layers;
    tracked, they would be saved twice)."""

    def __init__(self, **items):
        self.__dict__.update(items)


def task_ancestors(model):
    return [ancestor_layers(output) for output in model.outputs]

def find_shared_layer(model, layer_name):
    """The named layer (checked to feed every task), or the last layer
    with trainable weights that every task output depends on."""
    per_task = task_ancestors(model)
    shared_ids = set(per_task[0]).intersection(*per_task[1:])
    if layer_name is not None:
        try:
            layer = model.get_layer(layer_name)
        except ValueError:
            layer = None
        if layer is None:
            raise ValueError(
                f"GradNorm's shared_layer is not a layer of the model. "
                f"Received: shared_layer={layer_name!r}, layers="
                f"{[layer.name for layer in model.layers]}"
            )
        if id(layer) not in shared_ids:
            raise ValueError(
                "GradNorm's shared_layer must feed every task output. "
                f"Received: shared_layer={layer_name!r}, tasks="
                f"{model.task_names}"
            )
        if not layer.trainable_weights:
            raise ValueError(
                "GradNorm's shared_layer must have trainable weights. "
                f"Received: shared_layer={layer_name!r}"
            )
        return layer
    candidates = [
        layer
        for layer in model.layers
        if id(layer) in shared_ids and layer.trainable_weights
    ]
    if not candidates:
        raise ValueError(
            "GradNorm needs a layer with trainable weights shared by all "
            f"tasks, and the model has none. Received: tasks="
            f"{model.task_names}"
        )
    return candidates[-1]  # `layers` is in topological order

def find_shared_variables(model, names):
    """The trainable variables of the layers that two or more tasks
    depend on (or of the named layers), in `trainable_variables`
    order."""
    if names:
        layers = []
        for layer_name in names:
            try:
                layers.append(model.get_layer(layer_name))
            except ValueError:
                raise ValueError(
                    "shared_layers names a layer the model does not have. "
                    f"Received: shared_layers={list(names)}, layers="
                    f"{[layer.name for layer in model.layers]}"
                ) from None
    else:
        counts = {}
        for ancestors in task_ancestors(model):
            for key in ancestors:
                counts[key] = counts.get(key, 0) + 1
        layers = [layer for layer in model.layers if counts.get(id(layer), 0) >= 2]
    ids = {id(v) for layer in layers for v in layer.trainable_variables}
    shared = [v for v in model.trainable_variables if id(v) in ids]
    if not shared:
        raise ValueError(
            "The gradient methods need trainable parameters that two or "
            "more tasks share, and "
            + (
                f"the layers {list(names)} have none."
                if names
                else "no layer with trainable weights feeds two tasks."
            )
            + f" Received: tasks={model.task_names}"
        )
    return shared

def split_at_representation(model, representation):
    """The model as `trunk: inputs -> z` and
    `heads: [z] + inputs -> outputs` (sharing this model's layers), `z`
    the output of the representation layer."""
    per_task = task_ancestors(model)
    shared_ids = set(per_task[0]).intersection(*per_task[1:])
    if representation is True:
        candidates = [
            layer
            for layer in model.layers
            if id(layer) in shared_ids
            and not isinstance(layer, keras.layers.InputLayer)
            and len(inbound_nodes(layer)) == 1
            and not keras.tree.is_nested(layer.output)
        ]
        if not candidates:
            raise ValueError(
                "representation=True needs a layer with one output "
                "tensor that every task depends on; the model has none. "
                f"Received: tasks={model.task_names}"
            )
        layer = candidates[-1]
    else:
        try:
            layer = model.get_layer(representation)
        except ValueError:
            raise ValueError(
                "representation names a layer the model does not have. "
                f"Received: representation={representation!r}"
            ) from None
        if id(layer) not in shared_ids:
            raise ValueError(
                "The representation must feed every task output. "
                f"Received: representation={representation!r}, "
                f"tasks={model.task_names}"
            )
        if len(inbound_nodes(layer)) != 1 or keras.tree.is_nested(layer.output):
            raise ValueError(
                "The representation layer must be called once and have "
                f"one output tensor. Received: representation="
                f"{representation!r}"
            )
    z = layer.output
    inputs = list(model.inputs)
    trunk = keras.Model(inputs, z, name=f"{model.name}_trunk")
    heads = keras.Model(
        [z] + inputs, output_structure(model), name=f"{model.name}_heads"
    )
    return Holder(layer_name=layer.name, trunk=trunk, heads=heads)
