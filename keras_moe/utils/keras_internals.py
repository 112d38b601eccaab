"""The private Keras API that keras_moe relies on, in one place.

Keras 3 (3.15) has no public API for these: every use of a private Keras
attribute in keras_moe goes through a function here, so that a Keras
release that renames one breaks one function, found by the tests of its
callers. Each function says what it reads and why there is no public way.
"""

import contextlib

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


def child_layers(layer):
    """The direct sublayers of `layer`, in tracking order. `Layer._layers`:
    `Model.layers` is public but a plain `Layer` has no `layers`."""
    return getattr(layer, "_layers", [])


def inbound_nodes(layer):
    """The call nodes of `layer` in the functional graphs it is part of (empty
    for a layer of a subclassed model). `Layer._inbound_nodes`: no public
    accessor."""
    return getattr(layer, "_inbound_nodes", [])


def replace_sublayer(layer, attribute, new):
    """Sets `layer.<attribute> = new`, untracking the old sublayer. Keras
    locks the state of a built layer and has no public way to swap a
    sublayer, so `Layer._tracker` is unlocked for the swap and locked again
    (its `unlock`, `untrack`, `lock` and `_lock_violation_msg`, Keras
    3.15)."""
    old = getattr(layer, attribute)
    tracker = layer._tracker
    locked = tracker.locked
    message = getattr(tracker, "_lock_violation_msg", None)
    tracker.unlock()
    try:
        tracker.untrack(old)
        setattr(layer, attribute, new)
    finally:
        if locked:
            tracker.lock(message)


@contextlib.contextmanager
def unlocked_state(layer):
    """A context in which a built `layer` may create weights (locked again
    after it, if it was). Keras locks a layer's state after `build`
    (`Layer._tracker`); its own `Dense.enable_lora` unlocks the tracker to
    add the LoRA factors, and there is no public way to (Keras 3.15)."""
    tracker = layer._tracker
    locked = tracker.locked
    message = getattr(tracker, "_lock_violation_msg", None)
    tracker.unlock()
    try:
        yield
    finally:
        if locked:
            tracker.lock(message)


def assigned_layout(variable):
    """The layout a variable was created with (`keras.Variable(...,
    layout=)`), or None. `Variable._layout`: read the same way by Keras'
    own `ModelParallel.get_variable_layout`; no public accessor."""
    return getattr(variable, "_layout", None)


def input_signature(model):
    """The model's input specs with a dynamic batch dimension, as
    `model.export` computes them when given none. Keras exports no function
    for it (`keras.src.export.export_utils.get_input_signature`)."""
    from keras.src.export.export_utils import get_input_signature

    return get_input_signature(model)


def compiled_loss(model):
    """The `CompileLoss` that `model.compile(loss=...)` built (None without
    a compiled loss). `Trainer._compile_loss`: Keras 3 has no public
    `compiled_loss`."""
    return model._compile_loss


def compiled_loss_entries(compile_loss):
    """The `(path, loss, loss_weight, name)` entries of a built
    `CompileLoss`, or None when this Keras keeps none (`_flat_losses`)."""
    return getattr(compile_loss, "_flat_losses", None)


def set_compiled_loss_entries(compile_loss, entries):
    compile_loss._flat_losses = entries


def loss_tracker(model):
    """The `Mean` metric that logs a model's `loss` (`Trainer._loss_tracker`;
    a custom train step must update it as Keras' own does)."""
    return model._loss_tracker


def update_metrics_variables(model, *args):
    """JAX: the stateless metrics update of Keras' `train_step`
    (`JAXTrainer._update_metrics_variables`), for a custom train step."""
    return model._update_metrics_variables(*args)


def aggregate_additional_loss(loss):
    """One `add_loss` loss summed, in `floatx` if it is not a float: what
    Keras' own `compute_loss` does with `model.losses`
    (`Trainer._aggregate_additional_loss`), rewritten with public API for
    the models that override `compute_loss`."""
    if not keras.backend.is_float_dtype(loss.dtype):
        loss = keras.ops.cast(loss, keras.backend.floatx())
    return keras.ops.sum(loss)


def keeps_compiled_loss_entries(compile_loss):
    """Whether this Keras's `CompileLoss` keeps the entries that
    `compiled_loss_entries` reads."""
    return hasattr(compile_loss, "_flat_losses")


def untrack_variable(layer, variable):
    """Stops `layer` tracking `variable` (before the attribute holding it is
    replaced), as `Layer.__delattr__` does. `Layer._untrack_variable`: no
    public way to untrack."""
    layer._untrack_variable(variable)


def mark_quantized(layer):
    """Records that `layer` holds quantised weights, which `Layer` reads
    (`_is_quantized`) to allow loading them and to refuse a second
    `quantize`; Keras' own quantisable layers (`Dense`, `EinsumDense`) set
    it the same way in their quantised build."""
    layer._is_quantized = True


def register_tree_node_class(cls):
    """Makes `cls` (a class with `tree_flatten` / `tree_unflatten`) a node
    of Keras' nested structures (`keras.tree`), not a leaf: what lets a
    layer return a `dict` subclass (`RoutingResult`) from symbolic calls,
    functional models and compiled steps. `keras.tree` has no public
    registration function (Keras 3.15); this is the one Keras uses for its
    own tracked containers. Registering twice (a reloaded module) is a
    no-op."""
    from keras.src import tree as keras_tree

    try:
        keras_tree.register_tree_node_class(cls)
    except ValueError:  # already registered
        pass


def swap_value(variable, value):
    """Replaces the array a JAX-backend `variable` holds by `value` as is
    (same shape and dtype, any sharding) and returns the old one.
    `Variable._value`: `assign` re-applies the variable's layout, and
    `keras_moe.distribution.save_model` needs the gathered, replicated copy
    of an expert-sharded weight in its place while `model.save` reads it."""
    old = variable._value
    variable._value = value
    return old
