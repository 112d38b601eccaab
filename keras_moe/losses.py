"""Box regression losses for normalised `[y1, x1, y2, x2]` boxes.

All losses are `keras.losses.Loss` subclasses: they take `reduction`, `name`
and `dtype`, honour `sample_weight`, serialize with the model, and give one
value per box (shape `(...)` for boxes `(..., 4)`) before reduction.
`y_true` is checked with `keras_moe.boxes.validate_boxes` when its values
are concrete (eager calls, torch, `run_eagerly=True`); inside compiled
`fit` steps (TensorFlow, JAX) only its shape is checked.
"""

import keras
from keras import ops

from keras_moe import boxes as box_ops
from keras_moe.utils import validation as check


def _check_pair(y_true, y_pred):
    box_ops.validate_boxes(y_true, name="y_true")
    shape = tuple(y_pred.shape)
    if not shape or (shape[-1] is not None and shape[-1] != 4):
        raise ValueError(
            "y_pred must have shape (..., 4), [y1, x1, y2, x2] per box, e.g. "
            f"the output of keras_moe.layers.BoxHead. Received: y_pred with "
            f"shape {shape}"
        )


def _smooth_l1(y_true, y_pred, delta):
    diff = ops.abs(y_pred - y_true)
    if delta == 0.0:
        per_coordinate = diff
    else:
        per_coordinate = ops.where(
            diff < delta, 0.5 * ops.square(diff) / delta, diff - 0.5 * delta
        )
    return ops.mean(per_coordinate, axis=-1)


@keras.saving.register_keras_serializable(package="keras_moe")
class GIoULoss(keras.losses.Loss):
    """Generalised IoU loss between predicted and true boxes.

    `loss = 1 - GIoU(y_true, y_pred)`, in `[0, 2)`: 0 for a perfect box,
    1 for disjoint boxes that touch, approaching 2 as they move apart. Unlike
    `1 - IoU` it has a gradient when the boxes do not overlap, and it is
    scale invariant. A small epsilon in the denominators keeps zero-area
    boxes finite.

    Args:
        reduction: the Keras loss reduction (default
            `"sum_over_batch_size"`).
        name: the loss name.
        dtype: the dtype of the computation (default: `keras.config.floatx()`).

    Call arguments:
        y_true: true boxes `(..., 4)`, normalised `[y1, x1, y2, x2]`.
        y_pred: predicted boxes `(..., 4)`, e.g. from `BoxHead`.
        sample_weight: optional weights `(...)`.

    Example:

    >>> import numpy as np
    >>> y_true = np.array([[0.0, 0.0, 0.5, 0.5]], "float32")
    >>> y_pred = np.array([[0.0, 0.0, 0.5, 0.5]], "float32")
    >>> round(float(GIoULoss()(y_true, y_pred)), 4)
    0.0

    References:
        Rezatofighi et al. Generalized Intersection over Union: A Metric and
        a Loss for Bounding Box Regression (CVPR 2019).
    """

    def __init__(self, reduction="sum_over_batch_size", name="giou_loss", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def call(self, y_true, y_pred):
        _check_pair(y_true, y_pred)
        return 1.0 - box_ops.giou(y_true, y_pred)


@keras.saving.register_keras_serializable(package="keras_moe")
class SmoothL1Loss(keras.losses.Loss):
    """Smooth L1 loss on box coordinates, averaged over the 4 coordinates.

    For each coordinate difference `d = y_pred - y_true`:

    `l(d) = 0.5 d^2 / delta` if `|d| < delta`, else `|d| - 0.5 delta`

    (the Fast R-CNN form, as `torch.nn.SmoothL1Loss(beta=delta)`): an L1
    loss whose kink at 0 is rounded off within `delta`, so its gradient is
    bounded by 1. `delta=0` is the plain L1 loss. With normalised
    coordinates the default `delta=0.1` means "quadratic within 10% of the
    image".

    Args:
        delta: width (>= 0) of the quadratic zone.
        reduction: the Keras loss reduction.
        name: the loss name.
        dtype: the dtype of the computation.

    Call arguments:
        y_true: true boxes `(..., 4)`.
        y_pred: predicted boxes `(..., 4)`.
        sample_weight: optional weights `(...)`.

    Example:

    >>> import numpy as np
    >>> y_true = np.array([[0.0, 0.0, 0.5, 0.5]], "float32")
    >>> y_pred = np.array([[0.0, 0.0, 0.5, 0.9]], "float32")
    >>> round(float(SmoothL1Loss(delta=0.1)(y_true, y_pred)), 4)
    0.0875

    References:
        Girshick. Fast R-CNN (ICCV 2015).
    """

    def __init__(
        self, delta=0.1, reduction="sum_over_batch_size", name="smooth_l1_loss", dtype=None
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.delta = check.non_negative_float("delta", delta)

    def call(self, y_true, y_pred):
        _check_pair(y_true, y_pred)
        return _smooth_l1(y_true, y_pred, self.delta)

    def get_config(self):
        config = super().get_config()
        config.update(delta=self.delta)
        return config


@keras.saving.register_keras_serializable(package="keras_moe")
class BoxLoss(keras.losses.Loss):
    """GIoU plus smooth L1: the usual loss of a box regression head.

    `loss = giou_weight * (1 - GIoU(y_true, y_pred))
          + l1_weight * SmoothL1_delta(y_true, y_pred)`

    GIoU matches the boxes' overlap whatever their size; the coordinate term
    pulls each corner to its target and keeps a gradient when the IoU
    saturates (DETR uses the same pair).

    Args:
        giou_weight: weight (>= 0) of the GIoU term.
        l1_weight: weight (>= 0) of the smooth-L1 term. At least one weight
            must be > 0.
        delta: `delta` of the smooth-L1 term (see `SmoothL1Loss`).
        reduction: the Keras loss reduction.
        name: the loss name.
        dtype: the dtype of the computation.

    Call arguments:
        y_true: true boxes `(..., 4)`, normalised `[y1, x1, y2, x2]`.
        y_pred: predicted boxes `(..., 4)`, e.g. from `BoxHead`.
        sample_weight: optional weights `(...)`.

    Example:

    >>> import numpy as np
    >>> y_true = np.array([[0.0, 0.0, 0.5, 0.5]], "float32")
    >>> y_pred = np.array([[0.0, 0.0, 0.5, 0.9]], "float32")
    >>> round(float(BoxLoss()(y_true, y_pred)), 4)  # 1 - 0.25/0.45 + 0.0875
    0.5319

    References:
        Rezatofighi et al. Generalized Intersection over Union (CVPR 2019).
        Girshick. Fast R-CNN (ICCV 2015). Carion et al. End-to-End Object
        Detection with Transformers (ECCV 2020).
    """

    def __init__(
        self,
        giou_weight=1.0,
        l1_weight=1.0,
        delta=0.1,
        reduction="sum_over_batch_size",
        name="box_loss",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.giou_weight = check.non_negative_float("giou_weight", giou_weight)
        self.l1_weight = check.non_negative_float("l1_weight", l1_weight)
        if self.giou_weight == 0 and self.l1_weight == 0:
            raise ValueError(
                "At least one of giou_weight and l1_weight must be > 0. "
                f"Received: giou_weight={giou_weight!r}, l1_weight={l1_weight!r}"
            )
        self.delta = check.non_negative_float("delta", delta)

    def call(self, y_true, y_pred):
        _check_pair(y_true, y_pred)
        loss = 0.0
        if self.giou_weight:
            loss = loss + self.giou_weight * (1.0 - box_ops.giou(y_true, y_pred))
        if self.l1_weight:
            loss = loss + self.l1_weight * _smooth_l1(y_true, y_pred, self.delta)
        return loss

    def get_config(self):
        config = super().get_config()
        config.update(
            giou_weight=self.giou_weight, l1_weight=self.l1_weight, delta=self.delta
        )
        return config


__all__ = ["BoxLoss", "GIoULoss", "SmoothL1Loss"]
