"""
Title: A sparse-MoE GPT on Shakespeare and Python source
Author: keras_moe contributors
Date created: 2026/12/06
Last modified: 2026/12/07
Description: A small byte-level decoder-only language model whose feed-forward
blocks are `SparseMoE`, trained on two kinds of text at once: held-out bits
per byte per domain, generated text, which experts each domain uses, a
`.keras` save and reload, and a SavedModel that serves next-byte logits.
Accelerator: None (a 2-core CPU: 3.5-5 minutes on JAX, TensorFlow and
torch, measured per backend in docs/language_model.md)

Run it (any backend; the text files are in `../shared/data/text/` relative to
the project root):

    python examples/text_moe_gpt.py
    KERAS_BACKEND=jax python examples/text_moe_gpt.py --steps 1200
    python examples/text_moe_gpt.py --ffn dense      # the dense twin
    python examples/text_moe_gpt.py --train-text shakespeare=a.txt \\
        --train-text python=b.py --test-text shakespeare=held_out.txt

## Two domains, one model

Sparse MoE layers live mostly inside transformer language models. Here a
GPT-style model (Radford et al. 2018/2019: causal self-attention blocks, a
next-token loss) reads two very different kinds of text, Shakespeare's plays
and the Python standard library, through one vocabulary and one set of
weights. Its feed-forward layers are `SparseMoE`: each byte goes to one of 8
experts (top-1, as in Switch Transformers, Fedus et al. 2021), chosen by a
learned router that is never told which domain a byte comes from. Whether the
experts divide the domains among themselves is then something to measure:
`SparseMoE(num_groups=2)` called with `groups=` the domain of each window
counts the share of each domain's bytes that each expert takes.

```
bytes (B, T) -> byte embedding + learned position embedding (T <= context)
  -> 4 x [LayerNorm -> causal self-attention -> + ;
          LayerNorm -> SparseMoE (8 experts of width 512, top-1) -> + ]
  -> LayerNorm -> Dense(256): next-byte logits (B, T, 256)
```

Choices, and why:

- **Bytes as tokens** (a vocabulary of 256): no tokenizer to train or
  install, every file (any language, any encoding) can be read and scored,
  and bits per byte compare across tokenisations. A subword vocabulary
  would shorten the sequences (more text per context) at the price of a
  dependency and of scores that depend on it.
- **Plain Keras layers** (`Embedding`, `MultiHeadAttention(use_causal_mask=True)`,
  `LayerNormalization`) and a sampler of our own (top-k with a
  temperature, a dozen lines below): keras-hub has a `TransformerDecoder`
  and samplers, but it is not in keras_moe's install (it pulls the full
  `tensorflow`, which clashes with `tensorflow-cpu`); the project installs
  it only for its tests.
- **Capacity 1.0 in training, dropless in inference**: each expert takes
  at most `k N / E` (byte, expert) pairs of a training batch (the Switch
  Transformer's capacity; an overflowing byte skips the expert and keeps
  its residual), which costs 1.07x the dense step instead of dropless
  routing's 1.36x (docs/language_model.md); scoring, generation and the
  SavedModel are dropless (`eval_capacity_factor=None`), so every byte is
  computed. A capacity can leak the future (which bytes overflow can
  depend on later ones), so the layers are built with
  `SparseMoE(causal=True)`: pairs are placed token by token, a byte is kept
  or dropped by the bytes before it only, and a router that looks at every
  token is refused. `--capacity-factor none` trains dropless. Expert
  choice and Soft MoE are not offered: an expert that picks its tokens,
  or a soft slot that averages them, looks at the future of the sequence
  (`tests/layers/test_causal.py` shows the leak).
"""

import argparse
import importlib.util
import logging
import math
import os
import time


def capacity(value):
    """`--capacity-factor`: a positive float, or `none` for dropless."""
    if value.lower() in ("none", "dropless"):
        return None
    factor = float(value)
    if not factor > 0:
        raise argparse.ArgumentTypeError(f"capacity factor must be > 0 or 'none', got {value}")
    return factor


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--train-text", action="append", default=None,
                        help="name=PATH of a domain's training text; repeat per "
                             "domain (default: Shakespeare and Python from "
                             "../shared/data/text/)")
    parser.add_argument("--test-text", action="append", default=[],
                        help="name=PATH of a domain's held-out text (default: the "
                             "last 10%% of its training text)")
    parser.add_argument("--ffn", choices=("moe", "dense"), default="moe")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--expert-hidden", type=int, default=512)
    parser.add_argument("--capacity-factor", type=capacity, default=1.0,
                        help="training capacity factor (token-major, causal), "
                             "or 'none': dropless (inference is always dropless)")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--generate", type=int, default=300,
                        help="bytes to generate after each prompt")
    parser.add_argument("--max-bytes", type=int, default=None,
                        help="use the first N bytes of every part (smoke tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="runs/text_moe_gpt")
    return parser.parse_args(argv)


# The arguments are read before Keras is imported, so that `--help` and a
# mistyped flag answer at once instead of after the backend has loaded.
if __name__ == "__main__":
    ARGS = parse_args()

# TensorFlow's C++ log lines (oneDNN notices, CPU features) say nothing about
# this example: hide them unless you chose a log level. They are written
# while TensorFlow's libraries load (Keras loads TensorFlow, when it is
# installed, for the SavedModel export under every backend), so stderr is
# pointed at /dev/null meanwhile.
if "TF_CPP_MIN_LOG_LEVEL" not in os.environ:
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    _stderr, _devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(_devnull, 2)
    try:
        import keras

        if importlib.util.find_spec("tensorflow") is not None:
            import tensorflow  # noqa: F401
    finally:
        os.dup2(_stderr, 2)
        os.close(_stderr)
        os.close(_devnull)

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import layers, ops  # noqa: E402

from keras_moe.layers import SparseMoE  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = os.path.join(ROOT, "..", "shared", "data", "text")
DEFAULT_TRAIN = (
    f"shakespeare={os.path.join(TEXT, 'shakespeare_train.txt')}",
    f"python={os.path.join(TEXT, 'python_stdlib_train.txt')}",
)
VOCAB = 256  # bytes
PROMPTS = {"shakespeare": "ROMEO:\n", "python": "def "}  # else: test text's start

"""
## The data

Each domain is a `name=PATH` of UTF-8 text, read as bytes. The last 10% of
each training file is the validation part (the first 90% is trained on);
the test text of a domain is its `--test-text` file, or else its validation
part. A training batch holds the same number of windows from every domain,
`context + 1` bytes at random offsets (the input is the first `context`
bytes, the target the next byte at every position), drawn from a generator
seeded by `(seed, step)`: reproducible, and the same for every model.

Scoring uses non-overlapping windows of the test text: every byte but the
first is predicted once, from the 0 to `context - 1` bytes of its window
before it (the usual quick estimate; a sliding window would give every byte
a full context and lower numbers).
"""


def domain_paths(specs, flag):
    """`["name=PATH", ...]` as an ordered `{name: path}`."""
    paths = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"{flag} takes name=PATH. Received: {spec!r}")
        paths[name] = path
    return paths


def read_bytes(path, flag):
    if not os.path.exists(path):
        raise SystemExit(
            f"{flag} {path}: no such file. The default text files are in "
            "../shared/data/text/ relative to the project root.")
    with open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8)


def load_domains(train_specs, test_specs, val_fraction=0.1, max_bytes=None):
    """`{name: {"train", "val", "test"}}` uint8 arrays."""
    train_paths = domain_paths(train_specs, "--train-text")
    test_paths = domain_paths(test_specs, "--test-text")
    if set(test_paths) - set(train_paths):
        raise SystemExit("every --test-text domain needs a --train-text")
    domains = {}
    for name, path in train_paths.items():
        data = read_bytes(path, "--train-text")
        cut = int(len(data) * (1.0 - val_fraction))
        parts = {"train": data[:cut], "val": data[cut:]}
        parts["test"] = (read_bytes(test_paths[name], "--test-text")
                         if name in test_paths else parts["val"])
        domains[name] = {k: v[:max_bytes] for k, v in parts.items()}
    return domains


def batch_windows(texts, batch_size, context, seed, step):
    """`(x, y)` of training step `step`: `batch_size / D` random windows of
    each of the `D` texts."""
    rng = np.random.default_rng((seed, step))
    rows = []
    for text in texts:
        starts = rng.integers(0, len(text) - context - 1, size=batch_size // len(texts))
        rows.append(text[starts[:, None] + np.arange(context + 1)])
    rows = np.concatenate(rows).astype("int32")
    return rows[:, :-1], rows[:, 1:]


def eval_windows(text, context, limit=None):
    """Non-overlapping windows: `x` `(n, context)` and next-byte `y`."""
    n = (len(text) - 1) // context if limit is None else min(limit, (len(text) - 1) // context)
    idx = np.arange(n)[:, None] * context + np.arange(context)
    return text[idx].astype("int32"), text[idx + 1].astype("int32")


class TextStream(keras.utils.PyDataset):
    """Training batches for `fit`: batch `i` of epoch `t` is step
    `t * len(self) + i`."""

    def __init__(self, texts, batch_size, context, seed, steps_per_epoch, **kwargs):
        super().__init__(**kwargs)
        self.texts, self.batch_size, self.context = texts, batch_size, context
        self.seed, self.steps_per_epoch, self.epoch = seed, steps_per_epoch, 0

    def __len__(self):
        return self.steps_per_epoch

    def on_epoch_end(self):
        self.epoch += 1

    def __getitem__(self, i):
        step = self.epoch * self.steps_per_epoch + i
        return batch_windows(self.texts, self.batch_size, self.context, self.seed, step)


"""
## The model

Keras has no position embedding layer (keras-hub has one), so here is one:
a learned `(context, d)` table added to the byte embeddings. It is
registered, so the `.keras` file reloads it.

The blocks are pre-norm (GPT-2): `x + attention(norm(x))`, then
`x + ffn(norm(x))`. `MultiHeadAttention(..., use_causal_mask=True)` lets
position `t` attend to positions `<= t` only; the `SparseMoE` treats every
position as a token of its own. `--ffn dense` puts a dense feed-forward
layer of the width of one expert in its place: the same active parameters
and FLOPs per byte (the MoE adds the router's `d x E`), the comparison
`benchmarks/text_moe_vs_dense.py` runs over seeds.
"""


@keras.saving.register_keras_serializable(package="keras_moe_examples")
class PositionEmbedding(layers.Layer):
    """Adds a learned `(max_length, d)` table to a `(B, T, d)` input,
    `T <= max_length`."""

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


def build_model(ffn="moe", context=128, dim=128, blocks=4, heads=4, hidden=512,
                experts=8, k=1, capacity_factor=None, domains=("shakespeare", "python"),
                seed=0):
    """`(B, context)` int bytes -> `(B, context, 256)` next-byte logits.
    `ffn="moe"`: `SparseMoE` with `experts` experts of width `hidden`,
    top-`k`; `"dense"`: one dense layer of width `k * hidden`."""
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((context,), dtype="int32", name="bytes")
    x = layers.Embedding(VOCAB, dim, name="byte_embedding")(tokens)
    x = PositionEmbedding(context, name="position_embedding")(x)
    for b in range(1, blocks + 1):
        h = layers.LayerNormalization(epsilon=1e-5, name=f"block{b}_attention_norm")(x)
        h = layers.MultiHeadAttention(heads, dim // heads, name=f"block{b}_attention")(
            h, h, use_causal_mask=True)
        x = layers.Add(name=f"block{b}_attention_residual")([x, h])
        h = layers.LayerNormalization(epsilon=1e-5, name=f"block{b}_ffn_norm")(x)
        if ffn == "dense":
            h = layers.Dense(k * hidden, activation="gelu", name=f"block{b}_ffn_in")(h)
            h = layers.Dense(dim, name=f"block{b}_ffn_out")(h)
        else:
            # causal=True: with a capacity, (byte, expert) pairs are placed
            # token by token, so no byte is dropped because of a later one;
            # routers that look at every token are refused. (Dropless
            # routing is causal either way.)
            h = SparseMoE(
                num_experts=experts, hidden_dim=hidden, k=k,
                capacity_factor=capacity_factor, eval_capacity_factor=None,
                num_groups=len(domains), group_names=list(domains),
                seed=seed + b, causal=True, name=f"block{b}_moe",
            )(h)
        x = layers.Add(name=f"block{b}_ffn_residual")([x, h])
    x = layers.LayerNormalization(epsilon=1e-5, name="final_norm")(x)
    logits = layers.Dense(VOCAB, name="logits")(x)
    return keras.Model(tokens, logits, name=f"text_{ffn}_gpt")


"""
## Training

`fit` on the stream of batches, in chunks of `--eval-every` steps (one
Keras "epoch" each, with the validation loss on a few windows of each
domain). AdamW (weight decay 0.01, gradient norm clipped at 1), a linear
warm-up and a cosine decay to 10% of the peak learning rate. The loss is
the mean next-byte cross-entropy; in training each `SparseMoE` adds its
Switch load-balancing loss (weight 0.01).
"""


def compile_model(model, steps, learning_rate=1e-3, warmup=100):
    warmup = min(warmup, max(1, steps // 5))
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, max(1, steps - warmup), alpha=0.1, warmup_target=learning_rate,
        warmup_steps=warmup)
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=0.01, clipnorm=1.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))


def bits_per_byte(model, x, y, batch_size=64):
    """Mean next-byte cross-entropy in bits over all positions (inference:
    no balancing loss, dropless routing)."""
    total, count = 0.0, 0
    for i in range(0, len(x), batch_size):
        logits = np.asarray(model.predict_on_batch(x[i:i + batch_size]), "float64")
        top = logits.max(-1, keepdims=True)
        log_z = top[..., 0] + np.log(np.exp(logits - top).sum(-1))
        picked = np.take_along_axis(logits, y[i:i + batch_size, :, None], -1)[..., 0]
        total += float(np.sum(log_z - picked))
        count += picked.size
    return total / max(count, 1) / math.log(2.0)


"""
## Generating text

A sampler of our own: the model is causal, so the logits at position
`t` of a window depend on bytes `0..t` only. A prompt shorter than the
context is placed at the start of a window (the rest is padding the
prediction cannot see) and the next byte is read at the prompt's last
position; once the text is longer than the context, the window slides.
Each step keeps the `top_k` most likely bytes, divides their logits by the
temperature and draws one. All prompts run in one batch.
"""


def generate(model, prompts, length, context, top_k=10, temperature=0.8, seed=0):
    """`prompts` (list of bytes) continued by `length` sampled bytes each."""
    rng = np.random.default_rng(seed)
    texts = [list(p) for p in prompts]
    for _ in range(length):
        window = np.zeros((len(texts), context), "int32")
        last = []
        for row, text in enumerate(texts):
            tail = text[-context:]
            window[row, :len(tail)] = tail
            last.append(len(tail) - 1)
        logits = np.asarray(model.predict_on_batch(window), "float64")
        for row, text in enumerate(texts):
            scores = logits[row, last[row]] / temperature
            best = np.argsort(scores)[-top_k:]
            p = np.exp(scores[best] - scores[best].max())
            text.append(int(rng.choice(best, p=p / p.sum())))
    return [bytes(t) for t in texts]


"""
## Which experts each domain uses

The block's normalised input (`blockN_ffn_norm`) comes from a model that
stops there; the `SparseMoE` layer is called on it with `groups=` the
domain of every window (`num_groups=2` in its constructor) and
`return_routing=True`, which gives `group_expert_load` `(domains, experts)`:
the share of each domain's (byte, expert) assignments that each expert
takes. A row sums to 1; a uniform router gives `1 / E` everywhere. Each
probe batch holds as many windows of each domain.
"""


def domain_expert_tables(model, windows, batch_size=64):
    per = max(1, min(min(len(x) for x in windows.values()), batch_size // len(windows)))
    count = min(len(x) for x in windows.values())
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
            _, routing = layer(probe.predict_on_batch(x), return_routing=True,
                               groups=groups)
            total = total + ops.convert_to_numpy(routing["group_expert_load"])
            batches += 1
        tables[layer.name] = np.asarray(total) / max(batches, 1)
    return tables


def print_table(name, table, domains):
    """The table in %, and per expert its preference: its share of the
    domain it prefers over its mean share of the others (1: none; `-` for
    an expert with under a quarter of its fair share)."""
    print(f"{name}: share of each domain's test bytes per expert (%)")
    print("domain      " + " ".join(f"{e:>4d}" for e in range(table.shape[1])))
    for domain, row in zip(domains, table):
        print(f"{domain:<11} " + " ".join(f"{100 * v:4.0f}" for v in row))
    preference = []
    for column in table.T:
        rest = np.delete(column, np.argmax(column)).mean()
        preference.append(None if column.mean() < 0.25 / len(column)
                          else min(99.0, column.max() / max(rest, 1e-3)))
    print("preference  " + " ".join("   -" if p is None else f"{p:4.1f}"
                                    for p in preference))
    print(f"largest share x experts: {table.max() * table.shape[1]:.2f}; experts "
          f"preferring one domain 2:1 or more: {sum(p is not None and p >= 2 for p in preference)}")


"""
## Export: next-byte logits

The SavedModel serves the logits of the byte that follows a full window:
a model that takes the `(B, context)` bytes and returns the last position's
`(B, 256)` logits (the same layers and weights). `keras_moe.export_saved_model`
writes it from any backend (on torch through a TensorFlow subprocess that
imports this file for `PositionEmbedding`), and its output is checked
against Keras.
"""


def export_and_check(model, export_dir, x):
    from keras_moe import export_saved_model

    next_byte = keras.Model(model.input, model.output[:, -1, :], name="next_byte")
    export_saved_model(next_byte, export_dir, modules=[os.path.abspath(__file__)])
    import tensorflow as tf

    artifact = tf.saved_model.load(export_dir)  # keep it: it owns the variables
    served = np.asarray(artifact.serve(tf.constant(x)))
    expected = np.asarray(next_byte.predict(x, verbose=0))
    diff = float(np.max(np.abs(served - expected)))
    print(f"Exported SavedModel to {export_dir}: (batch, {x.shape[1]}) bytes -> "
          f"(batch, {served.shape[1]}) next-byte logits; serving max |difference| = "
          f"{diff:.2e}")
    assert served.shape == (len(x), VOCAB), served.shape
    assert diff < 1e-3, diff
    return diff


def show(text):
    return text.decode("utf-8", errors="replace")


def main(args):

    domains = load_domains(args.train_text or list(DEFAULT_TRAIN), args.test_text,
                           max_bytes=args.max_bytes)
    names = list(domains)
    print(f"Keras {keras.__version__}, backend {keras.backend.backend()}; "
          + ", ".join(f"{d}: {len(p['train']):,} training / {len(p['val']):,} "
                      f"validation / {len(p['test']):,} test bytes"
                      for d, p in domains.items()))
    model = build_model(args.ffn, context=args.context, dim=args.dim, blocks=args.blocks,
                        heads=args.heads, hidden=args.expert_hidden,
                        experts=args.experts, k=args.k,
                        capacity_factor=args.capacity_factor, domains=names,
                        seed=args.seed)
    every = min(args.eval_every, args.steps)
    epochs = max(1, args.steps // every)
    compile_model(model, epochs * every, args.learning_rate)
    print(f"{model.name}: {model.count_params():,} parameters, {epochs * every} steps "
          f"of {args.batch_size} windows x {args.context} bytes")

    # Training: fit, with the validation loss on 32 windows of each domain.
    val = [eval_windows(domains[d]["val"], args.context, 32) for d in names]
    val = tuple(np.concatenate(part) for part in zip(*val))
    stream = TextStream([domains[d]["train"] for d in names], args.batch_size,
                        args.context, args.seed, every)
    start = time.time()
    model.fit(stream, epochs=epochs, validation_data=val, verbose=2)
    seconds = time.time() - start

    # Held-out bits per byte, per domain.
    bits = {}
    for d in names:
        x, y = eval_windows(domains[d]["test"], args.context)
        bits[d] = bits_per_byte(model, x, y)
        print(f"{d}: {bits[d]:.4f} bits per byte on {x.size:,} test bytes")

    # Generated text.
    prompts = [PROMPTS.get(d, show(bytes(domains[d]["test"][:16]))).encode() for d in names]
    samples = generate(model, prompts, args.generate, args.context, seed=args.seed)
    for d, sample in zip(names, samples):
        print(f"\n----- generated ({d} prompt) -----\n{show(sample)}\n----- end -----")

    # Domain x expert tables and plots.
    os.makedirs(args.output_dir, exist_ok=True)
    windows = {d: eval_windows(domains[d]["test"], args.context, 256)[0] for d in names}
    for layer_name, table in domain_expert_tables(model, windows).items():
        print_table(layer_name, table, names)
        try:
            from keras_moe.plotting import plot_expert_heatmap

            plot_expert_heatmap(
                table, names, os.path.join(args.output_dir, f"{layer_name}_domain_expert.png"),
                title=f"{layer_name}: domain x expert (test bytes)", ylabel="domain")
        except ImportError:
            print("No plot: matplotlib is not installed (pip install -e '.[plot]').")

    # Save and reload.
    x_check = windows[names[0]][:8]
    path = os.path.join(args.output_dir, "model.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    diff = float(np.max(np.abs(np.asarray(reloaded.predict(x_check, verbose=0))
                               - np.asarray(model.predict(x_check, verbose=0)))))
    print(f"Saved {path}; reloaded model max |difference| = {diff:.2e}")
    assert diff < 1e-4, diff

    # SavedModel of the next-byte logits.
    export_and_check(model, os.path.join(args.output_dir, "saved_model"), x_check)

    print(f"RESULT model={model.name} "
          + " ".join(f"bits_{d}={bits[d]:.4f}" for d in names)
          + f" train_seconds={seconds:.0f}")


if __name__ == "__main__":
    main(ARGS)
