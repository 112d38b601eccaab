import os

import keras
import pytest


def pytest_report_header(config):
    return (
        f"keras {keras.__version__}, backend: {keras.backend.backend()} "
        f"(KERAS_BACKEND={os.environ.get('KERAS_BACKEND', '<unset>')})"
    )


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    keras.backend.clear_session()
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
