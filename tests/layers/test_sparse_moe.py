import keras
import numpy as np
import pytest

from keras_moe.layers import SparseMoE, TopKRouter
from keras_moe.testing import run_layer_test
from tests.conftest import (
    copy_weights,
    input_gradients,
    numpy_experts,
    tokens,
    xla_only,
)


@pytest.mark.parametrize("dispatch", ["sparse", "dense"])
def test_layer_contract(dispatch):
    run_layer_test(
        SparseMoE,
        dict(
            num_experts=6,
            hidden_dim=10,
            k=3,
            output_dim=7,
            capacity_factor=1.5,
            eval_capacity_factor=None,
            dispatch=dispatch,
            block_size=4,
            activation="silu",
            gated=True,
            use_bias=False,
            kernel_initializer="he_normal",
            bias_initializer="ones",
            kernel_regularizer="l2",
            bias_regularizer="l1",
            noisy_gating=True,
            load_balance_weight=0.05,
            z_loss_weight=0.001,
            router_kernel_initializer="glorot_normal",
            seed=3,
            causal=True,
        ),
        tokens((4, 5, 8)),
        expected_output_shape=(4, 5, 7),
        expected_num_trainable_weights=5,  # router kernel + noise, 3 kernels
        expected_num_non_trainable_weights=4,  # routing statistics
    )


def test_layer_contract_2d_inputs_top1():
    run_layer_test(
        SparseMoE,
        dict(num_experts=4, hidden_dim=8, k=1, capacity_factor=2.0),
        tokens((16, 6)),
        expected_output_shape=(16, 6),
    )


def reference_moe(layer, x, training=False):
    """Dense NumPy reference of one call: route, cut at capacity, mix."""
    flat = x.reshape(-1, x.shape[-1])
    _, routing = layer(x, training=training, return_routing=True)
    index = keras.ops.convert_to_numpy(routing["expert_index"])
    weights = keras.ops.convert_to_numpy(routing["combine_weights"])
    capacity = int(keras.ops.convert_to_numpy(routing["capacity"]))
    n, k = index.shape
    everything = numpy_experts(layer.experts, np.broadcast_to(flat, (layer.num_experts,) + flat.shape))
    fill = np.zeros(layer.num_experts, int)
    out = np.zeros((n, everything.shape[-1]), np.float32)
    dropped = 0
    for j in range(k):
        for t in range(n):
            e = index[t, j]
            if fill[e] < capacity:
                out[t] += weights[t, j] * everything[e, t]
            else:
                dropped += 1
            fill[e] += 1
    return out.reshape(x.shape[:-1] + (-1,)), dropped / (n * k)


@pytest.mark.parametrize("dispatch", ["sparse", "dense"])
@pytest.mark.parametrize("eval_capacity_factor", [None, 0.5])
def test_matches_numpy_reference(dispatch, eval_capacity_factor):
    x = tokens((3, 7, 5), seed=1) + 1.0  # shifted: skewed routing, drops
    layer = SparseMoE(4, 6, k=2, dispatch=dispatch, eval_capacity_factor=eval_capacity_factor)
    y = keras.ops.convert_to_numpy(layer(x))
    expected, dropped = reference_moe(layer, x)
    np.testing.assert_allclose(y, expected, atol=1e-5, rtol=1e-5)
    stats = layer.routing_stats()
    np.testing.assert_allclose(stats["dropped_fraction"], dropped, atol=1e-6)
    if eval_capacity_factor is not None:
        assert dropped > 0  # the case really exercises dropping


def model_with(layer_kwargs, x):
    inputs = keras.Input(x.shape[1:])
    layer = SparseMoE(**layer_kwargs)
    return layer, keras.Model(inputs, layer(inputs))


def sgd_step_gradients(model, x, target):
    """Outputs, and the gradients of one training step read off a plain
    SGD(lr=1) update (so no backend-specific gradient code is needed)."""
    before = [np.array(w.numpy()) for w in model.trainable_weights]
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    outputs = model.predict(x, verbose=0)
    model.train_on_batch(x, target)
    after = [keras.ops.convert_to_numpy(w) for w in model.trainable_weights]
    names = [w.path for w in model.trainable_weights]
    return outputs, {n: b - a for n, b, a in zip(names, before, after)}


@pytest.mark.parametrize("k,capacity_factor", [(2, None), (1, 8.0), (2, 0.5)])
def test_sparse_equals_dense_outputs_and_gradients(k, capacity_factor):
    x = tokens((4, 16, 8), seed=2)
    target = tokens((4, 16, 8), seed=3)
    common = dict(num_experts=8, hidden_dim=16, k=k, capacity_factor=capacity_factor,
                  eval_capacity_factor=capacity_factor)
    sparse_layer, sparse = model_with(dict(common, dispatch="sparse"), x)
    dense_layer, dense = model_with(dict(common, dispatch="dense"), x)
    copy_weights(sparse_layer, dense_layer)
    y_sparse, g_sparse = sgd_step_gradients(sparse, x, target)
    y_dense, g_dense = sgd_step_gradients(dense, x, target)
    np.testing.assert_allclose(y_sparse, y_dense, atol=1e-5, rtol=0)
    assert len(g_sparse) == len(g_dense) == 5
    for (name, gs), gd in zip(g_sparse.items(), g_dense.values()):
        np.testing.assert_allclose(gs, gd, atol=1e-5, rtol=0, err_msg=name)
    # Gradients reach the router and every expert.
    router = [n for n in g_sparse if "router" in n]
    assert router and all(np.abs(g_sparse[n]).max() > 0 for n in router)
    kernel_in = next(g for n, g in g_sparse.items() if n.endswith("kernel_in"))
    assert all(np.abs(kernel_in[e]).max() > 0 for e in range(8))


def test_training_on_sequences_lowers_the_loss():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(256, 8, 12)).astype("float32")
    # A piecewise target: different regions of input space want different maps.
    w = rng.normal(size=(4, 12, 4)).astype("float32")
    region = np.argmax(x[..., :4], axis=-1)
    y = np.tanh(np.einsum("btd,btdo->bto", x, w[region])).astype("float32")
    inputs = keras.Input((8, 12))
    h = SparseMoE(num_experts=4, hidden_dim=32, k=2, output_dim=16)(inputs)
    outputs = keras.layers.Dense(4)(h)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse")
    history = model.fit(x, y, batch_size=32, epochs=12, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.5 * losses[0], losses


def test_aux_loss_added_in_training_only():
    layer = SparseMoE(4, 8, k=2, load_balance_weight=0.5)
    x = tokens((6, 5))
    layer(x)
    assert len(layer.losses) == 0
    layer(x, training=True)
    assert len(layer.losses) == 1
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer.losses[0]),
        0.5 * layer.routing_stats()["load_balance_loss"],
        rtol=1e-6,
    )


def test_routing_is_inspectable():
    layer = SparseMoE(4, 8, k=2, eval_capacity_factor=0.5)
    x = tokens((2, 6, 5), seed=5) + 2.0
    _, routing = layer(x, return_routing=True)
    routing = {k: keras.ops.convert_to_numpy(v) for k, v in routing.items()}
    assert routing["expert_index"].shape == (12, 2)
    assert routing["probs"].shape == (12, 4)
    assert int(routing["capacity"]) == 3
    kept = routing["keep"].sum()
    np.testing.assert_allclose(routing["dropped_fraction"], 1 - kept / 24, atol=1e-6)
    np.testing.assert_allclose(routing["expert_load"].sum(), 1.0, atol=1e-6)
    stats = layer.routing_stats()
    np.testing.assert_allclose(stats["expert_load"], routing["expert_load"], atol=1e-6)
    np.testing.assert_allclose(stats["dropped_fraction"], routing["dropped_fraction"], atol=1e-6)


def test_routing_stats_update_inside_fit():
    inputs = keras.Input((5, 6))
    layer = SparseMoE(4, 8, k=1, capacity_factor=0.5)
    model = keras.Model(inputs, layer(inputs))
    model.compile(optimizer="sgd", loss="mse")
    x = tokens((8, 5, 6), seed=6) + 1.0
    model.fit(x, np.zeros((8, 5, 6), "float32"), batch_size=8, epochs=1, verbose=0)
    stats = layer.routing_stats()
    np.testing.assert_allclose(stats["expert_load"].sum(), 1.0, atol=1e-5)
    assert 0.5 <= stats["dropped_fraction"] < 1.0  # C = 10 of 40 tokens kept per expert


def test_partial_batches_and_unknown_batch_size():
    inputs = keras.Input((3, 4))
    model = keras.Model(inputs, SparseMoE(4, 8, k=2)(inputs))
    model.compile(optimizer="adam", loss="mse")
    x = tokens((10, 3, 4))
    history = model.fit(x, x, batch_size=4, epochs=2, verbose=0)  # 4 + 4 + 2
    assert np.all(np.isfinite(history.history["loss"]))
    assert model.predict(x, batch_size=3, verbose=0).shape == (10, 3, 4)


@xla_only
def test_jit_compiled_training():
    inputs = keras.Input((6, 8))
    layer = SparseMoE(8, 16, k=2, capacity_factor=1.0)
    model = keras.Model(inputs, layer(inputs))
    model.compile(optimizer="adam", loss="mse", jit_compile=True)
    x = tokens((32, 6, 8))
    history = model.fit(x, np.tanh(x), batch_size=8, epochs=3, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert history.history["loss"][-1] < history.history["loss"][0]
    eager = keras.Model(inputs, layer(inputs))
    np.testing.assert_allclose(
        model.predict(x, verbose=0),
        keras.ops.convert_to_numpy(eager(x)),
        atol=1e-5,
    )


def test_mixed_precision():
    keras.config.set_dtype_policy("mixed_bfloat16")
    inputs = keras.Input((4, 8))
    layer = SparseMoE(4, 16, k=2)
    outputs = keras.layers.Dense(8, dtype="float32")(layer(inputs))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss="mse")
    x = tokens((16, 4, 8))
    history = model.fit(x, x, batch_size=8, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert layer.router.compute_dtype == "float32"
    assert layer.experts.compute_dtype == "bfloat16"
    assert layer.experts.kernel_in.dtype == "float32"
    # The routing statistics survive the mixed policy (on torch an autocast
    # copy of the variable used to swallow the assignment).
    layer(x)
    np.testing.assert_allclose(layer.routing_stats()["expert_load"].sum(), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k=0), "k=0"),
        (dict(k=-1), "k=-1"),
        (dict(k=5), "k=5, num_experts=4"),
        (dict(capacity_factor=0.0), "capacity_factor=0.0"),
        (dict(capacity_factor=-1), "capacity_factor=-1"),
        (dict(eval_capacity_factor=float("inf")), "eval_capacity_factor=inf"),
        (dict(dispatch="ragged"), "dispatch='ragged'"),
        (dict(hidden_dim=0), "hidden_dim=0"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = dict(num_experts=4, hidden_dim=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        SparseMoE(**args)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"rank >= 2.*input_shape=\(8,\)"):
        SparseMoE(4, 8)(np.ones((8,), "float32"))
    with pytest.raises(ValueError, match="rank >= 2"):
        SparseMoE(4, 8)(keras.Input(batch_shape=(8,)))
    layer = SparseMoE(4, 8)
    layer(np.ones((2, 5), "float32"))
    with pytest.raises(ValueError, match="must be 5"):
        layer(np.ones((2, 6), "float32"))


@pytest.mark.skipif(
    keras.backend.backend() == "torch",
    reason="Keras 3.15 cannot export a SavedModel from torch (model.export); "
    "keras_moe.export_saved_model goes through a .keras file instead "
    "(tested in tests/test_export.py)",
)
def test_export_saved_model_with_dynamic_batch(tmp_path):
    import tensorflow as tf

    inputs = keras.Input((5, 6))
    model = keras.Model(inputs, SparseMoE(4, 8, k=2, eval_capacity_factor=0.5)(inputs))
    model.export(str(tmp_path), format="tf_saved_model", verbose=False)
    artifact = tf.saved_model.load(str(tmp_path))
    for batch in (64, 7):  # capacity follows the batch size of each call
        x = tokens((batch, 5, 6), seed=batch)
        np.testing.assert_allclose(
            artifact.serve(tf.constant(x)).numpy(),
            model.predict(x, batch_size=batch, verbose=0),
            atol=1e-5,
        )


def test_layer_contract_with_a_router_and_shared_experts():
    from keras_moe.layers import TopKRouter

    run_layer_test(
        SparseMoE,
        dict(num_experts=4, hidden_dim=8, num_shared_experts=2,
             router=TopKRouter(4, k=1, batch_prioritized=True, z_loss_weight=0.1)),
        tokens((6, 3, 5)),
        expected_output_shape=(6, 3, 5),
        expected_num_trainable_weights=1 + 4 + 4,  # router kernel, 2 banks
    )


def test_router_options_conflict_with_a_router():
    from keras_moe.layers import TopKRouter

    with pytest.raises(ValueError, match="load_balance_weight=0.5"):
        SparseMoE(4, 8, router=TopKRouter(4), load_balance_weight=0.5)
    with pytest.raises(ValueError, match="k=1, router.k=2"):
        SparseMoE(4, 8, k=1, router=TopKRouter(4, k=2))
    with pytest.raises(ValueError, match="router.num_experts=3, num_experts=4"):
        SparseMoE(4, 8, router=TopKRouter(3))
    with pytest.raises(ValueError, match="num_shared_experts=-1"):
        SparseMoE(4, 8, num_shared_experts=-1)


def test_shared_experts_add_a_dense_ffn_to_every_token():
    x = tokens((2, 3, 5), seed=9)
    layer = SparseMoE(4, 8, num_shared_experts=1, bias_initializer="random_normal")
    y = keras.ops.convert_to_numpy(layer(x))
    routed, _ = reference_moe(layer, x)
    shared = numpy_experts(layer.shared_experts, x.reshape(1, -1, 5)).reshape(2, 3, 5)
    np.testing.assert_allclose(y, routed + shared, atol=1e-5)


# ------------------------------------------------- issue 22: robustness

# One small layer shape for these tests: on JAX every new shape compiles
# every op of an eager call anew (seconds per test).
SMALL = dict(num_experts=2, hidden_dim=4, k=1, capacity_factor=1.0,
             eval_capacity_factor=1.0, load_balance_weight=0.0)


@pytest.mark.parametrize("training", [False, True])
def test_a_nan_token_reaches_no_other_token(training):
    """Issue 22: empty buffer rows were filled from the last token and
    multiplied by 0, and a dropped pair read a clamped row times weight 0;
    NaN * 0 = NaN. With a zero router every token picks expert 0 (ties go to
    the lower index, the NaN token too), so with C = 2 tokens 0, 1 are kept
    and 2, 3 dropped; expert 1's rows are empty."""
    x, clean = np.ones((4, 2), "float32"), np.ones((4, 2), "float32")
    x[3] = np.nan
    moe = SparseMoE(**SMALL, router_kernel_initializer="zeros")
    y = keras.ops.convert_to_numpy(moe(x, training=training))
    np.testing.assert_array_equal(y[:3], keras.ops.convert_to_numpy(moe(clean))[:3])
    assert np.all(np.isfinite(y[:3])) and np.all(y[2] == 0)  # 2 is dropped
    # Gradients (the custom gather rules in training, autodiff otherwise)
    # of a loss on the clean tokens: no NaN reaches their inputs.
    grads = input_gradients(moe, x, rows=[0, 1, 2], training=training)
    expected = input_gradients(moe, clean, rows=[0, 1, 2], training=training)
    np.testing.assert_allclose(grads[:3], expected[:3], rtol=1e-6, atol=1e-7)
    assert np.abs(grads[:2]).max() > 0


def test_empty_batch_gives_an_empty_output():
    """Issue 22: a batch of 0 crashed with a different error per backend."""
    moe = SparseMoE(**dict(SMALL, k=2))
    assert tuple(moe(np.zeros((0, 3, 2), "float32")).shape) == (0, 3, 2)
    y, routing = moe(np.zeros((0, 2), "float32"), training=True, return_routing=True)
    assert tuple(y.shape) == (0, 2)
    assert tuple(routing["expert_index"].shape) == (0, 2)
    assert tuple(moe(np.ones((4, 2), "float32")).shape) == (4, 2)  # still works


@pytest.mark.parametrize("dispatch", ["sparse", "dense"])
def test_integer_inputs_are_cast_to_the_compute_dtype(dispatch):
    """Issue 22: int32 inputs crashed on torch only (no einsum promotion)."""
    x = np.arange(8, dtype="int32").reshape(4, 2) % 3
    moe = SparseMoE(**SMALL, dispatch=dispatch)
    y = moe(x)
    assert keras.backend.standardize_dtype(y.dtype) == "float32"
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(y),
        keras.ops.convert_to_numpy(moe(x.astype("float32"))),
    )


def test_tiny_capacity_factor_keeps_one_row_per_expert():
    """Issue 22: capacity_factor=1e-5 gave capacity 0 (obscure gather
    errors); the capacity is at least 1."""
    moe = SparseMoE(**dict(SMALL, capacity_factor=1e-5, eval_capacity_factor=1e-5))
    for training in (False, True):
        y, routing = moe(np.ones((4, 2), "float32"), training=training,
                         return_routing=True)
        assert int(keras.ops.convert_to_numpy(routing["capacity"])) == 1
        assert np.all(np.isfinite(keras.ops.convert_to_numpy(y)))


# ------------------------------------------- issue 23: options of real models

# One layer shape for these tests (on JAX each new shape compiles anew).
X23 = tokens((3, 4, 5), seed=11)
OPTIONS23 = dict(num_experts=4, hidden_dim=6, k=2, capacity_factor=None, block_size=4)


def test_layer_contract_with_gated_shared_experts_and_glu_options():
    run_layer_test(
        SparseMoE,
        dict(
            OPTIONS23, gated=True, activation="quick_gelu", glu_limit=1.0,
            glu_linear_offset=1.0, output_scale=True, num_shared_experts=2,
            shared_hidden_dim=3, shared_expert_gate="sigmoid",
        ),
        X23,
        expected_output_shape=(3, 4, 5),
        # router, 2 banks of 3 kernels + 3 biases + a scale, the gate kernel
        expected_num_trainable_weights=1 + 7 + 7 + 1,
    )


def test_gated_shared_experts_by_hand():
    layer = SparseMoE(**OPTIONS23, num_shared_experts=2, shared_hidden_dim=3,
                      shared_expert_gate="sigmoid", bias_initializer="random_normal")
    y = keras.ops.convert_to_numpy(layer(X23))
    assert layer.shared_experts.kernel_in.shape == (2, 5, 3)
    routed, _ = reference_moe(layer, X23)
    flat = X23.reshape(1, -1, 5)
    shared = numpy_experts(layer.shared_experts, np.concatenate([flat, flat]))
    kernel = keras.ops.convert_to_numpy(layer.shared_gate_kernel)
    gates = 1 / (1 + np.exp(-flat[0] @ kernel))
    shared = (shared * gates.T[:, :, None]).sum(0).reshape(X23.shape)
    np.testing.assert_allclose(y, routed + shared, atol=1e-5)


def test_float_routing_inputs_are_what_the_router_sees():
    x, r = X23, tokens(X23.shape, seed=2)
    layer = SparseMoE(**OPTIONS23)
    y, routing = layer(x, routing_inputs=r, return_routing=True)
    expected = layer.router(r.reshape(-1, 5))
    index = keras.ops.convert_to_numpy(routing["expert_index"])
    np.testing.assert_array_equal(
        index, keras.ops.convert_to_numpy(expected["expert_index"])
    )
    # The experts ran on x with those routes.
    weights = keras.ops.convert_to_numpy(routing["combine_weights"])
    flat = x.reshape(-1, 5)
    everything = numpy_experts(layer.experts, np.broadcast_to(flat, (4,) + flat.shape))
    rows = np.arange(len(flat))
    reference = sum(weights[:, j, None] * everything[index[:, j], rows] for j in range(2))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(y), reference.reshape(x.shape), atol=1e-5
    )
    # routing_inputs=x is the default routing.
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer(x, routing_inputs=x)),
        keras.ops.convert_to_numpy(layer(x)), atol=0,
    )
    with pytest.raises(ValueError, match="shape of the inputs"):
        layer(x, routing_inputs=r[:, :3])


def test_sparse_equals_dense_with_the_expert_options():
    # The dropless blocks (Experts.call_blocks) and the dense reference
    # (Experts.call, as the capacity buffers) compute one function with the
    # clamped GLU and per-expert scales, in training too.
    target = tokens(X23.shape, seed=5)
    common = dict(OPTIONS23, gated=True, activation="quick_gelu", glu_limit=0.5,
                  glu_linear_offset=1.0, output_scale=True)
    pairs = [
        model_with(dict(common, dispatch=dispatch, capacity_factor=capacity_factor), X23)
        for dispatch, capacity_factor in (("sparse", None), ("dense", None))
    ]
    pairs[0][0].experts.expert_scale.assign(np.array([0.5, 2.0, -1.0, 1.5], "float32"))
    for layer, _ in pairs[1:]:
        copy_weights(pairs[0][0], layer)
    (y0, g0), *others = [sgd_step_gradients(model, X23, target) for _, model in pairs]
    for y, g in others:
        np.testing.assert_allclose(y, y0, atol=1e-5, rtol=0)
        for (name, a), b in zip(g0.items(), g.values()):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=name)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_shared_experts=1, shared_expert_gate="tanh"), "shared_expert_gate='tanh'"),
        (dict(shared_expert_gate="sigmoid"), "num_shared_experts=0"),
        (dict(shared_hidden_dim=4), "num_shared_experts=0"),
        (dict(num_shared_experts=1, shared_hidden_dim=0), "shared_hidden_dim=0"),
        (dict(glu_limit=7.0), "gated=True"),
    ],
)
def test_bad_shared_and_glu_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseMoE(4, 8, **kwargs)


@pytest.mark.parametrize("capacity_factor", [0.5, None])
def test_causal_outputs_ignore_later_tokens(capacity_factor):
    # causal=True: in training, with a capacity that drops pairs, a token's
    # output does not change when a later token of its sequence changes
    # (the pairs are placed token-major); dropless is causal anyway.
    layer = SparseMoE(4, 8, k=2, capacity_factor=capacity_factor, causal=True)
    x = tokens((1, 12, 6))
    before = keras.ops.convert_to_numpy(layer(x, training=True))
    changed = x.copy()
    changed[0, 7:] = tokens((5, 6), seed=1) * 3.0
    after = keras.ops.convert_to_numpy(layer(changed, training=True))
    np.testing.assert_allclose(after[0, :7], before[0, :7], atol=1e-6)
    assert not np.allclose(after[0, 7:], before[0, 7:])


def test_causal_refuses_routers_that_look_at_every_token():
    from keras_moe.layers import BalancedAssignmentRouter, ExpertChoiceRouter

    for router in (
        ExpertChoiceRouter(4, k=2),
        BalancedAssignmentRouter(4),
        TopKRouter(4, k=1, batch_prioritized=True),
    ):
        with pytest.raises(ValueError, match="causal=True refuses"):
            SparseMoE(4, 8, router=router, causal=True)
    with pytest.raises(ValueError, match="causal must be True or False"):
        SparseMoE(4, 8, causal="yes")
