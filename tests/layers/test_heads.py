"""Task heads and `default_compile_args`."""

import doctest
import os
import tempfile

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keras_moe import losses, metrics
from keras_moe.layers import (
    BinaryHead,
    BoxHead,
    ClassificationHead,
    RegressionHead,
    default_compile_args,
)
from keras_moe.layers import heads as heads_module
from keras_moe.testing import run_layer_test

DENSE_OPTIONS = dict(
    kernel_initializer="he_normal",
    bias_initializer="ones",
    kernel_regularizer="l2",
    bias_regularizer="l1",
)


def features(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def numpy_mlp(head, x):
    """Reference forward pass (inference: no dropout) of a head's Dense stack."""
    h = x.astype("float64")
    for layer in head.hidden_layers:
        h = h @ layer.kernel.numpy() + layer.bias.numpy()
        h = np.asarray(keras.ops.convert_to_numpy(head.activation(h.astype("float32"))), "float64")
    return h @ head.output_layer.kernel.numpy() + head.output_layer.bias.numpy()


def test_classification_head_contract():
    run_layer_test(
        ClassificationHead,
        dict(
            num_classes=5,
            hidden_units=[6, 4],
            dropout=0.2,
            activation="tanh",
            output="logits",
            **DENSE_OPTIONS,
        ),
        features((8, 7)),
        expected_output_shape=(8, 5),
        expected_num_trainable_weights=6,
    )


def test_binary_head_contract_rank_3():
    run_layer_test(
        BinaryHead,
        dict(hidden_units=[3], dropout=0.1, activation="gelu", output="logits", **DENSE_OPTIONS),
        features((4, 3, 6)),
        expected_output_shape=(4, 3, 1),
        expected_num_trainable_weights=4,
    )


def test_regression_head_contract():
    run_layer_test(
        RegressionHead,
        dict(units=3, hidden_units=[5], dropout=0.3, activation="silu", **DENSE_OPTIONS),
        features((8, 4)),
        expected_output_shape=(8, 3),
        expected_num_trainable_weights=4,
    )


def test_box_head_contract():
    run_layer_test(
        BoxHead,
        dict(
            hidden_units=[5, 3],
            dropout=0.25,
            activation="elu",
            output_kernel_initializer="glorot_normal",
            **DENSE_OPTIONS,
        ),
        features((8, 4)),
        expected_output_shape=(8, 4),
        expected_num_trainable_weights=6,
    )


@pytest.mark.parametrize("output", ["probabilities", "logits"])
def test_classification_and_binary_match_numpy(output):
    x = features((6, 5))
    head = ClassificationHead(4, hidden_units=[3], activation="relu", output=output)
    got = keras.ops.convert_to_numpy(head(x))
    logits = numpy_mlp(head, x)
    if output == "probabilities":
        e = np.exp(logits - logits.max(-1, keepdims=True))
        expected = e / e.sum(-1, keepdims=True)
    else:
        expected = logits
    np.testing.assert_allclose(got, expected, atol=1e-5)

    binary = BinaryHead(hidden_units=[3], output=output)
    got = keras.ops.convert_to_numpy(binary(x))
    logit = numpy_mlp(binary, x)
    expected = 1 / (1 + np.exp(-logit)) if output == "probabilities" else logit
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_regression_head_is_linear_mlp():
    x = features((5, 3))
    head = RegressionHead(2, hidden_units=[4], activation="tanh")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(head(x)), numpy_mlp(head, x), atol=1e-5
    )


def test_box_head_matches_numpy_and_starts_central():
    x = features((6, 5)) * 10
    head = BoxHead(hidden_units=[4])
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(head(x)),
        np.tile([0.25, 0.25, 0.75, 0.75], (6, 1)),
        atol=1e-7,
    )
    head.output_layer.kernel.assign(features((4, 4), seed=1) * 3)
    raw = numpy_mlp(head, x)
    s = 1 / (1 + np.exp(-raw))
    centre, size = s[:, :2], s[:, 2:]
    expected = np.concatenate(
        [np.clip(centre - size / 2, 0, 1), np.clip(centre + size / 2, 0, 1)], axis=-1
    )
    np.testing.assert_allclose(keras.ops.convert_to_numpy(head(x)), expected, atol=1e-5)


def assert_valid_boxes(b):
    assert b.shape[-1] == 4
    assert np.all(np.isfinite(b))
    assert np.all((b >= 0) & (b <= 1)), b
    assert np.all(b[..., 2] >= b[..., 0]) and np.all(b[..., 3] >= b[..., 1]), b


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    seed=st.integers(0, 2**31 - 1),
    input_scale=st.sampled_from([1e-3, 1.0, 1e2, 1e4]),
    weight_scale=st.sampled_from([0.0, 1.0, 1e2, 1e4]),
    bias=st.lists(st.floats(-1e4, 1e4), min_size=4, max_size=4),
)
def test_box_head_always_outputs_valid_boxes(seed, input_scale, weight_scale, bias):
    rng = np.random.default_rng(seed)
    head = BoxHead(hidden_units=[3])
    x = (rng.normal(size=(16, 5)) * input_scale).astype("float32")
    head.build(x.shape)
    for w in head.trainable_weights:
        w.assign((rng.normal(size=w.shape) * weight_scale).astype("float32"))
    head.output_layer.bias.assign(np.array(bias, "float32"))
    assert_valid_boxes(keras.ops.convert_to_numpy(head(x)))
    # The GIoU loss of any such box against a valid box stays in [0, 2].
    y_true = np.tile(np.array([[0.1, 0.2, 0.6, 0.9]], "float32"), (16, 1))
    loss = keras.ops.convert_to_numpy(losses.GIoULoss(reduction="none")(y_true, head(x)))
    assert np.all(np.isfinite(loss)) and np.all((loss >= 0) & (loss <= 2))


def test_dropout_only_in_training():
    x = features((64, 16))
    head = RegressionHead(1, hidden_units=[8], dropout=0.5)
    a = keras.ops.convert_to_numpy(head(x))
    np.testing.assert_allclose(a, keras.ops.convert_to_numpy(head(x)))
    np.testing.assert_allclose(a, numpy_mlp(head, x), atol=1e-5)
    trained = keras.ops.convert_to_numpy(head(x, training=True))
    assert not np.allclose(trained, a)


def test_default_losses_and_metrics():
    cls = ClassificationHead(3, output="logits")
    assert isinstance(cls.default_loss(), keras.losses.SparseCategoricalCrossentropy)
    assert cls.default_loss().get_config()["from_logits"] is True
    assert not ClassificationHead(3).default_loss().get_config()["from_logits"]
    assert [m.name for m in cls.default_metrics()] == ["accuracy"]
    assert cls.default_loss() is not cls.default_loss()  # fresh objects

    binary = BinaryHead(output="logits")
    assert binary.default_loss().get_config()["from_logits"] is True
    auc, acc = binary.default_metrics()
    assert isinstance(auc, keras.metrics.AUC) and auc.get_config()["from_logits"]
    assert isinstance(acc, keras.metrics.BinaryAccuracy) and acc.get_config()["threshold"] == 0.0
    assert BinaryHead().default_metrics()[1].get_config()["threshold"] == 0.5

    reg = RegressionHead(2)
    assert isinstance(reg.default_loss(), keras.losses.MeanSquaredError)
    assert isinstance(reg.default_metrics()[0], keras.metrics.MeanAbsoluteError)

    box = BoxHead()
    assert isinstance(box.default_loss(), losses.BoxLoss)
    iou, iou50 = box.default_metrics()
    assert isinstance(iou, metrics.BoxIoU) and iou.threshold is None
    assert iou50.threshold == 0.5


def toy_data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype("float32")
    corners = np.sort(rng.uniform(size=(n, 2, 2)), axis=1)
    boxes = np.stack(
        [corners[:, 0, 0], corners[:, 0, 1], corners[:, 1, 0], corners[:, 1, 1]], -1
    ).astype("float32")
    labels = rng.integers(0, 3, size=(n,))
    flags = rng.integers(0, 2, size=(n, 1)).astype("float32")
    return x, labels, boxes, flags


def multi_head_model(dict_outputs):
    inputs = keras.Input((6,))
    shared = keras.layers.Dense(8, activation="relu")(inputs)
    label = ClassificationHead(3, hidden_units=[4], name="label")(shared)
    box = BoxHead(hidden_units=[4], name="box")(shared)
    flag = BinaryHead(output="logits", name="flag")(shared)
    if dict_outputs:
        return keras.Model(inputs, {"cls": label, "bbox": box, "is_cat": flag})
    return keras.Model(inputs, [label, box, flag])


@pytest.mark.parametrize("dict_outputs", [False, True])
def test_default_compile_args_fits_with_dict_targets(dict_outputs):
    x, labels, boxes, flags = toy_data()
    model = multi_head_model(dict_outputs)
    names = ("cls", "bbox", "is_cat") if dict_outputs else ("label", "box", "flag")
    args = default_compile_args(model)
    assert set(args["loss"]) == set(args["metrics"]) == set(names)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), **args)
    y = dict(zip(names, (labels, boxes, flags)))
    history = model.fit(x, y, epochs=1, batch_size=16, verbose=0).history
    c, b, f = names
    expected = {
        "loss",
        f"{c}_loss", f"{c}_accuracy",
        f"{b}_loss", f"{b}_iou", f"{b}_iou_at_50",
        f"{f}_loss", f"{f}_auc", f"{f}_accuracy",
    }
    assert set(history) == expected, sorted(history)
    assert all(np.isfinite(v[0]) for v in history.values())


def test_default_compile_args_names_outputs_without_a_head():
    inputs = keras.Input((6,))
    outputs = [
        ClassificationHead(3, name="label")(inputs),
        keras.layers.Dense(2, name="plain")(inputs),
        keras.layers.Activation("linear", name="wrapped")(RegressionHead(1)(inputs)),
    ]
    model = keras.Model(inputs, outputs)
    with pytest.raises(ValueError, match=r"'plain' \(from Dense 'plain'\), 'wrapped' \(from Activation"):
        default_compile_args(model)


def test_default_compile_args_single_output_and_sequential():
    x, labels, _, _ = toy_data()
    inputs = keras.Input((6,))
    # A dict output takes dict targets...
    model = keras.Model(inputs, {"cls": ClassificationHead(3, name="label")(inputs)})
    model.compile(optimizer="adam", **default_compile_args(model))
    history = model.fit(x, {"cls": labels}, epochs=1, verbose=0).history
    assert set(history) == {"loss", "accuracy"}
    # ...a single plain output takes plain targets (Keras does not match a
    # dict `y` to it), with the same compile arguments.
    model = keras.Model(inputs, ClassificationHead(3, name="label")(inputs))
    args = default_compile_args(model)
    assert list(args["loss"]) == ["label"]
    model.compile(optimizer="adam", **args)
    history = model.fit(x, labels, epochs=1, verbose=0).history
    assert set(history) == {"loss", "accuracy"}
    sequential = keras.Sequential([keras.Input((6,)), ClassificationHead(3)])
    with pytest.raises(ValueError, match="needs a functional model"):
        default_compile_args(sequential)


def test_model_with_heads_saves_and_reloads_compiled():
    x, labels, boxes, flags = toy_data()
    model = multi_head_model(dict_outputs=True)
    model.compile(
        optimizer="adam",
        loss={
            "cls": "sparse_categorical_crossentropy",
            "bbox": losses.BoxLoss(giou_weight=2.0, l1_weight=5.0, delta=0.05),
            "is_cat": keras.losses.BinaryCrossentropy(from_logits=True),
        },
        metrics={"bbox": [metrics.BoxIoU(threshold=0.7)], "cls": ["accuracy"]},
    )
    y = {"cls": labels, "bbox": boxes, "is_cat": flags}
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    expected = model.predict(x, verbose=0)
    before = model.evaluate(x, y, verbose=0, return_dict=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "heads.keras")
        model.save(path)
        loaded = keras.saving.load_model(path, compile=True)
    got = loaded.predict(x, verbose=0)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], atol=1e-6)
    box_loss = loaded.loss["bbox"]
    assert isinstance(box_loss, losses.BoxLoss)
    assert (box_loss.giou_weight, box_loss.l1_weight, box_loss.delta) == (2.0, 5.0, 0.05)
    after = loaded.evaluate(x, y, verbose=0, return_dict=True)
    assert set(after) == set(before) and "bbox_iou_at_70" in after
    for key in before:
        np.testing.assert_allclose(after[key], before[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ClassificationHead(0), "num_classes=0"),
        (lambda: ClassificationHead(2.5), "num_classes=2.5"),
        (lambda: ClassificationHead(3, output="softmax"), "output='softmax'"),
        (lambda: BinaryHead(output="sigmoid"), "output='sigmoid'"),
        (lambda: RegressionHead(0), "units=0"),
        (lambda: BoxHead(dropout=-0.1), "dropout=-0.1"),
        (lambda: BoxHead(dropout=1.0), "dropout=1.0"),
        (lambda: RegressionHead(1, hidden_units=[4, 0]), r"hidden_units=\[4, 0\]"),
        (lambda: RegressionHead(1, hidden_units=8), "hidden_units=8"),
        (lambda: BinaryHead(activation="nope"), "nope"),
    ],
)
def test_bad_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_input_shape():
    with pytest.raises(ValueError, match="rank >= 2"):
        BoxHead()(np.zeros((4,), "float32"))


def test_docstring_examples_run():
    result = doctest.testmod(heads_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, result
