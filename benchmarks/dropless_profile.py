"""Where a dropless training step spends its time, part by part.

A profile by ablation: the dropless `SparseMoE` step is rebuilt from its
parts, adding one part at a time, and every variant is timed side by side
with the dense FFN of the same active parameters in one process (the
variants interleaved rep by rep, each timed step right after an untimed
step of the same model). The difference between two consecutive rows is
the cost of the part the second one adds. Each variant is a one-layer
Keras model trained with SGD on an MSE loss (`train_on_batch`), compiled
with XLA on TensorFlow and JAX, eager on torch, exactly as in
`benchmarks/moe_speed.py train`.

Variants (each includes the ones above it):

- `ffn`: `Dense(k h, gelu) -> Dense(d)` on the `N` tokens: the limit.
- `ffn_rows`: the same FLOPs laid out as the dropless path lays them out,
  one `(R, d) x (d, h)` matmul pair over the `R` rows of the block plan
  (`N k` pairs plus the padding), with a single weight set and no routing.
  The difference to `ffn` is the cost of the padding rows and of the
  narrower matmuls.
- `router`: `TopKRouter` logits, top-k and its losses; output scaled by the
  combine weights so that the backward pass runs through it.
- `plan`: plus `make_block_plan` (a sort of the `N k` pairs, scatters).
- `gathers`: plus `block_dispatch` and `block_combine` (tokens to rows and
  back, with their custom gradients) around identity experts.
- `blocks_shared`: plus the block matmuls with ONE weight set broadcast to
  every block (`einsum("nbd,dh->nbh")`): the dropless layout without the
  per-block copy of the expert weights.
- `blocks`: the same with each block's own expert weights
  (`Experts.call_blocks`, which copies `d x h` weights per block).
- `dropless`: the `SparseMoE(capacity_factor=None)` layer itself.

Usage:
    python benchmarks/dropless_profile.py --tokens 4096 --experts 8,64 --k 2
"""

import argparse
import itertools
import os
import statistics
import sys

import _harness
from _harness import interleaved_times, median_ratio, report, run_worker

HERE = os.path.abspath(__file__)
VARIANTS = (
    "ffn", "ffn_rows", "router", "plan", "gathers", "blocks_shared", "blocks",
    "dropless",
)


def ints(text):
    return [int(v) for v in text.split(",") if v]


def make_variant(keras, name, n, d, h, e, k):
    from keras import ops

    from keras_moe import ops as moe_ops
    from keras_moe.layers import Experts, SparseMoE, TopKRouter

    block_size = moe_ops.default_block_size(n * k, e)
    num_rows = moe_ops.row_budget(n * k, e, block_size)

    class Part(keras.layers.Layer):
        def build(self, input_shape):
            if name == "ffn_rows":
                self.w1 = self.add_weight(shape=(d, h), initializer="glorot_uniform")
                self.w2 = self.add_weight(shape=(h, d), initializer="glorot_uniform")
                return
            self.router = TopKRouter(e, k=k)
            self.router.build((None, d))
            if name == "blocks_shared":
                self.w1 = self.add_weight(shape=(d, h), initializer="glorot_uniform")
                self.w2 = self.add_weight(shape=(h, d), initializer="glorot_uniform")
            if name == "blocks":
                self.experts = Experts(e, h)
                self.experts.build((e, None, d))

        def call(self, x, training=None):
            if name == "ffn_rows":
                # R rows: the tokens k times, then padding rows (zeros).
                rows = ops.concatenate(
                    [x] * k + [ops.zeros((num_rows - n * k, d), x.dtype)], axis=0
                )
                y = ops.matmul(keras.activations.gelu(ops.matmul(rows, self.w1)), self.w2)
                return sum(y[j * n:(j + 1) * n] for j in range(k))
            routing = self.router(x, training=training)
            weights = routing["combine_weights"]
            if name == "router":
                return x * ops.sum(weights, axis=-1, keepdims=True)
            plan = moe_ops.make_block_plan(routing["expert_index"], e, block_size)
            if name == "plan":
                used = ops.cast(ops.sum(plan["row_pair"]) + ops.sum(plan["block_expert"]), x.dtype)
                return x * ops.sum(weights, axis=-1, keepdims=True) + 0.0 * used

            def identity(rows, block_expert, b):
                return rows

            def shared(rows, block_expert, b):
                blocks = ops.reshape(rows, (-1, b, d))
                hidden = keras.activations.gelu(ops.einsum("nbd,dh->nbh", blocks, self.w1))
                return ops.reshape(ops.einsum("nbh,ho->nbo", hidden, self.w2), (-1, d))

            experts = {"gathers": identity, "blocks_shared": shared,
                       "blocks": lambda r, be, b: self.experts.call_blocks(r, be, b)}[name]
            return moe_ops.run_blocks(x, plan, weights, experts, True)

    if name == "ffn":
        layer = keras.Sequential(
            [keras.layers.Dense(k * h, activation="gelu"), keras.layers.Dense(d)]
        )
    elif name == "dropless":
        layer = SparseMoE(e, h, k=k, capacity_factor=None, eval_capacity_factor=None)
    else:
        layer = Part()
    inputs = keras.Input((d,), batch_size=n)
    model = keras.Model(inputs, layer(inputs))
    model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse",
                  jit_compile=_harness.jit_compile())
    return model, block_size, num_rows


def worker(args):
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    for n, k, e in itertools.product(args.tokens, args.k, args.experts):
        rng = np.random.default_rng(0)
        x = rng.normal(size=(n, args.dim)).astype("float32")
        y = rng.normal(size=(n, args.dim)).astype("float32")
        models = {}
        for name in args.variants:
            models[name], block_size, num_rows = make_variant(
                keras, name, n, args.dim, args.hidden, e, k
            )
        times = interleaved_times(models, x, y, args.warmup, args.reps)
        report({"backend": _harness.backend_label(), "N": n, "k": k, "E": e,
               "B": block_size, "R": num_rows,
               "ms": {v: 1000 * statistics.median(t) for v, t in times.items()},
               "over_ffn": {v: median_ratio(times, v, "ffn") for v in times}})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument("--tokens", type=ints, default=[4096])
    parser.add_argument("--experts", type=ints, default=[8, 64])
    parser.add_argument("--k", type=ints, default=[2])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.variants = args.variants.split(",")
    if "ffn" not in args.variants:
        args.variants.insert(0, "ffn")
    if args.worker:
        return worker(args)

    rows = [row for backend in args.backends.split(",")
            for row in run_worker(HERE, backend, ["--worker", *sys.argv[1:]])]

    print(f"\nDropless training step by parts, d={args.dim} h={args.hidden}; "
          f"medians of {args.reps} interleaved reps (ms), and / FFN (median of "
          "per-rep ratios)\n")
    names = args.variants
    print("| backend | N | k | E | B | R | " + " | ".join(names) + " |")
    print("|---|---:|---:|---:|---:|---:|" + "---:|" * len(names))
    for r in rows:
        cells = [f"{r['ms'][v]:.0f} ({r['over_ffn'][v]:.2f})" for v in names]
        print(f"| {r['backend']} | {r['N']} | {r['k']} | {r['E']} | {r['B']} | "
              f"{r['R']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
