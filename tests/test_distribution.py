"""Expert parallelism (JAX, keras.distribution) and data parallelism (TF,
MirroredStrategy). The multi-device checks run in a fresh process because
the device count is fixed when the backend starts."""

import os
import subprocess
import sys

import keras
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
backend = keras.backend.backend()
jax_only = pytest.mark.skipif(
    backend != "jax", reason="Keras implements keras.distribution on JAX"
)


def run_check(script, backend_name):
    env = dict(os.environ, KERAS_BACKEND=backend_name, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "distributed", script)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600,
    )
    output = result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), output


@jax_only
def test_expert_parallel_on_8_cpu_devices():
    """Expert banks sharded along `expert` on a (2, 4) and an (8,) mesh of
    simulated CPU devices: shards, sharded buffers, outputs and one
    training step equal to one device within 1e-5."""
    run_check("expert_parallel_check.py", "jax")


@pytest.mark.skipif(
    backend != "tensorflow", reason="tf.distribute is the TensorFlow backend's"
)
def test_mirrored_strategy_on_2_cpu_devices():
    """Data parallelism over 2 logical CPU devices: the same weights after
    4 steps and the same routing statistics as one device."""
    run_check("mirrored_check.py", "tensorflow")


@jax_only
def test_expert_parallel_layouts():
    from keras_moe.distribution import ExpertParallel, expert_parallel

    devices = keras.distribution.list_devices()[:1]
    mesh = keras.distribution.DeviceMesh((1, 1), ("batch", "expert"), devices)
    distribution = expert_parallel(mesh)
    assert isinstance(distribution, ExpertParallel)
    assert distribution.batch_dim_name == "batch"
    layout = distribution.get_tensor_layout("block/moe/expert_buffers")
    assert tuple(layout.axes) == ("expert", None, None)
    assert distribution.get_tensor_layout("block/moe/output") is None

    with pytest.raises(ValueError, match="expert_axis.*'model'"):
        expert_parallel(mesh, expert_axis="model")
    with pytest.raises(ValueError, match="batch_axis.*'data'"):
        expert_parallel(mesh, batch_axis="data")
    with pytest.raises(ValueError, match="DeviceMesh"):
        expert_parallel((2, 4))
    solo = keras.distribution.DeviceMesh((1,), ("expert",), devices)
    assert expert_parallel(solo).batch_dim_name == "expert"
