"""Distilling an MoE teacher into a dense student (keras_moe.compression)."""

import os
import tempfile

import keras
import numpy as np
import pytest

from keras_moe.compression import Distiller, distillation_loss
from keras_moe.layers import (
    BinaryHead,
    BoxHead,
    ClassificationHead,
    MultiGateMoE,
    SparseMoE,
    default_compile_args,
)
from tests.conftest import randomize, to_numpy, zeros

STATISTICS = {
    "expert_load", "dropped_fraction", "load_balance_loss", "router_entropy",
    "task_expert_usage",
}


def test_terms_on_a_hand_computed_example():
    teacher = np.array([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]], "float32")
    student = np.array([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1]], "float32")
    t = 2.0
    # Softened distributions: p^(1/T), renormalised.
    soft_t = np.sqrt(teacher) / np.sqrt(teacher).sum(-1, keepdims=True)
    soft_s = np.sqrt(student) / np.sqrt(student).sum(-1, keepdims=True)
    kl = (soft_t * np.log(soft_t / soft_s)).sum(-1).mean() * t * t
    got = float(to_numpy(distillation_loss("kl", teacher, student, t)))
    np.testing.assert_allclose(got, kl, rtol=1e-5)
    # By hand, T = 2: sqrt(.7, .2, .1) = (.8367, .4472, .3162) -> softened
    # teacher (.5229, .2795, .1976); student (.5, .3, .2) -> (.4154, .3218,
    # .2628); KL = .5229 ln(.5229/.4154) + .2795 ln(.2795/.3218)
    # + .1976 ln(.1976/.2628) = .02457. Second row: .13743. Times T^2, mean.
    np.testing.assert_allclose(got, 4.0 * (0.02457 + 0.13743) / 2, rtol=1e-3)
    # From logits: the same numbers.
    got_logits = distillation_loss("kl_logits", np.log(teacher), np.log(student), t)
    np.testing.assert_allclose(float(to_numpy(got_logits)), kl, rtol=1e-5)
    # T = 1 and identical distributions: KL = 0.
    same = float(to_numpy(distillation_loss("kl", teacher, teacher, 1.0)))
    assert same == pytest.approx(0, abs=1e-6)

    # Sigmoid outputs: Bernoulli KL of the softened probabilities.
    pt, ps = np.array([[0.9], [0.2]], "float32"), np.array([[0.6], [0.4]], "float32")
    soft = lambda p: 1 / (1 + ((1 - p) / p) ** (1 / t))  # noqa: E731
    a, b = soft(pt), soft(ps)
    binary = (a * np.log(a / b) + (1 - a) * np.log((1 - a) / (1 - b))).mean() * t * t
    np.testing.assert_allclose(
        float(to_numpy(distillation_loss("binary_kl", pt, ps, t))), binary, rtol=1e-5
    )
    boxes_t = np.array([[0.1, 0.2, 0.5, 0.6]], "float32")
    boxes_s = np.array([[0.2, 0.2, 0.4, 0.9]], "float32")
    np.testing.assert_allclose(
        float(to_numpy(distillation_loss("l1", boxes_t, boxes_s))), 0.5 / 4, rtol=1e-5
    )
    np.testing.assert_allclose(
        float(to_numpy(distillation_loss("mse", boxes_t, boxes_s))), 0.11 / 4, rtol=1e-5
    )
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        distillation_loss("kl", teacher, student, 0.0)
    with pytest.raises(ValueError, match="Received: distillation loss='kld'"):
        distillation_loss("kld", teacher, student)


def models(width=8):
    """A teacher (token SparseMoE + sparse MMoE) and a dense student, both
    with a class head and a box head."""
    inputs = keras.Input((4, 6))
    tokens = zeros(SparseMoE, 4, 8, k=2, eval_capacity_factor=None, name="moe")(inputs)
    pooled = keras.layers.GlobalAveragePooling1D()(tokens)
    a, b = zeros(MultiGateMoE, 2, 4, 8, k=2, name="mmoe")(pooled)
    teacher = keras.Model(inputs, {"class": zeros(ClassificationHead, 3, name="class")(a),
                                   "box": BoxHead(name="box")(b)}, name="teacher")
    s_in = keras.Input((4, 6))
    flat = keras.layers.Flatten()(s_in)
    h = zeros(keras.layers.Dense, width, activation="relu")(flat)
    student = keras.Model(s_in, {"class": zeros(ClassificationHead, 3, name="class")(h),
                                 "box": BoxHead(name="box")(h)}, name="student")
    return randomize(teacher), randomize(student, seed=1)


def data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4, 6)).astype("float32")
    y = {"class": rng.integers(0, 3, n),
         "box": np.tile([[0.1, 0.2, 0.6, 0.7]], (n, 1)).astype("float32")}
    return x, y


def test_loss_combines_hard_and_distillation_terms():
    _, student = models()
    # Any teacher will do for the arithmetic; a dense one runs fast eagerly.
    t_in = keras.Input((4, 6))
    h = keras.layers.Flatten()(t_in)
    teacher = keras.Model(t_in, {"class": zeros(ClassificationHead, 3, name="class")(h),
                                 "box": BoxHead(name="box")(h)})
    randomize(teacher, seed=2)
    x, y = data(8)
    distiller = Distiller(student, teacher, alpha=0.3, temperature=3.0)
    assert distiller.distillation_loss == {"box": "l1", "class": "kl"}
    distiller.compile("sgd", loss_weights={"class": 1.0, "box": 2.0},
                      **default_compile_args(student))
    y_pred = distiller(x)
    total = float(to_numpy(distiller.compute_loss(x, y, y_pred, training=False)))

    t_pred = {k: to_numpy(v) for k, v in teacher(x, training=False).items()}
    s_pred = {k: to_numpy(v) for k, v in y_pred.items()}
    soft = lambda p: p ** (1 / 3) / (p ** (1 / 3)).sum(-1, keepdims=True)  # noqa: E731
    kl = (soft(t_pred["class"]) * np.log(soft(t_pred["class"]) / soft(s_pred["class"])))
    kl = 9.0 * kl.sum(-1).mean()
    l1 = np.abs(t_pred["box"] - s_pred["box"]).mean()
    losses = default_compile_args(student)["loss"]
    hard = float(to_numpy(losses["class"](y["class"], y_pred["class"]))) + 2.0 * float(
        to_numpy(losses["box"](y["box"], y_pred["box"]))
    )
    expected = 0.7 * hard + 0.3 * (kl + 2.0 * l1)
    np.testing.assert_allclose(total, expected, rtol=1e-4)


def test_fit_trains_the_student_only_and_the_student_saves():
    teacher, student = models()
    x, y = data()
    teacher_before = {v.path: to_numpy(v) for v in teacher.weights}
    student_before = [to_numpy(v) for v in student.trainable_weights]
    distiller = Distiller(student, teacher, alpha=0.5, temperature=2.0)
    distiller.compile(keras.optimizers.Adam(0.01), **default_compile_args(student))
    history = distiller.fit(x, y, epochs=2, batch_size=16, verbose=0)
    for name in ("loss", "distillation_loss", "class_loss", "box_loss", "class_accuracy"):
        assert np.all(np.isfinite(history.history[name])), name
    assert history.history["distillation_loss"][1] < history.history["distillation_loss"][0]

    for variable in teacher.weights:
        if variable.path.split("/")[-1] in STATISTICS:
            continue  # routing telemetry of the teacher's calls
        np.testing.assert_array_equal(to_numpy(variable), teacher_before[variable.path])
    assert not teacher.trainable_weights
    after = [to_numpy(v) for v in student.trainable_weights]
    assert all(not np.allclose(a, b) for a, b in zip(student_before, after))

    predictions = distiller.predict(x, verbose=0)  # the student's outputs
    direct = student.predict(x, verbose=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "student.keras")
        student.save(path)
        reloaded = keras.saving.load_model(path)
    again = reloaded.predict(x, verbose=0)
    for name in ("class", "box"):
        np.testing.assert_allclose(predictions[name], direct[name], atol=1e-6)
        np.testing.assert_array_equal(again[name], direct[name])


def test_single_output_and_config_round_trip():
    inputs = keras.Input((5,))
    teacher = keras.Model(inputs, zeros(BinaryHead, output="logits", name="p")(
        zeros(SparseMoE, 4, 8, name="moe")(inputs)))
    s_in = keras.Input((5,))
    student = keras.Model(s_in, zeros(BinaryHead, output="logits", name="p")(s_in))
    distiller = Distiller(student, teacher, alpha=1.0, temperature=1.5)
    assert distiller.distillation_loss == {"p": "binary_kl_logits"}
    config = distiller.get_config()
    revived = Distiller.from_config(config)
    assert revived.get_config() == config
    distiller.compile("adam")  # alpha = 1: the teacher only, no labels
    x = np.random.default_rng(1).normal(size=(16, 5)).astype("float32")
    history = distiller.fit(x, np.zeros((16, 1)), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_errors():
    teacher, student = models()
    with pytest.raises(ValueError, match="alpha must be a number in"):
        Distiller(student, teacher, alpha=1.5)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        Distiller(student, teacher, temperature=-1.0)
    with pytest.raises(ValueError, match="does not have.*'boxes'"):
        Distiller(student, teacher, distillation_loss={"boxes": "l1"})
    s_in = keras.Input((4, 6))
    plain = keras.Model(s_in, {"class": zeros(keras.layers.Dense, 3, name="class")(s_in),
                               "box": BoxHead(name="box")(s_in)})
    with pytest.raises(ValueError, match="'class' \\(from Dense\\)"):
        Distiller(plain, teacher)
    one = keras.Model(s_in, {"class": zeros(ClassificationHead, 3, name="class")(s_in)})
    with pytest.raises(ValueError, match="same outputs"):
        Distiller(one, teacher)
    with pytest.raises(ValueError, match="different models"):
        Distiller(teacher, teacher)
