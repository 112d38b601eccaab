import math

import keras
import numpy as np
import pytest

from keras_moe.layers import SparseMoE
from keras_moe.layers.routers.expert_choice import ExpertChoiceRouter
from keras_moe.testing import run_layer_test
from tests.conftest import copy_weights, tokens


def to_numpy(tree):
    return {k: keras.ops.convert_to_numpy(v) for k, v in tree.items()}


def numpy_softmax(x):
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def test_layer_contract():
    run_layer_test(
        ExpertChoiceRouter,
        dict(
            num_experts=5,
            k=3,
            use_bias=True,
            z_loss_weight=0.01,
            kernel_initializer="he_uniform",
            kernel_regularizer="l2",
            name="ec",
        ),
        tokens((8, 6)),
        expected_output_shape=(8, 5),
        expected_num_trainable_weights=2,
        output_selector=lambda routing: routing["combine_weights"],
    )


def test_symbolic_outputs_and_dtypes():
    router = ExpertChoiceRouter(4, k=2)
    symbolic = router(keras.Input((7, 6)))
    assert {k: tuple(v.shape) for k, v in symbolic.items()} == router.compute_output_shape(
        (None, 7, 6)
    )
    assert symbolic["expert_index"].dtype == "int32"
    assert symbolic["position"].dtype == "int32"
    assert symbolic["keep"].dtype == "bool"
    eager = to_numpy(router(tokens((3, 7, 6))))
    assert eager["keep"].shape == (3, 7, 4)  # leading shape kept, 21 tokens compete
    assert eager["keep"].dtype == np.bool_ and eager["position"].dtype == np.int32
    np.testing.assert_array_equal(eager["keep"].reshape(21, 4).sum(0), [11] * 4)


def test_layer_contract_inside_sparse_moe():
    router = ExpertChoiceRouter(4, k=2, z_loss_weight=0.001, name="router")
    run_layer_test(
        SparseMoE,
        dict(
            num_experts=4,
            hidden_dim=8,
            capacity_factor=1.0,
            eval_capacity_factor=1.5,
            router=keras.saving.serialize_keras_object(router),
        ),
        tokens((4, 5, 6)),
        expected_output_shape=(4, 5, 6),
        expected_num_trainable_weights=5,  # router kernel, 2 kernels, 2 biases
    )


def numpy_expert_choice(x, kernel, capacity):
    scores = numpy_softmax(x @ kernel)
    n, e = scores.shape
    keep = np.zeros((n, e), bool)
    position = np.full((n, e), -1)
    for expert in range(e):
        chosen = np.argsort(-scores[:, expert], kind="stable")[:capacity]
        keep[chosen, expert] = True
        position[chosen, expert] = np.arange(len(chosen))
    return scores, keep, position


@pytest.mark.parametrize("k,capacity", [(1, None), (2, None), (2, 3), (3, 7)])
def test_matches_numpy(k, capacity):
    x = tokens((7, 5), seed=1)
    router = ExpertChoiceRouter(4, k=k, kernel_initializer="glorot_uniform")
    got = to_numpy(router(x, capacity=capacity))
    kernel = keras.ops.convert_to_numpy(router.kernel)
    c = math.ceil(k * 7 / 4) if capacity is None else capacity
    scores, keep, position = numpy_expert_choice(x, kernel, c)
    np.testing.assert_allclose(got["probs"], scores, atol=1e-6)
    np.testing.assert_array_equal(got["keep"], keep)
    np.testing.assert_array_equal(got["position"][keep], position[keep])
    np.testing.assert_allclose(got["combine_weights"], np.where(keep, scores, 0), atol=1e-6)
    np.testing.assert_array_equal(got["expert_index"], np.tile(np.arange(4), (7, 1)))
    logsumexp = np.log(np.exp(x @ kernel).sum(-1))
    np.testing.assert_allclose(got["z_loss"], np.mean(logsumexp**2), rtol=1e-5)
    assert float(got["load_balance_loss"]) == 0.0
    # Every expert takes exactly C tokens; a token gets 0..E experts.
    np.testing.assert_array_equal(got["keep"].sum(0), [c] * 4)
    assert got["keep"].sum() == 4 * c


def test_capacity_may_be_a_tensor():
    x = tokens((9, 5), seed=2)
    router = ExpertChoiceRouter(3, k=1)
    as_int = to_numpy(router(x, capacity=4))
    as_tensor = to_numpy(router(x, capacity=keras.ops.convert_to_tensor(4, "int32")))
    np.testing.assert_array_equal(as_int["keep"], as_tensor["keep"])
    np.testing.assert_array_equal(as_int["keep"].sum(0), [4, 4, 4])


@pytest.mark.parametrize(
    "training,capacity_factor,eval_capacity_factor,expected_capacity",
    [
        (True, 1.25, 2.0, 13),  # ceil(2 * 20 / 4 * 1.25)
        (True, 1.0, 2.0, 10),  # the paper's C = k N / E
        (False, 1.0, 2.0, 20),  # ceil(2 * 20 / 4 * 2.0), capped at N
        (False, 1.0, 0.5, 5),
    ],
)
def test_every_expert_gets_exactly_capacity_tokens_in_sparse_moe(
    training, capacity_factor, eval_capacity_factor, expected_capacity
):
    layer = SparseMoE(
        4,
        8,
        router=ExpertChoiceRouter(4, k=2),
        capacity_factor=capacity_factor,
        eval_capacity_factor=eval_capacity_factor,
    )
    x = tokens((2, 10, 6), seed=3) + 1.0  # skewed: token choice would overflow
    _, routing = layer(x, training=training, return_routing=True)
    routing = to_numpy(routing)
    c = int(routing["capacity"])
    assert c == expected_capacity
    assert routing["expert_index"].shape == (20, 4)
    np.testing.assert_array_equal(routing["keep"].sum(axis=0), [c] * 4)
    # The load is balanced by construction: every expert holds C tokens.
    np.testing.assert_allclose(routing["expert_load"], [0.25] * 4, atol=1e-6)
    # On average k * capacity_factor experts per token (when C = k N f / E).
    experts_per_token = routing["keep"].sum(axis=1)
    assert experts_per_token.min() >= 0 and experts_per_token.max() <= 4
    np.testing.assert_allclose(experts_per_token.mean(), 4 * c / 20)
    # Only the pairs the experts selected count as routed: none is dropped.
    np.testing.assert_allclose(routing["dropped_fraction"], 0.0, atol=1e-6)
    # Kept pairs use distinct buffer rows below C.
    for e in range(4):
        rows = routing["position"][routing["keep"][:, e], e]
        np.testing.assert_array_equal(np.sort(rows), np.arange(c))
    # The gates are the router scores of the kept pairs.
    np.testing.assert_allclose(
        routing["combine_weights"],
        np.where(routing["keep"], routing["probs"], 0.0),
        atol=1e-6,
    )


def model_with(layer_kwargs, shape):
    inputs = keras.Input(shape)
    layer = SparseMoE(**layer_kwargs)
    return layer, keras.Model(inputs, layer(inputs))


def sgd_step_gradients(model, x, target):
    before = [np.array(w.numpy()) for w in model.trainable_weights]
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    outputs = model.predict(x, batch_size=len(x), verbose=0)
    model.train_on_batch(x, target)
    after = [keras.ops.convert_to_numpy(w) for w in model.trainable_weights]
    return outputs, [b - a for b, a in zip(before, after)]


def test_sparse_dispatch_equals_dense():
    x = tokens((4, 6, 8), seed=4)
    target = tokens((4, 6, 8), seed=5)
    common = dict(num_experts=4, hidden_dim=16, capacity_factor=1.0, eval_capacity_factor=1.0)
    sparse_layer, sparse = model_with(
        dict(common, dispatch="sparse", router=ExpertChoiceRouter(4, k=2)), x.shape[1:]
    )
    dense_layer, dense = model_with(
        dict(common, dispatch="dense", router=ExpertChoiceRouter(4, k=2)), x.shape[1:]
    )
    copy_weights(sparse_layer, dense_layer)
    y_sparse, g_sparse = sgd_step_gradients(sparse, x, target)
    y_dense, g_dense = sgd_step_gradients(dense, x, target)
    np.testing.assert_allclose(y_sparse, y_dense, atol=1e-5, rtol=0)
    assert len(g_sparse) == len(g_dense) == 5
    for gs, gd in zip(g_sparse, g_dense):
        np.testing.assert_allclose(gs, gd, atol=1e-5, rtol=0)
    assert np.abs(g_sparse[0]).max() > 0  # the router kernel learns


def test_z_loss_added_only_in_training():
    router = ExpertChoiceRouter(4, k=2, z_loss_weight=0.5)
    x = tokens((8, 4), seed=6)
    router(x, training=False)
    assert len(router.losses) == 0
    routing = router(x, training=True)
    assert len(router.losses) == 1
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(router.losses[0]),
        0.5 * keras.ops.convert_to_numpy(routing["z_loss"]),
        rtol=1e-6,
    )


def test_training_lowers_the_loss():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(128, 6, 8)).astype("float32")
    w = rng.normal(size=(4, 8, 4)).astype("float32")
    region = np.argmax(x[..., :4], axis=-1)
    y = np.tanh(np.einsum("btd,btdo->bto", x, w[region])).astype("float32")
    inputs = keras.Input((6, 8))
    h = SparseMoE(4, 32, output_dim=16, router=ExpertChoiceRouter(4, k=2))(inputs)
    model = keras.Model(inputs, keras.layers.Dense(4)(h))
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse")
    losses = model.fit(x, y, batch_size=32, epochs=8, verbose=0).history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0], losses


def test_float32_under_mixed_precision():
    keras.config.set_dtype_policy("mixed_bfloat16")
    router = ExpertChoiceRouter(4, k=2)
    routing = router(np.ones((6, 8), "float32"))
    assert router.compute_dtype == "float32"
    assert keras.backend.standardize_dtype(routing["combine_weights"].dtype) == "float32"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_experts=4, k=0), "k=0"),
        (dict(num_experts=4, k=-2), "k=-2"),
        (dict(num_experts=4, k=5), "k=5, num_experts=4"),
        (dict(num_experts=4, k=1.5), "k=1.5"),
        (dict(num_experts=0), "num_experts=0"),
        (dict(num_experts=4, z_loss_weight=-1.0), "z_loss_weight=-1.0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExpertChoiceRouter(**kwargs)


def test_rank1_input():
    with pytest.raises(ValueError, match="rank >= 2"):
        ExpertChoiceRouter(4)(np.ones((8,), "float32"))


@pytest.mark.skipif(
    keras.backend.backend() == "torch",
    reason="Keras 3.15 cannot export a SavedModel from torch (model.export)",
)
def test_export_saved_model_with_dynamic_batch(tmp_path):
    import tensorflow as tf

    inputs = keras.Input((5, 6))
    layer = SparseMoE(4, 8, router=ExpertChoiceRouter(4, k=2), eval_capacity_factor=0.5)
    model = keras.Model(inputs, layer(inputs))
    model.export(str(tmp_path), format="tf_saved_model", verbose=False)
    artifact = tf.saved_model.load(str(tmp_path))
    for batch in (16, 3):  # the capacity follows the batch size of each call
        x = tokens((batch, 5, 6), seed=batch)
        np.testing.assert_allclose(
            artifact.serve(tf.constant(x)).numpy(),
            model.predict(x, batch_size=batch, verbose=0),
            atol=1e-5,
        )
