"""`benchmarks/lora_fine_tuning.py` runs tiny on the current backend and
every number it prints is finite (docs/porting.md quotes its table)."""

import importlib.util
import math
import os

import pytest

pytest.importorskip("keras_hub", reason="keras-hub is a test-only dependency")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_lora_fine_tuning_runner_tiny(capsys):
    spec = importlib.util.spec_from_file_location(
        "benchmark_lora_fine_tuning",
        os.path.join(ROOT, "benchmarks", "lora_fine_tuning.py"),
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main([
        "--seeds", "0", "--rank", "2", "--layers", "1", "--dim", "8",
        "--hidden", "8", "--experts", "4", "--vocab", "16", "--batch", "2",
        "--seq", "4", "--warmup", "1", "--reps", "1", "--train-batches", "1",
        "--epochs", "1",
    ])
    out = capsys.readouterr().out
    assert "LoRA / full step time" in out
    (row,) = rows
    for name, value in row.items():
        assert math.isfinite(value), name
    # Only the experts' factors and the head train under LoRA: 4 experts,
    # rank 2, kernels 8 -> 8 (gate, up, down): 4 * 2 * 3 * 16; head 8 * 16 + 16.
    assert row["lora_backbone_params"] == 4 * 2 * 3 * 16
    assert row["lora_params"] == row["lora_backbone_params"] + 8 * 16 + 16
    assert row["full_params"] > row["lora_params"]
