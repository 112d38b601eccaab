"""
Title: Classify and localise CIFAR-10 objects with a multi-task Mixture-of-Experts
Author: keras_moe contributors
Date created: 2026/11/23
Last modified: 2026/12/05
Description: A CNN, a sparse MoE over its spatial tokens and a multi-gate MoE
(MMoE) feeding a class head and a box head: `fit` on a dict of targets, routing
tables, `.keras` save and reload, and a TensorFlow SavedModel export.
Accelerator: None
"""

"""
## Introduction

Each CIFAR-10 image is pasted at a random size and position on a 64x64
canvas with a textured background, and one model predicts both **what** the
object is (10 classes) and **where** it is (its box). Two Mixture-of-Experts
layers do the work in the middle:

```
image 64x64x3 -> CNN backbone (stride 8) -> 8x8 map -> 64 tokens
    -> tokens + SparseMoE(LayerNorm(tokens))      token experts, top-2 routing
    -> [mean token ; flattened 8x8 summary]       what both tasks see
    -> MultiGateMoE(2 tasks, 4 experts)           one mixture per task
    -> ClassificationHead(10)      BoxHead()
```

- `SparseMoE` sends each of the 64 tokens of an image to 2 of its 8 experts,
  with real sparse dispatch: a token costs 2 experts, not 8.
- `MultiGateMoE` (MMoE, Ma et al. 2018) gives each task its own softmax gate
  over a shared bank of 4 experts, so the class task and the box task can
  draw on different experts.

This example runs in about 4 minutes on a 2-core CPU with the 4,000-image
sample shipped in `examples/data/` (no download), on any backend
(TensorFlow is the fastest on CPU):

```
python examples/cifar_multitask.py
python examples/cifar_multitask.py --data keras        # all of CIFAR-10 (downloads it)
```

`benchmarks/cifar_multitask.py` is the experiment runner behind the numbers
in `docs/cifar_multitask.md` (the full 10,000-image run, the dense twin of
the same compute, sparse MMoE gates, ...).

## Setup
"""

import argparse
import importlib.util
import logging
import os
import time

parser = argparse.ArgumentParser(description="CIFAR-10 class + box with a multi-task MoE")
parser.add_argument("--data", default="sample",
                    help="'sample' (examples/data/cifar10_sample.npz, shipped), 'keras' "
                         "(keras.datasets.cifar10, downloaded), or an .npz with "
                         "x_train/y_train/x_test/y_test")
parser.add_argument("--epochs", type=int, default=12)
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--width", type=float, default=0.75, help="backbone width multiplier")
parser.add_argument("--train-size", type=int, default=None, help="first N training images")
parser.add_argument("--test-size", type=int, default=None, help="first N test images")
parser.add_argument("--output-dir", default="runs/cifar_multitask")
parser.add_argument("--verbose", type=int, default=0,
                    help="0: one short line per epoch; 1: Keras' progress bar with "
                         "every routing metric")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()


# TensorFlow's C++ log lines (oneDNN notices, CPU features) say nothing about
# this example: hide them unless you chose a log level. They are written
# while TensorFlow's libraries load, so stderr is pointed at /dev/null
# meanwhile (an import error is still printed: stderr is back by then).
# Keras loads TensorFlow, when it is installed, on the first `model.save`
# under every backend: under JAX and PyTorch it is loaded here, quietly.
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
from keras import layers  # noqa: E402

from keras_moe import export_saved_model  # noqa: E402
from keras_moe.callbacks import RoutingMetrics, RoutingMonitor  # noqa: E402
from keras_moe.layers import (  # noqa: E402
    BoxHead,
    ClassificationHead,
    MultiGateMoE,
    SparseMoE,
    default_compile_args,
)

keras.utils.set_random_seed(args.seed)
CANVAS = 64
TASKS = ("class", "box")

"""
## The data: CIFAR-10 objects on textured canvases

The shipped sample holds 4,000 training and 500 test images (32x32,
uint8). Each image is resized to a random size between 24 and 48 pixels,
flipped at random and pasted at a random position on a 64x64 canvas whose
background is smooth colour blobs plus grain. The targets are the class and
the box `[y1, x1, y2, x2]`, normalised to [0, 1].

The resize is a bilinear interpolation written as two matrix products (one
per axis), so a whole batch of canvases is one `einsum`.
"""

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLE = os.path.join(HERE, "data", "cifar10_sample.npz")
class_names = np.array(["airplane", "automobile", "bird", "cat", "deer", "dog",
                        "frog", "horse", "ship", "truck"])
if args.data == "keras":
    (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
    source = "keras.datasets.cifar10"
else:
    source = SAMPLE if args.data in ("sample", "auto") else args.data
    if not os.path.exists(source):
        raise SystemExit(
            f"--data {source}: no such file. Pass an .npz with x_train, y_train, "
            "x_test, y_test (e.g. ../shared/data/cifar10_small.npz relative to the "
            "project root), 'sample' (the shipped sample) or 'keras' "
            "(keras.datasets.cifar10, downloaded)."
        )
    with np.load(source) as data:
        x_train, y_train = data["x_train"], data["y_train"]
        x_test, y_test = data["x_test"], data["y_test"]
        if "class_names" in data:
            class_names = data["class_names"]
y_train, y_test = y_train.ravel(), y_test.ravel()
x_train, y_train = x_train[: args.train_size], y_train[: args.train_size]
x_test, y_test = x_test[: args.test_size], y_test[: args.test_size]


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
    """`(canvases uint8 (n, 64, 64, 3), boxes float32 (n, 4))`."""
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


"""
Training canvases are drawn afresh every epoch (position, size, flip and
background are free augmentation) by a `keras.utils.PyDataset`: batch `i`
of epoch `t` uses a generator seeded by `(seed, t, i)`, so runs are
reproducible and two workers can draw batches while the model trains. The
test canvases are drawn once, with a fixed seed.
"""


class CanvasDataset(keras.utils.PyDataset):
    """`(images, {"class": labels, "box": boxes})` batches, new every epoch."""

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


test_images, test_boxes = make_canvases(x_test, np.random.default_rng(12345), flip=False)
train = CanvasDataset(x_train, y_train, args.batch_size, args.seed, workers=2)
if source == SAMPLE:
    source = f"the CIFAR-10 sample shipped in {os.path.relpath(SAMPLE)} (no download)"
print(f"Keras {keras.__version__}, backend {keras.backend.backend()}; data: {source}; "
      f"{len(x_train)} training and {len(x_test)} test images")

"""
## The model

### A CNN backbone that ends in tokens

Seven 3x3 convolution blocks bring the 64x64 canvas down to an 8x8 map:
64 tokens, one per 8x8 patch. The widths are 32/48/96/192 channels times
`--width` (0.75 here). BatchNorm's moving statistics must settle within
the run: Keras' default momentum 0.99 still remembers 22% of its initial
values after 150 steps, so the momentum follows the run's length
(`1 - 10 / steps`, 0.987 for this run's 744 steps).
"""

steps = args.epochs * len(train)
bn_momentum = float(min(0.99, max(0.5, 1.0 - 10.0 / max(1, steps))))
widths = [max(8, int(round(c * args.width))) for c in (32, 48, 96, 192)]


def conv_block(x, filters, strides=1):
    x = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization(momentum=bn_momentum)(x)
    return layers.ReLU()(x)


inputs = keras.Input((CANVAS, CANVAS, 3), name="image")
x = layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
x = conv_block(x, widths[0], strides=2)  # 32x32
x = conv_block(x, widths[1])
x = conv_block(x, widths[1])
x = layers.MaxPooling2D()(x)  # 16x16
x = conv_block(x, widths[2])
x = conv_block(x, widths[2])
x = layers.MaxPooling2D()(x)  # 8x8
x = conv_block(x, widths[3])
x = conv_block(x, widths[3])
tokens = layers.Reshape((8 * 8, widths[3]), name="tokens")(x)

"""
### A sparse MoE over the tokens

A pre-norm residual `SparseMoE` block: a router picks 2 of 8 experts for
each token, and each expert (a 256-unit feed-forward network) runs only on
the tokens sent to it. In training an expert takes at most 1.25 times its
even share of a batch's tokens (`capacity_factor`); the tokens beyond that
skip it through the residual connection. Inference is dropless
(`eval_capacity_factor=None`): nothing is dropped, so an image's prediction
never depends on the other images of its batch.
"""

normed = layers.LayerNormalization(name="token_norm")(tokens)
mixed = SparseMoE(
    num_experts=8,
    hidden_dim=256,
    k=2,
    capacity_factor=1.25,
    eval_capacity_factor=None,
    name="token_moe",
)(normed)
tokens = layers.Add()([tokens, mixed])

"""
### A multi-gate MoE and two task heads

Both tasks see the mean token (what is in the image) and a flattened 16-d
summary of each token (where it is). `MultiGateMoE` runs 4 experts once per
image and gives each task its own softmax gate over them. The heads know
their losses and metrics: cross-entropy and accuracy for the class, GIoU +
smooth-L1 and box IoU for the box (`default_compile_args`).
"""

pooled = layers.GlobalAveragePooling1D()(tokens)
where = layers.Flatten()(layers.Dense(16, activation="gelu", name="summary")(tokens))
shared = layers.Concatenate(name="shared")([pooled, where])
shared = layers.LayerNormalization(name="shared_norm")(shared)
class_features, box_features = MultiGateMoE(
    num_tasks=2,
    num_experts=4,
    hidden_dim=128,
    output_dim=128,
    eval_capacity_factor=None,
    activation="gelu",
    task_names=list(TASKS),
    name="task_moe",
)(shared)
outputs = {
    "class": ClassificationHead(10, dropout=0.2, name="class")(class_features),
    "box": BoxHead(name="box")(box_features),
}
model = keras.Model(inputs, outputs, name="cifar_multitask_moe")

warmup = min(200, steps // 5)
schedule = keras.optimizers.schedules.CosineDecay(
    0.0, max(1, steps - warmup), warmup_target=3e-3, warmup_steps=warmup
)
model.compile(
    optimizer=keras.optimizers.AdamW(schedule, weight_decay=5e-4),
    loss_weights={"class": 1.0, "box": 1.0},
    **default_compile_args(model),
)
print(f"{model.name}: {model.count_params():,} parameters; training {args.epochs} "
      f"epochs of {len(train)} steps (batch {args.batch_size})")

"""
## Training, with the routing in view

`RoutingMetrics` adds each MoE layer's numbers to `fit`'s logs: the share of
the token MoE's (token, expert) assignments dropped for capacity, and for
each task the effective number of MMoE experts its gate uses
(`exp(entropy)` of its usage over the batch: 1 = one expert, 4 = all
alike). `RoutingMonitor` records the routing every epoch and saves plots
(expert load over epochs, drops, class x expert and task x expert tables;
it needs matplotlib). A small callback prints one short line per epoch.
"""

callbacks = [RoutingMetrics()]
plot_dir = os.path.join(args.output_dir, "plots")
try:
    callbacks.append(RoutingMonitor(
        plot_dir=plot_dir, class_data=(test_images, y_test),
        class_names=[str(n) for n in class_names], log_scalars=False,
    ))
except ImportError:  # matplotlib is an optional extra
    plot_dir = None
    print("No routing plots: matplotlib is not installed "
          "(pip install matplotlib, or pip install -e \".[plot]\").")
print(
    "Per epoch: loss, accuracy and box IoU on that epoch's training canvases;\n"
    "  'token MoE dropped': share of (token, expert) assignments beyond an\n"
    "    expert's capacity in training; those tokens skip the experts through\n"
    "    the residual connection. High while the untrained router is uneven,\n"
    "    falling as the load evens out. Inference never drops (dropless).\n"
    "  'MMoE experts per gate': the effective number of experts a task's gate\n"
    "    spreads its weight over in the batch: 1 = one expert, 4 = all alike.",
    flush=True,
)


class EpochLine(keras.callbacks.Callback):
    """One short line per epoch instead of Keras' line of every metric."""

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.time()
        self.first = getattr(self, "first", self.started)

    def on_epoch_end(self, epoch, logs=None):
        now, epochs = time.time(), self.params["epochs"]
        left = (now - self.first) / (epoch + 1) * (epochs - epoch - 1)
        value = {name: logs.get(name, float("nan")) for name in (
            "loss", "class_accuracy", "box_iou", "token_moe_dropped",
            "task_moe_class_experts", "task_moe_box_experts")}
        parts = [f"epoch {epoch + 1:>2}/{epochs}",
                 f"{now - self.started:4.0f} s (~{left:.0f} s left)",
                 f"loss {value['loss']:.3f}",
                 f"class accuracy {value['class_accuracy']:.3f}",
                 f"box IoU {value['box_iou']:.3f}",
                 f"token MoE dropped {100 * value['token_moe_dropped']:.0f}%",
                 "MMoE experts per gate: " + ", ".join(
                     f"{t} {value[f'task_moe_{t}_experts']:.1f}" for t in TASKS)]
        print(" | ".join(parts), flush=True)


if args.verbose == 0:
    callbacks.append(EpochLine())
start = time.time()
model.fit(train, epochs=args.epochs, verbose=args.verbose, callbacks=callbacks)
train_seconds = time.time() - start
load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
print(f"Training took {train_seconds:.0f} s "
      f"(load average {load:.1f} on {os.cpu_count()} cores at the end)")

"""
## Evaluation

Class accuracy, and the intersection over union (IoU) of each predicted box
with the true one on the fixed test canvases.
"""

predictions = model.predict(test_images, batch_size=256, verbose=0)
accuracy = float(np.mean(np.argmax(predictions["class"], -1) == y_test))
top = np.maximum(predictions["box"][:, :2], test_boxes[:, :2])
bottom = np.minimum(predictions["box"][:, 2:], test_boxes[:, 2:])
intersection = np.prod(np.clip(bottom - top, 0, None), axis=-1)
areas = [np.prod(b[:, 2:] - b[:, :2], axis=-1) for b in (predictions["box"], test_boxes)]
iou = intersection / np.maximum(areas[0] + areas[1] - intersection, 1e-9)
print(f"\nTest accuracy: {accuracy:.4f}")
print(f"Test mean IoU: {iou.mean():.4f} (IoU >= 0.5: {np.mean(iou >= 0.5):.2%})")

"""
## Which experts each task and each class use

The MMoE keeps its statistics from the last call (`routing_stats()`): each
task's share of gate weight per expert. For the token MoE,
`return_routing=True` gives the experts each token went to; grouping the
test images by class gives a class x expert table.
"""

usage = model.get_layer("task_moe").routing_stats()["task_expert_usage"]
print("\nMMoE gate usage per task (share of each task's gate mass, %):")
print("task    " + " ".join(f"{e:>4d}" for e in range(usage.shape[1])))
for task, row in zip(TASKS, usage):
    print(f"{task:<7} " + " ".join(f"{100 * v:4.0f}" for v in row))

token_moe = model.get_layer("token_moe")
features = keras.Model(model.input, token_moe.input).predict(test_images, verbose=0)
_, routing = token_moe(features, return_routing=True)
chosen = keras.ops.convert_to_numpy(routing["expert_index"]).reshape(len(test_images), -1)
print("\nToken MoE routing by class (share of the class's token choices, %):")
print("class       " + " ".join(f"{e:>4d}" for e in range(8)))
for c in range(10):
    counts = np.bincount(chosen[y_test == c].ravel(), minlength=8)
    share = counts / max(1, counts.sum())
    print(f"{str(class_names[c]):<11} " + " ".join(f"{100 * v:4.0f}" for v in share))

"""
## Save, reload and export for serving

A `.keras` file reloads with the same predictions on any backend.
`keras_moe.export_saved_model` writes a TensorFlow SavedModel from any
backend (on torch through the `.keras` file and a TensorFlow subprocess);
its `serving_default` signature takes `image=` and returns the
`{"class", "box"}` dict.
"""

os.makedirs(args.output_dir, exist_ok=True)
path = os.path.join(args.output_dir, "model.keras")
model.save(path)
reloaded = keras.saving.load_model(path)
again = reloaded.predict(test_images, batch_size=256, verbose=0)
diff = max(float(np.max(np.abs(again[t] - predictions[t]))) for t in TASKS)
print(f"\nSaved {path}; reloaded model max |difference| = {diff:.2e}")
assert diff < 1e-4, diff

export_dir = os.path.join(args.output_dir, "saved_model")
export_saved_model(model, export_dir)
import tensorflow as tf  # noqa: E402  (the SavedModel is read back with TensorFlow)

artifact = tf.saved_model.load(export_dir)  # keep it: it owns the variables
served = artifact.signatures["serving_default"](
    image=tf.constant(test_images[:64].astype("float32"))
)
expected = model.predict(test_images[:64], verbose=0)
diff = max(float(np.max(np.abs(np.asarray(served[t]) - expected[t]))) for t in TASKS)
print(f"Exported SavedModel to {export_dir}; serving max |difference| = {diff:.2e}")
assert diff < 1e-4, diff

"""
## Summary
"""

print("\n" + "=" * 72)
print(f"Trained a CNN, a sparse MoE over its 64 tokens (8 experts, top-2)\n"
      f"  and a multi-gate MoE (4 experts, a gate per task)\n"
      f"  to name the CIFAR-10 object on each 64x64 canvas and draw its box:\n"
      f"  {len(x_train)} training images, {args.epochs} epochs, {train_seconds:.0f} s "
      f"({keras.backend.backend()} backend).")
print(f"Test accuracy {accuracy:.3f}  (10 classes: chance is 0.100; "
      f"{len(x_test)} test canvases)")
print(f"Test box IoU  {iou.mean():.3f}  (overlap of predicted and true box, "
      f"1 = perfect; {np.mean(iou >= 0.5):.0%} >= 0.5)")
print(f"Files in {args.output_dir}/:\n"
      "  model.keras   the trained model (keras.saving.load_model)\n"
      "  saved_model/  TensorFlow SavedModel for serving")
if plot_dir is not None and os.path.isdir(plot_dir):
    print(f"  routing plots (expert load, drops, class/task x expert) in {plot_dir}/")
print("Next:\n  the full run (10,000 images; about 0.68 accuracy, 0.96 IoU; 11-17 min on\n"
      "  2 idle cores, about twice that on a busy machine):\n"
      "    python benchmarks/cifar_multitask.py --data ../shared/data/cifar10_small.npz \\\n"
      "        --epochs 20 --width 1.0 --batch-size 128 --box-weight 2\n"
      "  the dense twin with the same compute: add --baseline\n"
      "  the walk-through: docs/cifar_multitask.md")
print("=" * 72)
print(f"\nRESULT model={model.name} accuracy={accuracy:.4f} mean_iou={iou.mean():.4f} "
      f"train_seconds={train_seconds:.0f} epochs={args.epochs} "
      f"train_images={len(x_train)} backend={keras.backend.backend()}")
