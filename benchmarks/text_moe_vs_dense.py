#!/usr/bin/env python
"""A byte-level GPT on two kinds of text: dense FFN against SparseMoE.

    python benchmarks/text_moe_vs_dense.py                       # quality, 3 seeds
    python benchmarks/text_moe_vs_dense.py --seeds 0 --models dense,moe_top1
    python benchmarks/text_moe_vs_dense.py --timing              # step-time ratios

    # one process per model and seed (each under 30 min), then the reports:
    for seed in 0 1 2; do for model in dense moe_top1 moe_top2 dense_time; do
      python benchmarks/text_moe_vs_dense.py --models $model --seeds $seed \
          --dense-time-ratio 1.37 --output-dir runs/text; done; done
    python benchmarks/text_moe_vs_dense.py --collect --output-dir runs/text

The runner behind the numbers of docs/language_model.md (the example is
`examples/text_moe_gpt.py`; the two build the same model, and
`tests/test_examples.py` checks that their parameter counts agree).

**Data.** Two domains, each a `name=PATH` of UTF-8 text (default
Shakespeare and Python standard-library source, `../shared/data/text/`).
The last `--val-fraction` of each training file is held out (validation,
and the test text unless `--test-text name=PATH` gives another file).
Tokens are bytes (a vocabulary of 256). Every training batch is half
Shakespeare, half Python: `batch / 2` windows of `context + 1` bytes at
random offsets of each domain, drawn from a generator seeded by the
seed and the step, so every model of a seed sees the same tokens.

**Models** (all: `--blocks` pre-norm decoder blocks of width `--dim`,
`--heads` heads of causal self-attention, learned absolute positions, a
final norm and a 256-way output layer; they differ in the feed-forward
layer of each block):

- `dense`: `Dense(H, gelu) -> Dense(d)`, `H = --hidden` (4d by default).
- `moe_top1`: `SparseMoE`, `--experts` (E) experts of width `H`, top-1
  (Switch): the active parameters and FLOPs per token of `dense`, plus the
  router's `d x E`.
- `moe_top2`: `2E` experts of width `H / 2`, top-2: the same active
  compute, finer experts.
- `dense_time`: `dense` trained for as many steps as fit in `moe_top1`'s
  training time (equal wall time): `--steps` times the step-time ratio
  moe_top1 / dense, measured side by side at the start of the run (7
  interleaved reps on one batch) or given with `--dense-time-ratio`.

The MoE layers are dropless in training and inference
(`capacity_factor=None`): a token's output never depends on another token,
so the model is causal (`tests/layers/test_causal.py`). They are built
with `SparseMoE(causal=True)`, so `--capacity-factor C` (training with a
capacity) places pairs in token-major order: a token's kept/dropped status
depends only on earlier tokens. Expert choice and Soft
MoE are not offered: they are not causal (an expert picks its tokens
among the whole sequence, the future included; a soft slot averages
every token of the sequence).

**Output.** One line per run,
`RESULT model=<name> seed=<n> bits_shakespeare=<v> bits_python=<v>
train_seconds=<v>` (held-out bits per byte of each domain), a Markdown
table of means and ranges over seeds, the loss curves (train loss and
per-domain validation bits every `--eval-every` steps; `curves.json` and
`loss_curves.png` in `--output-dir`), and the domain x expert load of every
MoE block on the test text (`domain_expert.txt`, PNG heat maps).

**Timing** (`--timing`): one train step of each model on the same batch,
interleaved rep by rep, medians of `--reps` reps and the median per-rep
ratio to `dense` (run it under `cpu -x`: alone on the machine), for
dropless routing and every `--timing-capacity-factors` value.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import interleaved_times, median_ratio  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = os.path.join(ROOT, "..", "shared", "data", "text")
DEFAULT_TRAIN = (
    f"shakespeare={os.path.join(TEXT, 'shakespeare_train.txt')}",
    f"python={os.path.join(TEXT, 'python_stdlib_train.txt')}",
)
MODELS = ("dense", "moe_top1", "moe_top2", "dense_time")
VOCAB = 256  # bytes


# ---------------------------------------------------------------------------
# Data: bytes of each domain, batches of windows, evaluation windows
# ---------------------------------------------------------------------------


def domain_paths(specs, flag):
    """`["name=PATH", ...]` as an ordered `{name: path}`."""
    paths = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"{flag} takes name=PATH. Received: {spec!r}")
        if name in paths:
            raise SystemExit(f"{flag}: domain {name!r} given twice")
        paths[name] = path
    return paths


def read_bytes(path, flag):
    if not os.path.exists(path):
        raise SystemExit(
            f"{flag} {path}: no such file. The default text files are in "
            "../shared/data/text/ relative to the project root "
            "(../shared/data/README.md, section 5).")
    with open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8)


def load_domains(train_specs, test_specs=(), val_fraction=0.1, max_bytes=None):
    """`{name: {"train", "val", "test"}}` uint8 arrays. `val` is the last
    `val_fraction` of the training file; `test` is the `--test-text` file of
    that domain, or `val`. `max_bytes` keeps the first bytes of each part
    (smoke runs)."""
    train_paths = domain_paths(train_specs, "--train-text")
    test_paths = domain_paths(test_specs, "--test-text")
    unknown = sorted(set(test_paths) - set(train_paths))
    if unknown:
        raise SystemExit(f"--test-text domains {unknown} have no --train-text")
    domains = {}
    for name, path in train_paths.items():
        data = read_bytes(path, "--train-text")
        cut = int(len(data) * (1.0 - val_fraction))
        parts = {"train": data[:cut], "val": data[cut:]}
        parts["test"] = (read_bytes(test_paths[name], "--test-text")
                         if name in test_paths else parts["val"])
        if max_bytes:
            parts = {k: v[:max_bytes] for k, v in parts.items()}
        domains[name] = parts
    return domains


def batch_windows(texts, batch_size, context, seed, step):
    """`(x, y, domain)` of training step `step`: `batch_size / D` windows
    of `context + 1` bytes at random offsets of each of the `D` texts
    (x the first `context` bytes, y the next-byte targets)."""
    rng = np.random.default_rng((seed, step))
    per = batch_size // len(texts)
    rows, domain = [], []
    for d, text in enumerate(texts):
        starts = rng.integers(0, len(text) - context - 1, size=per)
        rows.append(text[starts[:, None] + np.arange(context + 1)])
        domain += [d] * per
    rows = np.concatenate(rows).astype("int32")
    return rows[:, :-1], rows[:, 1:], np.asarray(domain, "int32")


def eval_windows(text, context, limit=None):
    """Non-overlapping windows of a text: `x` `(n, context)` and the
    next-byte targets `y`; every byte after the first is scored once
    (with 0 to context - 1 bytes of context)."""
    n = (len(text) - 1) // context
    if limit is not None:
        n = min(n, limit)
    idx = np.arange(n)[:, None] * context + np.arange(context)
    return text[idx].astype("int32"), text[idx + 1].astype("int32")


def make_stream(keras, texts, batch_size, context, seed, steps_per_epoch, first_step=0):
    """A `keras.utils.PyDataset` of training batches; batch `i` of epoch `t`
    is step `first_step + t * steps_per_epoch + i` of `batch_windows`."""

    class Stream(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.epoch = 0

        def __len__(self):
            return steps_per_epoch

        def on_epoch_end(self):
            self.epoch += 1

        def __getitem__(self, i):
            step = first_step + self.epoch * steps_per_epoch + i
            x, y, _ = batch_windows(texts, batch_size, context, seed, step)
            return x, y

    return Stream()


# ---------------------------------------------------------------------------
# The model (the example builds the same one)
# ---------------------------------------------------------------------------


def position_embedding_class(keras):
    """The example's `PositionEmbedding`: adds a learned `(context, d)`
    table to a `(B, T, d)` input, `T <= context`."""
    from keras import ops

    @keras.saving.register_keras_serializable(package="keras_moe_examples")
    class PositionEmbedding(keras.layers.Layer):
        def __init__(self, max_length, **kwargs):
            super().__init__(**kwargs)
            self.max_length = max_length

        def build(self, input_shape):
            self.table = self.add_weight(
                name="table", shape=(self.max_length, input_shape[-1]),
                initializer=keras.initializers.RandomNormal(stddev=0.02))

        def call(self, inputs):
            length = ops.shape(inputs)[1]
            return inputs + ops.cast(self.table[None, :length], inputs.dtype)

        def compute_output_shape(self, input_shape):
            return input_shape

        def get_config(self):
            return {**super().get_config(), "max_length": self.max_length}

    return PositionEmbedding


def ffn_kind(name):
    return "dense" if name.startswith("dense") else name


def build_model(name, context=128, dim=128, blocks=4, heads=4, hidden=None, experts=8,
                capacity_factor=None, domains=("shakespeare", "python"), seed=0):
    """One of `MODELS` (`dense_time` is `dense`): a decoder-only byte model
    `(B, T) int -> (B, T, 256)` next-byte logits."""
    import keras
    from keras import layers

    from keras_moe.layers import SparseMoE

    hidden = hidden or 4 * dim
    kind = ffn_kind(name)
    if kind not in ("dense", "moe_top1", "moe_top2"):
        raise ValueError(f"Unknown model {name!r}; choose from {MODELS}")
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((context,), dtype="int32", name="bytes")
    x = layers.Embedding(VOCAB, dim, name="byte_embedding")(tokens)
    x = position_embedding_class(keras)(context, name="position_embedding")(x)
    for b in range(1, blocks + 1):
        h = layers.LayerNormalization(epsilon=1e-5, name=f"block{b}_attention_norm")(x)
        h = layers.MultiHeadAttention(heads, dim // heads, name=f"block{b}_attention")(
            h, h, use_causal_mask=True)
        x = layers.Add(name=f"block{b}_attention_residual")([x, h])
        h = layers.LayerNormalization(epsilon=1e-5, name=f"block{b}_ffn_norm")(x)
        if kind == "dense":
            h = layers.Dense(hidden, activation="gelu", name=f"block{b}_ffn_in")(h)
            h = layers.Dense(dim, name=f"block{b}_ffn_out")(h)
        else:
            k = 1 if kind == "moe_top1" else 2
            # causal=True: a capacity would place (token, expert) pairs
            # choice by choice (a later token's first choice before an
            # earlier token's second); causal=True places them token by
            # token, so a token is kept or dropped by the tokens before it
            # only. Dropless routing is causal either way.
            h = SparseMoE(
                num_experts=experts * k, hidden_dim=hidden // k, k=k,
                capacity_factor=capacity_factor, eval_capacity_factor=None,
                num_groups=len(domains), group_names=list(domains),
                seed=seed + b, causal=True, name=f"block{b}_moe",
            )(h)
        x = layers.Add(name=f"block{b}_ffn_residual")([x, h])
    x = layers.LayerNormalization(epsilon=1e-5, name="final_norm")(x)
    logits = layers.Dense(VOCAB, name="logits")(x)
    return keras.Model(tokens, logits, name=name)


def compile_model(model, steps, learning_rate=1e-3, warmup=100):
    """AdamW (weight decay 0.01, gradient norm clipped at 1), a linear
    warm-up over `warmup` steps and a cosine decay to 10% over `steps`."""
    import keras

    warmup = min(warmup, max(1, steps // 5))
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, max(1, steps - warmup), alpha=0.1, warmup_target=learning_rate,
        warmup_steps=warmup)
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=0.01, clipnorm=1.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))


def bits_per_byte(model, x, y, batch_size=64):
    """Mean next-byte cross-entropy in bits over all positions of the
    windows (inference: no auxiliary losses)."""
    total, count = 0.0, 0
    for i in range(0, len(x), batch_size):
        logits = np.asarray(model.predict_on_batch(x[i:i + batch_size]), "float64")
        top = logits.max(-1, keepdims=True)
        log_z = top[..., 0] + np.log(np.exp(logits - top).sum(-1))
        picked = np.take_along_axis(logits, y[i:i + batch_size, :, None], -1)[..., 0]
        total += float(np.sum(log_z - picked))
        count += picked.size
    return total / max(count, 1) / math.log(2.0)


def domain_expert_tables(model, windows, batch_size=64):
    """Per MoE block, the `(domains, experts)` share of each domain's
    token assignments going to each expert, from `SparseMoE`'s
    `group_expert_load` (`groups=` the domain of every window): `windows`
    is `{domain: x}`; each probe batch holds as many windows of each."""
    import keras

    from keras_moe.layers import SparseMoE

    count = min(len(x) for x in windows.values())
    per = max(1, min(count, batch_size // len(windows)))
    tables = {}
    for layer in model.layers:
        if not isinstance(layer, SparseMoE):
            continue
        block = layer.name.split("_")[0]
        probe = keras.Model(model.input, model.get_layer(f"{block}_ffn_norm").output)
        total, batches = 0.0, 0
        for i in range(0, count - per + 1, per):
            x = np.concatenate([w[i:i + per] for w in windows.values()])
            groups = np.repeat(np.arange(len(windows), dtype="int32"), per)
            h = probe.predict_on_batch(x)
            _, routing = layer(h, return_routing=True, groups=groups)
            total = total + keras.ops.convert_to_numpy(routing["group_expert_load"])
            batches += 1
        tables[layer.name] = np.asarray(total) / max(batches, 1)
    return tables


def specialisation(table):
    """`(fair, ratios)`: the largest share of one domain's assignments that
    one expert takes, over the fair share `1 / E` (>= 2: some expert takes
    twice its share of a domain, but an unbalanced router gets there without
    telling the domains apart); and per expert, its share of the domain it
    prefers over its mean share of the others (1: no preference; NaN for
    an expert with less than a quarter of its fair share)."""
    table = np.asarray(table, "float64")
    fair = float(table.max() * table.shape[1])
    ratios = []
    for column in table.T:
        if column.mean() < 0.25 / table.shape[1]:
            ratios.append(float("nan"))
            continue
        best = int(np.argmax(column))
        rest = np.delete(column, best).mean() if len(column) > 1 else column[best]
        ratios.append(float(column[best] / max(rest, 1e-3)))
    return fair, ratios


def format_table(name, table, domains):
    table = np.asarray(table)
    fair, ratios = specialisation(table)
    lines = [f"{name}: share of each domain's test-byte assignments per expert (%)",
             "domain      " + " ".join(f"{e:>4d}" for e in range(table.shape[1]))]
    for domain, row in zip(domains, table):
        lines.append(f"{domain:<11} " + " ".join(f"{100 * v:4.0f}" for v in row))
    lines.append("preference  " + " ".join(
        "   -" if math.isnan(r) else f"{min(r, 99):4.1f}" for r in ratios))
    lines.append(f"largest share x E: {fair:.2f}; experts with preference >= 2: "
                 f"{sum(r >= 2 for r in ratios)} of {len(ratios)}")
    return lines


# ---------------------------------------------------------------------------
# Training runs
# ---------------------------------------------------------------------------


def train_and_score(name, args, domains, seed, steps, log):
    """Trains one model for `steps` steps; returns its result dict (bits
    per domain on the test text, train seconds, curves, tables)."""
    import keras

    names = list(domains)
    texts = [domains[d]["train"] for d in names]
    model = build_model(name, context=args.context, dim=args.dim, blocks=args.blocks,
                        heads=args.heads, hidden=args.hidden, experts=args.experts,
                        capacity_factor=args.capacity_factor, domains=names, seed=seed)
    compile_model(model, steps, args.learning_rate)
    every = min(args.eval_every, steps)
    curve_windows = {d: eval_windows(domains[d]["val"], args.context, args.curve_windows)
                     for d in names}
    curves = {"step": [], "train": [], **{f"val_{d}": [] for d in names}}
    seconds = []

    class Curves(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds.append(time.perf_counter() - self.start)
            curves["step"].append((epoch + 1) * every)
            curves["train"].append(float(logs["loss"]) / math.log(2.0))
            for d, (x, y) in curve_windows.items():
                curves[f"val_{d}"].append(bits_per_byte(self.model, x, y))

    epochs = max(1, steps // every)
    stream = make_stream(keras, texts, args.batch_size, args.context, seed, every)
    log(f"{name} seed={seed}: {model.count_params():,} parameters, {epochs * every} "
        f"steps of {args.batch_size} x {args.context} bytes")
    model.fit(stream, epochs=epochs, verbose=0, callbacks=[Curves()])
    result = {"model": name, "seed": seed, "steps": epochs * every,
              "params": model.count_params(), "train_seconds": sum(seconds),
              "curves": curves}
    for d in names:
        x, y = eval_windows(domains[d]["test"], args.context, args.test_windows)
        result[f"bits_{d}"] = bits_per_byte(model, x, y)
    if name.startswith("moe"):
        windows = {d: eval_windows(domains[d]["test"], args.context,
                                   args.table_windows)[0] for d in names}
        result["tables"] = {k: v.tolist() for k, v in
                            domain_expert_tables(model, windows).items()}
    return result


def result_line(result, names):
    bits = " ".join(f"bits_{d}={result[f'bits_{d}']:.4f}" for d in names)
    return (f"RESULT model={result['model']} seed={result['seed']} {bits} "
            f"train_seconds={result['train_seconds']:.0f}")


def summary_table(results, names):
    """Markdown: per model, mean and [min, max] over seeds."""
    lines = ["| model | seeds | steps | " + " | ".join(f"{d} bits/byte" for d in names)
             + " | train s |", "|---" * (4 + len(names)) + "|"]
    models = list(dict.fromkeys(r["model"] for r in results))
    for model in models:
        rows = [r for r in results if r["model"] == model]

        def cell(key, digits):
            values = [r[key] for r in rows]
            mean = statistics.mean(values)
            if len(values) == 1:
                return f"{mean:.{digits}f}"
            return f"{mean:.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"

        steps = "/".join(str(s) for s in sorted({r["steps"] for r in rows}))
        lines.append(f"| {model} | {len(rows)} | {steps} | "
                     + " | ".join(cell(f"bits_{d}", 3) for d in names)
                     + f" | {cell('train_seconds', 0)} |")
    return lines


def plot_curves(results, names, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    colors = {"dense": "tab:gray", "moe_top1": "tab:blue", "moe_top2": "tab:orange",
              "dense_time": "tab:green"}
    for ax, d in zip(axes[0], names):
        for r in results:
            c = r["curves"]
            ax.plot(c["step"], c[f"val_{d}"], color=colors.get(r["model"], "black"),
                    alpha=0.8, label=r["model"] if r["seed"] == results[0]["seed"] else None)
        ax.set_title(f"{d}: validation bits per byte")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def plot_tables(result, names, output_dir):
    try:
        from keras_moe.plotting import plot_expert_heatmap
    except ImportError:
        return
    for layer, table in result.get("tables", {}).items():
        try:
            plot_expert_heatmap(
                np.asarray(table), names,
                os.path.join(output_dir, f"{result['model']}_seed{result['seed']}_{layer}.png"),
                title=f"{result['model']} {layer}: domain x expert (test bytes)",
                ylabel="domain")
        except ImportError:
            return


# ---------------------------------------------------------------------------
# Step-time ratios
# ---------------------------------------------------------------------------


def step_times(args, configs, reps):
    """`{label: [seconds of a train step per rep]}` of the models
    `configs` (`{label: (name, capacity_factor)}`) on one random batch,
    interleaved rep by rep (`benchmarks/_harness.py`)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, VOCAB, (args.batch_size, args.context)).astype("int32")
    y = rng.integers(0, VOCAB, (args.batch_size, args.context)).astype("int32")
    models = {}
    for label, (name, cf) in configs.items():
        model = build_model(name, context=args.context, dim=args.dim,
                            blocks=args.blocks, heads=args.heads, hidden=args.hidden,
                            experts=args.experts, capacity_factor=cf)
        compile_model(model, 1000, args.learning_rate)
        models[label] = model
    return interleaved_times(models, x, y, warmup=2, reps=reps)


def timing(args, log):
    """Median train-step seconds of each model on one batch, interleaved,
    and the median per-rep ratio to `dense`."""
    import keras

    configs = {name: (name, None) for name in ("dense", "moe_top1", "moe_top2")}
    for cf in args.timing_capacity_factors:
        for name in ("moe_top1", "moe_top2"):
            configs[f"{name}_cf{cf:g}"] = (name, cf)
    times = step_times(args, configs, args.reps)

    backend = keras.backend.backend()
    lines = [f"Train step, batch {args.batch_size} x {args.context} bytes, "
             f"backend {backend}, median of {args.reps} reps:",
             "| model | step ms | / dense |", "|---|---|---|"]
    rows = []
    for label in times:
        ms = 1000 * statistics.median(times[label])
        ratio = median_ratio(times, label, "dense")
        rows.append({"model": label, "step_ms": ms, "ratio": ratio, "backend": backend})
        lines.append(f"| {label} | {ms:.0f} | {ratio:.2f} |")
        print(f"TIMING model={label} backend={backend} step_ms={ms:.1f} "
              f"ratio={ratio:.3f}", flush=True)
    log("\n".join(lines))
    return rows


def equal_time_ratio(args, log):
    """moe_top1's step time over dense's, measured side by side here (7
    interleaved reps): `dense_time` trains this many times the steps."""
    if args.dense_time_ratio is not None:
        return args.dense_time_ratio

    times = step_times(args, {"dense": ("dense", None), "moe_top1": ("moe_top1", None)}, 7)

    ratio = median_ratio(times, "moe_top1", "dense")
    log(f"step time moe_top1 / dense, side by side in this process: {ratio:.3f} "
        f"(dense_time trains {ratio:.3f} x --steps)")
    return ratio


# ---------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--train-text", action="append", default=None,
                   help="name=PATH of a domain's training text (repeat per domain; "
                        "default: ../shared/data/text/ Shakespeare and Python)")
    p.add_argument("--test-text", action="append", default=[],
                   help="name=PATH of a domain's test text (default: the "
                        "validation part of its training text)")
    p.add_argument("--models", default="dense,moe_top1,moe_top2,dense_time")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--hidden", type=int, default=None, help="dense FFN width (4 x dim)")
    p.add_argument("--experts", type=int, default=8,
                   help="E: moe_top1 has E experts, moe_top2 2E of half width")
    p.add_argument("--capacity-factor", type=float, default=None,
                   help="train the MoE with a capacity (token-major, causal=True); "
                        "default: dropless")
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--curve-windows", type=int, default=64,
                   help="validation windows per domain for the curves")
    p.add_argument("--test-windows", type=int, default=None,
                   help="at most this many test windows per domain (default: all)")
    p.add_argument("--table-windows", type=int, default=200)
    p.add_argument("--max-bytes", type=int, default=None,
                   help="use the first N bytes of every part (smoke tests)")
    p.add_argument("--output-dir", default="runs/text_moe_vs_dense")
    p.add_argument("--dense-time-ratio", type=float, default=None,
                   help="dense_time trains this many times --steps (default: the "
                        "moe_top1 / dense step-time ratio measured at the start)")
    p.add_argument("--timing", action="store_true", help="step-time ratios only")
    p.add_argument("--collect", action="store_true",
                   help="no training: the reports of every run in --output-dir's "
                        "runs.jsonl (written by earlier calls, e.g. one per model "
                        "and seed)")
    p.add_argument("--timing-capacity-factors", default="1.0,1.25")
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args(argv)
    args.train_text = args.train_text or list(DEFAULT_TRAIN)
    args.models = [m for m in args.models.split(",") if m]
    for m in args.models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {MODELS}")
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.timing_capacity_factors = [float(v) for v in
                                    args.timing_capacity_factors.split(",") if v]
    return args


def write_reports(results, names, output_dir, log):
    """The summary table, `results.md`, `curves.json`, `domain_expert.txt`
    and `loss_curves.png` of `results` in `output_dir`."""
    table = summary_table(results, names)
    log("\n".join(table))
    lines = [result_line(r, names) for r in results]
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write("\n".join(table + [""] + lines) + "\n")
    with open(os.path.join(output_dir, "curves.json"), "w") as f:
        json.dump(results, f)
    with open(os.path.join(output_dir, "domain_expert.txt"), "w") as f:
        for r in results:
            for layer, t in r.get("tables", {}).items():
                f.write("\n".join(format_table(f"{r['model']} seed={r['seed']} {layer}",
                                               np.asarray(t), names)) + "\n\n")
    plot_curves(results, names, os.path.join(output_dir, "loss_curves.png"))


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.makedirs(args.output_dir, exist_ok=True)
    runs_file = os.path.join(args.output_dir, "runs.jsonl")

    def log(text):
        print(text, flush=True)

    if args.timing:
        rows = timing(args, log)
        with open(os.path.join(args.output_dir, "timing.json"), "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        return rows
    if args.collect:  # the runs of earlier calls, e.g. one per model and seed
        with open(runs_file) as f:
            results = [json.loads(line) for line in f if line.strip()]
        order = {m: i for i, m in enumerate(MODELS)}
        results.sort(key=lambda r: (order.get(r["model"], 99), r["seed"]))
        names = [k[len("bits_"):] for k in results[0] if k.startswith("bits_")]
        for r in results:
            log(result_line(r, names))
        write_reports(results, names, args.output_dir, log)
        return results
    domains = load_domains(args.train_text, args.test_text, args.val_fraction,
                           args.max_bytes)
    names = list(domains)
    import keras

    log(f"Keras {keras.__version__}, backend {keras.backend.backend()}; domains "
        + ", ".join(f"{d}: {len(p['train']):,} train / {len(p['test']):,} test bytes"
                    for d, p in domains.items()))
    results = []
    if "dense_time" in args.models:
        # As many steps as fit in moe_top1's time at dense's speed (whole
        # --eval-every chunks).
        chunks = args.steps * equal_time_ratio(args, log) / args.eval_every
        time_steps = args.eval_every * max(1, int(round(chunks)))
    for seed in args.seeds:
        for name in args.models:
            steps = time_steps if name == "dense_time" else args.steps
            result = train_and_score(name, args, domains, seed, steps, log)
            results.append(result)
            log(result_line(result, names))
            with open(runs_file, "a") as f:
                f.write(json.dumps(result) + "\n")
            for layer, table in result.get("tables", {}).items():
                log("\n".join(format_table(f"{name} seed={seed} {layer}",
                                           np.asarray(table), names)))
            plot_tables(result, names, args.output_dir)
    write_reports(results, names, args.output_dir, log)
    return results


if __name__ == "__main__":
    main()
