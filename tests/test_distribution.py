"""Expert parallelism (JAX, keras.distribution) and data parallelism (TF,
MirroredStrategy) on several devices of one process, and the multi-process
helpers on one process. The multi-device checks run in a fresh process
because the device count is fixed when the backend starts; the real
multi-process runs are tests/distributed/test_multiprocess.py."""

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
    assert expert_parallel(solo, auto_shard_dataset=False).auto_shard_dataset is False


# -- multi-process helpers, on one process (the 2-process runs are in
# tests/distributed/test_multiprocess.py) ---------------------------------


def test_save_model_on_one_process(tmp_path):
    """One process is process 0: `save_model` writes the file under a
    temporary name and renames it (nothing else is left), and it loads."""
    import numpy as np

    from keras_moe.distribution import process_index, save_model

    assert process_index() == 0
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.ones((4, 3)), np.ones((4, 2)), verbose=0)
    path = tmp_path / "model.keras"
    assert save_model(model, path) is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.keras"]
    loaded = keras.models.load_model(path)
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a),
                                      keras.ops.convert_to_numpy(b))
    with pytest.raises(ValueError, match="filepath must end in '.keras'"):
        save_model(model, tmp_path / "model.h5")


def test_torch_data_parallel_refuses_without_a_process_group():
    """Outside a `torch.distributed` run (or off torch) the callback says
    what it needs instead of training silently on one process."""
    from keras_moe.distribution import TorchDataParallel

    callback = TorchDataParallel()
    callback.set_model(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]))
    with pytest.raises(ValueError, match="TorchDataParallel needs"):
        callback.on_train_begin()


def test_cross_replica_sum_is_the_identity_on_one_process():
    import numpy as np

    from keras_moe.utils import replicas

    x = keras.ops.convert_to_tensor(np.arange(3.0, dtype="float32"))
    with replicas.synchronized():
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(replicas.cross_replica_sum(x)), [0.0, 1.0, 2.0]
        )


@jax_only
def test_communication_model_matches_the_compiled_program():
    """The bytes per device of expert parallelism written down in
    benchmarks/distributed/communication.py (docs/distribution.md) equal
    the collectives of the compiled JAX training step at 2 and 8 simulated
    devices, for top-1 and top-2, with a capacity (which must not enter)."""
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3")
    script = os.path.join(ROOT, "benchmarks", "distributed", "communication.py")
    result = subprocess.run(
        [sys.executable, script, "--check", "--devices", "2,8", "--k", "1,2",
         "--tokens", "256", "--dim", "16", "--hidden", "32", "--experts", "8",
         "--capacity-factor", "1.25"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600,
    )
    output = result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode == 0, output
    ratios = [float(line.rsplit("ratio=", 1)[1]) for line in result.stdout.splitlines()
              if line.startswith("RESULT")]
    assert len(ratios) == 4 and all(abs(r - 1) < 1e-3 for r in ratios), output
