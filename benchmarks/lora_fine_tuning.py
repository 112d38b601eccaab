"""LoRA fine-tuning of a ported keras-hub MoE backbone against full
fine-tuning: trainable parameters, train-step time (side by side) and the
loss reached on a toy task.

    KERAS_BACKEND=jax python benchmarks/lora_fine_tuning.py --seeds 0,1,2

A randomly initialised `MixtralBackbone` (the "pretrained" model) gets its
MoE blocks swapped by `keras_moe.interop.replace_moe_blocks`, and a
language-model head. Two copies with the same weights are fine-tuned on a
toy next-token task (each token is followed by `(3 t + 1) mod V`, mixed in
random sequences): one in full, one with keras-hub's
`Backbone.enable_lora(rank, target_layer_names=...)` (default: the expert
banks, `"experts"`; the head trains in both). The copies take turns step
by step (`_harness.interleaved_times`), so the ratio of their median step
times is measured side by side. One row per seed; needs keras-hub
(`pip install --no-deps keras-hub==0.32.0`). Run it on an idle machine
(`cpu -x` here).
"""

import argparse
import os
import statistics
import sys

import keras
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import interleaved_times  # noqa: E402


def backbone_of(args, seed):
    import keras_hub

    keras.utils.set_random_seed(seed)
    return keras_hub.models.MixtralBackbone(
        vocabulary_size=args.vocab,
        num_layers=args.layers,
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=args.dim,
        intermediate_dim=args.hidden,
        num_experts=args.experts,
        top_k=2,
        sliding_window=args.seq,
    )


def build(args, seed):
    """`(model, backbone)`: the swapped backbone and an LM head."""
    from keras_moe.interop import replace_moe_blocks

    backbone = backbone_of(args, seed)
    ids = keras.Input((args.seq,), dtype="int32", name="token_ids")
    mask = keras.Input((args.seq,), dtype="int32", name="padding_mask")
    hidden = backbone({"token_ids": ids, "padding_mask": mask})
    logits = keras.layers.Dense(args.vocab, name="lm_head")(hidden)
    model = keras.Model([ids, mask], logits)
    replace_moe_blocks(backbone)
    return model, backbone


def toy_data(args, seed, batches):
    """`batches` batches of (token ids, mask) and next-token targets: each
    sequence starts at a random token and follows `t -> (3 t + 1) mod V`
    with 20% of the steps replaced by a random token."""
    rng = np.random.default_rng(1000 + seed)
    n = args.batch * batches
    tokens = np.zeros((n, args.seq + 1), "int64")
    tokens[:, 0] = rng.integers(0, args.vocab, n)
    for t in range(1, args.seq + 1):
        follow = (3 * tokens[:, t - 1] + 1) % args.vocab
        noise = rng.integers(0, args.vocab, n)
        tokens[:, t] = np.where(rng.random(n) < 0.2, noise, follow)
    tokens = tokens.astype("int32")
    x = [tokens[:, :-1], np.ones((n, args.seq), "int32")]
    return x, tokens[:, 1:]


def count(weights):
    return int(sum(np.prod(w.shape) for w in weights))


def run_seed(args, seed):
    full, _ = build(args, seed)
    lora, lora_backbone = build(args, seed)
    lora.set_weights(full.get_weights())  # the same "pretrained" model
    lora_backbone.enable_lora(args.rank, target_layer_names=args.targets.split(","))
    for model in (full, lora):
        model.compile(
            optimizer=keras.optimizers.Adam(args.learning_rate),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    (ids, mask), targets = toy_data(args, seed, 1)
    x = [ids, mask]
    times = interleaved_times(
        {"full": full, "lora": lora}, x, targets, args.warmup, args.reps
    )
    ratios = [b / a for a, b in zip(times["full"], times["lora"])]
    train_x, train_y = toy_data(args, seed, args.train_batches)
    held_x, held_y = toy_data(args, seed + 7919, 2)
    losses = {}
    for name, model in (("full", full), ("lora", lora)):
        model.fit(train_x, train_y, batch_size=args.batch, epochs=args.epochs,
                  verbose=0)
        losses[name] = float(model.evaluate(held_x, held_y, batch_size=args.batch,
                                            verbose=0))
    return {
        "seed": seed,
        "full_params": count(full.trainable_weights),
        "lora_params": count(lora.trainable_weights),
        "lora_backbone_params": count(lora_backbone.trainable_weights),
        "full_ms": statistics.median(times["full"]) * 1e3,
        "lora_ms": statistics.median(times["lora"]) * 1e3,
        "ratio": statistics.median(ratios),
        "full_loss": losses["full"],
        "lora_loss": losses["lora"],
    }


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="experts",
                        help="comma-separated layer names for enable_lora")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--train-batches", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    print(f"backend={keras.backend.backend()} MixtralBackbone layers={args.layers} "
          f"d={args.dim} h={args.hidden} E={args.experts} top-2 V={args.vocab} "
          f"B={args.batch} T={args.seq}; LoRA rank {args.rank} on {args.targets}; "
          f"median of {args.reps} interleaved train steps")
    print("| seed | trainable, full | trainable, LoRA (backbone) | full step (ms) "
          "| LoRA step (ms) | LoRA / full | held-out loss, full | held-out loss, LoRA |")
    print("|---|---|---|---|---|---|---|---|")
    rows = [run_seed(args, int(seed)) for seed in args.seeds.split(",")]
    for r in rows:
        print(f"| {r['seed']} | {r['full_params']:,} | {r['lora_params']:,} "
              f"({r['lora_backbone_params']:,}) | {r['full_ms']:.1f} | "
              f"{r['lora_ms']:.1f} | {r['ratio']:.3f} | {r['full_loss']:.3f} | "
              f"{r['lora_loss']:.3f} |")
    ratios = [r["ratio"] for r in rows]
    print(f"LoRA / full step time: {min(ratios):.3f} - {max(ratios):.3f} over "
          f"{len(rows)} seeds")
    return rows


if __name__ == "__main__":
    main()
