import keras
import numpy as np

from keras_moe.callbacks import RoutingMetrics, moe_layers
from keras_moe.layers import SoftMoE, SparseMoE


def test_routing_metrics_in_history_and_logs():
    inputs = keras.Input((4, 6))
    x = SparseMoE(4, 8, k=1, capacity_factor=0.5, name="moe")(inputs)
    x = SoftMoE(2, 8, name="soft")(x)
    model = keras.Model(inputs, x)
    model.compile(optimizer="adam", loss="mse")
    data = np.random.default_rng(0).normal(size=(32, 4, 6)).astype("float32") + 1.0

    seen = []

    class Spy(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(dict(logs))

    history = model.fit(
        data, data, batch_size=8, epochs=2, verbose=0,
        validation_data=(data[:8], data[:8]),
        callbacks=[RoutingMetrics(per_expert=True), Spy()],
    )
    h = history.history
    for key in ("moe_dropped", "moe_load_cv", "moe_max_load", "moe_balance_loss",
                "moe_entropy", "moe_load_0", "soft_load_cv", "val_moe_dropped"):
        assert key in h and len(h[key]) == 2, (key, sorted(h))
        assert all(np.isfinite(h[key]))
    # Capacity factor 0.5 with top-1: at least half of the tokens are dropped.
    assert all(v >= 0.5 for v in h["moe_dropped"])
    assert all(v == 0.0 for v in h["soft_dropped"])
    np.testing.assert_allclose(sum(h[f"moe_load_{e}"][-1] for e in range(4)), 1.0, atol=1e-5)
    # The progress bar gets the per-batch values.
    assert len(seen) == 8 and "moe_dropped" in seen[0]


def test_moe_layers_finds_nested_layers():
    inner_in = keras.Input((3, 5))
    inner = keras.Model(inner_in, SparseMoE(2, 4, name="inner_moe")(inner_in))
    outer_in = keras.Input((3, 5))
    outer = keras.Model(outer_in, SparseMoE(2, 4, name="outer_moe")(inner(outer_in)))
    assert [layer.name for layer in moe_layers(outer)] == ["inner_moe", "outer_moe"]


def test_routing_metrics_per_task_keys():
    from keras_moe.callbacks import effective_num_experts
    from keras_moe.layers import PLE, MultiGateMoE

    inputs = keras.Input((6,))
    ys = MultiGateMoE(2, 4, 8, task_names=["a", "b"], name="mmoe")(inputs)
    zs = PLE(2, 2, 1, 1, hidden_dim=8, task_names=["a", "b"], name="ple")(ys[0])
    model = keras.Model(inputs, [ys[1]] + zs)
    model.compile(optimizer="adam", loss="mse")
    data = np.random.default_rng(1).normal(size=(16, 6)).astype("float32")
    history = model.fit(
        data, [data] * 3, batch_size=8, epochs=2, verbose=0,
        callbacks=[RoutingMetrics(per_expert=True)],
    )
    h = history.history
    for key in ("mmoe_a_experts", "mmoe_b_experts", "mmoe_a_usage_3",
                "ple_level_0_shared_experts", "ple_level_1_b_experts",
                "ple_a_experts", "mmoe_load_cv", "mmoe_dropped"):
        assert key in h and len(h[key]) == 2, (key, sorted(h))
    # Dense gates start near uniform: close to all 4 experts used.
    assert 3.0 < h["mmoe_a_experts"][0] <= 4.0
    # PLE's last level: task a's gate sees 1 own + 1 shared expert.
    assert 1.0 <= h["ple_level_1_a_experts"][-1] <= 2.0 + 1e-9
    np.testing.assert_allclose(effective_num_experts([0, 0, 1, 0]), 1.0)
    np.testing.assert_allclose(effective_num_experts([0.25] * 4), 4.0)
    assert effective_num_experts([0, 0]) == 0.0
