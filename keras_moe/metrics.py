"""Box metrics for normalised `[y1, x1, y2, x2]` boxes, and the multi-task
comparison `delta_m`."""

import math

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




def delta_m(results, baselines, higher_is_better):
    """The multi-task performance change `Delta_m` (Maninis et al., 2019):
    the mean relative change of every metric against a baseline (usually
    the single-task models), in percent; positive is better.

    `Delta_m = 100 / K sum_k s_k (M_k - B_k) / B_k`, with `s_k = +1` when a
    higher value of metric `k` is better (accuracy, AUC) and `-1` when a
    lower one is (error, loss, MSE).

    Args:
        results: the model's `K` metrics: a dict `{name: value}` or a
            sequence.
        baselines: the baseline's metrics, the same names (dict) or length.
        higher_is_better: one bool for all metrics, or one per metric (a
            dict with the same names, or a sequence).

    Returns:
        `Delta_m` in percent, a float.

    Example:

    >>> round(delta_m({"acc": 0.9, "mse": 0.5}, {"acc": 0.8, "mse": 0.4},
    ...               {"acc": True, "mse": False}), 4)
    -6.25

    References:
        Maninis, Radosavovic, Kokkinos. Attentive Single-Tasking of
        Multiple Tasks. CVPR 2019.
    """
    if isinstance(results, dict) != isinstance(baselines, dict):
        raise ValueError(
            "results and baselines must both be dicts or both be sequences. "
            f"Received: results={results!r}, baselines={baselines!r}"
        )
    if isinstance(results, dict):
        if sorted(results) != sorted(baselines):
            raise ValueError(
                "results and baselines must name the same metrics. Received: "
                f"results={sorted(results)}, baselines={sorted(baselines)}"
            )
        names = list(results)
        values = [results[n] for n in names]
        reference = [baselines[n] for n in names]
        if isinstance(higher_is_better, dict):
            if sorted(higher_is_better) != sorted(names):
                raise ValueError(
                    "higher_is_better must name every metric. Received: "
                    f"higher_is_better={sorted(higher_is_better)}, metrics={sorted(names)}"
                )
            higher_is_better = [higher_is_better[n] for n in names]
    else:
        values, reference = list(results), list(baselines)
        if len(values) != len(reference):
            raise ValueError(
                "results and baselines must have the same length. Received: "
                f"len(results)={len(values)}, len(baselines)={len(reference)}"
            )
    if not values:
        raise ValueError("delta_m needs at least one metric. Received: results={}")
    if isinstance(higher_is_better, bool):
        higher_is_better = [higher_is_better] * len(values)
    higher_is_better = list(higher_is_better)
    if len(higher_is_better) != len(values) or not all(
        isinstance(h, bool) for h in higher_is_better
    ):
        raise ValueError(
            "higher_is_better must be a bool or one bool per metric. Received: "
            f"higher_is_better={higher_is_better!r}, {len(values)} metrics"
        )
    total = 0.0
    for value, base, higher in zip(values, reference, higher_is_better):
        value, base = float(value), float(base)
        if base == 0.0 or not math.isfinite(base) or not math.isfinite(value):
            raise ValueError(
                "delta_m needs finite metrics and non-zero baselines. Received: "
                f"results={results!r}, baselines={baselines!r}"
            )
        total += (1.0 if higher else -1.0) * (value - base) / base
    return 100.0 * total / len(values)


__all__ = ["BoxIoU", "delta_m"]
