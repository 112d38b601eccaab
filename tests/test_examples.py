"""The examples run end to end (tiny settings) on the current backend, and so
do the experiment runners of `benchmarks/` they came from.

The examples run as users run them, `python examples/X.py` in a subprocess.
The runners are imported and their `main(argv)` called in this process (no
second Keras import: cheaper), with the arguments of a smoke run. An example
and its runner build the same model in two places (an example is one
self-contained file), so the tests also check that the two agree.
"""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CENSUS = os.path.join(ROOT, "..", "shared", "data", "census_income_kdd.csv.gz")


# A number that is not one: `nan`, `inf`, `-inf` (any case) as a word.
NOT_A_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:nan|inf(?:inity)?)(?![\w])", re.IGNORECASE)


def assert_numbers_finite(out):
    """Every number a script prints is finite (issue 32: the demo printed
    `box IoU nan` on every epoch, from a log key Keras does not write)."""
    bad = [line for line in out.splitlines() if NOT_A_NUMBER.search(line)]
    assert not bad, "non-finite numbers printed:\n" + "\n".join(bad[:20])


# TensorFlow's C++ log lines, which the examples hide (issue 32: they read
# like errors, "E0000 ... AVX-512" in particular).
TF_LOG_LINES = ("oneDNN", "cpu_feature_guard", "absl::InitializeLog", "E0000")


def run_example(name, *args):
    """Runs `python examples/<name> *args` as a user would: without the
    TF_CPP_MIN_LOG_LEVEL that the test runner may set."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", name), *args],
        capture_output=True, text=True, cwd=ROOT, timeout=600, env=env,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert_numbers_finite(result.stdout)
    noise = [line for line in (result.stdout + result.stderr).splitlines()
             if any(marker in line for marker in TF_LOG_LINES)]
    assert not noise, "TensorFlow log lines:\n" + "\n".join(noise[:10])
    return result.stdout


def runner(name):
    """`benchmarks/<name>.py` as a module (its `main` not run)."""
    spec = importlib.util.spec_from_file_location(
        f"benchmark_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_runner(name, *args, capsys):
    runner(name).main(list(args))
    out = capsys.readouterr().out
    assert_numbers_finite(out)
    return out


def needs_census():
    if not os.path.exists(CENSUS):
        pytest.skip(f"the shared census data file is not present: {CENSUS}")


# -- examples ----------------------------------------------------------------


def test_mnist_sparse_moe(tmp_path):
    out = run_example("mnist_sparse_moe.py", "--epochs", "1", "--train-size", "640",
                      "--output-dir", str(tmp_path))
    assert "Test accuracy" in out and "Routing by digit" in out
    assert "reloaded model max |difference|" in out
    assert "serving max |difference|" in out
    assert (tmp_path / "model.keras").exists()


def test_cifar_multitask(tmp_path):
    """The README's main demo, tiny: the shipped CIFAR sample, one epoch, a
    quarter-width backbone; fit, metrics, routing tables, .keras reload and
    SavedModel export with a serving check. Its model is the runner's."""
    out = run_example("cifar_multitask.py", "--data", "examples/data/cifar10_sample.npz",
                      "--epochs", "1", "--train-size", "256", "--test-size", "64",
                      "--width", "0.25", "--output-dir", str(tmp_path))
    assert "Test accuracy" in out and "Test mean IoU" in out
    assert "MMoE gate usage per task" in out
    assert "Token MoE routing by class" in out
    assert "reloaded model max |difference|" in out
    assert "serving max |difference|" in out
    assert "RESULT model=cifar_multitask_moe" in out
    assert (tmp_path / "model.keras").exists()
    same = runner("cifar_multitask").build_model(width=0.25)
    assert f"cifar_multitask_moe: {same.count_params():,} parameters" in out


def test_census_mmoe():
    """The census MMoE, tiny: 3,000 rows, one epoch. Its model is the
    runner's `mmoe`."""
    needs_census()
    out = run_example("census_mmoe.py", "--rows", "3000", "--epochs", "1",
                      "--batch-size", "4096")
    assert "Test AUC income" in out and "Test AUC never_married" in out
    assert "Expert usage on the test set" in out
    census = runner("census_mmoe")
    args = census.parse_args(["--rows", "3000"])
    _, pre = census.load_splits(args)
    same = census.build_models("mmoe", pre.vocabulary_size, args)[0][0]
    assert f"mmoe: {same.count_params():,} parameters" in out


def test_mnist_experts(tmp_path):
    """One mixture, tiny; its model is the runner's top-2 weighted sum."""
    out = run_example("mnist_experts.py", "--epochs", "1", "--train-size", "200",
                      "--test-size", "500", "--output-dir", str(tmp_path))
    assert "Test accuracy" in out and "Routing by digit" in out
    assert "reloaded model max |difference|" in out
    assert (tmp_path / "model.keras").exists()
    same = runner("mnist_experts").build_model(4, 2, "weighted_sum")
    assert f"mnist_experts_weighted_sum: {same.count_params():,} parameters" in out


def test_mnist_upcycling():
    out = run_example("mnist_upcycling.py", "--epochs", "1", "--extra-epochs", "1",
                      "--train-size", "256")
    difference = out.split("max |upcycled - dense| = ")[1].split()[0]
    assert float(difference) < 1e-4  # the upcycled model starts as the dense one
    assert "| dense |" in out and "| upcycled |" in out


# -- the experiment runners in benchmarks/ ------------------------------------


def test_census_mmoe_runner(tmp_path, capsys):
    """The MMoE paper's census experiment, tiny: 3,000 rows, one epoch, one
    seed, all five models; the results table and per-task expert usage.
    (One batch per split: fewer shapes to compile.)"""
    needs_census()
    out = run_runner("census_mmoe", "--rows", "3000", "--epochs", "1", "--seeds", "1",
                     "--batch-size", "4096", "--verbose", "0",
                     "--output-dir", str(tmp_path), capsys=capsys)
    assert "AUC check: ours" in out
    for model in ("single_task", "shared_bottom", "mmoe", "mmoe_sparse", "ple"):
        assert f"| {model} |" in out
    assert out.count("Expert usage on the test set") == 3
    table = (tmp_path / "census_results.md").read_text()
    assert "| mmoe_sparse |" in table and "never-married AUC" in table


def test_cifar_multitask_runner(tmp_path, capsys):
    """The runner's dense twin (`--baseline`), tiny, without the export (the
    example covers it)."""
    out = run_runner("cifar_multitask", "--data", "examples/data/cifar10_sample.npz",
                     "--epochs", "1", "--train-size", "128", "--test-size", "32",
                     "--width", "0.25", "--baseline", "--no-export",
                     "--output-dir", str(tmp_path), capsys=capsys)
    assert "RESULT model=cifar_dense_baseline accuracy=" in out
    assert (tmp_path / "model.keras").exists()


def test_mnist_experts_runner(tmp_path, capsys):
    out = run_runner("mnist_experts", "--epochs", "1", "--train-size", "200",
                     "--test-size", "500", "--output-dir", str(tmp_path), capsys=capsys)
    for row in ("top-1 (any strategy)", "weighted_sum", "max", "attention"):
        assert row in out
    assert "Routing by digit" in out
    assert "reloaded model max |difference|" in out


def test_mnist_upcycling_runner(tmp_path, capsys):
    out = run_runner("mnist_upcycling", "--epochs", "1", "--extra-epochs", "1",
                     "--dense-extra-epochs", "2", "--train-size", "256",
                     "--output-dir", str(tmp_path), capsys=capsys)
    difference = out.split("max |upcycled - dense| = ")[1].split()[0]
    assert float(difference) < 1e-4
    assert "RESULT model=dense extra_epochs=2" in out
    assert "RESULT model=upcycled extra_epochs=1" in out
    assert "| upcycled |" in (tmp_path / "results.md").read_text()


SHARED = os.path.join(ROOT, "..", "shared", "data")
AV_FILES = [os.path.join(SHARED, f) for f in ("mnist_small.npz", "fsdd_spoken_digits.npz")]


def test_av_digits(tmp_path):
    """The audio-visual digit example, tiny: the hard setting (PCA images,
    noisy audio), the per-modality loss on, one epoch of 256 pairs, a
    single-modality model and moe_fusion (the two code paths; dense_fusion
    and audio_only differ only in which of them they combine), the
    missing-modality accuracies, the modality x expert plots and the
    two-input SavedModel's serving check."""
    missing = [f for f in AV_FILES if not os.path.exists(f)]
    if missing:
        import pytest

        pytest.skip(f"the shared data files are not present: {missing}")
    out = run_example("av_digits.py", "--setting", "hard", "--epochs", "1",
                      "--train-size", "256", "--test-size", "64",
                      "--models", "image_only,moe_fusion",
                      # the per-modality loss is off by default: run it here
                      "--group-balance-weight", "0.01",
                      "--output-dir", str(tmp_path))
    for model in ("image_only", "moe_fusion"):
        assert f"RESULT model={model} setting=hard digit_accuracy=" in out
    for modality in ("image", "audio"):
        assert f"ONE_MODALITY model=moe_fusion setting=hard zeroed={modality}" in out
    assert "inputs ['audio', 'image']; serving max |difference|" in out
    assert (tmp_path / "plots" / "block1_moe_group_expert.png").exists()
    assert (tmp_path / "plots" / "block1_moe_test_modality_expert.png").exists()


@pytest.mark.parametrize("name", sorted(
    f for f in os.listdir(os.path.join(ROOT, "examples")) if f.endswith(".py")))
def test_help_answers_before_keras_loads(name):
    """Issue 32: `av_digits.py --help` took 28 s, Keras and its backend
    being imported before the arguments were read. Every example parses
    its arguments first: `--help` prints the flags and imports no Keras."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = [{name!r}, '--help']\n"
        "try:\n"
        f"    runpy.run_path({os.path.join(ROOT, 'examples', name)!r}, run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    assert exit.code in (0, None), exit.code\n"
        "assert 'keras' not in sys.modules, 'keras was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                            text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "--" in result.stdout and "usage:" in result.stdout
