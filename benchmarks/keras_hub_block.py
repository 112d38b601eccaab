"""Train-step time of keras-hub's Mixtral MoE block against the dropless
`SparseMoE` that computes the same function (`keras_moe.interop.from_keras_hub`,
the same weights).

keras-hub 0.32's `MixtralSparseMoeBlock` runs every expert on every token
and masks (`E / k` times the expert FLOPs); the port runs the `k` chosen
experts of each token (expert-sorted blocks). Issue 21's target: keras-hub /
ours >= `E / (2k)`.

    python benchmarks/keras_hub_block.py --experts 8,16,64

One process per backend; in each, the two models are trained side by side
(interleaved rep by rep, each timed step right after an untimed step of
the same model), SGD on an MSE loss, XLA-compiled on TensorFlow and JAX,
eager on torch. Also prints the largest difference of their predictions.
Needs keras-hub (`pip install --no-deps keras-hub==0.32.0`). Run it on an
idle machine.
"""

import argparse
import os
import statistics
import sys

import _harness
from _harness import interleaved_times, median_ratio, report, run_worker

HERE = os.path.abspath(__file__)


def worker(args):
    import keras
    import numpy as np
    from keras_hub.src.models.mixtral import mixtral_decoder

    from keras_moe.interop import from_keras_hub

    def model_of(layer, first_output):
        inputs = keras.Input((args.seq, args.dim), batch_size=args.batch)
        outputs = layer(inputs)
        if first_output:
            outputs = outputs[0]
        model = keras.Model(inputs, outputs)
        model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse",
                      jit_compile=_harness.jit_compile())
        return model

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, args.seq, args.dim)).astype("float32")
    y = rng.normal(size=(args.batch, args.seq, args.dim)).astype("float32")
    for e in args.experts:
        keras.utils.set_random_seed(0)
        block = mixtral_decoder.MixtralSparseMoeBlock(
            hidden_dim=args.dim, intermediate_dim=args.hidden, num_experts=e,
            top_k=2, router_jitter_noise=0.0,
        )
        block.build((None, args.seq, args.dim))
        models = {"keras_hub": model_of(block, True),
                  "keras_moe": model_of(from_keras_hub(block), False)}
        diff = float(np.max(np.abs(
            np.asarray(models["keras_hub"].predict_on_batch(x))
            - np.asarray(models["keras_moe"].predict_on_batch(x)))))
        times = interleaved_times(models, x, y, args.warmup, args.reps)
        report({
            "backend": _harness.backend_label(), "E": e,
            "hub_ms": 1000 * statistics.median(times["keras_hub"]),
            "ours_ms": 1000 * statistics.median(times["keras_moe"]),
            "ratio": median_ratio(times, "keras_hub", "keras_moe"), "diff": diff})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument("--experts", type=lambda t: [int(v) for v in t.split(",")],
                        default=[8, 16, 64])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    rows = [row for backend in args.backends.split(",")
            for row in run_worker(HERE, backend, ["--worker", *sys.argv[1:]])]
    print(f"\nMixtral MoE block train step, B={args.batch} T={args.seq} d={args.dim} "
          f"h={args.hidden} top-2; medians of {args.reps} interleaved reps\n")
    print("| backend | E | keras-hub (ms) | keras_moe dropless (ms) | keras-hub / "
          "keras_moe | target E/(2k) | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['backend']} | {r['E']} | {r['hub_ms']:.0f} | {r['ours_ms']:.0f} | "
              f"{r['ratio']:.1f} | {r['E'] / 4:g} | {r['diff']:.1e} |")


if __name__ == "__main__":
    main()
