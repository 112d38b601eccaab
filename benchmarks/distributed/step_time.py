"""Step time of 2-process data-parallel training next to 1 process, on each
backend's own engine, with the scripts of `examples/distributed/`.

    python benchmarks/distributed/step_time.py [--backends jax,tensorflow,torch]
        [--reps 5] [--batch-sizes 64,512] [--train-size 2048]

For every backend and global batch size it runs the training script with 1
process and with 2 processes on 127.0.0.1, alternating, `--reps` times, and
reads the median step time of the second epoch (the first compiles) from
each run's `history.jsonl` (process 0's train-batch times). It prints one
`RESULT` line per run and a Markdown table of medians and of the ratio
2-process / 1-process (the ratio of each rep's pair, then the median and
range). Run it alone on the machine (`cpu -x`): both configurations use
every core.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BACKENDS = ("jax", "tensorflow", "torch")


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def run(backend, num_processes, batch_size, train_size, timeout=600):
    """Median step time (s) of epoch 2 of one run."""
    script = os.path.join(ROOT, "examples", "distributed", f"train_{backend}.py")
    ports = free_ports(num_processes if backend == "tensorflow" else 1)
    addresses = ",".join(f"127.0.0.1:{p}" for p in ports)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    with tempfile.TemporaryDirectory() as directory:
        args = ["--num-processes", str(num_processes), "--addresses", addresses,
                "--batch-size", str(batch_size), "--train-size", str(train_size),
                "--epochs", "2", "--output-dir", directory]
        processes = [
            subprocess.Popen([sys.executable, script, *args, "--process-id", str(i)],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
            for i in range(num_processes)
        ]
        try:
            outputs = [p.communicate(timeout=timeout)[0] for p in processes]
        finally:
            for p in processes:
                if p.poll() is None:
                    os.killpg(p.pid, 9)
                    p.wait()
        for p, output in zip(processes, outputs):
            if p.returncode != 0:
                raise RuntimeError(f"{backend} x{num_processes} failed:\n{output[-3000:]}")
        with open(os.path.join(directory, "history.jsonl")) as f:
            records = {r["epoch"]: r for r in map(json.loads, f)}
    return records[2]["step_time"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch-sizes", default="64,512")
    parser.add_argument("--train-size", type=int, default=2048)
    args = parser.parse_args(argv)
    rows = []
    for backend in args.backends.split(","):
        for batch_size in map(int, args.batch_sizes.split(",")):
            one, two = [], []
            for rep in range(args.reps):
                one.append(run(backend, 1, batch_size, args.train_size))
                two.append(run(backend, 2, batch_size, args.train_size))
                print(f"RESULT backend={backend} batch={batch_size} rep={rep} "
                      f"one={1000 * one[-1]:.2f}ms two={1000 * two[-1]:.2f}ms",
                      flush=True)
            ratios = np.array(two) / np.array(one)
            rows.append((backend, batch_size, 1000 * np.median(one),
                         1000 * np.median(two), np.median(ratios),
                         ratios.min(), ratios.max()))
    print("\n| backend | global batch | 1 process (ms/step) | 2 processes (ms/step) "
          "| 2 / 1 (median, range) |")
    print("|---|---|---|---|---|")
    for backend, batch, one, two, ratio, low, high in rows:
        print(f"| {backend} | {batch} | {one:.1f} | {two:.1f} | "
              f"{ratio:.2f} ({low:.2f}-{high:.2f}) |")


if __name__ == "__main__":
    main()
