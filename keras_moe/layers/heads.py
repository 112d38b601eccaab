"""Task heads: the last layers of a multi-task model, one per task.

Each head is a small MLP (`hidden_units`, optional) followed by the output
layer of its task, and knows its usual loss and metrics
(`default_loss()`, `default_metrics()`), so that a multi-task model compiles
with `model.compile(optimizer, **default_compile_args(model))`.
"""

import keras
from keras import ops

from keras_moe.layers.expert_bank import quantized_dtype_config
from keras_moe.utils import validation as check
from keras_moe.utils.keras_internals import output_items, producing_layer

OUTPUT_MODES = ("probabilities", "logits")


def _hidden_units(hidden_units):
    valid = isinstance(hidden_units, (list, tuple)) and all(
        isinstance(units, int) and not isinstance(units, bool) and units > 0
        for units in hidden_units
    )
    if not valid:
        raise ValueError(
            "hidden_units must be a list of positive integers, e.g. [64, 32], "
            f"or [] for no hidden layer. Received: hidden_units={hidden_units!r}"
        )
    check.non_negative_int(
        "len(hidden_units)", len(hidden_units), maximum=check.MAX_LEVELS
    )
    return tuple(
        check.positive_int("hidden_units", units, maximum=check.MAX_WIDTH)
        for units in hidden_units
    )


class _Head(keras.layers.Layer):
    """An MLP trunk (`Dropout -> Dense(units, activation)` per hidden layer)
    then `Dropout -> Dense(output_units)` and the task's output function."""

    def __init__(
        self,
        hidden_units=(),
        dropout=0.0,
        activation="relu",
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.hidden_units = _hidden_units(hidden_units)
        self.dropout = check.dropout_rate("dropout", dropout)
        self.activation = keras.activations.get(activation)
        self.kernel_initializer = check.initializer(
            "kernel_initializer", kernel_initializer
        )
        self.bias_initializer = check.initializer("bias_initializer", bias_initializer)
        self.kernel_regularizer = check.regularizer(
            "kernel_regularizer", kernel_regularizer
        )
        self.bias_regularizer = check.regularizer("bias_regularizer", bias_regularizer)
        self.hidden_layers = [
            self._dense(units, f"hidden_{i}", activation=self.activation)
            for i, units in enumerate(self.hidden_units)
        ]
        self.dropout_layers = [
            keras.layers.Dropout(self.dropout, name=f"dropout_{i}")
            for i in range(len(self.hidden_units) + 1)
        ] if self.dropout else []

    def _dense(self, units, name, **overrides):
        options = dict(
            kernel_initializer=self.kernel_initializer,
            bias_initializer=self.bias_initializer,
            kernel_regularizer=self.kernel_regularizer,
            bias_regularizer=self.bias_regularizer,
            dtype=self.dtype_policy,
            name=name,
        )
        options.update(overrides)
        return keras.layers.Dense(units, **options)

    def build(self, input_shape):
        input_shape = check.token_input_shape(type(self).__name__, input_shape)
        shape = input_shape
        for layer in self.hidden_layers:
            layer.build(shape)
            shape = layer.compute_output_shape(shape)
        self.output_layer.build(shape)

    def _trunk(self, inputs, training):
        x = inputs
        for i, layer in enumerate(self.hidden_layers):
            if self.dropout_layers:
                x = self.dropout_layers[i](x, training=training)
            x = layer(x)
        if self.dropout_layers:
            x = self.dropout_layers[-1](x, training=training)
        return self.output_layer(x)

    def compute_output_shape(self, input_shape):
        input_shape = check.token_input_shape(type(self).__name__, input_shape)
        return input_shape[:-1] + (self.output_units,)

    def get_config(self):
        config = super().get_config()
        config.update(
            hidden_units=list(self.hidden_units),
            dropout=self.dropout,
            activation=keras.activations.serialize(self.activation),
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
            kernel_regularizer=keras.regularizers.serialize(self.kernel_regularizer),
            bias_regularizer=keras.regularizers.serialize(self.bias_regularizer),
        )
        # The Dense layers are rebuilt from this config: keep their int8
        # policies after `quantize` (else the saved model does not load).
        return quantized_dtype_config(self, config)

    def default_loss(self):
        """A new Keras loss suited to this head's output."""
        raise NotImplementedError

    def default_metrics(self):
        """A list of new Keras metrics suited to this head's output."""
        raise NotImplementedError


@keras.saving.register_keras_serializable(package="keras_moe")
class ClassificationHead(_Head):
    """A multi-class classification head: class probabilities or logits.

    `logits = W h(x) + b`, `p = softmax(logits)`, where `h` is the optional
    hidden MLP. `default_loss()` is sparse categorical cross-entropy on
    integer labels (with `from_logits` matching `output`),
    `default_metrics()` the accuracy.

    Args:
        num_classes: number of classes (>= 1).
        hidden_units: widths of the hidden `Dense` layers, e.g. `[64]`;
            `[]` (default) maps the inputs straight to the output layer.
        dropout: dropout rate in `[0, 1)` applied before every `Dense` layer
            of the head (the first one included), in training only.
        activation: activation of the hidden layers.
        output: `"probabilities"` (softmax, default, like
            `keras.applications` classifiers) or `"logits"`; kept as the
            attribute `output_mode` (`Layer.output` is taken by Keras).
        kernel_initializer, bias_initializer, kernel_regularizer,
        bias_regularizer: for the `Dense` layers of the head.
        **kwargs: base `Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: features `(..., d)`, e.g. `(B, d)`.
        training: training mode (dropout).

    Returns:
        `(..., num_classes)`.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> head = ClassificationHead(10, hidden_units=[32])
    >>> probs = keras.ops.convert_to_numpy(head(np.zeros((2, 16), "float32")))
    >>> probs.shape, np.allclose(probs.sum(axis=-1), 1.0)
    ((2, 10), True)

    References:
        Goodfellow, Bengio, Courville. Deep Learning (2016), section 6.2.2.3
        (softmax units for multinoulli output distributions).
    """

    def __init__(
        self,
        num_classes,
        hidden_units=(),
        dropout=0.0,
        activation="relu",
        output="probabilities",
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        **kwargs,
    ):
        super().__init__(
            hidden_units=hidden_units,
            dropout=dropout,
            activation=activation,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            **kwargs,
        )
        self.num_classes = check.positive_int(
            "num_classes", num_classes, maximum=check.MAX_CLASSES
        )
        self.output_mode = check.one_of("output", output, OUTPUT_MODES)
        self.output_units = self.num_classes
        self.output_layer = self._dense(self.num_classes, "logits")

    def call(self, inputs, training=None):
        logits = self._trunk(inputs, training)
        if self.output_mode == "logits":
            return logits
        return ops.softmax(logits, axis=-1)

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, output=self.output_mode)
        return config

    def default_loss(self):
        return keras.losses.SparseCategoricalCrossentropy(
            from_logits=self.output_mode == "logits"
        )

    def default_metrics(self):
        return [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]


@keras.saving.register_keras_serializable(package="keras_moe")
class BinaryHead(_Head):
    """A binary classification head: one probability (or logit) per example.

    `logit = w . h(x) + b`, `p = sigmoid(logit)`. `default_loss()` is binary
    cross-entropy, `default_metrics()` AUC and accuracy at 0.5 (both with
    `from_logits` / threshold matching `output`).

    Args:
        hidden_units: widths of the hidden `Dense` layers, e.g. `[64]`;
            `[]` (default) maps the inputs straight to the output layer.
        dropout: dropout rate in `[0, 1)` applied before every `Dense` layer
            of the head (the first one included), in training only.
        activation: activation of the hidden layers.
        output: `"probabilities"` (sigmoid, default) or `"logits"`; kept
            as the attribute `output_mode`.
        kernel_initializer, bias_initializer, kernel_regularizer,
        bias_regularizer: for the `Dense` layers of the head.
        **kwargs: base `Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: features `(..., d)`.
        training: training mode (dropout).

    Returns:
        `(..., 1)`.

    Example:

    >>> import numpy as np
    >>> tuple(BinaryHead(hidden_units=[8])(np.zeros((3, 16), "float32")).shape)
    (3, 1)

    References:
        Ma et al. Modeling Task Relationships in Multi-task Learning with
        Multi-gate Mixture-of-Experts (KDD 2018): one such tower per task.
    """

    def __init__(
        self,
        hidden_units=(),
        dropout=0.0,
        activation="relu",
        output="probabilities",
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        **kwargs,
    ):
        super().__init__(
            hidden_units=hidden_units,
            dropout=dropout,
            activation=activation,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            **kwargs,
        )
        self.output_mode = check.one_of("output", output, OUTPUT_MODES)
        self.output_units = 1
        self.output_layer = self._dense(1, "logit")

    def call(self, inputs, training=None):
        logit = self._trunk(inputs, training)
        if self.output_mode == "logits":
            return logit
        return ops.sigmoid(logit)

    def get_config(self):
        config = super().get_config()
        config.update(output=self.output_mode)
        return config

    def default_loss(self):
        return keras.losses.BinaryCrossentropy(from_logits=self.output_mode == "logits")

    def default_metrics(self):
        logits = self.output_mode == "logits"
        return [
            keras.metrics.AUC(name="auc", from_logits=logits),
            keras.metrics.BinaryAccuracy(
                name="accuracy", threshold=0.0 if logits else 0.5
            ),
        ]


@keras.saving.register_keras_serializable(package="keras_moe")
class RegressionHead(_Head):
    """A regression head: `units` unbounded real outputs.

    `y = W h(x) + b` (linear). `default_loss()` is the mean squared error,
    `default_metrics()` the mean absolute error.

    Args:
        units: number of outputs (>= 1).
        hidden_units: widths of the hidden `Dense` layers, e.g. `[64]`;
            `[]` (default) maps the inputs straight to the output layer.
        dropout: dropout rate in `[0, 1)` applied before every `Dense` layer
            of the head (the first one included), in training only.
        activation: activation of the hidden layers.
        kernel_initializer, bias_initializer, kernel_regularizer,
        bias_regularizer: for the `Dense` layers of the head.
        **kwargs: base `Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: features `(..., d)`.
        training: training mode (dropout).

    Returns:
        `(..., units)`.

    Example:

    >>> import numpy as np
    >>> tuple(RegressionHead(2)(np.zeros((3, 16), "float32")).shape)
    (3, 2)

    References:
        Caruana. Multitask Learning (Machine Learning, 1997): task-specific
        output layers on a shared representation.
    """

    def __init__(
        self,
        units,
        hidden_units=(),
        dropout=0.0,
        activation="relu",
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        **kwargs,
    ):
        super().__init__(
            hidden_units=hidden_units,
            dropout=dropout,
            activation=activation,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            **kwargs,
        )
        self.units = check.positive_int("units", units, maximum=check.MAX_WIDTH)
        self.output_units = self.units
        self.output_layer = self._dense(self.units, "outputs")

    def call(self, inputs, training=None):
        return self._trunk(inputs, training)

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units)
        return config

    def default_loss(self):
        return keras.losses.MeanSquaredError()

    def default_metrics(self):
        return [keras.metrics.MeanAbsoluteError(name="mae")]


@keras.saving.register_keras_serializable(package="keras_moe")
class BoxHead(_Head):
    """A bounding-box head: one valid normalised box `[y1, x1, y2, x2]`.

    The output layer predicts 4 numbers `(a, b, c, d)` that become a centre
    and a size in `(0, 1)`, then corners clipped to the image:

    `cy, cx, h, w = sigmoid(a), sigmoid(b), sigmoid(c), sigmoid(d)`

    `y1, y2 = clip(cy -/+ h / 2, 0, 1)`, `x1, x2 = clip(cx -/+ w / 2, 0, 1)`

    so every output is a valid box (`0 <= y1 <= y2 <= 1`,
    `0 <= x1 <= x2 <= 1`) whatever the weights. The output layer's kernel
    starts at `output_kernel_initializer` (zeros by default) and its bias at
    zero, so the initial box is the central box `[0.25, 0.25, 0.75, 0.75]`
    for every input, a neutral start for GIoU training. `default_loss()` is
    `keras_moe.losses.BoxLoss()` (GIoU + smooth L1), `default_metrics()`
    `keras_moe.metrics.BoxIoU()` and `BoxIoU(threshold=0.5)`.

    Args:
        hidden_units: widths of the hidden `Dense` layers, e.g. `[64]`;
            `[]` (default) maps the inputs straight to the output layer.
        dropout: dropout rate in `[0, 1)` applied before every `Dense` layer
            of the head (the first one included), in training only.
        activation: activation of the hidden layers.
        kernel_initializer, bias_initializer: for the hidden layers.
        kernel_regularizer, bias_regularizer: for every `Dense` layer.
        output_kernel_initializer: initializer of the box layer's kernel.
        **kwargs: base `Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: features `(..., d)`.
        training: training mode (dropout).

    Returns:
        `(..., 4)` boxes `[y1, x1, y2, x2]` in `[0, 1]`.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> boxes = BoxHead(hidden_units=[8])(np.ones((1, 16), "float32"))
    >>> keras.ops.convert_to_numpy(boxes).tolist()
    [[0.25, 0.25, 0.75, 0.75]]

    References:
        Sermanet et al. OverFeat: Integrated Recognition, Localization and
        Detection using Convolutional Networks (ICLR 2014): a regression
        head for localisation on shared features. Redmon et al. You Only
        Look Once (CVPR 2016): centre/size box parameterisation.
    """

    def __init__(
        self,
        hidden_units=(),
        dropout=0.0,
        activation="relu",
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        output_kernel_initializer="zeros",
        **kwargs,
    ):
        super().__init__(
            hidden_units=hidden_units,
            dropout=dropout,
            activation=activation,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            **kwargs,
        )
        self.output_kernel_initializer = check.initializer(
            "output_kernel_initializer", output_kernel_initializer
        )
        self.output_units = 4
        self.output_layer = self._dense(
            4,
            "box",
            kernel_initializer=self.output_kernel_initializer,
            bias_initializer="zeros",
        )

    def call(self, inputs, training=None):
        params = ops.sigmoid(self._trunk(inputs, training))
        centre, size = params[..., :2], params[..., 2:]
        top_left = ops.clip(centre - 0.5 * size, 0.0, 1.0)
        bottom_right = ops.clip(centre + 0.5 * size, 0.0, 1.0)
        return ops.concatenate([top_left, bottom_right], axis=-1)

    def get_config(self):
        config = super().get_config()
        config.update(
            output_kernel_initializer=keras.initializers.serialize(
                self.output_kernel_initializer
            )
        )
        return config

    def default_loss(self):
        from keras_moe.losses import BoxLoss

        return BoxLoss()

    def default_metrics(self):
        from keras_moe.metrics import BoxIoU

        return [BoxIoU(), BoxIoU(threshold=0.5)]


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


__all__ = [
    "BinaryHead",
    "BoxHead",
    "ClassificationHead",
    "RegressionHead",
    "default_compile_args",
]
