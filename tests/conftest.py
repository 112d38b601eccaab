import os

# XLA's LLVM back end at -O0 for the tests. The suite compiles hundreds of
# tiny programs (every weight initialiser of a new shape, every train and
# predict step on JAX) and runs each once or twice, so compile time is most
# of the JAX suite's time: -O0 took a PLE layer contract test from 29 s to
# 19 s (means of 4 and 3 runs, 2026-12-03). It changes how the code is
# optimised, not what it computes (rounding may differ in the last bits; the
# whole suite passes with the same tolerances). The examples and benchmarks,
# run as users run them, keep XLA's default level. Set before Keras imports
# a backend; a user's own XLA_FLAGS wins.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import keras  # noqa: E402
import pytest


def pytest_report_header(config):
    return (
        f"keras {keras.__version__}, backend: {keras.backend.backend()} "
        f"(KERAS_BACKEND={os.environ.get('KERAS_BACKEND', '<unset>')})"
    )


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(1234)
    yield
    keras.config.set_dtype_policy("float32")


# XLA compilation (`jit_compile=True`) is what TensorFlow and JAX do; on torch
# Keras maps it to torch.compile (TorchDynamo), a different compiler that the
# issue does not target and that takes minutes on 2 cores. Torch runs eagerly.
xla_only = pytest.mark.skipif(
    keras.backend.backend() == "torch",
    reason="jit_compile=True means XLA on TensorFlow/JAX; torch runs eagerly",
)


# The longest tests (the example scripts run as subprocesses, loading a file
# under the other backends, 8-device expert parallelism: 30-80 s each) are
# scheduled first, so that the xdist workers do not end with one of them
# running alone while the other worker is idle.
RUN_FIRST = ("test_examples.py", "test_cross_backend.py", "test_distribution.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name not in RUN_FIRST)
