"""The private Keras API that keras_moe relies on, in one place.

Keras 3 (3.15) has no public API for these: every use of a private Keras
attribute in keras_moe goes through a function here, so that a Keras
release that renames one breaks one function, found by the tests of its
callers. Each function says what it reads and why there is no public way.
"""

import keras


def flatten_layers(layer, include_self=True):
    """Every layer under `layer` (recursively, `layer` first when
    `include_self`). `Layer._flatten_layers`: Keras has no public recursive
    walk (`Model.layers` lists the top level only, and a plain `Layer` has
    no `layers`)."""
    return list(layer._flatten_layers(include_self=include_self))


def output_structure(model):
    """The nested structure of a functional model's outputs (a dict keeps its
    keys), or None for other models. `Functional._outputs_struct`:
    `model.outputs` is the flat list, without the keys of a dict output."""
    return getattr(model, "_outputs_struct", None)


def is_graph_model(model):
    """A functional or Sequential model (one that Keras rebuilds from a
    config listing its layers). Keras exports no `Functional` class to test
    with `isinstance`; a functional model is the one with an output
    structure."""
    return isinstance(model, keras.Sequential) or (
        isinstance(model, keras.Model) and hasattr(model, "_outputs_struct")
    )


def keras_history(tensor):
    """`(operation, node_index, tensor_index)` of a symbolic tensor, or None.
    `KerasTensor._keras_history`: the only link from a symbolic tensor to
    the layer call that produced it."""
    return getattr(tensor, "_keras_history", None)


def producing_layer(tensor):
    """The layer whose call produced the symbolic `tensor`."""
    return keras_history(tensor)[0]


def inbound_node(operation, node_index):
    """The `node_index`-th call node of `operation` (its `input_tensors`
    lead back through the graph). `Operation._inbound_nodes`: Keras has no
    public graph traversal."""
    return operation._inbound_nodes[node_index]


def output_items(model):
    """`(name, tensor)` for every output of a functional model, named as
    Keras names the targets of a dict `y`: the keys of a dict output
    structure, else `model.output_names` (the names of the layers producing
    the outputs)."""
    # Only functional models name their outputs (a Sequential model has no
    # `output_names` and Keras cannot match dict losses to its output).
    structure = output_structure(model)
    if structure is None or not getattr(model, "output_names", None):
        raise ValueError(
            "default_compile_args needs a functional model, made with "
            "keras.Model(inputs, outputs); for a Sequential model pass "
            "loss=head.default_loss(), metrics=head.default_metrics(). "
            f"Received: {model!r}"
        )
    if isinstance(structure, dict):
        return [(str(name), tensor) for name, tensor in structure.items()]
    return list(zip(model.output_names, keras.tree.flatten(structure)))
