"""
Title: A mixture of small CNN experts on MNIST
Author: keras_moe contributors
Date created: 2026/11/23
Last modified: 2026/12/05
Description: `MixtureOfExperts` with whole Keras models as experts: a gate sends
each digit to 2 of 4 small CNNs, which run only on the images sent to them.
Accelerator: None
"""

"""
## Introduction

The classic mixture of experts (Jacobs et al. 1991) routes whole examples,
not tokens: a gate scores the experts for each input and the chosen experts'
outputs are combined. `MixtureOfExperts` takes any Keras layers or models
as experts. With `k` set, the compute is sparse: the batch is dispatched into
one buffer of `C = ceil(k B / E * 1.25)` images per expert, and each expert
runs on its buffer only, not on the whole batch.

Here 4 small CNNs classify MNIST digits; a linear gate on the pixels sends
each image to 2 of them. It runs in about a minute on a 2-core CPU with the
sample shipped in `examples/data/`. `benchmarks/mnist_experts.py` compares
top-1 routing and the three ways of combining the experts' outputs
(`integration="weighted_sum"`, `"max"`, `"attention"`).

## Setup
"""

import argparse
import importlib.util
import logging
import os

SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "mnist_sample.npz")
parser = argparse.ArgumentParser(description="A mixture of small CNN experts on MNIST")
parser.add_argument("--data", default=SAMPLE,
                    help="an .npz with x_train/y_train/x_test/y_test (default: the "
                         "shipped sample), or 'keras' (keras.datasets.mnist)")
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--integration", default="weighted_sum",
                    choices=["weighted_sum", "max", "attention"])
parser.add_argument("--train-size", type=int, default=None, help="first N training images")
parser.add_argument("--test-size", type=int, default=None, help="first N test images")
parser.add_argument("--output-dir", default="runs/mnist_experts")
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

from keras_moe.callbacks import RoutingMetrics  # noqa: E402
from keras_moe.layers import MixtureOfExperts  # noqa: E402

keras.utils.set_random_seed(args.seed)

"""
## The data

28x28 uint8 images with their digit (the sample: 4,000 training and 1,000
test images).
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
x_test, y_test = x_test[: args.test_size], y_test[: args.test_size]
print(f"Keras {keras.__version__}, backend {keras.backend.backend()}; "
      f"{len(x_train)} training and {len(x_test)} test images")

"""
## The experts and the mixture

Each expert is a `keras.Sequential` CNN (`Conv-Pool-Conv-Pool-Dense`, about
60k weights) that maps a digit to 64 features. `MixtureOfExperts` scores
the experts with a linear gate on the flattened input, keeps the top 2 for
each image, runs each expert on the images sent to it, and combines their
features (`integration`): the gate-weighted sum by default. A shared linear
head classifies.

The load-balancing loss keeps all experts in use. Switch's usual weight 0.01
is tuned for thousands of tokens per batch; with 100 images per batch the
gate collapsed onto two experts, so the weight is 0.1 here. Inference is
dropless (`eval_capacity_factor=None`): no image is dropped, and a prediction
never depends on the other images of its batch.
"""

experts = [
    keras.Sequential(
        [
            keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
        ],
        name=f"expert_{e}",
    )
    for e in range(4)
]
inputs = keras.Input((28, 28), name="image")
x = keras.layers.Rescaling(1 / 255.0)(inputs)
x = keras.layers.Reshape((28, 28, 1))(x)
x = MixtureOfExperts(
    experts,
    integration=args.integration,
    k=2,
    capacity_factor=1.25,
    eval_capacity_factor=None,
    load_balance_weight=0.1,
    attention_dim=32,
    name="moe",
)(x)
x = keras.layers.Dropout(0.2)(x)
outputs = keras.layers.Dense(10, activation="softmax", name="digit")(x)
model = keras.Model(inputs, outputs, name=f"mnist_experts_{args.integration}")
model.compile(
    optimizer=keras.optimizers.Adam(2e-3),
    loss="sparse_categorical_crossentropy",
    metrics=["accuracy"],
)
print(f"{model.name}: {model.count_params():,} parameters")

"""
## Training

`RoutingMetrics` adds the mixture's routing numbers to `fit`'s logs: how
evenly the experts are loaded, the share of images dropped for capacity in
training, the balancing loss, the gate's entropy.
"""

model.fit(x_train, y_train, batch_size=100, epochs=args.epochs, verbose=2,
          callbacks=[RoutingMetrics()])
_, accuracy = model.evaluate(x_test, y_test, batch_size=250, verbose=0)
print(f"Test accuracy: {accuracy:.4f}")

"""
## Which experts each digit uses

`return_routing=True` returns, with the output, the experts each image went
to. Called on the mixture's input (from a model that stops there), it gives
the load of each expert on the test set and a digit x expert table.
"""

moe = model.get_layer("moe")
features = keras.Model(model.input, moe.input).predict(x_test, batch_size=250, verbose=0)
_, routing = moe(features, return_routing=True)
chosen = keras.ops.convert_to_numpy(routing["expert_index"])
load = np.bincount(chosen.ravel(), minlength=4) / chosen.size
print("Expert load on the test set: " + " ".join(f"{v:.2f}" for v in load))
print("\nRouting by digit (rows: digit, columns: expert, share of the digit's "
      "routed image-choices in %):")
print("digit " + " ".join(f"{e:>4d}" for e in range(4)))
for digit in range(10):
    counts = np.bincount(chosen[y_test == digit].ravel(), minlength=4)
    print(f"{digit:>5d} " + " ".join(f"{100 * v:4.0f}" for v in counts / max(1, counts.sum())))

"""
## Save and reload

The experts and the gate are serialized with the layer, so the `.keras`
file reloads with identical predictions.
"""

os.makedirs(args.output_dir, exist_ok=True)
path = os.path.join(args.output_dir, "model.keras")
model.save(path)
reloaded = keras.saving.load_model(path)
diff = np.max(np.abs(reloaded.predict(x_test, batch_size=250, verbose=0)
                     - model.predict(x_test, batch_size=250, verbose=0)))
print(f"\nSaved {path}; reloaded model max |difference| = {diff:.2e}")
assert diff < 1e-5, diff
