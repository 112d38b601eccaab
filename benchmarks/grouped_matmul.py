#!/usr/bin/env python
"""The grouped-matmul kernels against the block path and one dense matmul.

    python benchmarks/grouped_matmul.py [--backends tensorflow,jax,torch]
        [--tokens 4096,16384] [--k 1,2] [--groups 8,16,64]
        [--in-dim 256] [--out-dim 1024] [--reps 5] [--fallback-groups 8]

For `N` tokens routed to `k` of `G` experts (uniformly at random, `k`
distinct experts per token), the `P = N k` (token, expert) rows of width
`K` (`--in-dim`) are multiplied by their expert's `K x N_out` matrix
(`--out-dim`), forward and backward (the gradients of the rows and of the
weights for a random output gradient), three ways:

- `grouped`: each kernel of `keras_moe.ops.grouped.backend_kernels()`,
  called directly on the `P` expert-sorted rows (torch: `grouped_mm` and
  `loop`; TensorFlow: `split`; JAX: `ragged_dot`, a dense fallback on CPU,
  which is why the facade does not use it there, so it is timed only up
  to `G = --fallback-groups`);
- `blocks`: the matmul part of the portable dropless path, as
  `Experts.call_blocks` runs it: the rows of a `make_block_plan` layout
  (`R >= P` rows in blocks of `B`, the default block size), the weights
  gathered per block (`gather_experts`) and one batched `einsum`;
- `dense`: one `(P, K) @ (K, N_out)` matmul, the same FLOPs as the grouped
  kernels (the floor).

Each is one compiled function per backend, as a training step would run
it: torch eager; TensorFlow in a `tf.function` without XLA (where its
kernel runs), and the block path and the dense matmul also under XLA
(`jit_compile=True`, where the kernel cannot run); JAX `jax.jit`. The
methods of one configuration are timed interleaved, rep by rep, each timed
call right after an untimed call of the same method, and the table gives
each method's median time over `--reps` reps as a ratio to the dense
matmul's median in the same compilation mode (and the dense time in ms).

Each backend runs in its own subprocess (`_harness.run_worker`). Only the
ratios of one run mean anything on a shared machine; time it alone
(`cpu -x`).
"""

import argparse
import itertools
import os
import statistics
import sys
import time

import _harness

BACKENDS = ("tensorflow", "jax", "torch")
HERE = os.path.abspath(__file__)


def ints(text):
    return [int(v) for v in text.split(",") if v]


# ---------------------------------------------------------------------------
# Worker side (runs under one backend)
# ---------------------------------------------------------------------------


def routed_rows(num_tokens, k, num_groups, in_dim, seed=0):
    """NumPy data of one configuration: the tokens, their routing, the rows
    sorted by expert and the group sizes."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = rng.normal(size=(num_tokens, in_dim)).astype("float32")
    logits = rng.random((num_tokens, num_groups))
    expert_index = np.argsort(logits, axis=1)[:, :k].astype("int32")
    flat = expert_index.reshape(-1)
    order = np.argsort(flat, kind="stable")
    sorted_rows = tokens[order // k]
    sizes = np.bincount(flat, minlength=num_groups).astype("int32")
    return tokens, expert_index, sorted_rows, sizes


def gradient_step(backend, function, mode):
    """`step(x, w, c)`: the gradients of `function(x, w)` for the output
    gradient `c`, compiled as `mode` says, waiting for the result."""
    if backend == "torch":
        import torch

        def step(x, w, c):
            y = function(x, w)
            dx, dw = torch.autograd.grad(y, (x, w), c)
            return float(dx.sum() + dw.sum())

        return step
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=mode == "xla")
        def compiled(x, w, c):
            with tf.GradientTape() as tape:
                tape.watch([x, w])
                y = function(x, w)
            dx, dw = tape.gradient(y, [x, w], output_gradients=c)
            return tf.reduce_sum(dx) + tf.reduce_sum(dw)

        return lambda x, w, c: float(compiled(x, w, c))
    import jax

    def vjp(x, w, c):
        _, pullback = jax.vjp(function, x, w)
        dx, dw = pullback(c)
        return dx.sum() + dw.sum()

    compiled = jax.jit(vjp)
    return lambda x, w, c: float(compiled(x, w, c))


def leaf(backend, array):
    """A backend tensor that gradients are taken of."""
    import keras

    tensor = keras.ops.convert_to_tensor(array)
    if backend == "torch":
        tensor = tensor.detach().requires_grad_(True)
    return tensor


def methods(backend, num_tokens, k, num_groups, in_dim, out_dim, fallback_groups):
    """`{(mode, name): (step, x, w, c)}` for one configuration."""
    import keras
    import numpy as np

    from keras_moe import ops as moe_ops
    from keras_moe.ops import grouped

    tokens, expert_index, sorted_rows, sizes = routed_rows(
        num_tokens, k, num_groups, in_dim
    )
    rng = np.random.default_rng(1)
    weights = (rng.normal(size=(num_groups, in_dim, out_dim)) / in_dim**0.5).astype(
        "float32"
    )
    pairs = num_tokens * k
    to_tensor = keras.ops.convert_to_tensor

    plan = moe_ops.make_block_plan(to_tensor(expert_index), num_groups)
    block_size = plan["block_size"]
    block_expert = plan["block_expert"]
    block_rows = keras.ops.convert_to_numpy(
        moe_ops.block_dispatch(to_tensor(tokens), plan, custom_gradient=False)
    )
    group_sizes = to_tensor(sizes)

    def blocks(x, w):
        x = keras.ops.reshape(x, (-1, block_size, in_dim))
        w = moe_ops.gather_experts(w, block_expert, num_groups, block_size)
        return keras.ops.einsum("nbd,ndh->nbh", x, w)

    def dense(x, w):
        return keras.ops.matmul(x, w)

    def cotangent(rows):
        return to_tensor(rng.normal(size=(rows, out_dim)).astype("float32"))

    modes = {"tensorflow": ("graph", "xla"), "jax": ("jit",), "torch": ("eager",)}
    found = {}
    # A kernel the facade does not use here (JAX on CPU: ragged_dot's dense
    # fallback, G times the FLOPs) is timed for few groups only.
    kernels = grouped.backend_kernels()
    if not grouped.grouped_kernel_available() and num_groups > fallback_groups:
        kernels = {}
    for mode in modes[backend]:
        if mode != "xla":  # the kernels cannot run under XLA
            for name, kernel in kernels.items():
                found[mode, f"grouped:{name}"] = (
                    gradient_step(
                        backend,
                        lambda x, w, kernel=kernel: kernel(x, w, group_sizes),
                        mode,
                    ),
                    leaf(backend, sorted_rows),
                    leaf(backend, weights),
                    cotangent(pairs),
                )
        found[mode, "blocks"] = (
            gradient_step(backend, blocks, mode),
            leaf(backend, block_rows),
            leaf(backend, weights),
            keras.ops.reshape(cotangent(len(block_rows)), (-1, block_size, out_dim)),
        )
        found[mode, "dense"] = (
            gradient_step(backend, dense, mode),
            leaf(backend, sorted_rows),
            leaf(backend, weights[0]),
            cotangent(pairs),
        )
    return found, block_size, len(block_rows)


def worker(args):
    for num_tokens, k, num_groups in itertools.product(args.tokens, args.k, args.groups):
        found, block_size, block_rows = methods(
            args.backend, num_tokens, k, num_groups, args.in_dim, args.out_dim,
            args.fallback_groups,
        )
        times = {key: [] for key in found}
        for rep in range(1 + args.reps):  # the first round compiles
            for key, (step, x, w, c) in found.items():
                step(x, w, c)
                start = time.perf_counter()
                step(x, w, c)
                if rep:
                    times[key].append(time.perf_counter() - start)
        for mode in sorted({mode for mode, _ in found}):
            dense = statistics.median(times[mode, "dense"])
            ratios = {
                name: statistics.median(times[mode, name]) / dense
                for m, name in found
                if m == mode and name != "dense"
            }
            _harness.report(
                dict(
                    backend=args.backend, mode=mode, tokens=num_tokens, k=k,
                    groups=num_groups, block_size=block_size,
                    block_rows=block_rows, dense_ms=1000 * dense, ratios=ratios,
                )
            )


# ---------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------


def table(rows):
    """One line per backend, mode, configuration and kernel (a mode without
    a kernel, XLA, has one line with `-`)."""
    print(
        "| backend | mode | N | k | G | B | rows P / R | dense ms | "
        "blocks / dense | kernel | kernel / dense |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for row in rows:
        ratios = dict(row["ratios"])
        blocks = ratios.pop("blocks")
        kernels = sorted(ratios.items()) or [("-", None)]
        for name, ratio in kernels:
            print(
                f"| {row['backend']} | {row['mode']} | {row['tokens']} | {row['k']} | "
                f"{row['groups']} | {row['block_size']} | "
                f"{row['tokens'] * row['k']} / {row['block_rows']} | "
                f"{row['dense_ms']:.1f} | {blocks:.2f} | "
                f"{name.replace('grouped:', '')} | "
                + ("-" if ratio is None else f"{ratio:.2f}")
                + " |"
            )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--tokens", type=ints, default=[4096, 16384])
    parser.add_argument("--k", type=ints, default=[1, 2])
    parser.add_argument("--groups", type=ints, default=[8, 16, 64])
    parser.add_argument("--in-dim", type=int, default=256)
    parser.add_argument("--out-dim", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--fallback-groups", type=int, default=8,
        help="largest G at which to time a kernel the facade does not use "
        "on this device (JAX's ragged_dot on CPU)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    grid = [
        "--tokens", ",".join(map(str, args.tokens)),
        "--k", ",".join(map(str, args.k)),
        "--groups", ",".join(map(str, args.groups)),
        "--in-dim", str(args.in_dim), "--out-dim", str(args.out_dim),
        "--reps", str(args.reps), "--fallback-groups", str(args.fallback_groups),
    ]
    rows = []
    for backend in args.backends.split(","):
        rows += _harness.run_worker(
            HERE, backend, ["--worker", "--backend", backend, *grid]
        )
        print(f"{backend}: done", file=sys.stderr, flush=True)
    table(rows)


if __name__ == "__main__":
    main()
