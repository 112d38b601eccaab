#!/usr/bin/env python
"""Training-step time of SparseMoE vs a dense FFN and vs dense dispatch.

    python benchmarks/step_time.py [--backends tensorflow,jax,torch] [--reps 7]

For each backend (one subprocess each, one after the other) it times one
forward+backward+SGD step (`train_on_batch`) of three single-layer models on
the same `N x d` tokens, interleaved rep by rep so that machine noise hits
all three alike, and reports medians and their ratios:

- `ffn`: a dense FFN `d -> k*h -> d` with the same active parameters (and
  FLOPs) as the `k` experts a token uses: the limit a sparse MoE aims for;
- `sparse`: `SparseMoE(dispatch="sparse")`, capacity-based gather/scatter;
- `dense`: `SparseMoE(dispatch="dense")`, every expert on every token, masked
  (the keras-hub way).

TensorFlow and JAX steps are XLA-compiled (`jit_compile=True`); torch runs
eagerly. Only ratios measured in one run are meaningful on a noisy machine.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

BACKENDS = ("tensorflow", "jax", "torch")


def worker(args):
    import keras
    import numpy as np

    from keras_moe.layers import SparseMoE

    keras.utils.set_random_seed(0)
    n, d, h, e, k = args.tokens, args.dim, args.hidden, args.experts, args.k
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d)).astype("float32")
    y = rng.normal(size=(n, d)).astype("float32")

    def model(layer):
        inputs = keras.Input((d,))
        m = keras.Model(inputs, layer(inputs))
        m.compile(
            optimizer=keras.optimizers.SGD(1e-3),
            loss="mse",
            jit_compile=keras.backend.backend() != "torch",
        )
        return m

    ffn = keras.Sequential(
        [keras.layers.Dense(k * h, activation="gelu"), keras.layers.Dense(d)]
    )
    models = {
        "ffn": model(ffn),
        "sparse": model(SparseMoE(e, h, k=k, capacity_factor=args.capacity_factor)),
        "dense": model(
            SparseMoE(e, h, k=k, capacity_factor=args.capacity_factor, dispatch="dense")
        ),
    }
    times = {name: [] for name in models}
    for rep in range(args.warmup + args.reps):
        for name, m in models.items():
            start = time.perf_counter()
            loss = m.train_on_batch(x, y)
            float(np.asarray(loss))  # wait for the result
            if rep >= args.warmup:
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(
        "RESULT "
        + json.dumps(
            {
                "backend": keras.backend.backend(),
                **{f"{name}_ms": 1000 * t for name, t in median.items()},
                "sparse_over_ffn": median["sparse"] / median["ffn"],
                "dense_over_sparse": median["dense"] / median["sparse"],
            }
        ),
        flush=True,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    rows = []
    for backend in args.backends.split(","):
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        out = subprocess.run(
            [sys.executable, __file__, "--worker", *sys.argv[1:]],
            env=env, capture_output=True, text=True,
        )
        lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
        if out.returncode or not lines:
            print(out.stdout[-3000:], out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"benchmark failed on {backend}")
        rows.append(json.loads(lines[-1][len("RESULT "):]))

    print(
        f"\nN={args.tokens} d={args.dim} h={args.hidden} E={args.experts} "
        f"k={args.k} capacity_factor={args.capacity_factor}, "
        f"median of {args.reps} fwd+bwd+SGD steps\n"
    )
    print("| backend | dense FFN (ms) | SparseMoE (ms) | dense dispatch (ms) "
          "| SparseMoE / FFN | dense dispatch / SparseMoE |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['backend']} | {r['ffn_ms']:.1f} | {r['sparse_ms']:.1f} | "
              f"{r['dense_ms']:.1f} | {r['sparse_over_ffn']:.2f} | "
              f"{r['dense_over_sparse']:.2f} |")


if __name__ == "__main__":
    main()
