"""
Title: Balancing two tasks on MultiMNIST: fixed weights, MGDA-UB and PCGrad
Author: keras_moe contributors
Date created: 2026/12/07
Last modified: 2026/12/07
Description: One multi-task CNN reads two overlapping digits; `MultiTaskModel`
trains it three times, with the plain sum of the task losses, with MGDA on
the shared representation (MGDA-UB) and with PCGrad.
Accelerator: None
"""

"""
## Introduction

When several tasks share a network, the gradient of the sum of their losses
is a compromise that may favour one task, or let two tasks' gradients
cancel on the shared weights. Gradient-balancing methods look at the
gradient of every task separately and combine them differently:

- **MGDA** (Sener and Koltun, 2018) steps along the minimum-norm point of
  the convex hull of the task gradients: a direction that lowers every
  task's loss, if one exists. Taken with respect to the shared
  *representation* (MGDA-UB), it costs one extra pass through the small
  task heads instead of one through the whole network.
- **PCGrad** (Yu et al., 2020) removes from each task gradient its
  component along any other task gradient it conflicts with (negative
  inner product), then sums.

`keras_moe.models.MultiTaskModel` runs any of them inside the usual
`compile`/`fit`, by name: `task_weighting="mgda"`, `"pcgrad"`, ... (the
full list is `keras_moe.weighting.WEIGHTINGS`).

The data is MultiMNIST: two digits overlaid on one canvas, one towards the
top left and one towards the bottom right; one task reads the left digit,
the other the right one. It takes a few minutes on a 2-core CPU with the
MNIST sample shipped in `examples/data/`. `benchmarks/mtl_methods.py` runs
every method on four benchmarks and several seeds (docs/task_weighting.md).

## Setup
"""

import argparse
import importlib.util
import logging
import os

SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "mnist_sample.npz")
parser = argparse.ArgumentParser(description="Task balancing on MultiMNIST")
parser.add_argument("--data", default=SAMPLE,
                    help="an .npz with x_train/y_train/x_test/y_test (default: the "
                         "shipped sample; ../shared/data/mnist_small.npz from the "
                         "project root is larger), or 'keras' (keras.datasets.mnist)")
parser.add_argument("--epochs", type=int, default=4)
parser.add_argument("--train-size", type=int, default=None, help="first N training canvases")
parser.add_argument("--test-size", type=int, default=None, help="first N test canvases")
parser.add_argument("--strategies", default="fixed,mgda_ub,pcgrad",
                    help="comma-separated: fixed, mgda_ub (MGDA on the representation) "
                         "or any name of keras_moe.weighting.WEIGHTINGS")
parser.add_argument("--output-dir", default="runs/multimnist")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

# Keras (and its backend) load after the arguments are read: `--help` is
# instant. TensorFlow's C++ log lines (oneDNN notices, CPU features) say
# nothing about this example: hide them unless you chose a log level. They
# are written while TensorFlow's libraries load, so stderr points at
# /dev/null meanwhile. Keras loads TensorFlow, when it is installed, on the
# first `model.save` under every backend: under JAX and PyTorch it is
# loaded here, quietly.
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

from keras_moe.datasets import multi_mnist  # noqa: E402
from keras_moe.models import MultiTaskModel  # noqa: E402

"""
## The data

`multi_mnist` pastes two different MNIST digits on a 36x36 canvas, each
shifted by up to 4 pixels from its corner, keeps the brighter pixel where
they overlap and resizes the canvas to 28x28. The test canvases are made
from the test digits.
"""

if args.data == "keras":
    (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
else:
    with np.load(args.data) as data:
        x_train, y_train = data["x_train"], data["y_train"]
        x_test, y_test = data["x_test"], data["y_test"]
train_x, train_left, train_right = multi_mnist(x_train, y_train, seed=0)
test_x, test_left, test_right = multi_mnist(x_test, y_test, seed=1)
train_x, test_x = train_x[: args.train_size], test_x[: args.test_size]
train_y = {"left": train_left[: args.train_size], "right": train_right[: args.train_size]}
test_y = {"left": test_left[: args.test_size], "right": test_right[: args.test_size]}
print(f"{len(train_x)} training and {len(test_x)} test canvases of "
      f"{train_x.shape[1]}x{train_x.shape[2]}")

"""
## The model

A LeNet-style trunk shared by both tasks (two 5x5 convolutions, a 50-unit
layer, named `shared`: its output is the shared representation) and one
small head per digit. The outputs are a dict, so the tasks are named
`left` and `right`.
"""


def build_model(task_weighting, representation=None):
    layers = keras.layers
    inputs = keras.Input((28, 28, 1), name="image")
    x = layers.Conv2D(10, 5, activation="relu", name="conv_1")(inputs)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(20, 5, activation="relu", name="conv_2")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Flatten()(x)
    x = layers.Dense(50, activation="relu", name="shared")(x)
    outputs = {
        task: layers.Dense(10, name=task)(
            layers.Dense(50, activation="relu", name=f"{task}_hidden")(x)
        )
        for task in ("left", "right")
    }
    return MultiTaskModel(inputs, outputs, task_weighting=task_weighting,
                          representation=representation)


"""
## Three ways to train it

The strategy is one argument. `"fixed"` is Keras' own sum of the losses.
`"mgda"` with `representation="shared"` takes the task gradients with
respect to the output of the `shared` layer (MGDA-UB). `"pcgrad"` takes
them on every shared weight: `model.shared_variables` lists them (the
layers that both tasks depend on, found in the graph). `fit` logs each
task's loss and, as `<task>_weight`, the weight of its gradient in the
update.
"""

STRATEGIES = {"mgda_ub": ("mgda", "shared")}
loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
results = {}
for strategy in args.strategies.split(","):
    keras.utils.set_random_seed(args.seed)
    task_weighting, representation = STRATEGIES.get(strategy, (strategy, None))
    model = build_model(task_weighting, representation)
    if strategy == args.strategies.split(",")[0]:
        print(f"multimnist model: {model.count_params():,} parameters")
    model.compile(keras.optimizers.Adam(2e-3), loss={"left": loss, "right": loss})
    history = model.fit(train_x, train_y, batch_size=128, epochs=args.epochs, verbose=0)
    predictions = model.predict(test_x, batch_size=512, verbose=0)
    accuracy = {t: float(np.mean(np.argmax(predictions[t], -1) == test_y[t]))
                for t in ("left", "right")}
    weights = [history.history[f"{t}_weight"][-1] for t in ("left", "right")]
    results[strategy] = (model, accuracy)
    print(f"{strategy:>8}: test accuracy left {accuracy['left']:.4f}, right "
          f"{accuracy['right']:.4f}; last weights {weights[0]:.3f} / {weights[1]:.3f}")
    print(f"RESULT strategy={strategy} left_accuracy={accuracy['left']:.4f} "
          f"right_accuracy={accuracy['right']:.4f} final_loss={history.history['loss'][-1]:.4f}")

"""
## Save and reload

The strategy and its state are part of the model: a `.keras` file reloads
with them, and training continues where it stopped.
"""

os.makedirs(args.output_dir, exist_ok=True)
last = list(results)[-1]
model = results[last][0]
path = os.path.join(args.output_dir, "model.keras")
model.save(path)
reloaded = keras.saving.load_model(path)
difference = max(
    float(np.max(np.abs(a - b)))
    for a, b in zip(keras.tree.flatten(reloaded.predict(test_x[:256], verbose=0)),
                    keras.tree.flatten(model.predict(test_x[:256], verbose=0)))
)
print(f"reloaded {type(reloaded.task_weighting).__name__} model: "
      f"max |difference| {difference:.2e}")

"""
## What to expect

On this small sample the three are close: MultiMNIST's two tasks are
similar and rarely conflict much. `benchmarks/mtl_methods.py` measures
every method over several seeds, with single-task baselines and the
`Delta_m` summary (docs/task_weighting.md), and reports where the plain
sum is as good as the gradient methods.
"""
