import math

import keras
import numpy as np
import pytest

from keras_moe.layers import SparseMoE
from keras_moe.layers.routers.balanced_assignment import BalancedAssignmentRouter
from keras_moe.testing import run_layer_test
from tests.conftest import tokens


def skewed_tokens(n, d, seed):
    """Most tokens near one direction: greedy argmax sends most of them to
    the same expert."""
    x = 0.3 * tokens((n, d), seed=seed)
    x[: int(0.9 * n), 0] += 3.0
    return x


def to_numpy(tree):
    return {k: keras.ops.convert_to_numpy(v) for k, v in tree.items()}


def loads(index, num_experts):
    return np.bincount(np.asarray(index).reshape(-1), minlength=num_experts)


def numpy_softmax(x):
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def numpy_logsumexp(x, axis):
    m = x.max(axis, keepdims=True)
    return m + np.log(np.exp(x - m).sum(axis, keepdims=True))


def numpy_balanced_assignment(a, num_iterations, temperature):
    """Sinkhorn, then rounds of proposals to the preferred expert with room."""
    n, e = a.shape
    lp = (a - a.mean()) / (a.std() + 1e-6) / temperature
    for _ in range(num_iterations):
        lp = lp - numpy_logsumexp(lp, 1)
        lp = lp - numpy_logsumexp(lp, 0) + np.log(n / e)
    cap = math.ceil(n / e)
    assigned = np.full(n, -1)
    load = np.zeros(e, int)
    for _ in range(e):
        if (assigned >= 0).all():
            break
        choice = np.where(load < cap, lp, -np.inf).argmax(1)
        for expert in range(e):
            proposers = np.flatnonzero((choice == expert) & (assigned < 0))
            best = proposers[np.argsort(-lp[proposers, expert], kind="stable")]
            best = best[: cap - load[expert]]
            assigned[best] = expert
            load[expert] += len(best)
    return assigned


def test_layer_contract():
    run_layer_test(
        BalancedAssignmentRouter,
        dict(
            num_experts=3,
            num_iterations=4,
            temperature=0.5,
            kernel_initializer="he_uniform",
            name="base",
        ),
        tokens((9, 6)),
        expected_output_shape=(9, 1),
        expected_num_trainable_weights=1,
        output_selector=lambda routing: routing["combine_weights"],
    )


def test_symbolic_outputs_and_dtypes():
    router = BalancedAssignmentRouter(4)
    symbolic = router(keras.Input((8, 5)))
    assert {k: tuple(v.shape) for k, v in symbolic.items()} == router.compute_output_shape(
        (None, 8, 5)
    )
    assert symbolic["expert_index"].dtype == "int32"
    eager = to_numpy(router(tokens((2, 8, 5)), training=True))
    assert eager["expert_index"].shape == (2, 8, 1)
    assert eager["expert_index"].dtype == np.int32
    np.testing.assert_array_equal(loads(eager["expert_index"], 4), [4, 4, 4, 4])


def test_layer_contract_inside_sparse_moe():
    router = BalancedAssignmentRouter(4, num_iterations=3, name="router")
    run_layer_test(
        SparseMoE,
        dict(
            num_experts=4,
            hidden_dim=8,
            capacity_factor=1.0,
            router=keras.saving.serialize_keras_object(router),
        ),
        tokens((4, 5, 6)),
        expected_output_shape=(4, 5, 6),
        expected_num_trainable_weights=5,
    )


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_skewed_inputs_are_balanced_in_training(seed):
    e, n = 4, 64
    x = skewed_tokens(n, 8, seed)
    router = BalancedAssignmentRouter(e, kernel_initializer="glorot_uniform")
    greedy = loads(to_numpy(router(x, training=False))["expert_index"], e)
    assert greedy.max() >= 2 * n / e, greedy  # the input really is skewed
    balanced = loads(to_numpy(router(x, training=True))["expert_index"], e)
    assert balanced.sum() == n
    assert balanced.max() <= 1.1 * n / e, balanced


@pytest.mark.parametrize("n,e", [(10, 4), (7, 3), (5, 8), (1, 2)])
def test_load_at_most_ceil_n_over_e(n, e):
    x = skewed_tokens(n, 6, seed=n)
    router = BalancedAssignmentRouter(e, num_iterations=2)
    balanced = loads(to_numpy(router(x, training=True))["expert_index"], e)
    assert balanced.sum() == n
    assert balanced.max() <= math.ceil(n / e), balanced


@pytest.mark.parametrize("num_iterations,temperature", [(8, 0.3), (0, 1.0), (3, 2.0)])
def test_matches_numpy(num_iterations, temperature):
    x = skewed_tokens(24, 5, seed=11)
    router = BalancedAssignmentRouter(
        4, num_iterations, temperature, kernel_initializer="glorot_uniform"
    )
    trained = to_numpy(router(x, training=True))
    inferred = to_numpy(router(x, training=False))
    a = x @ keras.ops.convert_to_numpy(router.kernel)
    expected = numpy_balanced_assignment(a, num_iterations, temperature)
    np.testing.assert_array_equal(trained["expert_index"][:, 0], expected)
    np.testing.assert_array_equal(inferred["expert_index"][:, 0], a.argmax(-1))
    for routing in (trained, inferred):
        chosen = np.take_along_axis(a, routing["expert_index"], axis=-1)
        np.testing.assert_allclose(
            routing["combine_weights"], 1 / (1 + np.exp(-chosen)), atol=1e-6
        )
        np.testing.assert_allclose(routing["probs"], numpy_softmax(a), atol=1e-6)
        np.testing.assert_allclose(routing["logits"], a, atol=1e-5)


def test_balanced_preferences_are_kept():
    # Each token points clearly at one expert and the choices are already
    # balanced: the balanced assignment is the greedy one.
    e, n = 4, 32
    kernel = np.eye(e, dtype="float32") * 4.0
    x = np.eye(e, dtype="float32")[np.arange(n) % e] + 0.1 * tokens((n, e), seed=12)
    router = BalancedAssignmentRouter(e)
    router.build(x.shape)
    router.kernel.assign(kernel)
    trained = to_numpy(router(x, training=True))["expert_index"]
    np.testing.assert_array_equal(trained[:, 0], np.arange(n) % e)


def test_no_tokens_dropped_in_sparse_moe_training():
    layer = SparseMoE(4, 8, router=BalancedAssignmentRouter(4), eval_capacity_factor=1.0)
    x = skewed_tokens(48, 6, seed=13).reshape(4, 12, 6)
    _, train = layer(x, training=True, return_routing=True)
    train = to_numpy(train)
    assert train["expert_index"].shape == (48, 1)
    assert float(train["dropped_fraction"]) == 0.0
    assert train["expert_load"].max() <= 1.1 / 4
    _, infer = layer(x, training=False, return_routing=True)
    assert float(keras.ops.convert_to_numpy(infer["dropped_fraction"])) > 0.3


def test_training_lowers_the_loss():
    rng = np.random.default_rng(14)
    x = rng.normal(size=(128, 6, 8)).astype("float32")
    w = rng.normal(size=(4, 8, 4)).astype("float32")
    region = np.argmax(x[..., :4], axis=-1)
    y = np.tanh(np.einsum("btd,btdo->bto", x, w[region])).astype("float32")
    inputs = keras.Input((6, 8))
    h = SparseMoE(4, 32, output_dim=16, router=BalancedAssignmentRouter(4))(inputs)
    model = keras.Model(inputs, keras.layers.Dense(4)(h))
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse")
    losses = model.fit(x, y, batch_size=32, epochs=8, verbose=0).history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0], losses


def test_float32_under_mixed_precision():
    keras.config.set_dtype_policy("mixed_bfloat16")
    router = BalancedAssignmentRouter(4)
    routing = router(np.ones((8, 8), "float32"), training=True)
    assert router.compute_dtype == "float32"
    assert keras.backend.standardize_dtype(routing["combine_weights"].dtype) == "float32"
    np.testing.assert_array_equal(loads(to_numpy(routing)["expert_index"], 4), [2] * 4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_experts=0), "num_experts=0"),
        (dict(num_experts=-3), "num_experts=-3"),
        (dict(num_experts=4, num_iterations=-1), "num_iterations=-1"),
        (dict(num_experts=4, num_iterations=2.5), "num_iterations=2.5"),
        (dict(num_experts=4, temperature=0.0), "temperature=0.0"),
        (dict(num_experts=4, temperature=-1.0), "temperature=-1.0"),
        (dict(num_experts=4, temperature=float("nan")), "temperature=nan"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BalancedAssignmentRouter(**kwargs)


def test_rank1_input():
    with pytest.raises(ValueError, match="rank >= 2"):
        BalancedAssignmentRouter(4)(np.ones((8,), "float32"))
