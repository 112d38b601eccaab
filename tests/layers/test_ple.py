import keras
import numpy as np
import pytest

from keras_moe.layers import PLE
from keras_moe.testing import run_layer_test
from tests.conftest import EXPERT_OPTIONS, perturb_task_experts, to_numpy, tokens


# --- Layer contract ---------------------------------------------------------


@pytest.mark.parametrize("num_levels", [2, 3])
def test_contract_ple(num_levels):
    run_layer_test(
        PLE,
        dict(
            num_tasks=2,
            num_levels=num_levels,
            num_task_experts=2,
            num_shared_experts=2,
            hidden_dim=[6, 5, 4][:num_levels],
            output_dim=[5, 4, 3][:num_levels],
            k=2,
            gate_kernel_initializer="glorot_normal",
            task_names=["p", "q"],
            **EXPERT_OPTIONS,
        ),
        tokens((4, 3, 6)),
        expected_output_shape=[(4, 3, [5, 4, 3][num_levels - 1])] * 2,
    )


# --- Wiring ---------------------------------------------------------------------


def test_ple_gate_wiring():
    t, m, s, levels = 2, 2, 1, 3
    ple = PLE(t, levels, m, s, hidden_dim=6)
    x = tokens((5, 4), seed=7)
    ple(x)
    for i, level in enumerate(ple.levels):
        last = i == levels - 1
        # Task gates: T gates over [own experts + shared].
        assert tuple(level.task_gate_kernel.shape) == (t, 4, m + s)
        # The shared gate (over all T m + s experts) on all levels but the last.
        assert (level.shared_gate_kernel is None) == last
        if not last:
            assert tuple(level.shared_gate_kernel.shape) == (4, t * m + s)
        gates = [w for w in level.trainable_weights if "gate" in w.path]
        assert len(gates) == (2 if last else 4)
        assert level.shared_output == (not last)
    before = to_numpy(ple(x))
    perturb_task_experts(ple.levels[-1], 1)
    after = to_numpy(ple(x))
    np.testing.assert_allclose(after[0], before[0], atol=1e-6)  # last level: isolated
    assert not np.allclose(after[1], before[1])
    perturb_task_experts(ple.levels[0], 1)
    again = to_numpy(ple(x))
    assert not np.allclose(again[0], after[0])  # first level: via the shared gate


def test_ple_validates_per_level_sizes():
    with pytest.raises(ValueError, match="num_levels=3"):
        PLE(2, 3, hidden_dim=[4, 4])
    with pytest.raises(ValueError, match="output_dim"):
        PLE(2, 2, hidden_dim=4, output_dim=[4, 0])
    ple = PLE(2, 2, hidden_dim=[8, 4], output_dim=[6, None])
    assert [tuple(y.shape) for y in ple(tokens((3, 5)))] == [(3, 6), (3, 6)]


# --- Telemetry ------------------------------------------------------------------


def test_usage_rows_sum_to_one():
    layer = PLE(3, 2, 1, 2, hidden_dim=5)
    layer(tokens((8, 4)) + 1.0)
    stats = layer.routing_stats()
    usage = stats["task_expert_usage"]
    np.testing.assert_allclose(usage.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(stats["expert_load"].sum(), 1.0, atol=1e-5)
    assert len(stats["task_names"]) == usage.shape[0]


def test_mixed_precision():
    layer = PLE(2, 2, 1, 1, hidden_dim=8, dtype="mixed_bfloat16")
    ys = layer(tokens((4, 6)))
    for y in ys:
        assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
        assert np.isfinite(to_numpy(y).astype("float32")).all()
    np.testing.assert_allclose(
        layer.routing_stats()["task_expert_usage"].sum(1), 1.0, atol=1e-3
    )


# --- Validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: PLE(2, 0, hidden_dim=4), "num_levels=0"),
        (lambda: PLE(0, 2, hidden_dim=4), "num_tasks=0"),
    ],
)
def test_invalid_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_integer_inputs_are_cast_to_the_compute_dtype():
    """Issue 22: int32 inputs crashed on torch only (no einsum promotion)."""
    x = np.arange(8, dtype="int32").reshape(4, 2) % 3
    layer = PLE(2, 1, 1, 2, hidden_dim=4)
    outputs = layer(x)
    assert keras.backend.standardize_dtype(outputs[0].dtype) == "float32"
    for a, b in zip(to_numpy(outputs), to_numpy(layer(x.astype("float32")))):
        np.testing.assert_array_equal(a, b)
