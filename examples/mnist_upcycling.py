"""
Title: Sparse upcycling: from a trained dense model to a Mixture-of-Experts
Author: keras_moe contributors
Date created: 2026/12/05
Last modified: 2026/12/05
Description: Train a small dense model on MNIST rows, turn its feed-forward
block into a `SparseMoE` whose experts start as copies of it, and continue
training next to the dense model.
Accelerator: None
"""

"""
## Introduction

Sparse upcycling (Komatsuzaki et al. 2022) reuses a trained dense
checkpoint: every expert of a new MoE layer starts as a copy of the dense
model's feed-forward block (FFN) and the router starts fresh. With the
router's top-`k` weights summing to 1, the MoE layer computes exactly the
FFN at insertion, so training continues from the dense model's accuracy
instead of from scratch, with `E` times the FFN's parameters and about `k`
times its compute per token.

This example runs in about a minute on a 2-core CPU with the MNIST sample
shipped in `examples/data/`. `benchmarks/mnist_upcycling.py` is the runner
behind the measured tables of `docs/porting.md` (per seed, and with the
dense model given the same extra compute time).

## Setup
"""

import argparse
import importlib.util
import logging
import os
import time

SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "mnist_sample.npz")
parser = argparse.ArgumentParser(description="Sparse upcycling on MNIST rows")
parser.add_argument("--data", default=SAMPLE,
                    help="an .npz with x_train/y_train/x_test/y_test (default: the "
                         "shipped sample), or 'keras' (keras.datasets.mnist)")
parser.add_argument("--epochs", type=int, default=3, help="dense training")
parser.add_argument("--extra-epochs", type=int, default=3,
                    help="continued training of each model")
parser.add_argument("--train-size", type=int, default=None, help="first N training images")
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

from keras_moe.upcycling import upcycle  # noqa: E402

keras.utils.set_random_seed(args.seed)

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
print(f"Backend {keras.backend.backend()}: {len(x_train)} training and "
      f"{len(x_test)} test images")

"""
## A small dense model

Each image is a sequence of 28 tokens (its pixel rows). A token embedding
feeds one pre-norm residual FFN block (`Dense(128, gelu)` then `Dense(64)`);
a linear head classifies the flattened sequence, so it sees the positions.
Every layer has a name: the upcycled model will reuse them by name.
"""

inputs = keras.Input((28, 28), name="image")
x = keras.layers.Rescaling(1 / 255.0, name="rescale")(inputs)
x = keras.layers.Dense(64, name="token_embedding")(x)
h = keras.layers.LayerNormalization(name="ffn_norm")(x)
h = keras.layers.Dense(128, activation="gelu", name="ffn_in")(h)
h = keras.layers.Dense(64, name="ffn_out")(h)
x = keras.layers.Add(name="residual")([x, h])
x = keras.layers.LayerNormalization(name="final_norm")(x)
x = keras.layers.Flatten(name="flatten")(x)
outputs = keras.layers.Dense(10, activation="softmax", name="digit")(x)
dense = keras.Model(inputs, outputs, name="dense")
dense.compile(optimizer=keras.optimizers.Adam(1e-3),
              loss="sparse_categorical_crossentropy", metrics=["accuracy"])
dense.fit(x_train, y_train, epochs=args.epochs, batch_size=64, verbose=2)


def accuracy(model):
    probabilities = model.predict(x_test, batch_size=256, verbose=0)
    return float((probabilities.argmax(-1) == y_test).mean())


print(f"Dense model after {args.epochs} epochs: test accuracy {accuracy(dense):.4f}")

"""
## Upcycle its FFN

`upcycle((ffn_in, ffn_out), num_experts=4, k=2)` builds a `SparseMoE` whose
4 experts are copies of the two trained `Dense` layers and whose router is
new. The upcycled model is a clone of the dense one (so the two continue
independently) with the MoE in place of the FFN, wired from the clone's
layers. At insertion it predicts what the dense model does.
"""

clone = keras.models.clone_model(dense)
clone.set_weights(dense.get_weights())
layer = clone.get_layer
moe = upcycle((layer("ffn_in"), layer("ffn_out")), num_experts=4, k=2, name="moe")
inputs = keras.Input((28, 28), name="image")
x = layer("token_embedding")(layer("rescale")(inputs))
x = layer("residual")([x, moe(layer("ffn_norm")(x))])
x = layer("flatten")(layer("final_norm")(x))
upcycled = keras.Model(inputs, layer("digit")(x), name="upcycled")
difference = np.abs(upcycled.predict(x_test, verbose=0) - dense.predict(x_test, verbose=0))
print(f"At insertion: max |upcycled - dense| = {difference.max():.2e} over the test set; "
      "4 experts, top-2")

"""
## Continue both

Both models train for the same number of steps. The dense model simply
continues (its optimizer keeps its state). The upcycled model is new, so it
is compiled with a new optimizer: Adam's moments of the dense FFN are not
copied into the experts. The upcycled model costs more per step (2 experts
per token and a router), so at the same compute time the dense model could
train longer: the benchmark measures that comparison too.
"""

upcycled.compile(optimizer=keras.optimizers.Adam(1e-3),
                 loss="sparse_categorical_crossentropy", metrics=["accuracy"])
rows = []
for model in (dense, upcycled):
    start = time.perf_counter()
    model.fit(x_train, y_train, epochs=args.extra_epochs, batch_size=64, verbose=2)
    seconds = time.perf_counter() - start
    rows.append(f"| {model.name} | {accuracy(model):.4f} | {seconds:.1f} | "
                f"{model.count_params():,} |")
load = upcycled.get_layer("moe").routing_stats()["expert_load"]
print("Expert load on the last test batch:", [round(float(share), 3) for share in load])
print(f"\n| model | test accuracy after {args.extra_epochs} more epochs | "
      "time (s) | parameters |\n|---|---|---|---|")
print("\n".join(rows))
