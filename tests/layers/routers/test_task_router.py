import os

import keras
import numpy as np
import pytest

from keras_moe.layers import SparseMoE
from keras_moe.layers.routers.task_router import TaskRouter
from keras_moe.testing import assert_all_finite, check_config_round_trip
from tests.conftest import xla_only


def numpy_softmax(x):
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def route(router, ids, d=4, training=False):
    ids = np.asarray(ids)
    x = np.zeros(ids.shape + (d,), "float32")
    routing = router(x, routing_inputs=ids, training=training)
    return {k: keras.ops.convert_to_numpy(v) for k, v in routing.items()}


def test_layer_contract(tmp_path):
    kwargs = dict(
        num_experts=6,
        num_tasks=3,
        k=2,
        load_balance_weight=0.1,
        kernel_initializer="glorot_uniform",
        name="tasks",
    )
    check_config_round_trip(TaskRouter, kwargs)
    router = TaskRouter(**kwargs)
    router.build((None, 5))
    assert [tuple(w.shape) for w in router.trainable_weights] == [(3, 6)]

    x_in = keras.Input((4, 5))
    ids_in = keras.Input((4,), dtype="int32")
    router = TaskRouter(**kwargs)
    symbolic = router(x_in, routing_inputs=ids_in)
    assert {k: tuple(v.shape) for k, v in symbolic.items()} == router.compute_output_shape(
        (None, 4, 5)
    )
    assert symbolic["expert_index"].dtype == "int32"

    x = np.random.default_rng(0).normal(size=(2, 4, 5)).astype("float32")
    ids = np.array([[0, 1, 2, 0], [2, 2, 1, 0]], "int32")
    eager = route(router, ids, d=5)
    assert_all_finite(eager)
    assert eager["expert_index"].shape == (2, 4, 2)
    assert eager["expert_index"].dtype == np.int32

    model = keras.Model([x_in, ids_in], symbolic["combine_weights"])
    path = os.path.join(str(tmp_path), "router.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(
        loaded.predict([x, ids], verbose=0), model.predict([x, ids], verbose=0)
    )


@pytest.mark.parametrize("k", [1, 2, 3])
def test_matches_numpy_and_task_experts(k):
    router = TaskRouter(5, num_tasks=4, k=k)
    ids = np.random.default_rng(1).integers(0, 4, size=(3, 10)).astype("int32")
    got = route(router, ids)
    table = keras.ops.convert_to_numpy(router.task_logits)
    probs = numpy_softmax(table)
    index = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    weights = np.take_along_axis(probs, index, axis=-1)
    if k > 1:
        weights = weights / weights.sum(-1, keepdims=True)
    np.testing.assert_array_equal(got["expert_index"], index[ids])
    np.testing.assert_allclose(got["combine_weights"], weights[ids], atol=1e-6)
    np.testing.assert_allclose(got["probs"], probs[ids], atol=1e-6)
    np.testing.assert_allclose(got["logits"], table[ids], atol=1e-6)
    # Every token of a task goes to the task's experts: task_experts(t).
    for t in range(4):
        rows = got["expert_index"][ids == t]
        assert (rows == router.task_experts(t)).all()
    np.testing.assert_array_equal(router.task_experts(), index)
    assert router.task_experts(np.int64(2)).shape == (k,)


def test_load_balance_loss_added_in_training_only():
    router = TaskRouter(4, num_tasks=2, k=1, load_balance_weight=0.5)
    ids = np.array([0, 0, 0, 1], "int32")
    got = route(router, ids)
    assert len(router.losses) == 0
    got = route(router, ids, training=True)
    assert len(router.losses) == 1
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(router.losses[0]), 0.5 * got["load_balance_loss"], rtol=1e-6
    )
    assert len(TaskRouter(4, num_tasks=2).losses) == 0  # weight 0 by default


def test_bad_task_ids_raise_on_eager_inputs():
    router = TaskRouter(4, num_tasks=3)
    with pytest.raises(ValueError, match=r"\[-1, 3\].*num_tasks=3"):
        route(router, np.array([0, 3, -1, 2], "int32"))
    with pytest.raises(ValueError, match="routing_inputs=None"):
        router(np.zeros((2, 4), "float32"))
    with pytest.raises(ValueError, match="routing_inputs=None"):
        TaskRouter(4, num_tasks=3)(keras.Input((4,)))
    with pytest.raises(ValueError, match="one id per token"):
        router(np.zeros((2, 4), "float32"), routing_inputs=np.zeros((2, 2), "int32"))
    with pytest.raises(ValueError, match="task_id=3"):
        router.task_experts(3)
    with pytest.raises(ValueError, match="not built"):
        TaskRouter(4, num_tasks=3).task_experts(0)


@xla_only
def test_bad_task_ids_give_nan_inside_compiled_functions():
    x_in = keras.Input((4,))
    ids_in = keras.Input((), dtype="int32")
    model = keras.Model(
        [x_in, ids_in], SparseMoE(4, 8, router=TaskRouter(4, num_tasks=2))(x_in, routing_inputs=ids_in)
    )
    model.compile(loss="mse", jit_compile=True)
    x = np.ones((3, 4), "float32")
    y = model.predict([x, np.array([0, 5, 1], "int32")], verbose=0)
    assert np.isfinite(y[[0, 2]]).all()
    assert np.isnan(y[1]).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_experts=4, num_tasks=2, k=5), "k=5, num_experts=4"),
        (dict(num_experts=4, num_tasks=0), "num_tasks=0"),
        (dict(num_experts=0, num_tasks=2), "num_experts=0"),
        (dict(num_experts=4, num_tasks=2, load_balance_weight=-1.0), "load_balance_weight=-1.0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TaskRouter(**kwargs)


def task_moe_model(k=1, optimizer=None):
    x_in = keras.Input((5, 8))
    task_in = keras.Input((), dtype="int32")  # one task id per example
    moe = SparseMoE(
        6, 16, router=TaskRouter(6, num_tasks=3, k=k), capacity_factor=None, name="moe"
    )
    model = keras.Model([x_in, task_in], moe(x_in, routing_inputs=task_in))
    model.compile(optimizer=optimizer or keras.optimizers.Adam(1e-2), loss="mse")
    return model, moe


def task_data():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(24, 5, 8)).astype("float32")
    tasks = rng.integers(0, 3, size=(24,)).astype("int32")
    y = np.tanh(x) * (1.0 + tasks[:, None, None])
    return x, tasks, y.astype("float32")


@pytest.mark.parametrize("k", [1, 2])
def test_gradients_reach_the_task_table(k):
    model, moe = task_moe_model(k=k, optimizer=keras.optimizers.SGD(1.0))
    x, tasks, y = task_data()
    tasks = np.where(tasks == 2, 0, tasks).astype("int32")  # task 2 absent
    before = keras.ops.convert_to_numpy(moe.router.task_logits).copy()
    model.train_on_batch([x, tasks], y)
    after = keras.ops.convert_to_numpy(moe.router.task_logits)
    moved = np.abs(after - before).max(axis=-1)
    assert moved[0] > 0 and moved[1] > 0, moved
    assert moved[2] == 0, moved


def test_sparse_moe_with_task_ids_fits_and_saves(tmp_path):
    model, moe = task_moe_model(k=2)
    x, tasks, y = task_data()
    history = model.fit([x, tasks], y, batch_size=8, epochs=3, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    # Each task's tokens use exactly the task's experts.
    _, routing = moe(x, routing_inputs=tasks, return_routing=True)
    index = keras.ops.convert_to_numpy(routing["expert_index"]).reshape(24, 5, 2)
    for t in range(3):
        assert (index[tasks == t] == moe.router.task_experts(t)).all()
    path = os.path.join(str(tmp_path), "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(
        loaded.predict([x, tasks], verbose=0), model.predict([x, tasks], verbose=0)
    )
    np.testing.assert_array_equal(
        loaded.get_layer("moe").router.task_experts(), moe.router.task_experts()
    )
