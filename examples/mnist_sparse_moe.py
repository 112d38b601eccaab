"""
Title: A sparse Mixture-of-Experts classifier on MNIST rows
Description: SparseMoE inside a functional Keras model: fit, inspect the
routing, save to `.keras`, reload, and export a TensorFlow SavedModel.

Run it (any backend):

    python examples/mnist_sparse_moe.py                 # shipped 5,000-image sample
    python examples/mnist_sparse_moe.py --data keras    # full keras.datasets.mnist
    KERAS_BACKEND=jax python examples/mnist_sparse_moe.py --data ../shared/data/mnist_small.npz

## The model

Each image is read as a sequence of 28 tokens (its pixel rows). A token
embedding plus a learned position embedding feeds one pre-norm residual
SparseMoE block with 8 experts and top-2 routing; a linear head classifies the
flattened sequence. Each row is routed on its own, so the experts specialise
on stroke shapes at positions, and the per-class routing table printed at the
end shows which experts each digit uses.
"""

import argparse
import os
import time

import keras
import numpy as np

from keras_moe.layers import SparseMoE

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLE = os.path.join(HERE, "data", "mnist_sample.npz")


@keras.saving.register_keras_serializable(package="keras_moe_examples")
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned embedding of the token position: `x[:, t] + P[t]`."""

    def build(self, input_shape):
        self.embedding = self.add_weight(
            name="embedding",
            shape=tuple(input_shape[1:]),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
        )

    def call(self, inputs):
        return inputs + self.embedding


def load_data(source):
    """`(x_train, y_train), (x_test, y_test)` with uint8 images (N, 28, 28)."""
    if source == "keras":
        return keras.datasets.mnist.load_data()
    with np.load(source) as data:
        return (data["x_train"], data["y_train"]), (data["x_test"], data["y_test"])


def build_model(num_experts, k, dim=64, hidden_dim=128):
    inputs = keras.Input((28, 28), name="image")
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Dense(dim, name="token_embedding")(x)
    x = PositionEmbedding(name="position_embedding")(x)
    moe = SparseMoE(
        num_experts=num_experts,
        hidden_dim=hidden_dim,
        k=k,
        capacity_factor=1.25,
        # Dropless inference: an image's prediction must not depend on the
        # other images in its batch (with a finite eval capacity, an expert
        # that overflows in one batch drops tokens it keeps in another).
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


def routing_by_class(model, x, y, num_experts):
    """Share of each class's routed (token, choice) pairs sent to each expert."""
    moe = model.get_layer("moe")
    moe_input = moe.input  # the LayerNormalization output
    features = keras.Model(model.input, moe_input).predict(x, verbose=0)
    _, routing = moe(features, return_routing=True)
    index = keras.ops.convert_to_numpy(routing["expert_index"])
    index = index.reshape(len(x), -1)  # (images, tokens * k)
    table = np.zeros((10, num_experts))
    for digit in range(10):
        counts = np.bincount(index[y == digit].ravel(), minlength=num_experts)
        table[digit] = counts / counts.sum()
    return table, moe.routing_stats()


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--data", default=SAMPLE,
                        help="an .npz with x_train/y_train/x_test/y_test, or 'keras'")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--output-dir", default="runs/mnist_sparse_moe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=None,
                        help="use only the first N training images (smoke tests)")
    args = parser.parse_args()

    keras.utils.set_random_seed(args.seed)
    (x_train, y_train), (x_test, y_test) = load_data(args.data)
    x_train, y_train = x_train[: args.train_size], y_train[: args.train_size]
    print(f"Keras {keras.__version__}, backend {keras.backend.backend()}; "
          f"{len(x_train)} training and {len(x_test)} test images from {args.data}")

    model = build_model(args.experts, args.k)
    model.compile(
        optimizer=keras.optimizers.Adam(2e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.summary()
    start = time.time()
    model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs,
              validation_split=0.1, verbose=2)
    print(f"Training took {time.time() - start:.0f} s")
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(f"Test accuracy: {accuracy:.4f}")

    table, stats = routing_by_class(model, x_test, y_test, args.experts)
    print("\nExpert load on the test set (share of routed token-choices):")
    print("  " + " ".join(f"{load:5.2f}" for load in stats["expert_load"]))
    print(f"Dropped at inference: {stats['dropped_fraction']:.2%} (eval_capacity_factor=None: dropless)")
    print("\nRouting by digit (rows: digit, columns: expert, share in %):")
    print("digit " + " ".join(f"{e:>4d}" for e in range(args.experts)))
    for digit, row in enumerate(table):
        print(f"{digit:>5d} " + " ".join(f"{100 * v:4.0f}" for v in row))

    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "model.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    diff = np.max(np.abs(reloaded.predict(x_test, verbose=0)
                         - model.predict(x_test, verbose=0)))
    print(f"\nSaved {path}; reloaded model max |difference| = {diff:.2e}")
    assert diff < 1e-5, diff

    # A SavedModel from any backend (on torch through the .keras file and a
    # TensorFlow subprocess, which imports this script for PositionEmbedding).
    from keras_moe import export_saved_model

    export_dir = os.path.join(args.output_dir, "saved_model")
    export_saved_model(model, export_dir, modules=[os.path.abspath(__file__)])
    import tensorflow as tf

    artifact = tf.saved_model.load(export_dir)  # keep it: it owns the variables
    served = artifact.serve(tf.constant(x_test[:64].astype("float32"))).numpy()
    diff = np.max(np.abs(served - model.predict(x_test[:64], verbose=0)))
    print(f"Exported SavedModel to {export_dir}; serving max |difference| = "
          f"{diff:.2e}")
    assert diff < 1e-5, diff


if __name__ == "__main__":
    main()
