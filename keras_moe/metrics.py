"""Box metrics for normalised `[y1, x1, y2, x2]` boxes."""

import keras
from keras import ops

from keras_moe import boxes as box_ops
from keras_moe.utils import validation as check


def _default_name(threshold):
    if threshold is None:
        return "iou"
    return "iou_at_" + f"{threshold * 100:g}".replace(".", "_")


@keras.saving.register_keras_serializable(package="keras_moe")
class BoxIoU(keras.metrics.Metric):
    """Mean IoU between predicted and true boxes, or the fraction above a
    threshold ("localisation accuracy").

    Over all boxes `i` seen since the last `reset_state`, with sample
    weights `w_i` (default 1):

    `result = sum_i w_i IoU(true_i, pred_i) / sum_i w_i`

    or, with `threshold=t`, `sum_i w_i [IoU_i >= t] / sum_i w_i`
    (`threshold=0.5` is the usual "correct localisation" criterion of
    PASCAL VOC). The result is 0 before any box is seen.

    `y_true` is checked with `keras_moe.boxes.validate_boxes` when its
    values are concrete (eager); inside compiled steps only its shape is.

    Args:
        threshold: `None` for the mean IoU, or an IoU threshold in `[0, 1]`.
        name: the metric name; default `"iou"`, or `"iou_at_50"`
            for `threshold=0.5`.
        dtype: the dtype of the state and result.

    Call arguments (`update_state`):
        y_true: true boxes `(..., 4)`.
        y_pred: predicted boxes `(..., 4)`.
        sample_weight: optional weights broadcastable to `(...)`.

    Example:

    >>> import numpy as np
    >>> metric = BoxIoU()
    >>> metric.update_state(np.array([[0.0, 0.0, 0.5, 0.5]]),
    ...                     np.array([[0.0, 0.0, 0.5, 0.25]]))
    >>> round(float(metric.result()), 4)
    0.5
    >>> accuracy = BoxIoU(threshold=0.75)
    >>> accuracy.update_state(np.array([[0.0, 0.0, 0.5, 0.5]] * 2),
    ...                       np.array([[0.0, 0.0, 0.5, 0.25],
    ...                                 [0.0, 0.0, 0.5, 0.5]]))
    >>> round(float(accuracy.result()), 4)
    0.5

    References:
        Everingham et al. The PASCAL Visual Object Classes (VOC) Challenge
        (IJCV 2010).
    """

    def __init__(self, threshold=None, name=None, dtype=None):
        if threshold is not None:
            threshold = check.unit_interval("threshold", threshold)
        super().__init__(name=name or _default_name(threshold), dtype=dtype)
        self.threshold = threshold
        self.total = self.add_variable(
            shape=(), initializer="zeros", dtype=self.dtype, name="total"
        )
        self.count = self.add_variable(
            shape=(), initializer="zeros", dtype=self.dtype, name="count"
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        box_ops.validate_boxes(y_true, name="y_true")
        y_true = ops.cast(ops.convert_to_tensor(y_true), self.dtype)
        y_pred = ops.cast(ops.convert_to_tensor(y_pred), self.dtype)
        values = box_ops.iou(y_true, y_pred)
        if self.threshold is not None:
            values = ops.cast(values >= self.threshold, self.dtype)
        if sample_weight is None:
            weights = ops.ones_like(values)
        else:
            weights = ops.cast(ops.convert_to_tensor(sample_weight), self.dtype)
            # (B, 1) weights for (B,) boxes, as Keras' own metrics accept.
            while len(weights.shape) > len(values.shape) and weights.shape[-1] == 1:
                weights = ops.squeeze(weights, axis=-1)
            weights = ops.broadcast_to(weights, ops.shape(values))
        self.total.assign_add(ops.sum(values * weights))
        self.count.assign_add(ops.sum(weights))

    def result(self):
        return ops.divide_no_nan(self.total, self.count)

    def get_config(self):
        config = super().get_config()
        config.update(threshold=self.threshold)
        return config


__all__ = ["BoxIoU"]
