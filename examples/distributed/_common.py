"""What the three engines' scripts of this folder share: the model, resuming
from a checkpoint, and the checkpoint and log written after every epoch.

Imported by `train_jax.py`, `train_tensorflow.py` and `train_torch.py` once
each has set its engine up (Keras is imported here), so that the three
train the same model and write the same files.
"""

import json
import os
import re
import time

import keras
import numpy as np

from keras_moe.distribution import save_model
from keras_moe.layers import MultiGateMoE, SparseMoE, TopKRouter


def build_model():
    inputs = keras.Input((28, 28), name="image")
    x = keras.layers.Dense(16, name="embed")(inputs)
    router = TopKRouter(4, k=2, bias_update_rate=0.01, load_balance_weight=0.01)
    x = x + SparseMoE(4, 32, router=router, capacity_factor=None, name="moe")(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    digit, odd = MultiGateMoE(num_tasks=2, num_experts=4, hidden_dim=32, k=2,
                              capacity_factor=None, name="mmoe")(x)
    model = keras.Model(inputs, {
        "digit": keras.layers.Dense(10, activation="softmax", name="digit")(digit),
        "odd": keras.layers.Dense(1, activation="sigmoid", name="odd")(odd),
    })
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss={"digit": "sparse_categorical_crossentropy",
                        "odd": "binary_crossentropy"})
    return model


def load_or_build(resume):
    """`(model, initial_epoch)`: the checkpoint `resume` (its epoch read from
    its `epoch-NNN` name), or a new model at epoch 0 when `resume` is empty.
    Called inside a distribution, a loaded model is laid out anew."""
    if not resume:
        return build_model(), 0
    match = re.search(r"epoch-(\d+)", os.path.basename(resume))
    return keras.models.load_model(resume), int(match.group(1)) if match else 0


class Checkpoint(keras.callbacks.Callback):
    """After every epoch every process calls `save_model`; the chief writes
    `epoch-NNN.keras` and appends the epoch's logs and median step time to
    `history.jsonl`."""

    def __init__(self, output_dir, num_processes, chief):
        super().__init__()
        self.output_dir = output_dir
        self.num_processes = num_processes
        self.chief = chief

    def on_train_batch_begin(self, batch, logs=None):
        self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self.start)

    def on_epoch_begin(self, epoch, logs=None):
        self.times = []

    def on_epoch_end(self, epoch, logs=None):
        path = os.path.join(self.output_dir, f"epoch-{epoch + 1:03d}.keras")
        save_model(self.model, path)
        if self.chief:
            record = {"epoch": epoch + 1, "processes": self.num_processes,
                      "step_time": float(np.median(self.times[1:] or self.times)),
                      "logs": {k: float(v) for k, v in logs.items()}}
            with open(os.path.join(self.output_dir, "history.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"epoch {epoch + 1}: loss {logs['loss']:.4f}, moe balance loss "
                  f"{logs['moe_balance_loss']:.4f}, median step "
                  f"{1000 * record['step_time']:.1f} ms -> {path}", flush=True)

