"""The base of the task heads: an MLP trunk, the output layer of the task,
and the head's default loss and metrics (`keras_moe.layers.heads`)."""

import keras

from keras_moe.layers.expert_bank import quantized_dtype_config
from keras_moe.utils import validation as check

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


