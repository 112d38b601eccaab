"""Real multi-process training on the current backend's own engine: JAX
`jax.distributed` (gloo CPU collectives), TensorFlow
`MultiWorkerMirroredStrategy`, torch `torch.distributed` (gloo).

The scripts of `examples/distributed/` run as users run them, as 1 and 2
processes on 127.0.0.1 (free ports, each process in its own process group,
a hard deadline per launch, every process killed in `finally`). One set of
launches serves every test of this module, also across pytest-xdist
workers (a file lock; the first worker to get it runs them, the other reads
the results):

1. `reference`: 1 process, 3 epochs of 4 steps, a checkpoint per epoch.
2. `data`: 2 processes, data parallel, resumed from the reference's epoch-1
   checkpoint, on until process 1 is killed after epoch 3 is written.
3. (JAX) `expert`: 2 processes, the experts split between them, resumed
   from the same checkpoint, epochs 2 and 3.

The model is `SparseMoE` (top-2 router with the auxiliary-loss-free bias:
non-trainable routing state updated in training) + sparse `MultiGateMoE`,
with `RoutingMetrics` in `fit`.
"""

import fcntl
import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

import keras_moe  # noqa: F401  (registers the layers the checkpoints name)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BACKEND = keras.backend.backend()
SCRIPT = os.path.join(ROOT, "examples", "distributed", f"train_{BACKEND}.py")
DATA = os.path.join(ROOT, "examples", "data", "mnist_sample.npz")
TOL = 1e-5
EPOCHS = 3  # of 4 steps: 256 examples, global batch 64
COMMON = ["--train-size", "256", "--batch-size", "64"]
LAUNCH_TIMEOUT = 240  # s, per launch
KILL_BOUND = 60  # s from killing process 1 to process 0's exit
jax_only = pytest.mark.skipif(
    BACKEND != "jax", reason="keras.distribution (expert parallelism) is JAX's"
)


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def addresses(count):
    """One 127.0.0.1 address per process for TensorFlow's workers; one (the
    coordinator's, process 0's) for the others."""
    ports = free_ports(count if BACKEND == "tensorflow" else 1)
    return ",".join(f"127.0.0.1:{p}" for p in ports)


class Launch:
    """`num_processes` copies of the script, each in its own process group,
    logging to `<directory>/process<i>.log`."""

    def __init__(self, directory, num_processes, *args):
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
        common = ["--num-processes", str(num_processes), "--output-dir", directory]
        if num_processes > 1:
            common += ["--addresses", addresses(num_processes)]
        self.logs, self.processes = [], []
        for index in range(num_processes):
            log = open(os.path.join(directory, f"process{index}.log"), "w")
            self.logs.append(log)
            self.processes.append(subprocess.Popen(
                [sys.executable, SCRIPT, *common, "--process-id", str(index), *args],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            ))

    def output(self, index):
        with open(os.path.join(self.directory, f"process{index}.log")) as f:
            return f.read()

    def wait(self, timeout=LAUNCH_TIMEOUT):
        deadline = time.monotonic() + timeout
        for index, process in enumerate(self.processes):
            try:
                process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    f"process {index} still running after {timeout} s:\n"
                    + self.output(index)[-3000:]
                ) from None
        for index, process in enumerate(self.processes):
            assert process.returncode == 0, (
                f"process {index} exited with {process.returncode}:\n"
                + self.output(index)[-3000:]
            )

    def kill(self, index):
        try:
            os.killpg(self.processes[index].pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.processes[index].wait()

    def close(self):
        for index in range(len(self.processes)):
            self.kill(index)
        for log in self.logs:
            log.close()


def history(directory):
    with open(os.path.join(directory, "history.jsonl")) as f:
        return {record["epoch"]: record for record in map(json.loads, f)}


def checkpoint(directory, epoch):
    return os.path.join(directory, f"epoch-{epoch:03d}.keras")


def run_all(directory):
    """The launches of the module docstring; returns what the tests read
    besides the files: the failure run's outcome."""
    reference = os.path.join(directory, "reference")
    launch = Launch(reference, 1, *COMMON, "--epochs", str(EPOCHS))
    try:
        launch.wait()
    finally:
        launch.close()
    resume = ["--resume", checkpoint(reference, 1)]

    if BACKEND == "jax":
        expert = os.path.join(directory, "expert")
        launch = Launch(expert, 2, *COMMON, *resume, "--epochs", str(EPOCHS),
                        "--parallel", "expert")
        try:
            launch.wait()
            shards = launch.output(0) + launch.output(1)
        finally:
            launch.close()
        with open(os.path.join(expert, "shards.txt"), "w") as f:
            f.write(shards)

    # Data parallel, on until process 1 is killed once epoch 3 is written.
    data = os.path.join(directory, "data")
    launch = Launch(data, 2, *COMMON, *resume, "--epochs", "1000")
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while not (os.path.exists(checkpoint(data, EPOCHS))
                   and os.path.exists(os.path.join(data, "history.jsonl"))
                   and EPOCHS in history(data)):
            for index, process in enumerate(launch.processes):
                assert process.poll() is None, (
                    f"process {index} exited early with {process.returncode}:\n"
                    + launch.output(index)[-3000:]
                )
            assert time.monotonic() < deadline, (
                f"epoch {EPOCHS} not written after {LAUNCH_TIMEOUT} s:\n"
                + launch.output(0)[-3000:]
            )
            time.sleep(0.2)
        launch.kill(1)
        killed = time.monotonic()
        try:
            returncode = launch.processes[0].wait(KILL_BOUND)
        except subprocess.TimeoutExpired:
            returncode = None
        failure = {
            "returncode": returncode,
            "seconds": time.monotonic() - killed,
            "output": launch.output(0)[-4000:],
        }
    finally:
        launch.close()
    return {"failure": failure}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs the launches once per pytest session (xdist workers share
    them through a directory and a lock) and returns their directory and
    outcome."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # shared by the workers of this session
    directory = str(base / f"multiprocess_{BACKEND}")
    result = os.path.join(directory, "result.json")
    with open(str(base / f"multiprocess_{BACKEND}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(result):
            os.makedirs(directory, exist_ok=True)
            try:
                outcome = {"error": None, **run_all(directory)}
            except BaseException as error:  # recorded for the other worker
                outcome = {"error": f"{type(error).__name__}: {error}"}
            with open(result, "w") as f:
                json.dump(outcome, f)
    with open(result) as f:
        outcome = json.load(f)
    if outcome["error"]:
        pytest.fail(outcome["error"])
    return directory, outcome


def probe_images():
    with np.load(DATA) as data:
        return data["x_train"][:32].astype("float32") / 255.0


@functools.lru_cache(maxsize=None)
def weights(path):
    """`{variable path: array}` of the model and its optimizer in a
    checkpoint, and its predictions on the probe images."""
    model = keras.models.load_model(path)
    values = {v.path: keras.ops.convert_to_numpy(v) for v in model.weights}
    values.update({f"optimizer/{v.path}": keras.ops.convert_to_numpy(v)
                   for v in model.optimizer.variables})
    predictions = model.predict(probe_images(), verbose=0)
    return values, {k: np.asarray(v) for k, v in predictions.items()}


def assert_same_training(directory, run):
    """`run` (2 processes, resumed from the reference's epoch 1) equals the
    1-process reference after epochs 2 and 3: weights, optimizer state,
    router bias, logged losses and balance losses."""
    reference = os.path.join(directory, "reference")
    other = os.path.join(directory, run)
    expected, got = history(reference), history(other)
    assert min(got) == 2, f"{run} did not resume at epoch 2: {sorted(got)}"
    for epoch in range(2, EPOCHS + 1):
        assert got[epoch]["processes"] == 2
        for key in ("loss", "moe_balance_loss", "mmoe_balance_loss", "moe_load_cv"):
            a, b = got[epoch]["logs"][key], expected[epoch]["logs"][key]
            assert abs(a - b) <= TOL, f"{run} epoch {epoch} {key}: {a} vs {b}"
    ref_weights, ref_predictions = weights(checkpoint(reference, EPOCHS))
    run_weights, run_predictions = weights(checkpoint(other, EPOCHS))
    assert sorted(ref_weights) == sorted(run_weights)
    bias = [k for k in ref_weights if k.endswith("selection_bias")]
    assert len(bias) == 1 and np.any(ref_weights[bias[0]] != 0), bias
    for key, value in ref_weights.items():
        diff = float(np.max(np.abs(run_weights[key] - value), initial=0.0))
        assert diff <= TOL, f"{run} after epoch {EPOCHS}: {key} differs by {diff}"
    # The 2-process checkpoint, loaded on one process, predicts as the
    # 1-process run's.
    for task, value in ref_predictions.items():
        diff = float(np.max(np.abs(run_predictions[task] - value)))
        assert diff <= TOL, f"{run} checkpoint predicts {task} {diff} away"


def test_data_parallel_two_processes_equal_one(runs):
    """Data parallel over 2 processes, resumed from a 1-process checkpoint,
    trains as 1 process on the global batch: weights, Adam state, the
    auxiliary-loss-free selection bias, the logged loss and balance losses
    (<= 1e-5); its checkpoint loads on 1 process and predicts the same."""
    directory, _ = runs
    assert_same_training(directory, "data")


@jax_only
def test_expert_parallel_two_processes_equal_one(runs):
    """Experts split across 2 JAX processes: each holds only its half of
    every expert bank, and training equals 1 process as above."""
    directory, _ = runs
    with open(os.path.join(directory, "expert", "shards.txt")) as f:
        shards = f.read()
    for process, index in ((0, "slice(0, 2, None)"), (1, "slice(2, 4, None)")):
        assert re.search(
            rf"process {process}: moe/experts/kernel_in \(4, 16, 32\) holds "
            rf"\(2, 16, 32\) at {re.escape(index)}", shards), shards
    assert_same_training(directory, "expert")


def test_killed_process_stops_the_other(runs):
    """Process 1 killed mid-run: process 0 exits with a clear error within
    a bounded time (no hang), and the last checkpoint loads."""
    directory, outcome = runs
    failure = outcome["failure"]
    assert failure["returncode"] == 1, failure
    assert failure["seconds"] < KILL_BOUND, failure
    assert "process 0: training failed" in failure["output"], failure["output"]
    data = os.path.join(directory, "data")
    last = max(int(m.group(1)) for m in (
        re.fullmatch(r"epoch-(\d+)\.keras", name) for name in os.listdir(data)) if m)
    assert last >= EPOCHS
    model = keras.models.load_model(checkpoint(data, last))
    predictions = model.predict(probe_images(), verbose=0)
    assert all(np.all(np.isfinite(v)) for v in predictions.values())
