"""Box helpers (`keras_moe.boxes`) and box losses against NumPy references."""

import doctest
import json

import keras
import numpy as np
import pytest

from keras_moe import boxes, losses
from keras_moe.layers import BoxHead
from tests.conftest import numpy_iou_giou, random_boxes


CASES = {
    # name: (a, b, expected IoU, expected GIoU)
    "identical": ([0.1, 0.2, 0.6, 0.7], [0.1, 0.2, 0.6, 0.7], 1.0, 1.0),
    "disjoint": ([0.0, 0.0, 0.25, 0.25], [0.75, 0.75, 1.0, 1.0], 0.0, -0.875),
    "touching": ([0.0, 0.0, 0.5, 0.5], [0.0, 0.5, 0.5, 1.0], 0.0, 0.0),
    "nested": ([0.0, 0.0, 1.0, 1.0], [0.25, 0.25, 0.75, 0.75], 0.25, 0.25),
    "half_overlap": ([0.0, 0.0, 0.5, 0.5], [0.0, 0.25, 0.5, 0.75], 1 / 3, 1 / 3),
    "diagonal": ([0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 0.75, 0.75], 1 / 7, 1 / 7 - (0.5625 - 0.4375) / 0.5625),
    "zero_area_point": ([0.3, 0.3, 0.3, 0.3], [0.3, 0.3, 0.3, 0.3], 0.0, 0.0),
    "zero_area_line": ([0.2, 0.2, 0.2, 0.8], [0.0, 0.0, 0.5, 0.5], 0.0, -0.375),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_iou_giou_hand_made_cases(name):
    a, b, expected_iou, expected_giou = CASES[name]
    ref_iou, ref_giou = numpy_iou_giou(a, b)
    np.testing.assert_allclose([ref_iou, ref_giou], [expected_iou, expected_giou], atol=1e-12)
    a32, b32 = np.array([a], "float32"), np.array([b], "float32")
    got_iou = keras.ops.convert_to_numpy(boxes.iou(a32, b32))
    got_giou = keras.ops.convert_to_numpy(boxes.giou(a32, b32))
    np.testing.assert_allclose(got_iou, [expected_iou], atol=1e-6)
    np.testing.assert_allclose(got_giou, [expected_giou], atol=1e-6)
    # Symmetric.
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(boxes.giou(b32, a32)), got_giou, atol=1e-6
    )


def test_iou_giou_match_reference_on_random_boxes_any_rank():
    rng = np.random.default_rng(0)
    a, b = random_boxes(rng, (6, 5)), random_boxes(rng, (6, 5))
    got_iou = keras.ops.convert_to_numpy(boxes.iou(a, b))
    got_giou = keras.ops.convert_to_numpy(boxes.giou(a, b))
    assert got_iou.shape == got_giou.shape == (6, 5)
    ref = np.array(
        [numpy_iou_giou(p, q) for p, q in zip(a.reshape(-1, 4), b.reshape(-1, 4))]
    ).reshape(6, 5, 2)
    np.testing.assert_allclose(got_iou, ref[..., 0], atol=1e-5)
    np.testing.assert_allclose(got_giou, ref[..., 1], atol=1e-5)
    assert np.all((got_iou >= 0) & (got_iou <= 1))
    assert np.all((got_giou > -1) & (got_giou <= 1) & (got_giou <= got_iou + 1e-6))


def test_area():
    got = keras.ops.convert_to_numpy(
        boxes.area(np.array([[0.0, 0.0, 0.5, 0.25], [0.5, 0.5, 0.2, 0.9]], "float32"))
    )
    np.testing.assert_allclose(got, [0.125, 0.0])  # an inverted side counts as 0


@pytest.mark.parametrize(
    "bad, message",
    [
        ([[0.1, 0.1, 0.5, 0.5], [0.1, 0.2, 1.5, 0.6]], r"y_true\[1\] = \[0.1, 0.2, 1.5, 0.6\] has y2=1.5 outside \[0, 1\]"),
        ([[-0.25, 0.1, 0.5, 0.5]], r"y_true\[0\] = \[-0.25, .*y1=-0.25 outside"),
        ([[0.6, 0.1, 0.5, 0.5]], r"y_true\[0\] = \[0.6, 0.1, 0.5, 0.5\] has y2 < y1"),
        ([[0.1, 0.75, 0.5, 0.5]], r"y_true\[0\] = \[0.1, 0.75, 0.5, 0.5\] has x2 < x1"),
        ([[0.1, np.nan, 0.5, 0.5]], r"must be finite. Received: y_true\[0\]"),
    ],
)
def test_validate_boxes_names_the_offending_box(bad, message):
    with pytest.raises(ValueError, match=message):
        boxes.validate_boxes(np.array(bad, "float64"), name="y_true")
    # Eager tensors are checked too.
    with pytest.raises(ValueError, match="y_true"):
        boxes.validate_boxes(keras.ops.convert_to_tensor(np.array(bad, "float32")), name="y_true")


def test_validate_boxes_reports_nd_index_and_shape():
    good = random_boxes(np.random.default_rng(1), (2, 3))
    assert boxes.validate_boxes(good) is good
    bad = good.copy()
    bad[1, 2] = [0.5, 0.5, 0.25, 0.75]
    with pytest.raises(ValueError, match=r"boxes\[1, 2\] = \[0.5, 0.5, 0.25, 0.75\] has y2 < y1"):
        boxes.validate_boxes(bad)
    with pytest.raises(ValueError, match=r"shape \(..., 4\).*\(2, 3\)"):
        boxes.validate_boxes(np.zeros((2, 3)))


def test_validate_boxes_skips_values_of_symbolic_tensors():
    symbolic = keras.Input((4,))
    assert boxes.validate_boxes(symbolic) is symbolic
    with pytest.raises(ValueError, match="shape"):
        boxes.validate_boxes(keras.Input((5,)))


LOSSES = {
    "giou": (losses.GIoULoss, dict(reduction="sum", name="g", dtype="float32")),
    "smooth_l1": (losses.SmoothL1Loss, dict(delta=0.25, reduction="none", name="s")),
    "box": (losses.BoxLoss, dict(giou_weight=2.0, l1_weight=5.0, delta=0.0, reduction="mean", name="b")),
}


@pytest.mark.parametrize("key", sorted(LOSSES))
def test_loss_config_round_trip(key):
    cls, kwargs = LOSSES[key]
    loss = cls(**kwargs)
    config = loss.get_config()
    for name, value in kwargs.items():
        if name != "dtype":
            assert config[name] == value, name
    assert cls.from_config(config).get_config() == config
    again = keras.saving.deserialize_keras_object(
        json.loads(json.dumps(keras.saving.serialize_keras_object(loss)))
    )
    assert type(again) is cls and again.get_config() == config
    assert keras.saving.get_registered_object(f"keras_moe>{cls.__name__}") is cls


def test_giou_loss_matches_reference_and_is_in_range():
    rng = np.random.default_rng(2)
    y_true, y_pred = random_boxes(rng, (64,)), random_boxes(rng, (64,))
    y_pred[:4] = y_true[:4]  # perfect boxes
    per_box = keras.ops.convert_to_numpy(
        losses.GIoULoss(reduction="none")(y_true, y_pred)
    )
    ref = np.array([1 - numpy_iou_giou(t, p)[1] for t, p in zip(y_true, y_pred)])
    np.testing.assert_allclose(per_box, ref, atol=1e-5)
    assert np.all((per_box >= 0) & (per_box <= 2))
    np.testing.assert_allclose(per_box[:4], 0.0, atol=1e-6)
    mean = float(keras.ops.convert_to_numpy(losses.GIoULoss()(y_true, y_pred)))
    np.testing.assert_allclose(mean, ref.mean(), atol=1e-5)


def test_smooth_l1_matches_reference():
    rng = np.random.default_rng(3)
    y_true, y_pred = random_boxes(rng, (16,)), random_boxes(rng, (16,))
    d = np.abs(y_pred.astype("float64") - y_true)
    for delta in (0.0, 0.1, 0.5):
        ref = np.where(d < delta, 0.5 * d**2 / max(delta, 1e-30), d - 0.5 * delta).mean(-1)
        got = keras.ops.convert_to_numpy(
            losses.SmoothL1Loss(delta=delta, reduction="none")(y_true, y_pred)
        )
        np.testing.assert_allclose(got, ref, atol=1e-6)


def test_box_loss_is_weighted_sum_with_sample_weight():
    rng = np.random.default_rng(4)
    y_true, y_pred = random_boxes(rng, (8,)), random_boxes(rng, (8,))
    w = rng.uniform(size=(8,)).astype("float32")
    giou = losses.GIoULoss(reduction="none")(y_true, y_pred)
    l1 = losses.SmoothL1Loss(delta=0.2, reduction="none")(y_true, y_pred)
    expected = (2.0 * keras.ops.convert_to_numpy(giou) + 3.0 * keras.ops.convert_to_numpy(l1)) * w
    got = losses.BoxLoss(giou_weight=2.0, l1_weight=3.0, delta=0.2, reduction="sum")(
        y_true, y_pred, sample_weight=w
    )
    np.testing.assert_allclose(float(keras.ops.convert_to_numpy(got)), expected.sum(), rtol=1e-5)
    only_l1 = losses.BoxLoss(giou_weight=0.0, delta=0.2, reduction="none")(y_true, y_pred)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(only_l1), keras.ops.convert_to_numpy(l1), atol=1e-7
    )


def test_losses_finite_on_degenerate_boxes_with_finite_gradients():
    y_true = np.array(
        [[0.3, 0.3, 0.3, 0.3], [0.2, 0.2, 0.2, 0.8], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]],
        "float32",
    )
    y_pred = np.array(
        [[0.3, 0.3, 0.3, 0.3], [0.5, 0.5, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]],
        "float32",
    )
    for loss in (losses.GIoULoss(reduction="none"), losses.BoxLoss(reduction="none")):
        values = keras.ops.convert_to_numpy(loss(y_true, y_pred))
        assert np.all(np.isfinite(values)), (loss.name, values)
    # Gradients through a BoxHead whose outputs are all degenerate boxes
    # (huge logits saturate the sigmoids to size 0 or corners at the edge).
    inputs = keras.Input((3,))
    model = keras.Model(inputs, BoxHead(output_kernel_initializer="zeros")(inputs))
    head = model.layers[-1]
    head.output_layer.bias.assign(np.array([50.0, -50.0, -50.0, -50.0], "float32"))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=losses.BoxLoss())
    x = np.random.default_rng(0).normal(size=(4, 3)).astype("float32")
    model.fit(x, y_true, epochs=1, batch_size=4, verbose=0)
    for w in model.trainable_weights:
        assert np.all(np.isfinite(keras.ops.convert_to_numpy(w))), w.path


def test_box_head_with_box_loss_learns_a_toy_localisation():
    # Boxes are a fixed linear function of the inputs; GIoU + L1 must fall.
    rng = np.random.default_rng(5)
    x = rng.normal(size=(64, 4)).astype("float32")
    centre = 0.5 + 0.2 * np.tanh(x[:, :2])
    size = 0.3 + 0.1 * np.tanh(x[:, 2:])
    y = np.concatenate([centre - size / 2, centre + size / 2], axis=-1).astype("float32")
    inputs = keras.Input((4,))
    model = keras.Model(inputs, BoxHead(hidden_units=[16])(inputs))
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss=losses.BoxLoss())
    history = model.fit(x, y, epochs=20, batch_size=64, verbose=0).history["loss"]
    assert all(np.isfinite(history))
    assert history[-1] < 0.6 * history[0], history


def test_losses_validate_y_true_when_eager():
    y_pred = np.array([[0.1, 0.1, 0.5, 0.5]], "float32")
    for loss in (losses.GIoULoss(), losses.SmoothL1Loss(), losses.BoxLoss()):
        with pytest.raises(ValueError, match=r"y_true\[0\] = \[0.5, 0.1, 0.25, 0.5\] has y2 < y1"):
            loss(np.array([[0.5, 0.1, 0.25, 0.5]], "float32"), y_pred)
        with pytest.raises(ValueError, match=r"y_pred must have shape \(..., 4\)"):
            loss(np.array([[0.1, 0.1, 0.5, 0.5]], "float32"), np.zeros((1, 3), "float32"))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: losses.SmoothL1Loss(delta=-0.1), "delta=-0.1"),
        (lambda: losses.BoxLoss(delta=float("nan")), "delta=nan"),
        (lambda: losses.BoxLoss(giou_weight=-1.0), "giou_weight=-1.0"),
        (lambda: losses.BoxLoss(l1_weight="x"), "l1_weight='x'"),
        (lambda: losses.BoxLoss(giou_weight=0, l1_weight=0), "giou_weight=0, l1_weight=0"),
    ],
)
def test_loss_bad_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("module", [boxes, losses])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, result
