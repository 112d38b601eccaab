"""Issue 32: `import keras_moe` (and every public module) does not import
TensorFlow under JAX or PyTorch: it costs seconds and hundreds of MB, and
prints TensorFlow's log lines. Export imports it when it runs (lazily).

Each check runs in a fresh interpreter under the session's backend (this
process has long imported whatever the other tests needed)."""

import os
import subprocess
import sys

import keras
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = (
    "keras_moe",
    "keras_moe.layers",
    "keras_moe.ops",
    "keras_moe.callbacks",
    "keras_moe.compression",
    "keras_moe.models",
    "keras_moe.weighting",
    "keras_moe.export",
    "keras_moe.distribution",
    "keras_moe.interop",
    "keras_moe.upcycling",
    "keras_moe.plotting",
    "keras_moe.testing",
)


@pytest.mark.skipif(
    keras.backend.backend() == "tensorflow",
    reason="under the TensorFlow backend, importing Keras imports TensorFlow",
)
def test_importing_keras_moe_does_not_import_tensorflow():
    code = (
        "import importlib, sys\n"
        f"for name in {MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow')\n"
        "assert not loaded, loaded[:5]\n"
    )
    env = dict(os.environ, KERAS_BACKEND=keras.backend.backend(), PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                            text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
