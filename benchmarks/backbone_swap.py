"""Train-step time of a keras-hub MixtralBackbone before and after
`keras_moe.interop.replace_moe_blocks` (the same function: keras-hub runs
every expert on every token and masks; ours runs the dropless sparse blocks).

    KERAS_BACKEND=jax python benchmarks/backbone_swap.py
    KERAS_BACKEND=tensorflow python benchmarks/backbone_swap.py --experts 8,32

Prints one row per expert count: the median train-step time of each model
over `--reps` steps (after `--warmup` compiled steps), measured side by
side in one process, and their ratio. Needs keras-hub
(`pip install --no-deps keras-hub==0.32.0`). Run it on an idle machine.
"""

import argparse
import time

import keras
import numpy as np


def build(num_experts, args):
    import keras_hub

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.MixtralBackbone(
        vocabulary_size=args.vocab,
        num_layers=args.layers,
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=args.dim,
        intermediate_dim=args.hidden,
        num_experts=num_experts,
        top_k=2,
    )
    return backbone


def model_of(backbone, args):
    """An LM-style train step: backbone -> linear head, MSE on random
    targets (the head is the same in both models)."""
    ids = keras.Input((args.seq,), dtype="int32", name="token_ids")
    mask = keras.Input((args.seq,), dtype="int32", name="padding_mask")
    hidden = backbone({"token_ids": ids, "padding_mask": mask})
    model = keras.Model([ids, mask], hidden)
    model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse")
    return model


def step_time(model, data, target, args):
    for _ in range(args.warmup):
        model.train_on_batch(data, target)
    times = []
    for _ in range(args.reps):
        start = time.perf_counter()
        model.train_on_batch(data, target)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", default="8,32")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    from keras_moe.interop import replace_moe_blocks

    rng = np.random.default_rng(0)
    data = [
        rng.integers(0, args.vocab, (args.batch, args.seq)).astype("int32"),
        np.ones((args.batch, args.seq), "int32"),
    ]
    target = rng.normal(size=(args.batch, args.seq, args.dim)).astype("float32")
    print(f"backend={keras.backend.backend()} layers={args.layers} d={args.dim} "
          f"h={args.hidden} B={args.batch} T={args.seq} top-2, median of "
          f"{args.reps} train steps")
    print("| E | keras-hub (ms) | keras_moe dropless (ms) | keras-hub / keras_moe "
          "| max abs diff |")
    print("|---|---|---|---|---|")
    for e in [int(v) for v in args.experts.split(",")]:
        backbone = build(e, args)
        before = model_of(backbone, args)
        hub = step_time(before, data, target, args)
        snapshot = before.predict(data, verbose=0)
        replace_moe_blocks(backbone)
        after = model_of(backbone, args)
        diff = float(np.max(np.abs(after.predict(data, verbose=0) - snapshot)))
        ours = step_time(after, data, target, args)
        print(f"| {e} | {hub * 1e3:.0f} | {ours * 1e3:.0f} | {hub / ours:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
