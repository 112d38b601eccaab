"""A `.keras` file saved under the current backend loads under the two other
backends with the same outputs, config and routing decisions.

One model holds every main layer family; one subprocess per other backend
(run concurrently) does all the checks and reports them as JSON. Each side
runs one compiled `predict` (JAX's eager op-by-op calls are far slower).
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np

from keras_moe.layers import (
    PLE,
    BoxHead,
    ClassificationHead,
    ExpertChoiceRouter,
    MixtureOfExperts,
    MultiGateMoE,
    RegressionHead,
    SoftMoE,
    SparseMoE,
    TopKRouter,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ("tensorflow", "jax", "torch")
ROUTED_LAYERS = ("moe_expert_choice", "moe_batch_prioritized", "mmoe")


def every_family_model():
    inputs = keras.Input((6, 8), name="tokens")
    x = keras.layers.Dense(16, name="embed")(inputs)
    x = x + SparseMoE(4, 16, router=ExpertChoiceRouter(4, k=2),
                      name="moe_expert_choice")(x)
    # A finite eval capacity: tokens can be dropped, the same ones everywhere.
    x = x + SparseMoE(4, 16, router=TopKRouter(4, k=1, batch_prioritized=True),
                      eval_capacity_factor=1.0, name="moe_batch_prioritized")(x)
    x = x + SoftMoE(4, 16, name="soft_moe")(x)
    pooled = keras.layers.GlobalAveragePooling1D()(x)
    mixed = MixtureOfExperts([keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(16, activation="tanh"),
                              keras.layers.Dense(16)], k=2, name="mixture")(pooled)
    a, b, c = MultiGateMoE(num_tasks=3, num_experts=4, hidden_dim=16, k=2,
                           name="mmoe")(mixed)
    a2, b2 = PLE(num_tasks=2, num_levels=2, num_task_experts=1, num_shared_experts=1,
                 hidden_dim=16, name="ple")(keras.layers.Add()([a, b]))
    outputs = {
        "class": ClassificationHead(3, hidden_units=(8,), name="class")(a2),
        "box": BoxHead(name="box")(b2),
        "score": RegressionHead(1, name="score")(c),
    }
    return keras.Model(inputs, outputs, name="every_family")


def predict(model, x):
    """Outputs on one batch, and the routing statistics that this `predict`
    left in the MoE layers (which experts got how many tokens, what was
    dropped): equal statistics mean equal routing decisions."""
    outputs = model.predict(x, batch_size=len(x), verbose=0)
    stats = {}
    for name in ROUTED_LAYERS:
        for key, value in model.get_layer(name).routing_stats().items():
            value = np.asarray(value)
            if np.issubdtype(value.dtype, np.number):  # not the task names
                stats[f"{name}/{key}"] = value.astype("float64")
    return outputs, stats


def config_json(model):
    return json.dumps(model.get_config(), sort_keys=True, default=str)


# The other backend's side: load, predict, compare, report as JSON.
CHILD = r'''
import json, sys
import keras, numpy as np
sys.path.insert(0, sys.argv[3])
from tests.test_cross_backend import config_json, predict

keras_file, reference = sys.argv[1], sys.argv[2]
with np.load(reference) as data:
    ref = dict(data)
model = keras.saving.load_model(keras_file)
x = ref.pop("x")
outputs, stats = predict(model, x)
report = {
    "backend": keras.backend.backend(),
    "output_keys": sorted(outputs),
    "max_output_difference": max(
        float(np.max(np.abs(outputs[k] - ref["out/" + k]))) for k in outputs),
    "max_routing_stat_difference": {
        k: float(np.max(np.abs(v - ref["stat/" + k]))) for k, v in stats.items()},
    "config_equal": config_json(model) == open(keras_file + ".config.json").read(),
    "trainable_weights": len(model.trainable_weights),
}
print("REPORT " + json.dumps(report))
'''


def test_keras_file_loads_under_the_other_backends(tmp_path):
    model = every_family_model()
    x = np.random.default_rng(0).normal(size=(8, 6, 8)).astype("float32")
    outputs, stats = predict(model, x)
    # The batch-prioritized layer really drops tokens here (capacity 1.0),
    # so equal statistics mean the same share is dropped everywhere.
    assert stats["moe_batch_prioritized/dropped_fraction"] > 0
    keras_file = str(tmp_path / "model.keras")
    model.save(keras_file)
    with open(keras_file + ".config.json", "w") as f:
        f.write(config_json(model))
    reference = str(tmp_path / "reference.npz")
    np.savez(reference, x=x, **{"out/" + k: v for k, v in outputs.items()},
             **{"stat/" + k: v for k, v in stats.items()})

    others = [b for b in BACKENDS if b != keras.backend.backend()]
    children = {
        backend: subprocess.Popen(
            [sys.executable, "-c", CHILD, keras_file, reference, ROOT],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
            env=dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3"),
        )
        for backend in others
    }
    for backend, child in children.items():
        stdout, stderr = child.communicate(timeout=600)
        assert child.returncode == 0, f"{backend}:\n{stdout[-3000:]}\n{stderr[-3000:]}"
        (line,) = [l for l in stdout.splitlines() if l.startswith("REPORT ")]
        report = json.loads(line[len("REPORT "):])
        assert report["backend"] == backend
        assert report["output_keys"] == sorted(outputs)
        assert report["max_output_difference"] <= 1e-5, (backend, report)
        assert set(report["max_routing_stat_difference"]) == set(stats)
        assert max(report["max_routing_stat_difference"].values()) <= 1e-6, (
            backend, report)
        assert report["config_equal"], backend
        assert report["trainable_weights"] == len(model.trainable_weights)
