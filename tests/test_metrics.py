"""`keras_moe.metrics.BoxIoU` against a NumPy reference."""

import doctest
import json

import keras
import numpy as np
import pytest

from keras_moe import metrics
from keras_moe.layers import BoxHead
from tests.conftest import numpy_iou_giou, random_boxes


def reference_ious(y_true, y_pred):
    return np.array([numpy_iou_giou(t, p)[0] for t, p in zip(y_true, y_pred)])


def value(metric):
    return float(keras.ops.convert_to_numpy(metric.result()))


def test_mean_iou_accumulates_weighted_over_two_updates_and_resets():
    rng = np.random.default_rng(0)
    t1, p1 = random_boxes(rng, (5,)), random_boxes(rng, (5,))
    t2, p2 = random_boxes(rng, (3,)), random_boxes(rng, (3,))
    w1 = rng.uniform(size=(5,)).astype("float32")
    metric = metrics.BoxIoU()
    assert value(metric) == 0.0  # nothing seen yet
    metric.update_state(t1, p1, sample_weight=w1)
    metric.update_state(t2, p2)  # weight 1
    ious = np.concatenate([reference_ious(t1, p1), reference_ious(t2, p2)])
    weights = np.concatenate([w1, np.ones(3)])
    np.testing.assert_allclose(value(metric), (ious * weights).sum() / weights.sum(), atol=1e-6)
    metric.reset_state()
    assert value(metric) == 0.0
    metric.update_state(t2, p2)
    np.testing.assert_allclose(value(metric), reference_ious(t2, p2).mean(), atol=1e-6)


def test_threshold_counts_the_fraction_of_boxes_at_or_above_it():
    y_true = np.array([[0.0, 0.0, 0.5, 0.5]] * 4, "float32")
    y_pred = np.array(
        [
            [0.0, 0.0, 0.5, 0.5],  # IoU 1
            [0.0, 0.0, 0.5, 0.25],  # IoU 0.5 (counts: >=)
            [0.0, 0.0, 0.5, 0.2],  # IoU 0.4
            [0.6, 0.6, 0.9, 0.9],  # IoU 0
        ],
        "float32",
    )
    metric = metrics.BoxIoU(threshold=0.5)
    assert metric.name == "iou_at_50"
    metric.update_state(y_true[:2], y_pred[:2], sample_weight=np.array([[1.0], [3.0]]))
    metric.update_state(y_true[2:], y_pred[2:], sample_weight=np.array([2.0, 2.0]))
    np.testing.assert_allclose(value(metric), 4.0 / 8.0, atol=1e-6)
    exact = metrics.BoxIoU(threshold=1.0)
    exact.update_state(y_true, y_pred)
    np.testing.assert_allclose(value(exact), 0.25, atol=1e-6)  # identical box: IoU exactly 1


def test_works_on_rank_3_boxes_and_degenerate_boxes():
    rng = np.random.default_rng(1)
    y_true, y_pred = random_boxes(rng, (2, 3)), random_boxes(rng, (2, 3))
    y_true[0, 0] = y_pred[0, 0] = [0.3, 0.3, 0.3, 0.3]  # zero-area: IoU 0
    metric = metrics.BoxIoU()
    metric.update_state(y_true, y_pred)
    expected = reference_ious(y_true.reshape(-1, 4), y_pred.reshape(-1, 4)).mean()
    np.testing.assert_allclose(value(metric), expected, atol=1e-6)


def test_config_round_trip_and_bad_arguments():
    metric = metrics.BoxIoU(threshold=0.75, name="loc_acc", dtype="float32")
    config = metric.get_config()
    assert config["threshold"] == 0.75 and config["name"] == "loc_acc"
    assert metrics.BoxIoU.from_config(config).get_config() == config
    again = keras.saving.deserialize_keras_object(
        json.loads(json.dumps(keras.saving.serialize_keras_object(metric)))
    )
    assert type(again) is metrics.BoxIoU and again.get_config() == config
    assert metrics.BoxIoU().name == "iou"
    for bad in (-0.1, 1.5, "0.5", True):
        with pytest.raises(ValueError, match=f"threshold={bad!r}"):
            metrics.BoxIoU(threshold=bad)


def test_validates_y_true_when_eager():
    metric = metrics.BoxIoU()
    with pytest.raises(ValueError, match=r"y_true\[1\] = \[0.1, 0.2, 0.3, 1.25\] has x2=1.25 outside"):
        metric.update_state(
            np.array([[0.1, 0.1, 0.5, 0.5], [0.1, 0.2, 0.3, 1.25]], "float32"),
            np.zeros((2, 4), "float32"),
        )


def test_in_compiled_model_fit_and_evaluate_match_reference():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = random_boxes(rng, (32,))
    inputs = keras.Input((4,))
    model = keras.Model(inputs, BoxHead(hidden_units=[8], name="box")(inputs))
    model.compile(
        optimizer="adam",
        loss="mse",
        metrics=[metrics.BoxIoU(), metrics.BoxIoU(threshold=0.5)],
    )
    history = model.fit(x, y, epochs=1, batch_size=16, verbose=0).history
    assert {"iou", "iou_at_50"} <= set(history)
    results = model.evaluate(x, y, batch_size=32, verbose=0, return_dict=True)
    ious = reference_ious(y, model.predict(x, verbose=0))
    np.testing.assert_allclose(results["iou"], ious.mean(), atol=1e-5)
    np.testing.assert_allclose(results["iou_at_50"], (ious >= 0.5).mean(), atol=1e-6)


def test_docstring_examples_run():
    result = doctest.testmod(metrics, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, result


# delta_m -------------------------------------------------------------------


def test_delta_m_on_hand_computed_cases():
    # Two accuracies: +10% relative on one, -5% on the other: mean +2.5%.
    assert metrics.delta_m([0.88, 0.76], [0.8, 0.8], True) == pytest.approx(2.5)
    # An error going from 0.2 to 0.1 is a 50% improvement.
    assert metrics.delta_m([0.1], [0.2], False) == pytest.approx(50.0)
    # Mixed directions, by name (the order of the keys does not matter).
    got = metrics.delta_m(
        {"mse": 0.3, "auc": 0.7}, {"auc": 0.5, "mse": 0.2}, {"auc": True, "mse": False}
    )
    assert got == pytest.approx(100 * (0.4 - 0.5) / 2)
    # The baseline against itself is 0.
    assert metrics.delta_m([3.0, 4.0], [3.0, 4.0], [True, False]) == 0.0


@pytest.mark.parametrize(
    "args,message",
    [
        (([1.0], [0.0], True), "non-zero baselines"),
        (([1.0, 2.0], [1.0], True), "same length"),
        (({"a": 1.0}, {"b": 1.0}, True), "same metrics"),
        (([1.0], [1.0], "yes"), "higher_is_better"),
        (([1.0, 2.0], [1.0, 2.0], [True]), "higher_is_better"),
        (([], [], True), "at least one"),
        (([float("nan")], [1.0], True), "finite"),
    ],
)
def test_delta_m_errors(args, message):
    with pytest.raises(ValueError, match=message):
        metrics.delta_m(*args)
