import os

import keras
import numpy as np
import pytest

from keras_moe.layers import SparseMoE
from keras_moe.models import MultiTaskModel
from keras_moe.testing.layer_test import check_config_round_trip
from keras_moe.weighting import FixedWeighting, GradNorm, UncertaintyWeighting
from tests.conftest import xla_only


def toy_data(n=256, noise_variance=(0.05, 0.05), seed=0):
    """Two linear regression tasks on the same inputs, with Gaussian target
    noise of the given variances."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype("float32")
    w = rng.normal(size=(4, 2)).astype("float32")
    noise = rng.normal(size=(n, 2)) * np.sqrt(noise_variance)
    y = (x @ w + noise).astype("float32")
    return x, {"a": y[:, :1], "b": y[:, 1:]}


def toy_model(task_weighting=None, regularizer=None, depth=1, seed=7):
    """A shared trunk (`shared_0`, ...) and two heads `a` and `b`, with
    seeded initializers (two calls give identical weights)."""
    inputs = keras.Input((4,))
    h = inputs
    for i in range(depth):
        h = keras.layers.Dense(
            16,
            activation="relu",
            kernel_initializer=keras.initializers.GlorotUniform(seed + i),
            kernel_regularizer=regularizer,
            name=f"shared_{i}",
        )(h)
    heads = [
        keras.layers.Dense(
            1, kernel_initializer=keras.initializers.GlorotUniform(seed + 10 + t),
            name=name,
        )(h)
        for t, name in enumerate(["a", "b"])
    ]
    if task_weighting == "plain keras":
        return keras.Model(inputs, heads)
    return MultiTaskModel(inputs, heads, task_weighting=task_weighting)


def numpy_weights(model):
    return [np.array(keras.ops.convert_to_numpy(w)) for w in model.weights]


def save_and_load(model, tmp_path):
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    return keras.saving.load_model(path)


# Fixed weighting ---------------------------------------------------------


@pytest.mark.parametrize("task_weighting", [None, "fixed"])
def test_fixed_weighting_trains_exactly_like_keras_model(task_weighting):
    x, y = toy_data(n=96)
    histories, finals = [], []
    for kind in ["plain keras", task_weighting]:
        model = toy_model(kind, regularizer=keras.regularizers.L2(0.01))
        model.compile(
            optimizer=keras.optimizers.SGD(0.05),
            loss={"a": "mse", "b": "mae"},
            loss_weights={"a": 0.3, "b": 2.0},
        )
        history = model.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0)
        histories.append(history.history)
        finals.append(numpy_weights(model)[:6])  # the 3 Dense layers
    plain, multi = histories
    for key in ["loss", "a_loss", "b_loss"]:
        np.testing.assert_allclose(multi[key], plain[key], rtol=1e-5)
    for got, expected in zip(finals[1], finals[0]):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # The logged weight of a task is its constant loss weight.
    np.testing.assert_allclose(multi["a_weight"], [0.3] * 3, rtol=1e-6)
    np.testing.assert_allclose(multi["b_weight"], [2.0] * 3, rtol=1e-6)


def test_fixed_weighting_sums():
    assert float(FixedWeighting()(np.array([1.0, 2.5, 0.5], "float32"))) == 4.0


# Uncertainty weighting ---------------------------------------------------


def test_uncertainty_loss_matches_formula():
    s = [0.3, -1.2, 2.0]
    losses = np.array([0.5, 2.0, 7.0], "float32")
    weighting = UncertaintyWeighting(initial_log_variance=s)
    expected = np.sum(np.exp(-np.array(s)) * losses + np.array(s))
    total = keras.ops.convert_to_numpy(weighting(losses))
    np.testing.assert_allclose(total, expected, rtol=1e-6)
    assert [w.name for w in weighting.trainable_weights] == ["log_variance"]


def test_uncertainty_learns_larger_variance_for_noisier_task():
    # Task b's targets have 10x the noise variance of task a's.
    x, y = toy_data(noise_variance=(0.05, 0.5))
    model = toy_model("uncertainty")
    model.compile(optimizer=keras.optimizers.Adam(0.1), loss="mse")
    history = model.fit(x, y, batch_size=64, epochs=25, verbose=0)
    s = keras.ops.convert_to_numpy(model.task_weighting.log_variance)
    variance = np.exp(s)
    assert variance[1] > 3 * variance[0], variance
    # exp(s_t) estimates the task's loss, here its noise variance.
    np.testing.assert_allclose(variance, [0.05, 0.5], rtol=0.5)
    # fit logs the weights exp(-s_t) of the last step.
    np.testing.assert_allclose(
        [history.history["a_weight"][-1], history.history["b_weight"][-1]],
        np.exp(-s),
        rtol=0.05,
    )
    assert model.task_weights() == pytest.approx(
        {"a": np.exp(-s[0]), "b": np.exp(-s[1])}, rel=1e-5
    )


def test_uncertainty_evaluate_returns_the_weighted_total():
    x, y = toy_data(n=64)
    model = toy_model(UncertaintyWeighting(initial_log_variance=[0.5, -1.0]))
    model.compile(optimizer="sgd", loss={"a": "mse", "b": "mae"})
    logs = model.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)
    expected = np.exp(-0.5) * logs["a_loss"] + 0.5 + np.exp(1.0) * logs["b_loss"] - 1.0
    np.testing.assert_allclose(logs["loss"], expected, rtol=1e-5)
    np.testing.assert_allclose(logs["b_weight"], np.exp(1.0), rtol=1e-6)


def test_uncertainty_save_load(tmp_path):
    x, y = toy_data(n=64)
    model = toy_model(UncertaintyWeighting(initial_log_variance=[0.2, 0.4]))
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    loaded = save_and_load(model, tmp_path)
    assert isinstance(loaded, MultiTaskModel)
    assert isinstance(loaded.task_weighting, UncertaintyWeighting)
    assert loaded.task_weighting.initial_log_variance == [0.2, 0.4]
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(loaded.task_weighting.log_variance),
        keras.ops.convert_to_numpy(model.task_weighting.log_variance),
    )
    for got, expected in zip(loaded.predict(x, verbose=0), model.predict(x, verbose=0)):
        np.testing.assert_allclose(got, expected, atol=1e-6)
    # Reloaded compiled, with its optimizer state: it trains on.
    history = loaded.fit(x, y, batch_size=32, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert "a_weight" in history.history


# GradNorm ----------------------------------------------------------------


def numpy_gradnorm(
    weights, initial, losses, norms, alpha, lr, optimizer, log_weights, state
):
    """One GradNorm step in NumPy (the paper's update, L1 loss on the
    gradient norms; Adam or plain gradient descent on the weights or on
    their logarithms)."""
    ratio = losses / initial
    r = ratio / ratio.mean()
    big_g = weights * norms
    target = big_g.mean() * r**alpha
    grad = np.sign(big_g - target) * norms
    if log_weights:
        grad = grad * weights
    if optimizer == "adam":
        state["t"] += 1
        state["m"] = 0.9 * state["m"] + 0.1 * grad
        state["v"] = 0.999 * state["v"] + 0.001 * grad**2
        m_hat = state["m"] / (1 - 0.9 ** state["t"])
        v_hat = state["v"] / (1 - 0.999 ** state["t"])
        step = lr * m_hat / (np.sqrt(v_hat) + 1e-7)
    else:
        step = lr * grad
    if log_weights:
        weights = weights * np.exp(-step)
    else:
        weights = np.maximum(weights - step, 1e-4)
    return weights * len(weights) / weights.sum()


@pytest.mark.parametrize("log_weights", [True, False])
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_gradnorm_update_matches_numpy(optimizer, log_weights):
    gradnorm = GradNorm(
        alpha=0.7,
        learning_rate=0.05,
        weight_optimizer=optimizer,
        log_weights=log_weights,
    )
    gradnorm.build((3,))
    steps = [
        ([2.0, 1.0, 4.0], [1.0, 3.0, 0.5]),
        ([1.5, 0.9, 2.0], [1.2, 2.0, 0.7]),
        ([1.0, 0.8, 1.0], [0.8, 2.5, 1.0]),
    ]
    weights, initial = np.ones(3), np.array(steps[0][0])
    state = {"t": 0, "m": np.zeros(3), "v": np.zeros(3)}
    for losses, norms in steps:
        gradnorm.update(np.array(losses, "float32"), np.array(norms, "float32"))
        weights = numpy_gradnorm(
            weights, initial, np.array(losses), np.array(norms), 0.7, 0.05,
            optimizer, log_weights, state,
        )
        got = keras.ops.convert_to_numpy(gradnorm.task_weights)
        np.testing.assert_allclose(got, weights, rtol=1e-5)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(gradnorm.initial_losses), steps[0][0]
    )
    assert float(keras.ops.convert_to_numpy(gradnorm.iterations)) == 3


def shared_gradient_norm(task, x, y):
    """||grad_W L_task|| on the shared layer at the seeded initial weights,
    read off one SGD(lr=1) step of a plain Keras model trained on that task
    only (no backend-specific gradient code)."""
    model = toy_model("plain keras")
    before = numpy_weights(model)[:2]
    model.compile(
        optimizer=keras.optimizers.SGD(1.0),
        loss={"a": "mse", "b": "mse"},
        loss_weights={"a": float(task == "a"), "b": float(task == "b")},
    )
    model.train_on_batch(x, y)
    after = numpy_weights(model)[:2]
    return np.sqrt(sum(np.sum((b - a) ** 2) for b, a in zip(before, after)))


def test_gradnorm_measures_the_task_gradient_norms():
    x, y = toy_data(n=64)
    y["b"] = 5.0 * y["b"]  # a larger loss, larger gradients
    model = toy_model("gradnorm")
    model.compile(optimizer="sgd", loss={"a": "mse", "b": "mse"})
    model.train_on_batch(x, y)
    got = keras.ops.convert_to_numpy(model.task_weighting.grad_norms)
    expected = [shared_gradient_norm(task, x, y) for task in "ab"]
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    assert got[1] > 2 * got[0]


def gradient_norms_ratio(model):
    """max/min of the weighted task gradient norms G_t = w_t g_t."""
    g = keras.ops.convert_to_numpy(model.task_weighting.grad_norms)
    w = keras.ops.convert_to_numpy(model.task_weighting.task_weights)
    big_g = w * g
    return big_g.max() / big_g.min()


def test_gradnorm_balances_gradient_norms_of_a_scaled_task():
    # Same noise on both tasks, but task b's loss is scaled x100.
    x, y = toy_data()
    model = toy_model(GradNorm(alpha=1.5))
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss={"a": "mse", "b": "mse"},
        loss_weights={"a": 1.0, "b": 100.0},
    )
    model.train_on_batch(x[:64], {k: v[:64] for k, v in y.items()})
    # After one step the weights are still ~1: G_b / G_a = g_b / g_a.
    first_ratio = gradient_norms_ratio(model)
    assert first_ratio > 20
    history = model.fit(x, y, batch_size=64, epochs=8, verbose=0)
    last_ratio = gradient_norms_ratio(model)
    assert last_ratio < first_ratio / 4, (first_ratio, last_ratio)
    w = keras.ops.convert_to_numpy(model.task_weighting.task_weights)
    assert np.all(w > 0) and w[1] < 0.5 < 1.5 < w[0], w
    np.testing.assert_allclose(w.sum(), 2.0, rtol=1e-5)
    # Logged weights: the constant loss weight times w_t, used in the step.
    assert history.history["b_weight"][-1] < 100 * 0.5
    assert history.history["a_weight"][0] > 1.0


def test_gradnorm_finds_the_last_shared_layer_or_takes_a_name():
    assert toy_model("gradnorm", depth=2).shared_layer.name == "shared_1"
    model = toy_model(GradNorm(shared_layer="shared_0"), depth=2)
    assert model.shared_layer.name == "shared_0"
    x, y = toy_data(n=64)
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    g = keras.ops.convert_to_numpy(model.task_weighting.grad_norms)
    assert np.all(g > 0)
    assert float(keras.ops.convert_to_numpy(model.task_weighting.iterations)) == 2


def test_gradnorm_with_dict_outputs_and_a_routed_trunk():
    # A SparseMoE trunk adds its balancing loss with add_loss; the heads are
    # dict outputs. The MoE is the last shared layer.
    inputs = keras.Input((4,))
    h = keras.layers.Dense(8, name="embed")(inputs)
    h = SparseMoE(num_experts=2, hidden_dim=4, k=1, name="moe")(h)
    outputs = {
        "first": keras.layers.Dense(1, name="head_1")(h),
        "second": keras.layers.Dense(1, name="head_2")(h),
    }
    model = MultiTaskModel(inputs, outputs, task_weighting="gradnorm")
    assert model.task_names == ["first", "second"]
    assert model.shared_layer.name == "moe"
    x, y = toy_data(n=64)
    model.compile(optimizer="adam", loss={"first": "mse", "second": "mae"})
    history = model.fit(
        x, {"first": y["a"], "second": y["b"]}, batch_size=32, epochs=1, verbose=0
    )
    for key in ["loss", "first_loss", "second_loss", "first_weight", "second_weight"]:
        assert np.all(np.isfinite(history.history[key])), key
    # The total is the weighted task sum plus the routing (add_loss) loss.
    targets = {"first": y["a"], "second": y["b"]}
    y_pred = model(x, training=True)
    aux = sum(float(keras.ops.convert_to_numpy(l)) for l in model.losses)
    assert aux > 0
    total = model.compute_loss(x, targets, y_pred, training=True)
    pred = {k: keras.ops.convert_to_numpy(v) for k, v in y_pred.items()}
    first = np.mean((pred["first"] - y["a"]) ** 2)
    second = np.mean(np.abs(pred["second"] - y["b"]))
    weights = model.task_weights()
    expected = weights["first"] * first + weights["second"] * second + aux
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(total), expected, rtol=1e-5
    )


@xla_only
def test_gradnorm_under_jit_compile():
    x, y = toy_data(n=64)
    model = toy_model(GradNorm(learning_rate=0.1))
    model.compile(
        optimizer="adam",
        loss=["mse", "mse"],
        loss_weights=[1.0, 10.0],
        jit_compile=True,
    )
    model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    w = keras.ops.convert_to_numpy(model.task_weighting.task_weights)
    assert w[1] < 1.0 < w[0]


def test_gradnorm_save_load(tmp_path):
    x, y = toy_data(n=64)
    model = toy_model(GradNorm(alpha=0.5, learning_rate=0.1, shared_layer="shared_0"))
    model.compile(
        optimizer="adam", loss={"a": "mse", "b": "mse"}, loss_weights=[1.0, 10.0]
    )
    model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    loaded = save_and_load(model, tmp_path)
    assert isinstance(loaded.task_weighting, GradNorm)
    assert loaded.task_weighting.get_config() == model.task_weighting.get_config()
    for got, expected in zip(
        loaded.task_weighting.non_trainable_weights,
        model.task_weighting.non_trainable_weights,
    ):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(got), keras.ops.convert_to_numpy(expected)
        )
    assert loaded.task_weights() == model.task_weights()
    assert model.task_weights()["a"] != 1.0  # the state really moved
    for got, expected in zip(loaded.predict(x, verbose=0), model.predict(x, verbose=0)):
        np.testing.assert_allclose(got, expected, atol=1e-6)
    history = loaded.fit(x, y, batch_size=32, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


# Configs -----------------------------------------------------------------


def test_weighting_configs_round_trip():
    check_config_round_trip(
        UncertaintyWeighting, dict(initial_log_variance=[0.5, -0.5], name="u")
    )
    check_config_round_trip(UncertaintyWeighting, dict(initial_log_variance=1.5))
    check_config_round_trip(
        GradNorm,
        dict(
            alpha=0.3,
            learning_rate=0.2,
            shared_layer="trunk",
            weight_optimizer="sgd",
            log_weights=False,
            name="g",
        ),
    )
    check_config_round_trip(FixedWeighting, dict(name="f"))


def test_model_config_round_trip():
    model = toy_model(GradNorm(alpha=0.25, shared_layer="shared_0"))
    config = model.get_config()
    assert config["task_weighting"]["config"]["alpha"] == 0.25
    revived = MultiTaskModel.from_config(config)
    assert isinstance(revived.task_weighting, GradNorm)
    assert revived.task_weighting.alpha == 0.25
    assert revived.shared_layer.name == "shared_0"
    assert revived.task_names == ["a", "b"]


# Errors ------------------------------------------------------------------


def test_unknown_weighting_name():
    with pytest.raises(ValueError, match="task_weighting='softmax'"):
        toy_model("softmax")
    with pytest.raises(ValueError, match="task_weighting=3"):
        toy_model(3)


def test_loss_count_must_match_tasks():
    model = toy_model("uncertainty")
    with pytest.raises(ValueError, match=r"loss keys=\['a'\]"):
        model.compile(optimizer="sgd", loss={"a": "mse"})
    with pytest.raises(ValueError, match=r"len\(loss\)=3"):
        model.compile(optimizer="sgd", loss=["mse", "mse", "mse"])
    with pytest.raises(ValueError, match=r"loss keys=\['a', 'c'\]"):
        model.compile(optimizer="sgd", loss={"a": "mse", "c": "mse"})


def test_weighting_task_count_must_match_outputs():
    with pytest.raises(ValueError, match=r"len\(initial_log_variance\)=3, num_tasks=2"):
        toy_model(UncertaintyWeighting(initial_log_variance=[0.0, 0.0, 0.0]))
    built = UncertaintyWeighting()
    built.build((3,))
    with pytest.raises(ValueError, match="num_tasks=3"):
        toy_model(built)


def test_gradnorm_shared_layer_errors():
    with pytest.raises(ValueError, match="shared_layer='trunk'"):
        toy_model(GradNorm(shared_layer="trunk"))
    with pytest.raises(ValueError, match="must feed every task.*shared_layer='a'"):
        toy_model(GradNorm(shared_layer="a"))
    # No trainable layer feeds both heads.
    inputs = keras.Input((4,))
    heads = [keras.layers.Dense(1, name=n)(inputs) for n in ("a", "b")]
    with pytest.raises(ValueError, match="shared by all tasks"):
        MultiTaskModel(inputs, heads, task_weighting="gradnorm")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(alpha=-0.5), "alpha=-0.5"),
        (dict(learning_rate=0.0), "learning_rate=0.0"),
        (dict(weight_optimizer="rmsprop"), "weight_optimizer='rmsprop'"),
        (dict(shared_layer=3), "shared_layer=3"),
        (dict(log_weights="yes"), "log_weights='yes'"),
    ],
)
def test_gradnorm_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GradNorm(**kwargs)


def test_uncertainty_argument_errors():
    with pytest.raises(ValueError, match="initial_log_variance=nan"):
        UncertaintyWeighting(initial_log_variance=float("nan"))
    with pytest.raises(ValueError, match="initial_log_variance='x'"):
        UncertaintyWeighting(initial_log_variance=[0.0, "x"])
