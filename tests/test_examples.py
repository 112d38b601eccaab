"""The examples run end to end (tiny settings) on the current backend."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(name, *args, tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", name), *args,
         "--output-dir", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout


def test_mnist_sparse_moe(tmp_path):
    out = run_example("mnist_sparse_moe.py", "--epochs", "1", "--train-size", "640",
                      tmp_path=tmp_path)
    assert "Test accuracy" in out
    assert "reloaded model max |difference|" in out
    assert (tmp_path / "model.keras").exists()


def test_cifar_multitask(tmp_path):
    """The README's main demo, tiny: the shipped CIFAR sample, one epoch, a
    quarter-width backbone; fit, metrics, routing tables, .keras reload and
    (TensorFlow/JAX) SavedModel export with a serving check."""
    out = run_example("cifar_multitask.py", "--data", "examples/data/cifar10_sample.npz",
                      "--epochs", "1", "--train-size", "256", "--test-size", "64",
                      "--width", "0.25", tmp_path=tmp_path)
    assert "Test accuracy" in out and "Test mean IoU" in out
    assert "MMoE gate usage per task" in out
    assert "reloaded model max |difference|" in out
    assert (tmp_path / "model.keras").exists()


CENSUS = os.path.join(ROOT, "..", "shared", "data", "census_income_kdd.csv.gz")


def test_census_mmoe(tmp_path):
    """The MMoE paper's census experiment, tiny: 3,000 rows, one epoch, one
    seed, all five models; the results table and per-task expert usage.
    (One batch per split: fewer shapes to compile.)"""
    if not os.path.exists(CENSUS):
        import pytest

        pytest.skip(f"the shared census data file is not present: {CENSUS}")
    out = run_example("census_mmoe.py", "--rows", "3000", "--epochs", "1",
                      "--seeds", "1", "--batch-size", "4096", tmp_path=tmp_path)
    assert "AUC check: ours" in out
    for model in ("single_task", "shared_bottom", "mmoe", "mmoe_sparse", "ple"):
        assert f"| {model} |" in out
    assert out.count("Expert usage on the test set") == 3
    table = (tmp_path / "census_results.md").read_text()
    assert "| mmoe_sparse |" in table and "never-married AUC" in table


def test_mnist_experts(tmp_path):
    out = run_example("mnist_experts.py", "--epochs", "1", "--train-size", "200",
                      "--test-size", "500", tmp_path=tmp_path)
    for row in ("top-1 (any strategy)", "weighted_sum", "max", "attention"):
        assert row in out
    assert "Routing by digit" in out
    assert "reloaded model max |difference|" in out
    assert (tmp_path / "model.keras").exists()


def test_mnist_upcycling(tmp_path):
    out = run_example("mnist_upcycling.py", "--epochs", "1", "--extra-epochs", "1",
                      "--train-size", "256", tmp_path=tmp_path)
    difference = out.split("max |upcycled - dense| = ")[1].split()[0]
    assert float(difference) < 1e-4  # the upcycled model starts as the dense one
    assert "RESULT model=dense" in out and "RESULT model=upcycled" in out
    assert "| upcycled |" in (tmp_path / "results.md").read_text()


SHARED = os.path.join(ROOT, "..", "shared", "data")
AV_FILES = [os.path.join(SHARED, f) for f in ("mnist_small.npz", "fsdd_spoken_digits.npz")]


def test_av_digits(tmp_path):
    """The audio-visual digit example, tiny: the hard setting (PCA images,
    noisy audio), one epoch of 256 pairs, a single-modality model and
    moe_fusion (the two code paths; dense_fusion and audio_only differ only
    in which of them they combine), the missing-modality accuracies, the
    modality x expert plots and the two-input SavedModel's serving check."""
    missing = [f for f in AV_FILES if not os.path.exists(f)]
    if missing:
        import pytest

        pytest.skip(f"the shared data files are not present: {missing}")
    out = run_example("av_digits.py", "--setting", "hard", "--epochs", "1",
                      "--train-size", "256", "--test-size", "64",
                      "--models", "image_only,moe_fusion", tmp_path=tmp_path)
    for model in ("image_only", "moe_fusion"):
        assert f"RESULT model={model} setting=hard digit_accuracy=" in out
    for modality in ("image", "audio"):
        assert f"MISSING model=moe_fusion setting=hard missing={modality}" in out
    assert "inputs ['audio', 'image']; serving max |difference|" in out
    assert (tmp_path / "plots" / "block1_moe_group_expert.png").exists()
    assert (tmp_path / "plots" / "block1_moe_test_modality_expert.png").exists()
