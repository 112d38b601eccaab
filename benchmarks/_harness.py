"""What the speed benchmarks share: one worker process per backend, a train
step that waits for its result, and side-by-side (interleaved) timing.

`KERAS_BACKEND` is read once at import, so each backend runs in its own
process: the script re-runs itself with a worker flag and prints one
`RESULT <json>` line per measured configuration, which the driver collects.
"""

import json
import os
import statistics
import subprocess
import sys
import time


# `--backends` takes the three backends and `tensorflow-graph`: TensorFlow
# with `jit_compile=False` (a `tf.function` graph without XLA, where the
# grouped-matmul kernel runs; see docs/performance.md).
BACKENDS = ("tensorflow", "jax", "torch", "tensorflow-graph")
_NO_XLA = "KERAS_MOE_BENCH_NO_XLA"


def run_worker(script, backend, argv, env=None):
    """Runs `python script *argv` under `backend` (one of `BACKENDS`);
    returns its RESULT rows.

    Exits with the worker's output tail when it fails or reports nothing.
    """
    env = dict(env or {})
    if backend == "tensorflow-graph":
        backend, env[_NO_XLA] = "tensorflow", "1"
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3", **env)
    out = subprocess.run([sys.executable, script, *argv], env=env,
                         capture_output=True, text=True)
    rows = [json.loads(line[len("RESULT "):]) for line in out.stdout.splitlines()
            if line.startswith("RESULT ")]
    if out.returncode or not rows:
        print(out.stdout[-3000:], out.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"benchmark worker failed on {backend}: {' '.join(argv)}")
    return rows


def report(row):
    """Prints one RESULT line (the worker side of `run_worker`)."""
    print("RESULT " + json.dumps(row), flush=True)


def train_step(model, x, y):
    """One `train_on_batch`, waiting for the result (asynchronous backends
    would otherwise return before the step is done). A model with several
    outputs returns a list (the loss and one per output): all are read."""
    import numpy as np

    float(np.sum(np.asarray(model.train_on_batch(x, y), dtype="float64")))


def interleaved_times(models, x, y, warmup, reps, steps=1):
    """Seconds of `reps` train steps of each model, measured side by side:
    the models take turns rep by rep, and each timed step follows an
    untimed step of the same model (so caches hold that model's data).
    The first `warmup` rounds (compilation) are not kept. `steps > 1`
    times that many consecutive steps per rep (the mean step), which
    averages out the jitter of one short step."""
    times = {name: [] for name in models}
    for rep in range(warmup + reps):
        for name, model in models.items():
            train_step(model, x, y)
            start = time.perf_counter()
            for _ in range(steps):
                train_step(model, x, y)
            if rep >= warmup:
                times[name].append((time.perf_counter() - start) / steps)
    return times


def median_ratio(times, a, b):
    """Median of the per-rep ratios `a / b` (robust to a slow rep that hits
    both models)."""
    return statistics.median(p / q for p, q in zip(times[a], times[b]))


def jit_compile():
    """The `jit_compile` of the models of this worker: XLA on TensorFlow and
    JAX (not for `tensorflow-graph`), eager on torch."""
    import keras

    if keras.backend.backend() == "torch":
        return False
    return os.environ.get(_NO_XLA) != "1"


def backend_label():
    """This worker's backend as `--backends` names it."""
    import keras

    name = keras.backend.backend()
    return "tensorflow-graph" if os.environ.get(_NO_XLA) == "1" else name
