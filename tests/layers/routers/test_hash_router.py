import os

import keras
import numpy as np
import pytest

from keras_moe.layers import SparseMoE
from keras_moe.layers.routers.hash_router import HashRouter
from keras_moe.testing import assert_all_finite, check_config_round_trip


def route(router, ids, d=4):
    ids = np.asarray(ids)
    x = np.zeros(ids.shape + (d,), "float32")
    routing = router(x, routing_inputs=ids)
    return {k: keras.ops.convert_to_numpy(v) for k, v in routing.items()}


def save_and_load(model, tmp_path, name="model.keras"):
    path = os.path.join(str(tmp_path), name)
    model.save(path)
    return keras.saving.load_model(path)


@pytest.mark.parametrize("vocab_size", [None, 50])
def test_layer_contract(vocab_size, tmp_path):
    kwargs = dict(num_experts=5, k=2, vocab_size=vocab_size, seed=3, name="hash")
    config = check_config_round_trip(HashRouter, kwargs)
    assert config["vocab_size"] == vocab_size
    router = HashRouter(**kwargs)
    router.build((None, 6))
    assert len(router.trainable_weights) == 0
    assert len(router.non_trainable_weights) == (0 if vocab_size is None else 1)

    x_in = keras.Input((7, 6))
    ids_in = keras.Input((7,), dtype="int32")
    router = HashRouter(**kwargs)
    symbolic = router(x_in, routing_inputs=ids_in)
    shapes = router.compute_output_shape((None, 7, 6))
    assert {k: tuple(v.shape) for k, v in symbolic.items()} == shapes
    assert symbolic["expert_index"].dtype == "int32"

    x = np.random.default_rng(0).normal(size=(3, 7, 6)).astype("float32")
    ids = np.random.default_rng(1).integers(0, 50, size=(3, 7)).astype("int32")
    eager = route(router, ids, d=6)
    assert_all_finite(eager)
    assert eager["expert_index"].shape == (3, 7, 2)
    assert eager["expert_index"].dtype == np.int32
    assert eager["probs"].shape == (3, 7, 5)

    model = keras.Model([x_in, ids_in], symbolic["expert_index"])
    loaded = save_and_load(model, tmp_path)
    np.testing.assert_array_equal(
        loaded.predict([x, ids], verbose=0), model.predict([x, ids], verbose=0)
    )
    np.testing.assert_array_equal(loaded.predict([x, ids], verbose=0), eager["expert_index"])


@pytest.mark.parametrize("vocab_size", [None, 40])
@pytest.mark.parametrize("k", [1, 3])
def test_outputs_follow_the_contract(vocab_size, k):
    ids = np.arange(40, dtype="int32")
    router = HashRouter(6, k=k, vocab_size=vocab_size)
    got = route(router, ids)
    index = got["expert_index"]
    assert index.shape == (40, k)
    assert all(len(set(row)) == k for row in index.tolist())  # distinct
    assert index.min() >= 0 and index.max() < 6
    np.testing.assert_allclose(got["combine_weights"], np.full((40, k), 1 / k), rtol=1e-6)
    expected_probs = np.zeros((40, 6), "float32")
    for n, row in enumerate(index):
        expected_probs[n, row] = 1 / k
    np.testing.assert_allclose(got["probs"], expected_probs, rtol=1e-6)
    assert float(got["load_balance_loss"]) == 0.0
    router(np.zeros((40, 4), "float32"), routing_inputs=ids, training=True)
    assert len(router.losses) == 0


@pytest.mark.parametrize("vocab_size", [None, 30])
def test_deterministic_across_calls_instances_and_saving(vocab_size, tmp_path):
    ids = np.random.default_rng(2).integers(0, 30, size=(64,)).astype("int32")
    router = HashRouter(8, k=2, vocab_size=vocab_size, seed=11)
    first = route(router, ids)["expert_index"]
    np.testing.assert_array_equal(route(router, ids)["expert_index"], first)
    np.testing.assert_array_equal(router.expert_table(ids), first)
    # The same id always gets the same experts, wherever it appears.
    for token in np.unique(ids):
        rows = first[ids == token]
        assert (rows == rows[0]).all()
    same_seed = HashRouter(8, k=2, vocab_size=vocab_size, seed=11)
    np.testing.assert_array_equal(route(same_seed, ids)["expert_index"], first)
    other_seed = HashRouter(8, k=2, vocab_size=vocab_size, seed=12)
    assert not np.array_equal(route(other_seed, ids)["expert_index"], first)

    x_in = keras.Input((4,))
    ids_in = keras.Input((), dtype="int32")
    model = keras.Model(
        [x_in, ids_in],
        HashRouter(8, k=2, vocab_size=vocab_size, seed=11)(
            x_in, routing_inputs=ids_in
        )["expert_index"],
    )
    loaded = save_and_load(model, tmp_path)
    x = np.zeros((64, 4), "float32")
    np.testing.assert_array_equal(loaded.predict([x, ids], verbose=0), first)


def test_saved_table_is_used_after_loading(tmp_path):
    """The table is a weight: a loaded model uses the saved table, even if
    the seed would build another one."""
    x_in = keras.Input((4,))
    ids_in = keras.Input((), dtype="int32")
    router = HashRouter(4, k=1, vocab_size=10, seed=0)
    model = keras.Model([x_in, ids_in], router(x_in, routing_inputs=ids_in)["expert_index"])
    custom = np.array([[3], [2], [1], [0], [3], [2], [1], [0], [3], [2]], "int32")
    router.table.assign(custom)
    loaded = save_and_load(model, tmp_path)
    ids = np.arange(10, dtype="int32")
    got = loaded.predict([np.zeros((10, 4), "float32"), ids], verbose=0)
    np.testing.assert_array_equal(got, custom)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_balanced_table(k):
    vocab_size, num_experts = 103, 8
    router = HashRouter(num_experts, k=k, vocab_size=vocab_size, seed=5)
    index = route(router, np.arange(vocab_size, dtype="int32"))["expert_index"]
    load = np.bincount(index.ravel(), minlength=num_experts)
    assert load.sum() == vocab_size * k
    assert load.max() - load.min() <= 1, load
    assert all(len(set(row)) == k for row in index.tolist())


def test_arithmetic_hash_spreads_ids():
    router = HashRouter(8, k=2, seed=0)
    ids = np.arange(-50, 8000, dtype="int32")
    index = route(router, ids)["expert_index"]
    load = np.bincount(index.ravel(), minlength=8)
    mean = load.mean()
    assert np.all(np.abs(load - mean) < 0.1 * mean), load
    first = np.bincount(index[:, 0], minlength=8)
    assert np.all(np.abs(first - first.mean()) < 0.15 * first.mean()), first
    # Any int32 id is valid, including the extremes.
    extremes = route(router, np.array([2**31 - 1, -(2**31), 0], "int32"))
    assert extremes["expert_index"].min() >= 0 and extremes["expert_index"].max() < 8


def test_out_of_vocabulary_ids_wrap():
    router = HashRouter(4, k=2, vocab_size=10, seed=1)
    got = route(router, np.array([3, 13, -7, 9, -1], "int32"))["expert_index"]
    np.testing.assert_array_equal(got[0], got[1])
    np.testing.assert_array_equal(got[0], got[2])
    np.testing.assert_array_equal(got[3], got[4])


def test_missing_or_bad_routing_inputs():
    router = HashRouter(4)
    with pytest.raises(ValueError, match="routing_inputs=None"):
        router(np.zeros((3, 4), "float32"))
    with pytest.raises(ValueError, match="routing_inputs=None"):
        HashRouter(4)(keras.Input((4,)))
    with pytest.raises(ValueError, match="one id per token"):
        router(np.zeros((3, 4), "float32"), routing_inputs=np.zeros((2,), "int32"))
    with pytest.raises(ValueError, match="integer ids"):
        router(np.zeros((3, 4), "float32"), routing_inputs=np.zeros((3,), "float32"))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_experts=4, k=5), "k=5, num_experts=4"),
        (dict(num_experts=4, k=0), "k=0"),
        (dict(num_experts=0), "num_experts=0"),
        (dict(num_experts=4, vocab_size=0), "vocab_size=0"),
        (dict(num_experts=4, seed=-1), "seed=-1"),
        (dict(num_experts=4, seed=None), "seed=None"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HashRouter(**kwargs)


def hash_moe_model():
    x_in = keras.Input((6, 8))
    ids_in = keras.Input((6,), dtype="int32")
    moe = SparseMoE(
        4, 16, router=HashRouter(4, k=2, vocab_size=20, seed=2), name="moe"
    )
    model = keras.Model([x_in, ids_in], moe(x_in, routing_inputs=ids_in))
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    return model, moe


def hash_data():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(32, 6, 8)).astype("float32")
    ids = rng.integers(0, 20, size=(32, 6)).astype("int32")
    return x, ids, np.tanh(x)


def test_sparse_moe_with_ids_fits_and_saves(tmp_path):
    model, moe = hash_moe_model()
    x, ids, y = hash_data()
    before = [np.array(w.numpy()) for w in model.trainable_weights]
    history = model.fit([x, ids], y, batch_size=8, epochs=3, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    after = [keras.ops.convert_to_numpy(w) for w in model.trainable_weights]
    assert all(not np.array_equal(b, a) for b, a in zip(before, after))
    # Routing follows the ids: a token's experts come from the table.
    _, routing = moe(x[:2], routing_inputs=ids[:2], return_routing=True)
    table = keras.ops.convert_to_numpy(moe.router.table)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(routing["expert_index"]), table[ids[:2].ravel()]
    )
    loaded = save_and_load(model, tmp_path)
    np.testing.assert_array_equal(
        loaded.predict([x, ids], verbose=0), model.predict([x, ids], verbose=0)
    )
    assert isinstance(loaded.get_layer("moe").router, HashRouter)
