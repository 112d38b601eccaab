"""Task heads: the last layers of a multi-task model, one per task.

Each head is a small MLP (`hidden_units`, optional) followed by the output
layer of its task, and knows its usual loss and metrics
(`default_loss()`, `default_metrics()`), so that a multi-task model compiles
with `model.compile(optimizer, **default_compile_args(model))`.
"""

import keras
from keras import ops

from keras_moe.layers._head import OUTPUT_MODES, _Head
from keras_moe.utils import validation as check

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


# BoxHead (box_head.py) and default_compile_args (compile_args.py: it reads
# any head by duck typing) live in their own modules; re-exported here,
# where they were first.
from keras_moe.layers.box_head import BoxHead  # noqa: E402
from keras_moe.layers.compile_args import default_compile_args  # noqa: E402

__all__ = [
    "BinaryHead",
    "BoxHead",
    "ClassificationHead",
    "RegressionHead",
    "default_compile_args",
]
