#!/usr/bin/env python
"""Speed and memory of SparseMoE against a dense FFN and the dense dispatch.

    python benchmarks/moe_speed.py train   [--backends ...] [--experts 8,16,64,128]
                                           [--k 1,2] [--capacity-factors 1.0,1.25]
                                           [--tokens 4096,16384] [--reps 5]
    python benchmarks/moe_speed.py memory  [same grid options]
    python benchmarks/moe_speed.py latency [--batches 1,256] [--experts ...]

Three single-layer models on `N` tokens of width `d` (default 256), expert
hidden width `h` (default 1024):

- `ffn`: a dense FFN `d -> k*h -> d` with the same active parameters (and
  FLOPs) as the `k` experts a token uses: the limit a sparse MoE aims for;
- `sparse`: `SparseMoE(dispatch="sparse")` (capacity-based dispatch);
- `dense`: `SparseMoE(dispatch="dense")`, every expert on every token,
  masked (the keras-hub way); only where `E * N <= --dense-limit` (it
  holds `E x N x h` activations: gigabytes and seconds per step beyond).

`train`: one forward+backward+SGD step (`train_on_batch`; XLA-compiled with
`jit_compile=True` on TensorFlow and JAX, eager on torch; the pseudo-backend
`tensorflow-graph` is TensorFlow with `jit_compile=False`, a graph without
XLA, where the grouped-matmul kernel runs). The models of a
configuration are timed interleaved, rep by rep, each timed step right after
an untimed step of the same model (so one model's memory traffic does not
land on the next), and the table gives the medians over `--reps` reps and
the median of the per-rep ratios.

`memory`: the peak resident memory a training step adds (activations,
gradients, temporaries), one fresh process per backend and configuration:
after two warm-up steps, the kernel's peak-RSS counter is reset
(`/proc/self/clear_refs`) and two more steps are run. So that the resident
size follows the live memory, freed blocks must go back to the system:
glibc is told to (`MALLOC_MMAP_THRESHOLD_`), and the caching allocators are
switched off (`TF_ENABLE_ONEDNN_OPTS=0`, `XLA_PYTHON_CLIENT_ALLOCATOR=
platform`); these settings are for this measurement only. Linux only.

`latency`: inference (`predict_on_batch`, compiled on TensorFlow and JAX)
for batches of `--batches` tokens, median of `--reps` calls; `sparse` is
the default inference capacity (`eval_capacity_factor=2.0`) and
`dropless` is `eval_capacity_factor=None`.

Each backend runs in its own subprocess, one after the other. Only ratios
measured in one run are meaningful on a noisy machine.
"""

import argparse
import itertools
import json
import os
import statistics
import sys
import time

import _harness
from _harness import interleaved_times, median_ratio, report, train_step

BACKENDS = ("tensorflow", "jax", "torch")  # and "tensorflow-graph" (_harness)
HERE = os.path.abspath(__file__)


def ints(text):
    return [int(v) for v in text.split(",") if v]


def floats(text):
    return [float(v) for v in text.split(",") if v]


def grid(args):
    return list(itertools.product(args.tokens, args.k, args.experts, args.capacity_factors))


# ---------------------------------------------------------------------------
# Worker side (runs under one backend)
# ---------------------------------------------------------------------------


def make_models(keras, n_tokens, d, h, e, k, cf, names, eval_cf=2.0, block_size=None):
    from keras_moe.layers import SparseMoE

    class ExpertBankFloor(keras.layers.Layer):
        """Weights of the size of an `E`-expert bank that the step must
        differentiate and update but that change nothing (`+ 0 * sum`): the
        part of an MoE step that grows with `E` whatever the dispatch."""

        def __init__(self, e, d, h):
            super().__init__()
            self.shapes = ((e, d, h), (e, h), (e, h, d), (e, d))

        def build(self, input_shape):
            self.bank = [self.add_weight(shape=s, initializer="zeros") for s in self.shapes]

        def call(self, x):
            total = sum(keras.ops.sum(w) for w in self.bank)
            return x + 0.0 * total

    def model(layer):
        inputs = keras.Input((d,))
        m = keras.Model(inputs, layer(inputs))
        m.compile(
            optimizer=keras.optimizers.SGD(1e-3),
            loss="mse",
            jit_compile=_harness.jit_compile(),
        )
        return m

    builders = {
        "ffn": lambda: keras.Sequential(
            [keras.layers.Dense(k * h, activation="gelu"), keras.layers.Dense(d)]
        ),
        "roofline": lambda: keras.Sequential(
            [
                keras.layers.Dense(k * h, activation="gelu"),
                keras.layers.Dense(d),
                ExpertBankFloor(e, d, h),
            ]
        ),
        "sparse": lambda: SparseMoE(
            e, h, k=k, capacity_factor=cf, eval_capacity_factor=eval_cf
        ),
        "dropless": lambda: SparseMoE(
            e, h, k=k, capacity_factor=None, eval_capacity_factor=None,
            block_size=block_size,
        ),
        "dense": lambda: SparseMoE(
            e, h, k=k, capacity_factor=cf, eval_capacity_factor=eval_cf,
            dispatch="dense",
        ),
    }
    return {name: model(builders[name]()) for name in names}


def data(n_tokens, d, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(n_tokens, d)).astype("float32"),
        rng.normal(size=(n_tokens, d)).astype("float32"),
    )


def train_worker(args):
    import keras

    keras.utils.set_random_seed(0)
    for n, k, e in itertools.product(args.tokens, args.k, args.experts):
        x, y = data(n, args.dim)
        models = make_models(
            keras, n, args.dim, args.hidden, e, k, None, ["ffn", "roofline"]
        )
        for b in args.block_sizes or [None]:
            name = "dropless" if b is None else f"dropless_B{b}"
            models[name] = make_models(
                keras, n, args.dim, args.hidden, e, k, None, ["dropless"], block_size=b
            )["dropless"]
        for cf in args.capacity_factors:
            models[f"cf{cf}"] = make_models(
                keras, n, args.dim, args.hidden, e, k, cf, ["sparse"]
            )["sparse"]
        if e * n <= args.dense_limit:
            models["dense"] = make_models(
                keras, n, args.dim, args.hidden, e, k, None, ["dense"]
            )["dense"]
        times = interleaved_times(models, x, y, args.warmup, args.reps)

        def ratio(a, b):
            return median_ratio(times, a, b)

        row = {"backend": _harness.backend_label(), "N": n, "k": k, "E": e}
        row["ms"] = {name: 1000 * statistics.median(t) for name, t in times.items()}
        row["over_ffn"] = {name: ratio(name, "ffn") for name in times}
        row["over_roofline"] = {name: ratio(name, "roofline") for name in times}
        dropless = "dropless" if "dropless" in times else f"dropless_B{args.block_sizes[0]}"
        row["over_dropless"] = {name: ratio(name, dropless) for name in times}
        report(row)
        del models


def rss_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_worker(args):
    import keras

    n, k, e, cf = args.config
    keras.utils.set_random_seed(0)
    x, y = data(n, args.dim)
    model = make_models(keras, n, args.dim, args.hidden, e, k, cf, [args.model])[args.model]
    for _ in range(2):
        train_step(model, x, y)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter to the current RSS
    base = rss_kib("VmRSS")
    for _ in range(2):
        train_step(model, x, y)
    peak = rss_kib("VmHWM")
    weights = sum(v.numpy().nbytes for v in model.trainable_weights)
    report({
        "backend": _harness.backend_label(), "N": n, "k": k, "E": e, "cf": cf,
        "model": args.model, "step_mib": (peak - base) / 1024,
        "weights_mib": weights / 2**20,
    })


def latency_worker(args):
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    for e in args.experts:
        names = ["ffn", "sparse", "dropless"] + (
            ["dense"] if e * max(args.batches) <= args.dense_limit else []
        )
        models = make_models(keras, None, args.dim, args.hidden, e, args.k[0],
                             args.capacity_factors[0], names)
        for batch in args.batches:
            x = np.random.default_rng(batch).normal(size=(batch, args.dim)).astype("float32")
            times = {name: [] for name in models}
            for rep in range(args.warmup + args.reps):
                for name, m in models.items():
                    start = time.perf_counter()
                    np.asarray(m.predict_on_batch(x))
                    if rep >= args.warmup:
                        times[name].append(time.perf_counter() - start)
            row = {"backend": _harness.backend_label(), "E": e, "k": args.k[0], "batch": batch}
            row.update({f"{name}_ms": 1000 * statistics.median(t) for name, t in times.items()})
            report(row)


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def run_worker(backend, extra):
    env = {}
    if "--memory-worker" in extra:
        # Resident memory follows the live memory only if freed blocks go
        # back to the system: glibc's large blocks (mmap), and no caching
        # allocator in front (TensorFlow's oneDNN CPU allocator and JAX's
        # default CPU allocator keep what they freed).
        env.update(MALLOC_MMAP_THRESHOLD_="65536", TF_ENABLE_ONEDNN_OPTS="0",
                   XLA_PYTHON_CLIENT_ALLOCATOR="platform")
    return _harness.run_worker(HERE, backend, extra, env)


def cell(value, fmt):
    return "—" if value is None else format(value, fmt)


def print_train(rows, args):
    print(f"\nTraining step (fwd+bwd+SGD), d={args.dim} h={args.hidden}; medians of "
          f"{args.reps} interleaved reps; ratios are medians of per-rep ratios\n")
    names = list(dict.fromkeys(n for r in rows for n in r["ms"]))
    print("| backend | N | k | E | " + " | ".join(f"{n} (ms)" for n in names)
          + " | " + " | ".join(f"{n} / FFN" for n in names if n != "ffn")
          + " | dropless / roofline | dense / dropless |")
    print("|---|---:|---:|---:|" + "---:|" * (2 * len(names) + 1))
    for r in rows:
        dropless = next(n for n in r["ms"] if n.startswith("dropless"))
        print(f"| {r['backend']} | {r['N']} | {r['k']} | {r['E']} | "
              + " | ".join(cell(r["ms"].get(n), ".0f") for n in names) + " | "
              + " | ".join(cell(r["over_ffn"].get(n), ".2f") for n in names if n != "ffn")
              + f" | {r['over_roofline'][dropless]:.2f} | "
              + f"{cell(r['over_dropless'].get('dense'), '.1f')} |")


def print_memory(rows):
    print("\nPeak memory a training step adds (MiB; weights not included, "
          "weight gradients included)\n")
    print("| backend | N | k | E | cf | FFN | SparseMoE (cf) | SparseMoE dropless "
          "| dense dispatch | SparseMoE (cf) / FFN | dropless / FFN "
          "| SparseMoE weights (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    keyed = {}
    for r in rows:
        keyed.setdefault((r["backend"], r["N"], r["k"], r["E"], r["cf"]), {})[r["model"]] = r
    for (backend, n, k, e, cf), m in keyed.items():
        ffn, sparse, dropless, dense = (
            m.get(x, {}).get("step_mib") for x in ("ffn", "sparse", "dropless", "dense")
        )
        ratio = sparse / ffn if sparse is not None and ffn else None
        ratio_dropless = dropless / ffn if dropless is not None and ffn else None
        print(f"| {backend} | {n} | {k} | {e} | {cf} | {cell(ffn, '.0f')} | "
              f"{cell(sparse, '.0f')} | {cell(dropless, '.0f')} | {cell(dense, '.0f')} | "
              f"{cell(ratio, '.2f')} | {cell(ratio_dropless, '.2f')} | "
              f"{m['sparse']['weights_mib']:.0f} |")


def print_latency(rows, args):
    print(f"\nInference latency (predict_on_batch), d={args.dim} h={args.hidden} "
          f"k={args.k[0]}; median of {args.reps} calls (ms)\n")
    print("| backend | E | batch | FFN | SparseMoE (cf 2.0) | SparseMoE dropless "
          "| dense dispatch |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['backend']} | {r['E']} | {r['batch']} | {r['ffn_ms']:.2f} | "
              f"{r['sparse_ms']:.2f} | {r['dropless_ms']:.2f} | "
              f"{cell(r.get('dense_ms'), '.2f')} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("train", "memory", "latency"))
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--tokens", type=ints, default=[4096, 16384])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=ints, default=[8, 16, 64, 128])
    parser.add_argument("--k", type=ints, default=[1, 2])
    parser.add_argument("--capacity-factors", type=floats, default=[1.0, 1.25])
    parser.add_argument("--batches", type=ints, default=[1, 256])
    parser.add_argument("--block-sizes", type=ints, default=[],
                        help="train: dropless block sizes to compare (default: "
                             "the per-shape default)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dense-limit", type=int, default=16 * 16384,
                        help="run the dense dispatch only where E * N <= this")
    parser.add_argument("--train-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--latency-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--config", type=json.loads, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train_worker:
        return train_worker(args)
    if args.latency_worker:
        return latency_worker(args)
    if args.memory_worker:
        return memory_worker(args)

    common = sys.argv[2:]
    rows = []
    start = time.time()
    for backend in args.backends.split(","):
        if args.mode == "train":
            rows += run_worker(backend, ["train", "--train-worker", *common])
        elif args.mode == "latency":
            rows += run_worker(backend, ["latency", "--latency-worker", *common])
        else:
            ffn = {}  # the FFN depends on N and k only: measured once
            for n, k, e, cf in grid(args):
                names = ["sparse", "dropless"] + (
                    ["dense"] if e * n <= args.dense_limit else []
                )
                if (n, k) not in ffn:
                    names.insert(0, "ffn")
                for name in names:
                    found = run_worker(backend, [
                        "memory", "--memory-worker", *common, "--model", name,
                        "--config", json.dumps([n, k, e, cf]),
                    ])
                    if name == "ffn":
                        ffn[(n, k)] = found[0]
                    rows += found
                if "ffn" not in names:
                    rows.append(dict(ffn[(n, k)], E=e, cf=cf))
        print(f"[{backend} done after {time.time() - start:.0f} s]", file=sys.stderr)
    {"train": lambda: print_train(rows, args), "memory": lambda: print_memory(rows),
     "latency": lambda: print_latency(rows, args)}[args.mode]()


if __name__ == "__main__":
    main()
