"""
Title: A sparse Mixture-of-Experts classifier on MNIST rows
Author: keras_moe contributors
Date created: 2026/11/22
Last modified: 2026/12/05
Description: `SparseMoE` inside a functional Keras model: fit, see which experts
each digit uses, save to `.keras`, reload, and export a TensorFlow SavedModel.
Accelerator: None
"""

"""
## Introduction

A sparse Mixture-of-Experts layer holds `E` feed-forward experts and a router
that sends each token to `k` of them, so a token costs `k` experts, not `E`.
Here an MNIST image is read as a sequence of 28 tokens, its pixel rows, and
one residual `SparseMoE` block with 8 experts and top-2 routing sits between
a token embedding and a linear classifier. Each row is routed on its own, so
the experts specialise on stroke shapes at positions; a table at the end
shows which experts each digit uses.

It runs in about a minute on a 2-core CPU with the 4,000-image sample
shipped in `examples/data/`, on any backend:

```
python examples/mnist_sparse_moe.py
python examples/mnist_sparse_moe.py --data keras   # all of MNIST (downloads it)
```

## Setup
"""

import argparse
import importlib.util
import logging
import os
import time

SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "mnist_sample.npz")
parser = argparse.ArgumentParser(description="A sparse MoE classifier on MNIST rows")
parser.add_argument("--data", default=SAMPLE,
                    help="an .npz with x_train/y_train/x_test/y_test (default: the "
                         "shipped sample), or 'keras' (keras.datasets.mnist)")
parser.add_argument("--epochs", type=int, default=8)
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--train-size", type=int, default=None, help="first N training images")
parser.add_argument("--output-dir", default="runs/mnist_sparse_moe")
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

from keras_moe import export_saved_model  # noqa: E402
from keras_moe.layers import SparseMoE  # noqa: E402

keras.utils.set_random_seed(args.seed)

"""
## The data

28x28 uint8 images with their digit. The sample holds 4,000 training and
1,000 test images, the same number of each digit.
"""

if args.data == "keras":
    (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
else:
    if not os.path.exists(args.data):
        parser.error(f"--data {args.data}: no such file (an .npz with x_train, "
                     "y_train, x_test, y_test, or 'keras')")
    with np.load(args.data) as data:
        (x_train, y_train) = data["x_train"], data["y_train"]
        (x_test, y_test) = data["x_test"], data["y_test"]
x_train, y_train = x_train[: args.train_size], y_train[: args.train_size]
print(f"Keras {keras.__version__}, backend {keras.backend.backend()}; "
      f"{len(x_train)} training and {len(x_test)} test images")

"""
## The model

- Token embedding: each 28-pixel row becomes a 64-d token. An `EinsumDense`
  whose bias has one row per position (`bias_axes="td"`) adds a learned
  position embedding in the same step.
- A pre-norm residual MoE block: `x + SparseMoE(LayerNorm(x))`, 8 experts of
  128 hidden units, top-2 routing. In training an expert takes at most 1.25
  times its even share of a batch's tokens (`capacity_factor`); inference is
  dropless (`eval_capacity_factor=None`), so an image's prediction never
  depends on the other images of its batch.
- A linear classifier on the flattened sequence, so it sees the positions.

`model.compile` needs nothing special: `SparseMoE` adds its load-balancing
loss with `add_loss`, and `fit` minimises it with the task loss.
"""


def build_model(num_experts=8, k=2, dim=64, hidden_dim=128):
    inputs = keras.Input((28, 28), name="image")
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.EinsumDense("btp,pd->btd", output_shape=(28, dim), bias_axes="td",
                                 name="token_embedding")(x)
    moe = SparseMoE(
        num_experts=num_experts,
        hidden_dim=hidden_dim,
        k=k,
        capacity_factor=1.25,
        eval_capacity_factor=None,
        activation="gelu",
        name="moe",
    )
    x = x + moe(keras.layers.LayerNormalization()(x))
    x = keras.layers.LayerNormalization()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(10, activation="softmax", name="digit")(x)
    return keras.Model(inputs, outputs, name="mnist_sparse_moe")


model = build_model()
model.compile(
    optimizer=keras.optimizers.Adam(2e-3),
    loss="sparse_categorical_crossentropy",
    metrics=["accuracy"],
)
model.summary()

"""
## Training
"""

start = time.time()
model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs,
          validation_split=0.1, verbose=2)
print(f"Training took {time.time() - start:.0f} s")
_, accuracy = model.evaluate(x_test, y_test, verbose=0)
print(f"Test accuracy: {accuracy:.4f}")

"""
## Which experts each digit uses

`layer(x, return_routing=True)` returns the layer's output and its routing:
for every token, the experts it went to (`expert_index`, `(tokens, k)`),
their weights, the router's probabilities. The MoE layer's input comes from
a model that stops there. The layer also keeps statistics of its last call
(`routing_stats()`): the load of each expert and the share of dropped
(token, expert) pairs, 0 at inference.
"""

moe = model.get_layer("moe")
features = keras.Model(model.input, moe.input).predict(x_test, verbose=0)
_, routing = moe(features, return_routing=True)
chosen = keras.ops.convert_to_numpy(routing["expert_index"]).reshape(len(x_test), -1)
stats = moe.routing_stats()
print("\nExpert load on the test set (share of routed token-choices):")
print("  " + " ".join(f"{load:5.2f}" for load in stats["expert_load"]))
print(f"Dropped at inference: {stats['dropped_fraction']:.2%} "
      "(eval_capacity_factor=None: dropless)")
print("\nRouting by digit (rows: digit, columns: expert, share in %):")
print("digit " + " ".join(f"{e:>4d}" for e in range(moe.num_experts)))
for digit in range(10):
    counts = np.bincount(chosen[y_test == digit].ravel(), minlength=moe.num_experts)
    print(f"{digit:>5d} " + " ".join(f"{100 * v:4.0f}" for v in counts / counts.sum()))

"""
## Save, reload, export

The `.keras` file reloads with the same predictions (on any backend).
`export_saved_model` writes a TensorFlow SavedModel from any backend (on
torch through the `.keras` file and a TensorFlow subprocess) for serving.
"""

os.makedirs(args.output_dir, exist_ok=True)
path = os.path.join(args.output_dir, "model.keras")
model.save(path)
reloaded = keras.saving.load_model(path)
diff = np.max(np.abs(reloaded.predict(x_test, verbose=0) - model.predict(x_test, verbose=0)))
print(f"\nSaved {path}; reloaded model max |difference| = {diff:.2e}")
assert diff < 1e-5, diff

export_dir = os.path.join(args.output_dir, "saved_model")
export_saved_model(model, export_dir)
import tensorflow as tf  # noqa: E402

artifact = tf.saved_model.load(export_dir)  # keep it: it owns the variables
served = artifact.serve(tf.constant(x_test[:64].astype("float32"))).numpy()
diff = np.max(np.abs(served - model.predict(x_test[:64], verbose=0)))
print(f"Exported SavedModel to {export_dir}; serving max |difference| = {diff:.2e}")
assert diff < 1e-5, diff
