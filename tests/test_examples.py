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
