"""Every task weighting inside `MultiTaskModel`: by name and as an object,
`compile`/`fit`, `.keras` save and reload with its state, training that
continues exactly where it stopped, mixed precision and XLA; the
per-task-gradient step checked against plain Keras training; the shared
parameters and the representation mode."""

import os

import keras
import numpy as np
import pytest

from keras_moe import weighting as W
from keras_moe.models import MultiTaskModel
from keras_moe.testing.layer_test import check_config_round_trip
from tests.conftest import xla_only

NAMES = sorted({cls.registered_name for cls in W.REGISTRY.values()})
GRADIENT_NAMES = [n for n in NAMES if W.REGISTRY[n].needs_task_gradients]
REPRESENTATION_NAMES = [n for n in GRADIENT_NAMES if W.REGISTRY[n].supports_representation]


def np_(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def tiny_data(n=48, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype("float32")
    w = rng.normal(size=(4, 2)).astype("float32")
    y = np.tanh(x @ w) + 0.1 * rng.normal(size=(n, 2))
    return x, {"a": y[:, :1].astype("float32"), "b": (3.0 * y[:, 1:]).astype("float32")}


def tiny_model(task_weighting, regularizer=None, seed=7, **kwargs):
    """A shared `Dense(8)` trunk (`shared`) and two linear heads, with
    seeded initializers (two calls give identical weights)."""
    inputs = keras.Input((4,), name="x")
    h = keras.layers.Dense(
        8,
        activation="tanh",
        kernel_initializer=keras.initializers.GlorotUniform(seed),
        kernel_regularizer=regularizer,
        name="shared",
    )(inputs)
    outputs = {
        name: keras.layers.Dense(
            1, kernel_initializer=keras.initializers.GlorotUniform(seed + 1 + t), name=name
        )(h)
        for t, name in enumerate("ab")
    }
    if task_weighting == "plain keras":
        return keras.Model(inputs, outputs)
    return MultiTaskModel(inputs, outputs, task_weighting=task_weighting, **kwargs)


def weighting_state(model):
    return [np_(v) for v in model.task_weighting.weights]


# Every strategy -----------------------------------------------------------


# Eagerly for every strategy (no tracing: the state round trip is what is
# checked), compiled for one of each kind of state (per-epoch statistics,
# a learned softmax with its own optimizer state, a random generator in a
# gradient method), where JAX writes the state back from its compiled step.
RESUME_CASES = [(name, True) for name in NAMES] + [
    (name, False) for name in ("dwa", "famo", "pcgrad")
]


@pytest.mark.parametrize("name,run_eagerly", RESUME_CASES)
def test_strategy_trains_saves_and_resumes_exactly(name, run_eagerly, tmp_path):
    x, y = tiny_data(n=32)
    model = tiny_model(name)
    assert type(model.task_weighting) is W.REGISTRY[name]
    model.compile(
        keras.optimizers.Adam(0.02), loss={"a": "mse", "b": "mae"}, run_eagerly=run_eagerly
    )
    first = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    before = weighting_state(model)
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    loaded.run_eagerly = run_eagerly
    assert type(loaded.task_weighting) is type(model.task_weighting)
    assert loaded.task_weighting.get_config() == model.task_weighting.get_config()
    for got, expected in zip(weighting_state(loaded), before):
        np.testing.assert_array_equal(got, expected)
    # Both go on for two epochs (DWA's weights move from the third on):
    # the reloaded model, with its weighting state, optimizer state and
    # random generator, trains exactly like the one that was never saved.
    uninterrupted = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    resumed = loaded.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    for key in ("loss", "a_loss", "b_loss", "a_weight", "b_weight"):
        values = first.history[key] + uninterrupted.history[key]
        assert np.all(np.isfinite(values)), (key, values)
        np.testing.assert_allclose(
            resumed.history[key], uninterrupted.history[key], rtol=2e-5, atol=1e-6
        )
    for got, expected in zip(weighting_state(loaded), weighting_state(model)):
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_strategy_under_mixed_precision(name):
    keras.config.set_dtype_policy("mixed_float16")
    x, y = tiny_data()
    model = tiny_model(name)
    model.compile(keras.optimizers.Adam(0.02), loss="mse")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    for value in weighting_state(model):
        assert np.all(np.isfinite(value))


@xla_only
@pytest.mark.parametrize("name", NAMES)
def test_strategy_under_jit_compile(name):
    x, y = tiny_data()
    model = tiny_model(name)
    model.compile(keras.optimizers.Adam(0.02), loss="mse", jit_compile=True)
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


CONFIGS = {
    "aligned_mtl": {},
    "cagrad": dict(c_alpha=0.2, rescale=2, iterations=7),
    "db_mtl": dict(beta=0.5, beta_sigma=0.25),
    "dwa": dict(temperature=3.0),
    "famo": dict(learning_rate=0.1, weight_decay=0.0),
    "fixed": {},
    "gls": {},
    "graddrop": dict(leak=0.25, seed=3),
    "gradnorm": dict(alpha=0.3, learning_rate=0.2, shared_layer="trunk",
                     weight_optimizer="sgd", log_weights=False),
    "gradvac": dict(beta=0.5, seed=2),
    "imtl": {},
    "imtl_g": {},
    "imtl_l": {},
    "mgda": dict(normalization="loss+", iterations=9),
    "nash_mtl": dict(iterations=5, max_norm=0.0),
    "pcgrad": dict(seed=5),
    "rlw": dict(distribution="dirichlet", seed=1),
    "uncertainty": dict(initial_log_variance=[0.5, -0.5]),
    "upgrad": dict(norm_eps=1e-3, reg_eps=0.0, iterations=4),
}


def test_registry_names_configs_and_errors():
    assert sorted(CONFIGS) == NAMES
    assert len(NAMES) >= 15
    for name in NAMES:
        check_config_round_trip(W.REGISTRY[name], dict(CONFIGS[name], name=f"w_{name}"))
        assert isinstance(W.get(name.upper().replace("_", "-")), W.REGISTRY[name])
    assert isinstance(W.get("ew"), W.FixedWeighting)
    assert isinstance(W.get(None), W.FixedWeighting)
    with pytest.raises(ValueError, match="task_weighting='sgd'"):
        W.get("sgd")
    for cls, kwargs, message in [
        (W.MGDA, dict(normalization="l1"), "normalization='l1'"),
        (W.CAGrad, dict(rescale=3), "rescale=3"),
        (W.CAGrad, dict(c_alpha=-1.0), "c_alpha=-1.0"),
        (W.GradDrop, dict(leak=1.5), "leak=1.5"),
        (W.GradVac, dict(beta=2.0), "beta=2.0"),
        (W.RLW, dict(distribution="beta"), "distribution='beta'"),
        (W.RLW, dict(seed=-1), "seed=-1"),
        (W.DWA, dict(temperature=0.0), "temperature=0.0"),
        (W.NashMTL, dict(max_norm=-1.0), "max_norm=-1.0"),
        (W.DBMTL, dict(beta=1.0), "beta=1.0"),
        (W.UPGrad, dict(iterations=0), "iterations=0"),
        (W.FAMO, dict(learning_rate=0.0), "learning_rate=0.0"),
    ]:
        with pytest.raises(ValueError, match=message):
            cls(**kwargs)


# The per-task-gradient step ------------------------------------------------


class _SumOfTasks(W.GradientWeighting):
    """combine = the plain sum: must train exactly like plain Keras."""

    def combine(self, grads, task_losses):
        return keras.ops.sum(grads, axis=0)


class _FirstTask(W.GradientWeighting):
    """combine = task a's gradient only."""

    def combine(self, grads, task_losses):
        return grads[0]


def sgd_step(model, x, y, loss_weights=None):
    model.compile(
        keras.optimizers.SGD(1.0), loss={"a": "mse", "b": "mse"}, loss_weights=loss_weights
    )
    before = {v.path: np_(v) for v in model.trainable_variables}
    model.train_on_batch(x, y)
    return {p: np_(v) - before[p] for p, v in ((v.path, v) for v in model.trainable_variables)}


@pytest.mark.parametrize("representation", [None, "shared"])
def test_the_step_combines_task_gradients_on_the_shared_part_only(representation):
    """With `combine` = task a's gradient, the shared layer moves by task
    a's gradient (and the regularizer's), each head by its own task's
    gradient: read off SGD(1) steps of plain Keras models."""
    x, y = tiny_data(n=32)
    regularizer = keras.regularizers.L2(0.05)
    both = sgd_step(tiny_model("plain keras", regularizer), x, y)
    only_a = sgd_step(tiny_model("plain keras", regularizer), x, y, {"a": 1.0, "b": 0.0})
    model = tiny_model(_FirstTask(), regularizer, representation=representation)
    got = sgd_step(model, x, y)
    for path, delta in got.items():
        expected = only_a[path] if path.startswith("shared") else both[path]
        np.testing.assert_allclose(delta, expected, rtol=1e-4, atol=1e-6, err_msg=path)
    # The sum of the task gradients is plain training.
    summed = sgd_step(tiny_model(_SumOfTasks(), regularizer, representation=representation), x, y)
    for path, delta in summed.items():
        np.testing.assert_allclose(delta, both[path], rtol=1e-4, atol=1e-6, err_msg=path)


@pytest.mark.parametrize("name", REPRESENTATION_NAMES)
def test_representation_mode_trains(name):
    x, y = tiny_data()
    model = tiny_model(name, representation=True)
    assert model.representation_layer.name == "shared"
    assert model.shared_variables == []
    model.compile(keras.optimizers.Adam(0.02), loss="mse")
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert history.history["loss"][-1] < history.history["loss"][0] * 1.5


def test_shared_parameters_are_found_and_can_be_named():
    inputs = keras.Input((4,))
    trunk = keras.layers.Dense(8, name="trunk")(inputs)
    tower = keras.layers.Dense(8, name="tower_a")(trunk)
    middle = keras.layers.Dense(8, name="middle")(trunk)  # used by b and c
    outputs = [
        keras.layers.Dense(1, name="a")(tower),
        keras.layers.Dense(1, name="b")(middle),
        keras.layers.Dense(1, name="c")(middle),
    ]
    model = MultiTaskModel(inputs, outputs, task_weighting="mgda")
    assert {v.path.split("/")[0] for v in model.shared_variables} == {"trunk", "middle"}
    named = MultiTaskModel(inputs, outputs, task_weighting="mgda", shared_layers=["trunk"])
    assert [v.path for v in named.shared_variables] == ["trunk/kernel", "trunk/bias"]
    assert named.get_config()["shared_layers"] == ["trunk"]
    revived = MultiTaskModel.from_config(named.get_config())
    assert revived.shared_layers == ["trunk"]
    rep = MultiTaskModel(inputs, outputs, task_weighting="pcgrad", representation=True)
    assert rep.representation_layer.name == "trunk"  # the last layer all tasks need
    with pytest.raises(ValueError, match="shared_layers=\\['nope'\\]"):
        MultiTaskModel(inputs, outputs, task_weighting="mgda", shared_layers=["nope"])
    with pytest.raises(ValueError, match="representation='middle'"):
        MultiTaskModel(inputs, outputs, task_weighting="mgda", representation="middle")
    with pytest.raises(ValueError, match="does not use them"):
        MultiTaskModel(inputs, outputs, task_weighting="dwa", representation=True)
    with pytest.raises(ValueError, match="no representation mode"):
        MultiTaskModel(inputs, outputs, task_weighting="db_mtl", representation=True)
    with pytest.raises(ValueError, match="shared_layers must be"):
        MultiTaskModel(inputs, outputs, task_weighting="mgda", shared_layers="trunk")
    separate = [keras.layers.Dense(1, name=n)(inputs) for n in "xy"]
    with pytest.raises(ValueError, match="no layer with trainable weights feeds two"):
        MultiTaskModel(inputs, separate, task_weighting="pcgrad")


def test_dwa_closes_its_epochs_in_fit():
    x, y = tiny_data()
    model = tiny_model("dwa")
    model.compile("adam", loss="mse")
    history = model.fit(x, y, batch_size=16, epochs=3, verbose=0)
    assert float(np_(model.task_weighting.epochs)) == 3.0
    weights = [history.history["a_weight"][-1], history.history["b_weight"][-1]]
    assert weights != [1.0, 1.0] and abs(sum(weights) - 2.0) < 1e-4


# Files saved before the weighting package ----------------------------------

DATA = os.path.join(os.path.dirname(__file__), "data")


@pytest.mark.parametrize("name", ["fixed", "uncertainty", "gradnorm"])
def test_files_saved_before_the_package_load_with_their_state(name):
    saved = np.load(os.path.join(DATA, "weightings_before_package.npz"))
    model = keras.saving.load_model(os.path.join(DATA, f"{name}_before_package.keras"))
    assert type(model.task_weighting) is W.REGISTRY[name]
    prediction = model.predict(saved["x"], verbose=0)
    np.testing.assert_allclose(prediction["a"], saved[f"{name}_a"], atol=1e-5)
    np.testing.assert_allclose(prediction["b"], saved[f"{name}_b"], atol=1e-5)
    weights = model.task_weights()
    np.testing.assert_allclose([weights["a"], weights["b"]], saved[f"{name}_weights"], rtol=1e-6)
    state = [np.ravel(np_(v)) for v in model.task_weighting.weights]
    state = np.concatenate(state) if state else np.zeros(0)
    np.testing.assert_allclose(state, saved[f"{name}_state"], rtol=1e-6)


@pytest.mark.skipif(
    keras.backend.backend() == "torch",
    reason="on torch export_saved_model goes through the .keras file and a "
    "TensorFlow subprocess (a minute; tests/test_export.py covers that route); "
    "the methods do not change `call`, which is what is exported",
)
def test_a_gradient_trained_model_exports_as_before(tmp_path):
    tf = pytest.importorskip("tensorflow")
    import keras_moe

    x, y = tiny_data()
    model = tiny_model("pcgrad", representation=True)
    model.compile("adam", loss="mse")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    path = keras_moe.export_saved_model(model, tmp_path / "saved_model")
    artifact = tf.saved_model.load(path)  # kept: it owns the variables
    served = artifact.serve(tf.constant(x))
    expected = model.predict(x, verbose=0)
    assert set(served) == {"a", "b"}
    for task in ("a", "b"):
        np.testing.assert_allclose(np.asarray(served[task]), expected[task], atol=1e-5)
