"""The CIFAR-10 multi-task MoE experiments: every variant the docs measure.

The model of the example `examples/cifar_multitask.py` (a CNN backbone, a
sparse MoE over its spatial tokens and a multi-gate MoE (MMoE) feeding a
class head and a box head), with a flag for each experiment of
docs/cifar_multitask.md: the full 10,000-image run, its dense twin of the
same active compute (`--baseline`), sparse MMoE gates (`--task-k`), shared
experts, dropless training, other widths and sizes. One seed a run
(`--seed S`); it ends with one `RESULT` line to collect across seeds. The
example is the one to read (the quickstart, top to bottom); this runner
is the one to measure with, and other benchmarks import its functions
(`benchmarks/cifar_compression.py`).

Run it (any backend, from the project root; TensorFlow is the fastest on CPU):

    python benchmarks/cifar_multitask.py     # the quickstart's recipe, ~3 minutes
    python benchmarks/cifar_multitask.py --data ../shared/data/cifar10_small.npz \
        --epochs 20 --width 1.0 --batch-size 128 --box-weight 2   # the full run
    python benchmarks/cifar_multitask.py --baseline  # dense model, same active compute

(`../shared/data` is a folder next to the project directory that holds
the larger data sets; pass any `.npz` with `x_train, y_train, x_test,
y_test`, or `--data keras` to download CIFAR-10 with `keras.datasets`.)

## The task

Each CIFAR-10 image (32x32) is resized to a random size (24 to 48 pixels),
randomly flipped, and pasted at a random position on a 64x64 canvas with a
random textured background (smooth colour blobs plus grain). The model
predicts the object's class and its box `[y1, x1, y2, x2]` (normalised to
[0, 1]). Training canvases are drawn afresh every epoch (position, size,
flip and background are free augmentation); the test canvases are drawn once
with a fixed seed.

## The model

```
image 64x64x3 -> CNN backbone (stride 8) -> 8x8 map -> 64 tokens
    -> tokens + SparseMoE(LayerNorm(tokens))      token experts, top-k routing
    -> [mean token ; flattened 8x8 summary]       what both tasks see
    -> MultiGateMoE(2 tasks, 4 experts, softmax gates)  one mixture per task
    -> ClassificationHead(10)      BoxHead()
```

`SparseMoE` sends each of the 64 tokens of an image to `k` of `E` experts
(real sparse dispatch: each token costs `k` experts, not `E`). `MultiGateMoE`
gives each task its own gate over a shared bank of experts, so the class
task and the box task can use different experts. Its gates are dense
softmax gates here (Ma et al. 2018): the 4 experts run once per image and
serve both tasks, the compute of two task towers of twice an expert's width,
but each task can draw on all 4 experts instead of one tower.
(`--task-k 2 --task-experts 6` gives it sparse top-2 gates instead; they save
compute when experts are many or large, not here, where the MMoE is under 1%
of the compute, and they lost to the dense gates: docs/cifar_multitask.md.)
`--baseline` replaces every MoE by dense feed-forward layers of the same
*active* size, a shared-bottom model with two task towers and the same
compute per image: the honest comparison.

## What it prints

One line per epoch: time, loss, class accuracy and box IoU on that epoch's
training canvases, the share of the token MoE's (token, expert)
assignments dropped for capacity (training only: high while the untrained
router is uneven, near 0 once it has balanced) and the effective number of
MMoE experts each task's gate uses (`exp(entropy)` of its usage over the
batch: 1 = one expert, 4 = all alike). Then the test accuracy and mean IoU
(and the share of boxes with IoU >= 0.5), the per-task expert usage of the
MMoE, the class x expert routing table of the token MoE; it saves
`model.keras`, reloads it and checks the predictions, exports a TensorFlow
SavedModel and checks its serving signature, and ends with a summary: what
was trained, the numbers, where the files are, what to run next.
`--verbose 1` shows Keras' own progress bar (with every routing metric).
"""

import argparse
import logging
import os
import time

# TensorFlow's C++ log lines (oneDNN notices, CPU features, a harmless
# oneDNN "E" line about int32) say nothing about this script: hide them
# unless the user chose a log level (real errors still raise Python
# exceptions). TensorFlow 2.21
# writes its oneDNN notice while its libraries load, before that setting
# applies, so stderr is also closed while Keras (and TensorFlow) import.
if "TF_CPP_MIN_LOG_LEVEL" not in os.environ:
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    # and its Python warnings (tf.function retracing notices from the
    # predict calls on differently sized inputs at the end)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    _stderr, _devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(_devnull, 2)
    try:
        import keras
    finally:  # an import error is still printed: stderr is back by then
        os.dup2(_stderr, 2)
        os.close(_stderr)
        os.close(_devnull)

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import layers  # noqa: E402

from keras_moe.callbacks import RoutingMetrics, RoutingMonitor  # noqa: E402
from keras_moe.layers import (  # noqa: E402
    BoxHead,
    ClassificationHead,
    MultiGateMoE,
    SparseMoE,
    default_compile_args,
)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SAMPLE = os.path.join(ROOT, "examples", "data", "cifar10_sample.npz")
CANVAS = 64
TASKS = ("class", "box")
# The quickstart's recipe (python benchmarks/cifar_multitask.py with no flags):
# a 0.75-wide backbone, batch 64, box loss weight 1, 12 epochs of the
# 4,000-image sample: 0.4+ test accuracy in about 3 minutes on 2 cores
# (docs/cifar_multitask.md). Until 2026-12-04 the defaults were width 1.0,
# batch 128, box weight 2 and 10 epochs of 2,000 images (0.316 accuracy);
# the full 10,000-image runs in the docs pass those flags explicitly.
EPOCHS = 12
BATCH_SIZE = 64
WIDTH = 0.75
BOX_WEIGHT = 1.0

# ---------------------------------------------------------------------------
# Data: CIFAR-10 objects on textured canvases
# ---------------------------------------------------------------------------


def load_cifar(source):
    """`(x_train, y_train), (x_test, y_test), class_names` (uint8 images).

    `source`: `"sample"` (the file shipped in examples/data, no network),
    `"keras"` (`keras.datasets.cifar10`: downloads 163 MB once), or the path
    of an `.npz` with `x_train, y_train, x_test, y_test` (and optionally
    `class_names`). `"auto"` is an old name of `"sample"`.
    """
    names = np.array(["airplane", "automobile", "bird", "cat", "deer", "dog",
                      "frog", "horse", "ship", "truck"])
    if source == "keras":
        (x, y), (xt, yt) = keras.datasets.cifar10.load_data()
        return (x, y.ravel()), (xt, yt.ravel()), names
    if source in ("sample", "auto"):
        source = SAMPLE
    if not os.path.exists(source):
        raise SystemExit(
            f"--data {source}: no such file. Pass an .npz with x_train, y_train, "
            "x_test, y_test (e.g. ../shared/data/cifar10_small.npz relative to "
            "the project root), 'sample' (the shipped sample) or 'keras' "
            "(keras.datasets.cifar10, downloaded)."
        )
    with np.load(source) as data:
        if "class_names" in data:
            names = data["class_names"]
        return ((data["x_train"], data["y_train"].ravel()),
                (data["x_test"], data["y_test"].ravel()), names)


def placement_matrices(sizes, offsets, source=32, canvas=CANVAS):
    """Bilinear matrices `(n, canvas, source)` that resize a `source`-pixel
    axis to `sizes[i]` pixels placed at `offsets[i]` on a `canvas` axis (rows
    outside the object are zero), and the `(n, canvas)` inside mask."""
    n = len(sizes)
    i = np.arange(canvas)[None, :]
    inside = (i >= offsets[:, None]) & (i < (offsets + sizes)[:, None])
    u = (i - offsets[:, None] + 0.5) * (source / sizes[:, None]) - 0.5
    u = np.clip(u, 0, source - 1)
    j0 = np.floor(u).astype(int)
    w = (u - j0).astype("float32")
    j1 = np.minimum(j0 + 1, source - 1)
    m = np.zeros((n, canvas, source), "float32")
    rows = np.broadcast_to(np.arange(n)[:, None], (n, canvas))
    cols = np.broadcast_to(i, (n, canvas))
    np.add.at(m, (rows, cols, j0), (1 - w) * inside)
    np.add.at(m, (rows, cols, j1), w * inside)
    return m, inside


def make_canvases(images, rng, min_size=24, max_size=48, flip=True):
    """Pastes each image at a random size and position on a textured canvas.

    Returns `(canvases uint8 (n, 64, 64, 3), boxes float32 (n, 4))`, boxes
    as normalised `[y1, x1, y2, x2]`.
    """
    n = len(images)
    sizes = rng.integers(min_size, max_size + 1, size=n)
    y0 = (rng.random(n) * (CANVAS - sizes + 1)).astype(int)
    x0 = (rng.random(n) * (CANVAS - sizes + 1)).astype(int)
    objects = images.astype("float32")
    if flip:
        flipped = rng.random(n) < 0.5
        objects[flipped] = objects[flipped, :, ::-1]
    rows, inside_y = placement_matrices(sizes, y0)
    cols, inside_x = placement_matrices(sizes, x0)
    placed = np.einsum("nij,njkc,nlk->nilc", rows, objects, cols, optimize=True)
    mask = (inside_y[:, :, None] & inside_x[:, None, :])[..., None]
    # Background: smooth colour blobs (6x6 noise upsampled) plus fine grain.
    blobs = rng.random((n, 6, 6, 3)).astype("float32")
    up, _ = placement_matrices(np.array([CANVAS]), np.array([0]), source=6)
    background = np.einsum("ij,njkc,lk->nilc", up[0], blobs, up[0], optimize=True)
    base = rng.uniform(40, 200, (n, 1, 1, 3)).astype("float32")
    contrast = rng.uniform(20, 140, (n, 1, 1, 1)).astype("float32")
    grain = rng.normal(0, 12, (n, CANVAS, CANVAS, 1)).astype("float32")
    background = base + contrast * (background - 0.5) + grain
    canvases = np.clip(np.where(mask, placed, background), 0, 255).astype("uint8")
    boxes = np.stack([y0, x0, y0 + sizes, x0 + sizes], axis=1) / CANVAS
    return canvases, boxes.astype("float32")


class CanvasDataset(keras.utils.PyDataset):
    """Fresh canvases every epoch: `(images, {"class": y, "box": boxes})`.

    Batch `i` of epoch `t` is drawn with the generator seeded by
    `(seed, t, i)`, so runs are reproducible and batches can be made by
    parallel workers (`workers=2` overlaps them with training).
    """

    def __init__(self, images, labels, batch_size, seed, **kwargs):
        super().__init__(**kwargs)
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.seed, self.epoch = seed, 0
        self.order = np.random.default_rng((seed, 0)).permutation(len(images))

    def __len__(self):
        return max(1, len(self.images) // self.batch_size)

    def on_epoch_end(self):
        self.epoch += 1
        self.order = np.random.default_rng((self.seed, self.epoch)).permutation(
            len(self.images)
        )

    def __getitem__(self, index):
        rows = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        rng = np.random.default_rng((self.seed, self.epoch, index))
        canvases, boxes = make_canvases(self.images[rows], rng)
        return canvases, {"class": self.labels[rows], "box": boxes}


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


def conv_block(x, filters, strides=1, bn_momentum=0.99):
    x = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization(momentum=bn_momentum)(x)
    return layers.ReLU()(x)


def feed_forward(x, hidden, output, name):
    """The dense stand-in of an MoE with the same active size."""
    h = layers.Dense(hidden, activation="gelu", name=f"{name}_in")(x)
    return layers.Dense(output, name=f"{name}_out")(h)


def bn_momentum_for(steps):
    """BatchNorm momentum for a run of `steps` training steps: Keras' 0.99
    for long runs (e.g. the 1,560 steps of the full run), faster for short
    ones. At 0.99 the moving statistics still hold `0.99**150 = 22%` of their
    initial values after 150 steps (the quickstart until 2026-12-04), so
    inference used stale statistics and predicted at chance level (0.10 test
    accuracy) while training accuracy rose; with 0.933 it reached 0.30
    (docs/cifar_multitask.md). The quickstart's 744 steps now get 0.987."""
    # Clamped to [0.5, 0.99]: a smoke run of 2 steps would otherwise get a
    # negative momentum, and moving variances below zero give NaN.
    return float(min(0.99, max(0.5, 1.0 - 10.0 / max(1, steps))))


def build_model(width=1.0, experts=8, k=2, hidden=256, shared_experts=0,
                task_experts=4, task_k=None, task_hidden=128, baseline=False,
                bn_momentum=0.99, capacity_factor=1.25, task_capacity_factor=1.25):
    """The multi-task MoE model, or with `baseline=True` its dense twin with
    the same active compute per image (each token uses `k` routed and
    `shared_experts` shared experts of width `hidden`)."""
    w = [max(8, int(round(c * width))) for c in (32, 48, 96, 192)]

    def block(x, filters, strides=1):
        return conv_block(x, filters, strides, bn_momentum)

    inputs = keras.Input((CANVAS, CANVAS, 3), name="image")
    x = layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    x = block(x, w[0], strides=2)                  # 32x32
    x = block(x, w[1])
    x = block(x, w[1])
    x = layers.MaxPooling2D()(x)                   # 16x16
    x = block(x, w[2])
    x = block(x, w[2])
    x = layers.MaxPooling2D()(x)                   # 8x8
    x = block(x, w[3])
    x = block(x, w[3])
    side = CANVAS // 8
    tokens = layers.Reshape((side * side, w[3]), name="tokens")(x)

    normed = layers.LayerNormalization(name="token_norm")(tokens)
    if baseline:
        mixed = feed_forward(normed, (k + shared_experts) * hidden, w[3], "token_ffn")
    else:
        mixed = SparseMoE(
            num_experts=experts, hidden_dim=hidden, k=k,
            num_shared_experts=shared_experts, capacity_factor=capacity_factor,
            # Dropless inference: an image's prediction must not depend on
            # the other images of its batch.
            eval_capacity_factor=None,
            name="token_moe",
        )(normed)
    tokens = layers.Add()([tokens, mixed])

    pooled = layers.GlobalAveragePooling1D()(tokens)
    where = layers.Flatten()(layers.Dense(16, activation="gelu", name="summary")(tokens))
    shared = layers.Concatenate(name="shared")([pooled, where])
    shared = layers.LayerNormalization(name="shared_norm")(shared)
    if baseline:
        # Sparse gates: each task runs its k experts. Dense gates: the E
        # experts run once for all T tasks, E * hidden / T units per task.
        tower = (task_k * task_hidden if task_k is not None
                 else task_experts * task_hidden // len(TASKS))
        per_task = [feed_forward(shared, tower, task_hidden, f"{t}_ffn") for t in TASKS]
    else:
        per_task = MultiGateMoE(
            num_tasks=len(TASKS), num_experts=task_experts, hidden_dim=task_hidden,
            output_dim=task_hidden, k=task_k, capacity_factor=task_capacity_factor,
            eval_capacity_factor=None,
            activation="gelu", task_names=list(TASKS), name="task_moe",
        )(shared)
    outputs = {
        "class": ClassificationHead(10, dropout=0.2, name="class")(per_task[0]),
        "box": BoxHead(name="box")(per_task[1]),
    }
    name = "cifar_dense_baseline" if baseline else "cifar_multitask_moe"
    return keras.Model(inputs, outputs, name=name)


# ---------------------------------------------------------------------------
# Evaluation and routing
# ---------------------------------------------------------------------------


def box_iou(a, b):
    """IoU of matching rows of two `(n, 4)` `[y1, x1, y2, x2]` arrays."""
    top, left = np.maximum(a[:, 0], b[:, 0]), np.maximum(a[:, 1], b[:, 1])
    bottom, right = np.minimum(a[:, 2], b[:, 2]), np.minimum(a[:, 3], b[:, 3])
    inter = np.clip(bottom - top, 0, None) * np.clip(right - left, 0, None)

    def area(z):
        return (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])

    return inter / np.maximum(area(a) + area(b) - inter, 1e-9)


def class_expert_table(model, images, labels, num_experts):
    """Share of each class's token assignments that each token expert gets."""
    moe = model.get_layer("token_moe")
    features = keras.Model(model.input, moe.input).predict(images, verbose=0)
    _, routing = moe(features, return_routing=True)
    index = keras.ops.convert_to_numpy(routing["expert_index"])
    index = index.reshape(len(images), -1)
    table = np.zeros((10, num_experts))
    for c in range(10):
        counts = np.bincount(index[labels == c].ravel(), minlength=num_experts)
        table[c] = counts / max(1, counts.sum())
    return table


def print_routing(model, x_test, y_test, names, experts):
    usage = model.get_layer("task_moe").routing_stats()["task_expert_usage"]
    print("\nMMoE gate usage per task (share of each task's gate mass, %):")
    print("task    " + " ".join(f"{e:>4d}" for e in range(usage.shape[1])))
    for task, row in zip(TASKS, usage):
        print(f"{task:<7} " + " ".join(f"{100 * v:4.0f}" for v in row))
    table = class_expert_table(model, x_test, y_test, experts)
    print("\nToken MoE routing by class (share of the class's token choices, %):")
    print("class       " + " ".join(f"{e:>4d}" for e in range(experts)))
    for c, row in enumerate(table):
        print(f"{str(names[c]):<11} " + " ".join(f"{100 * v:4.0f}" for v in row))


def export_and_check(model, export_dir, x):
    """Exports a SavedModel (from any backend: on torch through a `.keras`
    file and a TensorFlow subprocess) and checks its serving signature."""
    from keras_moe import export_saved_model

    export_saved_model(model, export_dir)
    import tensorflow as tf

    artifact = tf.saved_model.load(export_dir)  # keep it: it owns the variables
    served = artifact.signatures["serving_default"](image=tf.constant(x.astype("float32")))
    expected = model.predict(x, verbose=0)
    diff = max(float(np.max(np.abs(np.asarray(served[t]) - expected[t]))) for t in TASKS)
    print(f"Exported SavedModel to {export_dir}; serving max |difference| = {diff:.2e}")
    assert diff < 1e-4, diff


def capacity_arg(text):
    """`--capacity-factor`: a positive number, or 'none' (dropless)."""
    if text.lower() == "none":
        return None
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"capacity factor must be > 0 or 'none', got {text!r}")
    return value


def k_arg(text):
    """`--task-k`: a positive integer, or 'none' (dense gates)."""
    if text.lower() == "none":
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"k must be >= 1 or 'none', got {text!r}")
    return value


class EpochLine(keras.callbacks.Callback):
    """One short line per epoch instead of Keras' line of every metric:
    the epoch's time, loss, class accuracy and box IoU (on that epoch's
    training canvases), the token MoE's dropped share and how many experts
    each task's MMoE gate spreads over (see `explain_routing_numbers`)."""

    def __init__(self, epochs):
        super().__init__()
        self.epochs, self.started, self.first = epochs, None, None

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.time()
        self.first = self.first or self.started

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        now = time.time()
        left = (now - self.first) / (epoch + 1) * (self.epochs - epoch - 1)
        parts = [f"epoch {epoch + 1:>2}/{self.epochs}",
                 f"{now - self.started:4.0f} s (~{left:.0f} s left)",
                 f"loss {logs.get('loss', float('nan')):.3f}",
                 f"class accuracy {logs.get('class_accuracy', float('nan')):.3f}",
                 f"box IoU {logs.get('box_iou', float('nan')):.3f}"]
        if "token_moe_dropped" in logs:
            parts.append(f"token MoE dropped {100 * logs['token_moe_dropped']:.0f}%")
        gates = [f"{t} {logs[f'task_moe_{t}_experts']:.1f}" for t in TASKS
                 if f"task_moe_{t}_experts" in logs]
        if gates:
            parts.append("MMoE experts per gate: " + ", ".join(gates))
        print(" | ".join(parts), flush=True)


def explain_routing_numbers(task_experts):
    print(
        "Per epoch: loss, accuracy and box IoU on that epoch's training canvases;\n"
        "  'token MoE dropped': share of (token, expert) assignments beyond an\n"
        "    expert's capacity in training (capacity factor 1.25). Those tokens\n"
        "    skip the experts through the residual connection; the share is high\n"
        "    while the untrained router is uneven and falls as the load evens out.\n"
        "    Inference never drops (dropless).\n"
        "  'MMoE experts per gate': the effective number of experts a task's gate\n"
        "    spreads its weight over in the batch, exp(entropy): 1 = one expert,\n"
        f"    {task_experts} = all alike. It is a batch-level number: with sparse\n"
        "    top-k gates each image uses k experts but different images use\n"
        "    different ones, so it can exceed k.",
        flush=True,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--data", default="sample",
                        help="'sample' (default: examples/data/cifar10_sample.npz, "
                             "shipped, no network), 'keras' (keras.datasets.cifar10, "
                             "downloaded), or an .npz with x_train/y_train/x_test/y_test, "
                             "e.g. ../shared/data/cifar10_small.npz")
    parser.add_argument("--epochs", type=int, default=EPOCHS,
                        help="20 for the full 10,000-image run (docs/cifar_multitask.md)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--box-weight", type=float, default=BOX_WEIGHT,
                        help="weight of the box loss against the class loss")
    parser.add_argument("--width", type=float, default=WIDTH,
                        help="backbone width multiplier (0.25 for smoke tests)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256,
                        help="hidden width of each token expert")
    parser.add_argument("--shared-experts", type=int, default=0,
                        help="token experts that every token uses (DeepSeekMoE)")
    parser.add_argument("--capacity-factor", type=capacity_arg, default=1.25,
                        help="training capacity factor of the token MoE, or 'none' "
                             "for dropless training (inference is always dropless)")
    parser.add_argument("--task-capacity-factor", type=capacity_arg, default=1.25,
                        help="training capacity factor of the MMoE's sparse gates "
                             "(with --task-k), or 'none'")
    parser.add_argument("--task-experts", type=int, default=4,
                        help="experts of the MMoE (hidden 128 each)")
    parser.add_argument("--task-k", type=k_arg, default=None,
                        help="'none' (default): dense softmax gates, every expert runs "
                             "once per image for both tasks; or an integer k: sparse "
                             "top-k gates (e.g. --task-k 2 --task-experts 6)")
    parser.add_argument("--baseline", action="store_true",
                        help="train the dense model with the same active compute")
    parser.add_argument("--train-size", type=int, default=None,
                        help="use the first N training images (default: all)")
    parser.add_argument("--test-size", type=int, default=None,
                        help="use the first N test images (default: all)")
    parser.add_argument("--output-dir", default="runs/cifar_multitask")
    parser.add_argument("--plot-dir", default=None,
                        help="where RoutingMonitor saves the routing plots "
                             "(default: OUTPUT_DIR/plots; needs matplotlib)")
    parser.add_argument("--verbose", type=int, default=0,
                        help="0 (default): one short line per epoch; 1: Keras' "
                             "progress bar with every metric instead; 2: Keras' "
                             "line per epoch with every metric")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-export", action="store_true",
                        help="skip the SavedModel export and its serving check")
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(args.seed)
    (x_train, y_train), (x_test, y_test), names = load_cifar(args.data)
    x_train, y_train = x_train[: args.train_size], y_train[: args.train_size]
    x_test, y_test = x_test[: args.test_size], y_test[: args.test_size]
    test_images, test_boxes = make_canvases(
        x_test, np.random.default_rng(12345), flip=False
    )
    source = ("the CIFAR-10 sample shipped in " + os.path.relpath(SAMPLE)
              + " (no download)" if args.data in ("sample", "auto")
              else "keras.datasets.cifar10" if args.data == "keras" else args.data)
    print(f"Keras {keras.__version__}, backend {keras.backend.backend()}; data: {source}; "
          f"{len(x_train)} training and {len(x_test)} test images")

    train = CanvasDataset(x_train, y_train, args.batch_size, args.seed, workers=2)
    steps = args.epochs * len(train)
    model = build_model(width=args.width, experts=args.experts, k=args.k,
                        hidden=args.hidden, shared_experts=args.shared_experts,
                        baseline=args.baseline, bn_momentum=bn_momentum_for(steps),
                        capacity_factor=args.capacity_factor,
                        task_experts=args.task_experts, task_k=args.task_k,
                        task_capacity_factor=args.task_capacity_factor)
    warmup = min(200, steps // 5)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, max(1, steps - warmup), warmup_target=args.learning_rate,
        warmup_steps=warmup,
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=5e-4),
        loss_weights={"class": 1.0, "box": args.box_weight},
        **default_compile_args(model),
    )
    print(f"{model.name}: {model.count_params():,} parameters; training {args.epochs} "
          f"epochs of {len(train)} steps (batch {args.batch_size})")
    callbacks = [] if args.baseline else [RoutingMetrics()]
    plot_dir = args.plot_dir or os.path.join(args.output_dir, "plots")
    monitor = None
    if not args.baseline:
        try:  # load per epoch, class x expert (token_moe), task x expert (task_moe)
            monitor = RoutingMonitor(
                plot_dir=plot_dir, class_data=(test_images, y_test),
                class_names=[str(n) for n in names], log_scalars=False,
            )
            callbacks.append(monitor)
        except ImportError:  # matplotlib is an optional extra
            print("No routing plots: matplotlib is not installed "
                  "(pip install matplotlib, or pip install -e \".[plot]\").")
        explain_routing_numbers(args.task_experts)
    if args.verbose == 0:
        callbacks.append(EpochLine(args.epochs))
    start = time.time()
    model.fit(train, epochs=args.epochs, verbose=args.verbose, callbacks=callbacks)
    train_seconds = time.time() - start
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"Training took {train_seconds:.0f} s "
          f"(load average {load:.1f} on {os.cpu_count()} cores at the end)")

    predictions = model.predict(test_images, batch_size=256, verbose=0)
    accuracy = float(np.mean(np.argmax(predictions["class"], -1) == y_test))
    iou = box_iou(predictions["box"], test_boxes)
    print(f"\nTest accuracy: {accuracy:.4f}")
    print(f"Test mean IoU: {iou.mean():.4f} (IoU >= 0.5: {np.mean(iou >= 0.5):.2%})")
    if not args.baseline:
        print_routing(model, test_images, y_test, names, args.experts)

    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "model.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    again = reloaded.predict(test_images, batch_size=256, verbose=0)
    diff = max(float(np.max(np.abs(again[t] - predictions[t]))) for t in TASKS)
    print(f"\nSaved {path}; reloaded model max |difference| = {diff:.2e}")
    assert diff < 1e-4, diff
    if not args.no_export:
        export_and_check(model, os.path.join(args.output_dir, "saved_model"),
                         test_images[:64])

    what = ("a dense CNN with two task towers (--baseline)" if args.baseline else
            f"a CNN, a sparse MoE over its 64 tokens ({args.experts} experts, top-{args.k})"
            f"\n  and a multi-gate MoE ({args.task_experts} experts, a gate per task)")
    print("\n" + "=" * 72)
    print(f"Trained {what}\n  to name the CIFAR-10 object on each 64x64 canvas and "
          f"draw its box:\n  {len(x_train)} training images, {args.epochs} epochs, "
          f"{train_seconds:.0f} s ({keras.backend.backend()} backend).")
    print(f"Test accuracy {accuracy:.3f}  (10 classes: chance is 0.100; "
          f"{len(x_test)} test canvases)")
    print(f"Test box IoU  {iou.mean():.3f}  (overlap of predicted and true box, "
          f"1 = perfect; {np.mean(iou >= 0.5):.0%} >= 0.5)")
    print(f"Files in {args.output_dir}/:\n  model.keras   the trained model "
          "(keras.saving.load_model)" + ("" if args.no_export else
                                         "\n  saved_model/  TensorFlow SavedModel for serving"))
    if monitor is not None and os.path.isdir(plot_dir):
        print(f"  routing plots (expert load, drops, class/task x expert) in {plot_dir}/")
    print("Next:\n  the full run (10,000 images; about 0.68 accuracy, 0.96 IoU; 11-17 min on\n"
          "  2 idle cores, about twice that on a busy machine):\n"
          "    python benchmarks/cifar_multitask.py --data ../shared/data/cifar10_small.npz "
          "\\\n        --epochs 20 --width 1.0 --batch-size 128 --box-weight 2\n"
          "  the dense twin with the same compute: add --baseline\n"
          "  the example, read top to bottom: examples/cifar_multitask.py\n"
          "  the walk-through: docs/cifar_multitask.md")
    print("=" * 72)
    print(f"\nRESULT model={model.name} accuracy={accuracy:.4f} mean_iou={iou.mean():.4f} "
          f"train_seconds={train_seconds:.0f} epochs={args.epochs} "
          f"train_images={len(x_train)} backend={keras.backend.backend()}")


if __name__ == "__main__":
    main()
