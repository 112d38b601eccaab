"""Small CNN experts on MNIST: top-1 routing and three integration strategies compared.

`MixtureOfExperts` with Keras models as experts: top-1 and top-2 routing
with real sparse compute, the weighted-sum, max and attention integration
strategies trained from the same initial weights and compared (test
accuracy, expert load, time), the per-digit routing table of the best
model, and a `.keras` save/reload check. `examples/mnist_experts.py` is the
example to read: one mixture, one run, top to bottom.

Run it (any backend, from the project root):

    python benchmarks/mnist_experts.py                    # 10,000 images if ../shared/data exists
    python benchmarks/mnist_experts.py --data examples/data/mnist_sample.npz
    python benchmarks/mnist_experts.py --data keras       # full keras.datasets.mnist
    KERAS_BACKEND=jax python benchmarks/mnist_experts.py --epochs 5

## The model

`E = 4` experts, each a small CNN (`Conv-Pool-Conv-Pool-Dense`, ~60k
weights) that maps a 28x28 digit to a 64-d feature vector. A linear gate on
the flattened pixels scores the experts; `MixtureOfExperts` routes each image
to its top-`k` experts and integrates their features, and a shared linear
head classifies. With `k` set, the routing is real sparse compute: the batch
is dispatched into one buffer of `C = ceil(k B / E * 1.25)` images per
expert and each CNN runs on its buffer only, not on the whole batch.

## What is compared

- **Top-1 routing** (`k = 1`, Switch-style): each image goes through one
  CNN, whose features are scaled by its gate probability. With one expert
  per image, there is nothing to integrate: the weighted sum, the max and
  the attention of one output are that output, so the three strategies are
  the same function at `k = 1` and the script trains it once.
- **The three integration strategies at top-`k`** (`--k`, default 2): the
  gate weights' weighted sum of the selected experts' features; their
  elementwise max (of the gate-weighted features, so that the task loss
  trains the gate); and attention, where a query from the image scores each
  selected expert's output (keys from the features) with the gate as a
  prior.

The table reports test accuracy, the expert load on the test set (share of
routed image-choices per expert) and the training time; the per-digit
routing table of the most accurate model shows which experts each digit
uses. The load-balancing loss keeps all experts in use: with Switch's weight
0.01 (tuned for thousands of tokens per batch), the top-1 gate here collapsed
onto two of the four experts and dropped ~38% of the training images at
capacity; `--balance-weight 0.1` (the default) keeps the four experts busy
and drops ~2%, at the same test accuracy.
Inference is dropless (`eval_capacity_factor=None`), so a prediction never
depends on the other images of its batch.
"""

import argparse
import os
import time

import keras
import numpy as np

from keras_moe.callbacks import RoutingMetrics
from keras_moe.layers import MixtureOfExperts

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHARED = os.path.join(ROOT, "..", "shared", "data", "mnist_small.npz")
SAMPLE = os.path.join(ROOT, "examples", "data", "mnist_sample.npz")
DEFAULT_DATA = SHARED if os.path.exists(SHARED) else SAMPLE
STRATEGIES = ("weighted_sum", "max", "attention")
# Evaluation batch: divides both test sets (2,000 and 1,000 images), so that
# JAX and TensorFlow compile the evaluation step for one batch shape only.
EVAL_BATCH = 250


def load_data(source):
    """`(x_train, y_train), (x_test, y_test)` with uint8 images (N, 28, 28)."""
    if source == "keras":
        return keras.datasets.mnist.load_data()
    with np.load(source) as data:
        return (data["x_train"], data["y_train"]), (data["x_test"], data["y_test"])


def make_expert(index, features=64):
    """A small CNN: (B, 28, 28, 1) -> (B, features)."""
    return keras.Sequential(
        [
            keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(features, activation="relu"),
        ],
        name=f"expert_{index}",
    )


def build_model(num_experts, k, integration, load_balance_weight=0.1):
    inputs = keras.Input((28, 28), name="image")
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Reshape((28, 28, 1))(x)
    moe = MixtureOfExperts(
        [make_expert(e) for e in range(num_experts)],
        integration=integration,
        k=k,
        capacity_factor=1.25,
        eval_capacity_factor=None,  # dropless inference
        load_balance_weight=load_balance_weight,
        attention_dim=32,
        name="moe",
    )
    x = moe(x)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(10, activation="softmax", name="digit")(x)
    return keras.Model(inputs, outputs, name=f"mnist_experts_{integration}_k{k}")


def routing_on(model, x, batch_size=EVAL_BATCH):
    """Every test image's selected experts, `(N, k)`, read with
    `return_routing=True` on the mixture's inputs."""
    moe = model.get_layer("moe")
    features = keras.Model(model.input, moe.input).predict(
        x, batch_size=batch_size, verbose=0
    )
    index = []
    for start in range(0, len(x), batch_size):
        _, routing = moe(features[start : start + batch_size], return_routing=True)
        index.append(keras.ops.convert_to_numpy(routing["expert_index"]))
    return np.concatenate(index)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA,
                        help="an .npz with x_train/y_train/x_test/y_test, or 'keras' "
                             "(default: ../shared/data/mnist_small.npz relative to "
                             "the repository if it exists, else the shipped sample)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--k", type=int, default=2,
                        help="experts per image for the strategy comparison")
    parser.add_argument("--balance-weight", type=float, default=0.1,
                        help="weight of the load-balancing loss")
    parser.add_argument("--train-size", type=int, default=None,
                        help="use only the first N training images (smoke tests)")
    parser.add_argument("--test-size", type=int, default=None,
                        help="use only the first N test images (smoke tests)")
    parser.add_argument("--output-dir", default="runs/mnist_experts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    (x_train, y_train), (x_test, y_test) = load_data(args.data)
    x_train, y_train = x_train[: args.train_size], y_train[: args.train_size]
    x_test, y_test = x_test[: args.test_size], y_test[: args.test_size]
    print(f"Keras {keras.__version__}, backend {keras.backend.backend()}; "
          f"{len(x_train)} training and {len(x_test)} test images from {args.data}")

    runs = [("top-1 (any strategy)", "weighted_sum", 1)] + [
        (name, name, args.k) for name in STRATEGIES
    ]
    results = []
    for label, integration, k in runs:
        print(f"\n== {label}: integration={integration!r}, k={k} ==")
        keras.utils.set_random_seed(args.seed)  # same experts and gate init
        model = build_model(args.experts, k, integration, args.balance_weight)
        model.compile(
            optimizer=keras.optimizers.Adam(2e-3),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        start = time.time()
        model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs,
                  verbose=2, callbacks=[RoutingMetrics()])
        seconds = time.time() - start
        _, accuracy = model.evaluate(x_test, y_test, batch_size=EVAL_BATCH, verbose=0)
        index = routing_on(model, x_test)
        load = np.bincount(index.ravel(), minlength=args.experts) / index.size
        results.append(dict(label=label, k=k, model=model, accuracy=accuracy,
                            load=load, seconds=seconds, index=index))

    print("\nTest accuracy, expert load on the test set (share of routed "
          "image-choices) and training time:")
    print(f"{'model':<22} {'k':>2} {'accuracy':>9}  {'expert load':<{6 * args.experts}} "
          f"{'time':>6}")
    for r in results:
        loads = " ".join(f"{v:5.2f}" for v in r["load"])
        print(f"{r['label']:<22} {r['k']:>2} {r['accuracy']:9.4f}  {loads:<{6 * args.experts}} "
              f"{r['seconds']:5.0f}s")

    best = max(results, key=lambda r: r["accuracy"])
    print(f"\nRouting by digit for the most accurate model, {best['label']} "
          f"(k={best['k']}); rows: digit, columns: expert, share of the digit's "
          "routed image-choices in %:")
    print("digit " + " ".join(f"{e:>4d}" for e in range(args.experts)))
    for digit in range(10):
        chosen = best["index"][y_test == digit].ravel()
        share = np.bincount(chosen, minlength=args.experts) / max(chosen.size, 1)
        print(f"{digit:>5d} " + " ".join(f"{100 * v:4.0f}" for v in share))

    model = best["model"]
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "model.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    diff = np.max(np.abs(reloaded.predict(x_test, batch_size=EVAL_BATCH, verbose=0)
                         - model.predict(x_test, batch_size=EVAL_BATCH, verbose=0)))
    print(f"\nSaved {path}; reloaded model max |difference| = {diff:.2e}")
    assert diff < 1e-5, diff


if __name__ == "__main__":
    main()
