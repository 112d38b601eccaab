"""`BoxHead`: a bounding-box regression head that always outputs valid
`[y1, x1, y2, x2]` boxes (see `keras_moe.layers.heads` for the others)."""

import keras
from keras import ops

from keras_moe.layers._head import _Head
from keras_moe.utils import validation as check


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
