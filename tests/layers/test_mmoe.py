import keras
import numpy as np
import pytest

from keras_moe.callbacks import RoutingMetrics
from keras_moe.layers import (
    PLE,
    DSelectKRouter,
    ExpertChoiceRouter,
    MultiGateMoE,
    SparseMoE,
    TopKRouter,
)
from keras_moe.testing import run_layer_test
from tests.conftest import (
    EXPERT_OPTIONS,
    input_gradients,
    numpy_experts,
    softmax,
    to_numpy,
    tokens,
    weight,
    xla_only,
)


# --- Layer contract ---------------------------------------------------------


def test_contract_mmoe_dense():
    run_layer_test(
        MultiGateMoE,
        dict(
            num_tasks=3,
            num_experts=5,
            hidden_dim=6,
            output_dim=4,
            capacity_factor=2.0,
            eval_capacity_factor=1.5,
            load_balance_weight=0.1,
            gate_kernel_initializer="glorot_normal",
            task_names=["ctr", "cvr", "dwell"],
            **EXPERT_OPTIONS,
        ),
        tokens((6, 7)),
        expected_output_shape=[(6, 4)] * 3,
        expected_num_trainable_weights=5,  # 3 expert kernels, gate kernel + bias
        expected_num_non_trainable_weights=4,  # telemetry
    )


def test_contract_mmoe_sparse():
    run_layer_test(
        MultiGateMoE,
        dict(
            num_tasks=2,
            num_experts=4,
            hidden_dim=6,
            output_dim=3,
            k=2,
            capacity_factor=1.5,
            eval_capacity_factor=2.0,
            load_balance_weight=0.05,
            activation="gelu",
            gate_kernel_initializer="glorot_uniform",
            task_names=["a", "b"],
        ),
        tokens((4, 5, 7)),
        expected_output_shape=[(4, 5, 3)] * 2,
        expected_num_trainable_weights=6,  # 4 expert weights + 2 router kernels
        expected_num_non_trainable_weights=5,  # telemetry incl. balance loss
    )


def test_contract_mmoe_custom_routers():
    run_layer_test(
        MultiGateMoE,
        dict(
            num_tasks=3,
            num_experts=4,
            hidden_dim=5,
            routers=[
                ExpertChoiceRouter(4, k=2, name="ec"),
                TopKRouter(4, k=1, batch_prioritized=True, name="top1"),
                DSelectKRouter(4, k=2, name="dselect"),
            ],
            capacity_factor=1.0,
            eval_capacity_factor=0.75,
        ),
        tokens((8, 6)),
        expected_output_shape=[(8, 6)] * 3,
    )


# --- Numerics against NumPy references -----------------------------------------


def test_dense_mmoe_equals_separate_mixtures():
    x = tokens((9, 5), seed=1)
    layer = MultiGateMoE(3, 4, 6, output_dim=2, gate_kernel_initializer="glorot_normal")
    ys = to_numpy(layer(x))
    kernel = keras.ops.convert_to_numpy(weight(layer, "gate_kernel"))
    bias = np.random.default_rng(2).normal(size=(3, 4)).astype("float32")
    weight(layer, "gate_bias").assign(bias)
    ys = to_numpy(layer(x))
    f = numpy_experts(layer.experts, np.broadcast_to(x, (4,) + x.shape))  # (E, N, o)
    for t in range(3):
        g = softmax(x @ kernel[t] + bias[t])  # one task's mixture, on its own
        expected = np.einsum("ne,eno->no", g, f)
        np.testing.assert_allclose(ys[t], expected, atol=1e-5, rtol=1e-5)
    # The gates differ, so the task outputs do.
    assert not np.allclose(ys[0], ys[1])


def sparse_reference(layer, x, training=False):
    """NumPy reference of sparse MMoE: every task's routing, the capacity cut
    over the T N pseudo-tokens (choice major, then token, then task), mix."""
    n = x.shape[0]
    routings = [to_numpy(r(x, training=training)) for r in layer.routers]
    _, routing = layer(x, training=training, return_routing=True)
    capacity = int(keras.ops.convert_to_numpy(routing["capacity"]))
    f = numpy_experts(layer.experts, np.broadcast_to(x, (layer.num_experts,) + x.shape))
    out = np.zeros((layer.num_tasks, n, f.shape[-1]), np.float32)
    fill = np.zeros(layer.num_experts, int)
    dropped = 0
    k = routings[0]["expert_index"].shape[1]
    for j in range(k):
        for i in range(n):
            for t, r in enumerate(routings):
                e = r["expert_index"][i, j]
                if fill[e] < capacity:
                    out[t, i] += r["combine_weights"][i, j] * f[e, i]
                else:
                    dropped += 1
                fill[e] += 1
    return out, dropped / (layer.num_tasks * n * k), capacity


@pytest.mark.parametrize("eval_capacity_factor", [None, 0.5])
def test_sparse_mmoe_matches_reference(eval_capacity_factor):
    x = tokens((10, 6), seed=3) + 0.5  # shifted: skewed routing, drops
    layer = MultiGateMoE(
        3, 5, 8, k=2, eval_capacity_factor=eval_capacity_factor,
        gate_kernel_initializer="glorot_normal",
    )
    ys = to_numpy(layer(x))
    expected, dropped, capacity = sparse_reference(layer, x)
    np.testing.assert_allclose(np.stack(ys), expected, atol=1e-5, rtol=1e-5)
    stats = layer.routing_stats()
    np.testing.assert_allclose(stats["dropped_fraction"], dropped, atol=1e-6)
    if eval_capacity_factor is None:
        assert capacity == 30 and dropped == 0  # dropless: C = T N
    else:
        assert capacity == int(np.ceil(2 * 30 / 5 * 0.5)) and dropped > 0


def test_sparse_mmoe_dropless_equals_dense_gate_reference():
    """Dropless sparse gates are a dense mixture with top-k gates."""
    x = tokens((2, 6, 5), seed=4)
    layer = MultiGateMoE(2, 4, 6, output_dim=3, k=2)
    ys, routing = layer(x, return_routing=True)
    gates = keras.ops.convert_to_numpy(routing["gates"])  # (T, N, E)
    flat = x.reshape(-1, 5)
    f = numpy_experts(layer.experts, np.broadcast_to(flat, (4,) + flat.shape))
    for t in range(2):
        probs = to_numpy(layer.routers[t](flat))["probs"]
        top = np.argsort(-probs, axis=-1)[:, :2]
        dense = np.zeros_like(probs)
        np.put_along_axis(dense, top, np.take_along_axis(probs, top, -1), -1)
        dense /= dense.sum(-1, keepdims=True)
        np.testing.assert_allclose(gates[t], dense, atol=1e-6)
        expected = np.einsum("ne,eno->no", dense, f).reshape(2, 6, 3)
        np.testing.assert_allclose(to_numpy(ys[t]), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("training", [False, True])
def test_one_task_sparse_mmoe_equals_sparse_moe(training):
    x = tokens((3, 8, 6), seed=5) + 1.0
    common = dict(capacity_factor=0.75, eval_capacity_factor=0.75)
    mmoe = MultiGateMoE(1, 4, 8, k=2, load_balance_weight=0.02, **common)
    moe = SparseMoE(4, 8, k=2, activation="relu", load_balance_weight=0.02, **common)
    mmoe.build(x.shape)
    moe.build(x.shape)
    weight(moe, "router/kernel").assign(
        keras.ops.convert_to_numpy(weight(mmoe, "router_0/kernel"))
    )
    for name in ("kernel_in", "bias_in", "kernel_out", "bias_out"):
        weight(moe, f"experts/{name}").assign(
            keras.ops.convert_to_numpy(weight(mmoe, f"experts/{name}"))
        )
    (y_mmoe,) = mmoe(x, training=training)
    y_moe = moe(x, training=training)
    np.testing.assert_allclose(to_numpy(y_mmoe), to_numpy(y_moe), atol=1e-5, rtol=1e-5)
    a, b = mmoe.routing_stats(), moe.routing_stats()
    assert b["dropped_fraction"] > 0
    for key in ("expert_load", "dropped_fraction", "load_balance_loss"):
        np.testing.assert_allclose(a[key], b[key], atol=1e-6, err_msg=key)
    if training:  # the same auxiliary loss
        np.testing.assert_allclose(
            sum(to_numpy(mmoe.losses)), sum(to_numpy(moe.losses)), rtol=1e-6
        )


def test_per_task_capacity_with_expert_choice_router():
    """Expert-choice routers pick C_t tokens per expert for their task; the
    other task's top-k pairs fill their own block of the buffers."""
    x = tokens((12, 5), seed=6)
    layer = MultiGateMoE(
        2, 3, 4, routers=[ExpertChoiceRouter(3, k=1), TopKRouter(3, k=2)],
        eval_capacity_factor=1.0,
    )
    ys, routing = layer(x, return_routing=True)
    routing = to_numpy(routing)
    c0 = 4  # ceil(1 * 12 / 3)
    c1 = 8  # ceil(2 * 12 / 3)
    assert int(routing["capacity"]) == c0 + c1
    # Expert choice: each expert keeps exactly C_0 tokens of task 0.
    keep0 = routing["keep"][0]
    for e in range(3):
        assert keep0[routing["expert_index"][0] == e].sum() == c0
    # Reference for task 0: the expert-choice gates, mixed densely.
    f = numpy_experts(layer.experts, np.broadcast_to(x, (3,) + x.shape))
    r0 = to_numpy(layer.routers[0](x, capacity=c0))
    gates0 = np.where(r0["keep"], r0["combine_weights"], 0.0)
    np.testing.assert_allclose(
        to_numpy(ys[0]), np.einsum("ne,eno->no", gates0, f), atol=1e-5, rtol=1e-5
    )
    usage = layer.routing_stats()["task_expert_usage"]
    np.testing.assert_allclose(usage.sum(axis=1), 1.0, atol=1e-5)


def test_task_gates_start_different():
    """One initializer instance reuses its seed: every task's router, and
    every PLE level's gates, must still get their own initial values."""
    x = tokens((4, 6))
    for init in (None, "glorot_normal", keras.initializers.GlorotNormal(seed=7)):
        mmoe = MultiGateMoE(3, 4, 8, k=2, gate_kernel_initializer=init)
        mmoe(x)
        kernels = [keras.ops.convert_to_numpy(r.kernel) for r in mmoe.routers]
        assert not np.allclose(kernels[0], kernels[1])
        assert not np.allclose(kernels[1], kernels[2])
        ple = PLE(2, 3, 1, 1, hidden_dim=4, output_dim=6, gate_kernel_initializer=init)
        ple(x)
        gates = [keras.ops.convert_to_numpy(lv.task_gate_kernel) for lv in ple.levels]
        assert not np.allclose(gates[1], gates[2])
    # A seeded initializer is reproducible.
    a = MultiGateMoE(2, 4, 8, k=2, gate_kernel_initializer=keras.initializers.GlorotNormal(3))
    b = MultiGateMoE(2, 4, 8, k=2, gate_kernel_initializer=keras.initializers.GlorotNormal(3))
    a(x), b(x)
    for ra, rb in zip(a.routers, b.routers):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(ra.kernel), keras.ops.convert_to_numpy(rb.kernel)
        )


# --- Telemetry ------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: MultiGateMoE(3, 4, 5),
        lambda: MultiGateMoE(3, 4, 5, k=2, eval_capacity_factor=0.5),
    ],
)
def test_usage_rows_sum_to_one(make):
    layer = make()
    layer(tokens((8, 4)) + 1.0)
    stats = layer.routing_stats()
    usage = stats["task_expert_usage"]
    np.testing.assert_allclose(usage.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(stats["expert_load"].sum(), 1.0, atol=1e-5)
    assert len(stats["task_names"]) == usage.shape[0]


def test_forced_gate_shows_full_usage():
    layer = MultiGateMoE(2, 4, 5, task_names=["a", "b"])
    x = tokens((8, 3))
    layer(x)
    bias = np.zeros((2, 4), "float32")
    bias[1, 2] = 50.0  # task b always picks expert 2
    weight(layer, "gate_bias").assign(bias)
    weight(layer, "gate_kernel").assign(np.zeros((2, 3, 4), "float32"))
    layer(x)
    usage = layer.routing_stats()["task_expert_usage"]
    np.testing.assert_allclose(usage[0], 0.25, atol=1e-6)  # uniform gate
    np.testing.assert_allclose(usage[1], [0, 0, 1, 0], atol=1e-6)


def test_forced_sparse_gate_shows_full_usage():
    layer = MultiGateMoE(2, 4, 5, k=1)
    x = np.abs(tokens((8, 3))) + 1.0
    layer(x)
    kernel = np.zeros((3, 4), "float32")
    kernel[:, 3] = 5.0
    weight(layer, "router_1/kernel").assign(kernel)
    layer(x)
    usage = layer.routing_stats()["task_expert_usage"]
    np.testing.assert_allclose(usage[1], [0, 0, 0, 1], atol=1e-6)
    np.testing.assert_allclose(usage.sum(axis=1), 1.0, atol=1e-5)


def test_routing_metrics_logs_per_task_keys():
    inputs = keras.Input((6,))
    mmoe = MultiGateMoE(2, 3, 8, k=2, task_names=["ctr", "cvr"], name="mmoe")
    ys = mmoe(inputs)
    model = keras.Model(inputs, [keras.layers.Dense(1)(y) for y in ys])
    model.compile(optimizer="adam", loss="mse")
    x = tokens((32, 6))
    history = model.fit(
        x, [np.zeros((32, 1))] * 2, batch_size=8, epochs=1, verbose=0,
        callbacks=[RoutingMetrics(per_expert=True)],
    )
    h = history.history
    for task in ("ctr", "cvr"):
        value = h[f"mmoe_{task}_experts"][0]
        assert 1.0 <= value <= 3.0 + 1e-6
        shares = [h[f"mmoe_{task}_usage_{e}"][0] for e in range(3)]
        np.testing.assert_allclose(sum(shares), 1.0, atol=1e-5)
    assert "mmoe_dropped" in h and "mmoe_balance_loss" in h


def test_stats_update_inside_fit_and_losses_in_training():
    inputs = keras.Input((4, 6))
    layer = MultiGateMoE(2, 4, 8, k=1, capacity_factor=0.5, load_balance_weight=0.3)
    model = keras.Model(inputs, layer(inputs))
    model.compile(optimizer="sgd", loss="mse")
    x = tokens((8, 4, 6), seed=8) + 1.0
    model.fit(x, [np.zeros((8, 4, 6), "float32")] * 2, batch_size=8, epochs=1, verbose=0)
    stats = layer.routing_stats()
    assert stats["dropped_fraction"] >= 0.5  # C = half the pairs
    assert stats["load_balance_loss"] > 0
    layer(x)
    assert len(layer.losses) == 0
    layer(x, training=True)
    assert len(layer.losses) == 2  # one balancing loss per task router


def test_mixed_precision():
    x = tokens((4, 6))
    for layer in (
        MultiGateMoE(2, 4, 8, dtype="mixed_bfloat16"),
        MultiGateMoE(2, 4, 8, k=2, dtype="mixed_bfloat16"),
    ):
        ys = layer(x)
        for y in ys:
            assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
            assert np.isfinite(to_numpy(y).astype("float32")).all()
        np.testing.assert_allclose(
            layer.routing_stats()["task_expert_usage"].sum(1), 1.0, atol=1e-3
        )


@xla_only
def test_sparse_mmoe_jit_compiled_fit():
    inputs = keras.Input((6,))
    layer = MultiGateMoE(
        2, 4, 8, routers=[ExpertChoiceRouter(4, k=1), TopKRouter(4, k=2)]
    )
    model = keras.Model(inputs, layer(inputs))
    model.compile(optimizer="adam", loss="mse", jit_compile=True)
    x = tokens((16, 6))
    history = model.fit(x, [x, x], batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    np.testing.assert_allclose(
        layer.routing_stats()["task_expert_usage"].sum(1), 1.0, atol=1e-5
    )


# --- Validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: MultiGateMoE(0, 4, 8), "num_tasks=0"),
        (lambda: MultiGateMoE(2, 4, 8, k=5), "k=5, num_experts=4"),
        (
            lambda: MultiGateMoE(3, 4, 8, routers=[TopKRouter(4), TopKRouter(4)]),
            "len\\(routers\\)=2, num_tasks=3",
        ),
        (
            lambda: MultiGateMoE(2, 4, 8, routers=[TopKRouter(4), TopKRouter(5)]),
            "router.num_experts=5, num_experts=4",
        ),
        (
            lambda: MultiGateMoE(2, 4, 8, k=1, routers=[TopKRouter(4, k=2)] * 2),
            "k=1, router.k=2",
        ),
        (lambda: MultiGateMoE(2, 4, 8, routers=TopKRouter(4)), "list of router"),
        (lambda: MultiGateMoE(2, 4, 8, task_names=["a"]), "len\\(task_names\\)=1"),
        (lambda: MultiGateMoE(2, 4, 8, task_names=["a", "a"]), "distinct"),
        (lambda: MultiGateMoE(2, 4, 8, capacity_factor=0), "capacity_factor=0"),
    ],
)
def test_invalid_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_wrong_input_width_after_build():
    layer = MultiGateMoE(2, 4, 8)
    layer(tokens((3, 5)))
    with pytest.raises(ValueError, match="must be 5"):
        layer(tokens((3, 6)))
    with pytest.raises(ValueError, match="rank >= 2"):
        MultiGateMoE(2, 4, 8)(tokens((5,)))


# ------------------------------------------------- issue 22: robustness

# One small shape for these tests: on JAX every new shape compiles every op
# of an eager call anew (seconds per test).
SMALL_SPARSE = dict(num_tasks=2, num_experts=2, hidden_dim=4, k=1,
                    capacity_factor=1.0, eval_capacity_factor=1.0,
                    load_balance_weight=0.0)


@pytest.mark.parametrize("training", [False, True])
def test_sparse_mmoe_a_nan_token_reaches_no_other_token(training):
    """Issue 22: with zero gates every (token, task) pair picks expert 0;
    C = 4 of the 8 pairs fit (tokens 0, 1), tokens 2, 3 are dropped and
    expert 1's rows are empty. Empty rows were filled from the NaN token
    and multiplied by 0, and dropped pairs read them with weight 0."""
    mmoe = MultiGateMoE(**SMALL_SPARSE, gate_kernel_initializer="zeros")
    x, clean = np.ones((4, 2), "float32"), np.ones((4, 2), "float32")
    x[3] = np.nan
    y = np.concatenate(to_numpy(mmoe(x, training=training)), axis=-1)
    expected = np.concatenate(to_numpy(mmoe(clean, training=training)), axis=-1)
    np.testing.assert_array_equal(y[:3], expected[:3])
    assert np.all(np.isfinite(y[:3])) and np.all(y[2] == 0)  # 2 is dropped
    grads = input_gradients(mmoe, x, rows=[0, 1, 2], training=training)
    clean_grads = input_gradients(mmoe, clean, rows=[0, 1, 2], training=training)
    np.testing.assert_allclose(grads[:3], clean_grads[:3], rtol=1e-6, atol=1e-7)
    assert np.abs(grads[:2]).max() > 0


def test_sparse_mmoe_empty_batch_gives_empty_outputs():
    """Issue 22: a batch of 0 crashed the sparse gates."""
    mmoe = MultiGateMoE(**SMALL_SPARSE)
    for training in (False, True):
        outputs = mmoe(np.zeros((0, 2), "float32"), training=training)
        assert [tuple(y.shape) for y in outputs] == [(0, 2), (0, 2)]
    assert tuple(mmoe(np.ones((4, 2), "float32"))[0].shape) == (4, 2)


@pytest.mark.parametrize(
    "make",
    [
        lambda: MultiGateMoE(2, 2, 4),
        lambda: MultiGateMoE(**SMALL_SPARSE),
    ],
    ids=["mmoe", "sparse-mmoe"],
)
def test_integer_inputs_are_cast_to_the_compute_dtype(make):
    """Issue 22: int32 inputs crashed on torch only (no einsum promotion)."""
    x = np.arange(8, dtype="int32").reshape(4, 2) % 3
    layer = make()
    outputs = layer(x)
    assert keras.backend.standardize_dtype(outputs[0].dtype) == "float32"
    for a, b in zip(to_numpy(outputs), to_numpy(layer(x.astype("float32")))):
        np.testing.assert_array_equal(a, b)
