"""`default_compile_args`: the `loss` and `metrics` of `model.compile` for a
multi-task model, read from the task heads that produce its outputs."""

from keras_moe.utils.keras_internals import output_items, producing_layer


def default_compile_args(model):
    """`loss` and `metrics` for `model.compile`, from the model's heads.

    For a functional model whose outputs are produced by keras_moe heads
    (`ClassificationHead`, `BinaryHead`, `RegressionHead`, `BoxHead`, or any
    layer with `default_loss()` and `default_metrics()`), returns

    `{"loss": {name: head.default_loss()}, "metrics": {name: head.default_metrics()}}`

    keyed by the names Keras uses for dict targets: the keys when the model
    outputs a dict, else `model.output_names` (the names of the output
    layers, i.e. the heads' `name`s). Every call returns new loss and metric
    objects. Fit with targets keyed the same way, `model.fit(x, {name: y})`;
    a model with a single output that is not in a dict takes plain targets,
    `model.fit(x, y)` (Keras does not match a dict `y` to it).

    Args:
        model: a functional Keras model (a `Sequential` one has no output
            names: use `loss=head.default_loss()` there).

    Returns:
        A dict with keys `"loss"` and `"metrics"`, to pass as
        `model.compile(optimizer=..., **default_compile_args(model))`; add
        `loss_weights=` yourself to weight the tasks.

    Raises:
        ValueError: if `model` is not functional, or if some output is not
            produced directly by a head (an output computed from a head's
            output, e.g. through an `Activation`, does not count); the
            message names those outputs. Give their losses yourself.

    Example:

    >>> import keras
    >>> from keras_moe.layers import BoxHead, ClassificationHead
    >>> inputs = keras.Input((16,))
    >>> outputs = {
    ...     "label": ClassificationHead(3, name="label")(inputs),
    ...     "box": BoxHead(name="box")(inputs),
    ... }
    >>> model = keras.Model(inputs, outputs)
    >>> args = default_compile_args(model)
    >>> sorted(args["loss"]), type(args["loss"]["box"]).__name__
    (['box', 'label'], 'BoxLoss')
    >>> model.compile(optimizer="adam", **args)
    """
    losses, metrics, unknown = {}, {}, []
    for name, tensor in output_items(model):
        layer = producing_layer(tensor)
        if not (
            callable(getattr(layer, "default_loss", None))
            and callable(getattr(layer, "default_metrics", None))
        ):
            unknown.append(f"{name!r} (from {type(layer).__name__} {layer.name!r})")
            continue
        losses[name] = layer.default_loss()
        metrics[name] = list(layer.default_metrics())
    if unknown:
        raise ValueError(
            "default_compile_args: every model output must come directly from "
            "a head layer (ClassificationHead, BinaryHead, RegressionHead, "
            "BoxHead, or a layer with default_loss() and default_metrics()). "
            f"Received outputs not produced by a head: {', '.join(unknown)}"
        )
    return {"loss": losses, "metrics": metrics}
