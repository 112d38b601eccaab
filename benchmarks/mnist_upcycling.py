"""Sparse upcycling against continued dense training on MNIST rows, one seed a run.

Trains a small dense model on MNIST rows, turns its feed-forward block into
a `SparseMoE` whose experts start as copies of it
(`keras_moe.upcycling.upcycle`), continues training, and compares with
continuing the dense model for the same number of steps
(`--dense-extra-epochs`: for the same compute time). Prints a Markdown
table and one `RESULT` line per model; docs/porting.md has the measured
tables (`--seed 0`, `1`, `2`). `examples/mnist_upcycling.py` is the example
to read: the same steps, one run, top to bottom.

Run it (any backend, from the project root):

    python benchmarks/mnist_upcycling.py                  # shipped 5,000-image sample
    python benchmarks/mnist_upcycling.py --data ../shared/data/mnist_small.npz
    KERAS_BACKEND=jax python benchmarks/mnist_upcycling.py --extra-epochs 5

## The idea

Sparse upcycling (Komatsuzaki et al. 2022) reuses a trained dense
checkpoint: every expert of a new MoE layer starts as a copy of the dense
model's feed-forward block (FFN) and the router starts fresh. With the
router's top-`k` weights summing to 1, the MoE layer computes exactly the
FFN at insertion, so training continues from the dense model's accuracy
instead of from scratch, with `E` times the FFN parameters and about `k`
times its compute per token.

## The model

Each image is a sequence of 28 tokens (its pixel rows). A token embedding
feeds one pre-norm residual FFN block (`Dense(128, gelu)` then `Dense(64)`);
a linear head classifies the flattened sequence (so it sees the positions).
"""

import argparse
import os
import time

import keras
import numpy as np

from keras_moe.upcycling import upcycle

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SAMPLE = os.path.join(ROOT, "examples", "data", "mnist_sample.npz")


def load_data(source):
    """`(x_train, y_train), (x_test, y_test)` with uint8 images (N, 28, 28)."""
    if source == "keras":
        return keras.datasets.mnist.load_data()
    with np.load(source) as data:
        return (data["x_train"], data["y_train"]), (data["x_test"], data["y_test"])


def build_dense(dim=64, hidden_dim=128):
    inputs = keras.Input((28, 28), name="image")
    x = keras.layers.Rescaling(1 / 255.0, name="rescale")(inputs)
    x = keras.layers.Dense(dim, name="token_embedding")(x)
    h = keras.layers.LayerNormalization(name="ffn_norm")(x)
    h = keras.layers.Dense(hidden_dim, activation="gelu", name="ffn_in")(h)
    h = keras.layers.Dense(dim, name="ffn_out")(h)
    x = keras.layers.Add(name="residual")([x, h])
    x = keras.layers.LayerNormalization(name="final_norm")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    outputs = keras.layers.Dense(10, activation="softmax", name="digit")(x)
    return keras.Model(inputs, outputs, name="dense")


def upcycled_copy(dense, num_experts, k):
    """A new model: a copy of `dense` whose FFN is an upcycled `SparseMoE`."""
    copy = keras.models.clone_model(dense)
    copy.set_weights(dense.get_weights())
    layer = copy.get_layer
    moe = upcycle((layer("ffn_in"), layer("ffn_out")), num_experts=num_experts,
                  k=k, name="moe")
    inputs = keras.Input((28, 28), name="image")
    x = layer("token_embedding")(layer("rescale")(inputs))
    x = layer("residual")([x, moe(layer("ffn_norm")(x))])
    x = layer("flatten")(layer("final_norm")(x))
    return keras.Model(inputs, layer("digit")(x), name="upcycled")


def compile_model(model):
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])


def accuracy(model, x, y):
    probs = model.predict(x, batch_size=256, verbose=0)
    return float((probs.argmax(-1) == y).mean())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=SAMPLE,
                        help="an .npz with x_train/y_train/x_test/y_test, or 'keras'")
    parser.add_argument("--epochs", type=int, default=3, help="dense training")
    parser.add_argument("--extra-epochs", type=int, default=3,
                        help="continued training of each model")
    parser.add_argument("--dense-extra-epochs", type=int, default=None,
                        help="continued training of the dense model (default: "
                             "--extra-epochs, the same steps; about 3x gives "
                             "it the upcycled model's extra compute time)")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=None, help="where to write results.md")
    args = parser.parse_args(argv)
    keras.utils.set_random_seed(args.seed)

    (x_train, y_train), (x_test, y_test) = load_data(args.data)
    if args.train_size:
        x_train, y_train = x_train[: args.train_size], y_train[: args.train_size]
    print(f"Backend {keras.backend.backend()}: {len(x_train)} training and "
          f"{len(x_test)} test images")

    # ## 1. Train the dense model
    dense = build_dense()
    compile_model(dense)
    start = time.perf_counter()
    dense.fit(x_train, y_train, epochs=args.epochs, batch_size=args.batch_size,
              verbose=2)
    print(f"Dense model after {args.epochs} epochs: test accuracy "
          f"{accuracy(dense, x_test, y_test):.4f} "
          f"({time.perf_counter() - start:.1f} s)")

    # ## 2. Upcycle its FFN
    # The copy shares nothing with `dense`, so both continue independently.
    # At insertion the upcycled model predicts what the dense one does.
    upcycled = upcycled_copy(dense, args.experts, args.k)
    difference = np.abs(upcycled.predict(x_test, verbose=0)
                        - dense.predict(x_test, verbose=0)).max()
    print(f"At insertion: max |upcycled - dense| = {difference:.2e} over the "
          f"test set; {args.experts} experts, top-{args.k}")

    # ## 3. Continue both
    # For the same number of steps by default; `--dense-extra-epochs` gives
    # the dense model more (about 3x its steps matches the upcycled model's
    # extra compute time). The dense model simply continues (its optimizer
    # keeps its state). The
    # upcycled model is a new model, compiled with a new optimizer: Adam's
    # moments of the dense FFN are not copied into the experts.
    compile_model(upcycled)
    results = {}
    dense_epochs = args.dense_extra_epochs or args.extra_epochs
    for name, model, epochs in (("dense", dense, dense_epochs),
                                ("upcycled", upcycled, args.extra_epochs)):
        start = time.perf_counter()
        model.fit(x_train, y_train, epochs=epochs,
                  batch_size=args.batch_size, verbose=2)
        seconds = time.perf_counter() - start
        results[name] = (accuracy(model, x_test, y_test), seconds,
                         model.count_params(), epochs)
    load = upcycled.get_layer("moe").routing_stats()["expert_load"]
    print("Expert load on the last test batch:",
          [round(float(share), 3) for share in load])

    # ## 4. Results
    lines = ["| model | extra epochs | test accuracy | continued training (s) "
             "| parameters |", "|---|---|---|---|---|"]
    for name, (acc, seconds, params, epochs) in results.items():
        lines.append(f"| {name} | {epochs} | {acc:.4f} | {seconds:.1f} | {params:,} |")
    print("\n".join(lines))
    for name, (acc, seconds, params, epochs) in results.items():
        print(f"RESULT model={name} extra_epochs={epochs} "
              f"accuracy={acc:.4f} seconds={seconds:.1f} params={params}")
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "results.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
