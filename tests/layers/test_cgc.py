import keras
import numpy as np
import pytest

from keras_moe.layers import CGC
from keras_moe.testing import run_layer_test
from tests.conftest import (
    EXPERT_OPTIONS,
    numpy_experts,
    perturb_task_experts,
    softmax,
    to_numpy,
    tokens,
)


# --- Layer contract ---------------------------------------------------------


@pytest.mark.parametrize("shared_output", [False, True])
@pytest.mark.parametrize("list_input", [False, True])
def test_contract_cgc(shared_output, list_input):
    t = 2
    x = tokens((5, 6))
    data = [tokens((5, 6), seed=i) for i in range(t + 1)] if list_input else x
    outputs = t + int(shared_output)
    run_layer_test(
        CGC,
        dict(
            num_tasks=t,
            num_task_experts=2,
            num_shared_experts=3,
            hidden_dim=7,
            output_dim=4,
            shared_output=shared_output,
            k=3,
            gate_kernel_initializer="glorot_normal",
            task_names=["x", "y"],
            **EXPERT_OPTIONS,
        ),
        data,
        expected_output_shape=[(5, 4)] * outputs,
        # task + shared experts (3 kernels each), task gate (+ shared gate)
        expected_num_trainable_weights=6 + 2 + 2 * int(shared_output),
        expected_num_non_trainable_weights=4,
    )

# --- Wiring and numerics against NumPy references ---------------------------


def test_cgc_task_output_reads_only_its_experts_and_input():
    t = 3
    xs = [tokens((6, 4), seed=i) for i in range(t + 1)]
    cgc = CGC(t, 2, 1, hidden_dim=5, shared_output=True)
    before = to_numpy(cgc(xs))
    perturb_task_experts(cgc, 1)
    after = to_numpy(cgc(xs))
    np.testing.assert_allclose(after[0], before[0], atol=1e-6)
    np.testing.assert_allclose(after[2], before[2], atol=1e-6)
    assert not np.allclose(after[1], before[1])
    assert not np.allclose(after[3], before[3])  # the shared gate sees task 1
    # Task 0's output reads task 0's input and the shared one only.
    changed = list(xs)
    changed[1] = changed[1] + 1.0
    again = to_numpy(cgc(changed))
    np.testing.assert_allclose(again[0], after[0], atol=1e-6)
    assert not np.allclose(again[1], after[1])


def test_cgc_gates_numpy_reference():
    t, m, s = 2, 2, 1
    xs = [tokens((5, 4), seed=10 + i) for i in range(t + 1)]
    cgc = CGC(t, m, s, hidden_dim=6, output_dim=3, shared_output=True,
              gate_kernel_initializer="glorot_normal")
    ys = to_numpy(cgc(xs))
    f_task = numpy_experts(cgc.task_experts, np.repeat(np.stack(xs[:t]), m, axis=0))
    f_shared = numpy_experts(cgc.shared_experts, np.broadcast_to(xs[t], (s,) + xs[t].shape))
    wk = keras.ops.convert_to_numpy(cgc.task_gate_kernel)
    for i in range(t):
        g = softmax(xs[i] @ wk[i])
        mixed = np.concatenate([f_task[i * m : (i + 1) * m], f_shared])
        np.testing.assert_allclose(
            ys[i], np.einsum("ne,eno->no", g, mixed), atol=1e-5, rtol=1e-5
        )
    g_s = softmax(xs[t] @ keras.ops.convert_to_numpy(cgc.shared_gate_kernel))
    np.testing.assert_allclose(
        ys[t], np.einsum("ne,eno->no", g_s, np.concatenate([f_task, f_shared])),
        atol=1e-5, rtol=1e-5,
    )


def test_cgc_top_k_keeps_k_weights():
    cgc = CGC(2, 3, 2, hidden_dim=4, k=2, shared_output=True)
    _, routing = cgc(tokens((7, 5)), return_routing=True)
    for gates in to_numpy([routing["task_gates"], routing["shared_gates"]]):
        assert ((gates > 0).sum(-1) == 2).all()
        np.testing.assert_allclose(gates.sum(-1), 1.0, atol=1e-5)

# --- Telemetry ------------------------------------------------------------------


def test_usage_rows_sum_to_one():
    layer = CGC(3, 1, 2, 5, shared_output=True)
    layer(tokens((8, 4)) + 1.0)
    stats = layer.routing_stats()
    usage = stats["task_expert_usage"]
    np.testing.assert_allclose(usage.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(stats["expert_load"].sum(), 1.0, atol=1e-5)
    assert len(stats["task_names"]) == usage.shape[0]


# --- Validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: CGC(0, 1, 1, 4), "num_tasks=0"),
        (lambda: CGC(2, 0, 0, 4), "num_task_experts=0"),
        (lambda: CGC(2, 1, 1, 4, k=3), "k=3"),
        (lambda: CGC(2, 1, 1, 4, task_names=["a", "b", "c"]), "len\\(task_names\\)=3"),
    ],
)
def test_invalid_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_cgc_list_input_of_wrong_length():
    cgc = CGC(2, 1, 1, 4)
    with pytest.raises(ValueError, match="a list of 2 inputs, num_tasks=2"):
        cgc([tokens((3, 5)), tokens((3, 5))])
    with pytest.raises(ValueError, match="same shape"):
        cgc([tokens((3, 5)), tokens((3, 5)), tokens((3, 4))])


def test_integer_inputs_are_cast_to_the_compute_dtype():
    """Issue 22: int32 inputs crashed on torch only (no einsum promotion)."""
    x = np.arange(8, dtype="int32").reshape(4, 2) % 3
    layer = CGC(2, 1, 1, 4)
    outputs = layer(x)
    assert keras.backend.standardize_dtype(outputs[0].dtype) == "float32"
    for a, b in zip(to_numpy(outputs), to_numpy(layer(x.astype("float32")))):
        np.testing.assert_array_equal(a, b)
