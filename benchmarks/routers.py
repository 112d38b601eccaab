#!/usr/bin/env python
"""Routers compared on one task: load balance, dropped tokens, quality.

    python benchmarks/routers.py [--data examples/data/mnist_sample.npz] [--epochs 3]

Every router drives the same model: MNIST images read as 28 row-tokens, a
token embedding plus a position embedding, one residual MoE block (8 experts,
hidden 64, capacity factor 1.25 in training, 2.0 at inference) and a linear
classifier. Each configuration trains for the same number of steps from the
same seed; the table reports, on the training run's last epoch (from
`keras_moe.callbacks.RoutingMetrics`), the coefficient of variation of the
expert load (0 = perfect balance) and the dropped fraction, then the final
training loss and the test accuracy. The hash router routes on the row
position (a fixed, input-independent map).
"""

import argparse
import os
import time

import keras
import numpy as np

from keras_moe.callbacks import RoutingMetrics
from keras_moe.layers import SoftMoE, SparseMoE, TopKRouter

HERE = os.path.dirname(os.path.abspath(__file__))
E, HIDDEN, DIM = 8, 64, 48


def routers():
    """(name, factory of the MoE layer, needs row ids)"""
    configs = [
        ("top-2 softmax (Switch loss)", lambda: SparseMoE(E, HIDDEN, k=2), False),
        ("top-1 (Switch)", lambda: SparseMoE(E, HIDDEN, k=1), False),
        ("top-2, no balancing", lambda: SparseMoE(
            E, HIDDEN, router=TopKRouter(E, k=2, load_balance_weight=0.0)), False),
        ("top-2 batch-prioritized", lambda: SparseMoE(
            E, HIDDEN, router=TopKRouter(E, k=2, batch_prioritized=True)), False),
        ("top-2 noisy + importance/load CV^2", lambda: SparseMoE(
            E, HIDDEN, router=TopKRouter(E, k=2, noisy_gating=True, load_balance_weight=0.0,
                                         importance_weight=0.1, load_weight=0.1)), False),
        ("top-2 sigmoid, aux-loss-free bias", lambda: SparseMoE(
            E, HIDDEN, router=TopKRouter(E, k=2, score_function="sigmoid",
                                         load_balance_weight=0.0, bias_update_rate=1e-3)),
         False),
        ("top-2 + z-loss", lambda: SparseMoE(
            E, HIDDEN, router=TopKRouter(E, k=2, z_loss_weight=1e-3)), False),
        ("top-2 dropless (capacity = N)", lambda: SparseMoE(
            E, HIDDEN, k=2, capacity_factor=None, eval_capacity_factor=None), False),
        ("soft MoE (1 slot/expert)", lambda: SoftMoE(E, HIDDEN), False),
    ]
    optional = [
        ("keras_moe.layers.routers.expert_choice", "ExpertChoiceRouter", "expert choice (k=2)",
         lambda cls: SparseMoE(E, HIDDEN, router=cls(E, k=2)), False),
        ("keras_moe.layers.routers.balanced_assignment", "BalancedAssignmentRouter",
         "balanced assignment (BASE)", lambda cls: SparseMoE(E, HIDDEN, router=cls(E)), False),
        ("keras_moe.layers.routers.dselect_k", "DSelectKRouter", "DSelect-k (k=2)",
         lambda cls: SparseMoE(E, HIDDEN, router=cls(E, k=2)), False),
        ("keras_moe.layers.routers.hash_router", "HashRouter", "hash on row position",
         lambda cls: SparseMoE(E, HIDDEN, router=cls(E, k=1)), True),
    ]
    import importlib

    for module, cls_name, name, factory, ids in optional:
        try:
            cls = getattr(importlib.import_module(module), cls_name)
        except (ImportError, AttributeError):
            continue
        configs.append((name, (lambda f, c: lambda: f(c))(factory, cls), ids))
    return configs


@keras.saving.register_keras_serializable(package="keras_moe_benchmarks")
class PositionEmbedding(keras.layers.Layer):
    def build(self, input_shape):
        self.embedding = self.add_weight(
            shape=tuple(input_shape[1:]),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
        )

    def call(self, inputs):
        return inputs + self.embedding


def build(moe, with_ids):
    image = keras.Input((28, 28), name="image")
    x = keras.layers.Dense(DIM)(keras.layers.Rescaling(1 / 255.0)(image))
    x = PositionEmbedding()(x)
    h = keras.layers.LayerNormalization()(x)
    if with_ids:
        ids = keras.Input((28,), dtype="int32", name="row")
        x = x + moe(h, routing_inputs=ids)
        inputs = [image, ids]
    else:
        x = x + moe(h)
        inputs = image
    x = keras.layers.Flatten()(keras.layers.LayerNormalization()(x))
    outputs = keras.layers.Dense(10, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(2e-3),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--data", default=os.path.join(
        HERE, "..", "examples", "data", "mnist_sample.npz"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    with np.load(args.data) as data:
        x, y = data["x_train"], data["y_train"]
        x_test, y_test = data["x_test"], data["y_test"]
    rows = np.tile(np.arange(28, dtype="int32"), (len(x), 1))
    rows_test = np.tile(np.arange(28, dtype="int32"), (len(x_test), 1))

    print(f"backend {keras.backend.backend()}, {len(x)} training images, "
          f"{args.epochs} epochs of batch {args.batch_size}, E={E}\n")
    print("| router | load CV | dropped | train loss | test accuracy | time (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, factory, with_ids in routers():
        keras.utils.set_random_seed(0)
        moe = factory()
        model = build(moe, with_ids)
        inputs, test_inputs = ([x, rows], [x_test, rows_test]) if with_ids else (x, x_test)
        start = time.time()
        history = model.fit(inputs, y, batch_size=args.batch_size, epochs=args.epochs,
                            verbose=0, callbacks=[RoutingMetrics()])
        seconds = time.time() - start
        h = history.history
        _, accuracy = model.evaluate(test_inputs, y_test, verbose=0)
        print(f"| {name} | {h[moe.name + '_load_cv'][-1]:.2f} | "
              f"{h[moe.name + '_dropped'][-1]:.1%} | {h['loss'][-1]:.3f} | "
              f"{accuracy:.3f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
