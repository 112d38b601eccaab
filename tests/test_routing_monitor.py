"""RoutingMonitor: per-epoch routing history, TensorBoard summaries, plots."""

import glob
import importlib.util
import os
import sys

import keras
import numpy as np
import pytest

from keras_moe import plotting
from keras_moe.callbacks import RoutingMetrics, RoutingMonitor
from keras_moe.layers import MultiGateMoE, SparseMoE

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
HAVE_TENSORFLOW = importlib.util.find_spec("tensorflow") is not None
needs_matplotlib = pytest.mark.skipif(
    not HAVE_MATPLOTLIB,
    reason="matplotlib is an optional extra: pip install -e '.[plot]'",
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def two_layer_model():
    """Tokens -> SparseMoE (top-1, tight capacity: some drops) -> pooled ->
    MultiGateMoE (dense softmax gates) -> two regression outputs."""
    inputs = keras.Input((4, 6))
    x = SparseMoE(4, 8, k=1, capacity_factor=1.0, name="moe")(inputs)
    pooled = keras.layers.GlobalAveragePooling1D()(x)
    a, b = MultiGateMoE(2, 4, 8, task_names=["a", "b"], name="mmoe")(pooled)
    model = keras.Model(inputs, [keras.layers.Dense(1)(a), keras.layers.Dense(1)(b)])
    model.compile(optimizer="adam", loss="mse")
    return model


class StatsSpy(keras.callbacks.Callback):
    """Reads the layers' statistic variables after every training batch
    (not through `routing_stats()`, so it does not count as a read)."""

    def __init__(self, names):
        super().__init__()
        self.names = names
        self.batches = []  # per epoch: list of {name: {stat: value}}
        self.last = None  # the values after the last (training or test) step

    def on_epoch_begin(self, epoch, logs=None):
        self.batches.append([])

    def _read(self):
        model = self.model
        read = keras.ops.convert_to_numpy
        values = {}
        for name in self.names:
            layer = model.get_layer(name)
            values[name] = {"expert_load": read(layer.expert_load),
                            "dropped_fraction": read(layer.dropped_fraction)}
            if hasattr(layer, "task_expert_usage"):
                values[name]["task_expert_usage"] = read(layer.task_expert_usage)
        self.last = values
        return values

    def on_train_batch_end(self, batch, logs=None):
        self.batches[-1].append(self._read())

    def on_test_batch_end(self, batch, logs=None):
        self._read()

    def epoch_means(self, name, stat):
        return np.array([np.mean([b[name][stat] for b in epoch], axis=0)
                         for epoch in self.batches])


def count_reads(layer):
    """Wraps `layer.routing_stats` with a call counter; returns the counter."""
    calls = [0]
    original = layer.routing_stats

    def counted():
        calls[0] += 1
        return original()

    layer.routing_stats = counted
    return calls


def top_k_class_table(moe, tokens, labels, num_classes):
    """Class x expert shares computed in NumPy from the layer's default
    `TopKRouter` (no bias, no noise at inference: the `k` largest logits
    `tokens @ kernel`). `tokens`: `(examples, tokens, d)`, the layer input."""
    kernel = keras.ops.convert_to_numpy(moe.router.kernel).astype("float64")
    logits = tokens.astype("float64") @ kernel  # (B, T, E)
    chosen = np.argsort(-logits, axis=-1)[..., :moe.k].reshape(len(tokens), -1)
    table = np.zeros((num_classes, moe.num_experts))
    for c in range(num_classes):
        table[c] = np.bincount(chosen[labels == c].ravel(), minlength=moe.num_experts)
    return table / table.sum(axis=1, keepdims=True)


def read_events(directory):
    """`{tag: [(step, value or None, plugin)]}` from the event files."""
    import tensorflow as tf

    found = {}
    for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                plugin = value.metadata.plugin_data.plugin_name
                array = tf.make_ndarray(value.tensor)
                scalar = float(array) if plugin == "scalars" else None
                found.setdefault(value.tag, []).append((event.step, scalar, plugin, array))
    return found


@needs_matplotlib
@pytest.mark.skipif(not HAVE_TENSORFLOW,
                    reason="TensorBoard logs need TensorFlow: pip install -e '.[backends]'")
def test_monitor_history_tensorboard_and_plots(tmp_path):
    model = two_layer_model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4, 6)).astype("float32")
    y = [x[:, 0, :1], x[:, 1, :1]]
    labels = rng.integers(0, 3, 32)
    labels[:3] = [0, 1, 2]
    reads = {name: count_reads(model.get_layer(name)) for name in ("moe", "mmoe")}
    spy = StatsSpy(["moe", "mmoe"])
    monitor = RoutingMonitor(
        log_dir=tmp_path / "logs", plot_dir=tmp_path / "plots",
        class_data=(x, labels), class_names=["cat", "dog", "eel"], batch_size=8,
    )
    history = model.fit(
        x, y, batch_size=8, epochs=2, verbose=0,
        validation_data=(x[:8], [v[:8] for v in y]),
        callbacks=[RoutingMetrics(per_expert=True), monitor, spy],
    ).history

    # Per-epoch means over all batches, equal to the layers' own statistics.
    moe, mmoe = monitor.history["moe"], monitor.history["mmoe"]
    assert moe["expert_load"].shape == (2, 4)
    np.testing.assert_allclose(moe["expert_load"].sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(moe["expert_load"], spy.epoch_means("moe", "expert_load"),
                               atol=1e-6)
    np.testing.assert_allclose(moe["dropped_fraction"],
                               spy.epoch_means("moe", "dropped_fraction"), atol=1e-6)
    assert np.all(moe["dropped_fraction"] > 0)  # top-1 at capacity factor 1
    assert mmoe["task_expert_usage"].shape == (2, 2, 4)
    assert mmoe["task_names"] == ["a", "b"]
    np.testing.assert_allclose(mmoe["task_expert_usage"].sum(axis=2), 1.0, atol=1e-5)
    np.testing.assert_allclose(mmoe["task_expert_usage"],
                               spy.epoch_means("mmoe", "task_expert_usage"), atol=1e-6)
    np.testing.assert_allclose(mmoe["expert_load"], spy.epoch_means("mmoe", "expert_load"),
                               atol=1e-6)
    assert moe["val_expert_load"].shape == (2, 4)
    # The same keys and values as RoutingMetrics(per_expert=True) in History.
    np.testing.assert_allclose(history["moe_load_2"], moe["expert_load"][:, 2], atol=1e-6)
    np.testing.assert_allclose(history["mmoe_b_usage_3"],
                               mmoe["task_expert_usage"][:, 1, 3], atol=1e-6)
    np.testing.assert_allclose(history["val_moe_dropped"], moe["val_dropped_fraction"],
                               atol=1e-6)
    # Both callbacks together read each step's statistics once:
    # 2 epochs x (4 training + 1 validation batches).
    assert reads["moe"][0] == reads["mmoe"][0] == 10

    # Computing the class table restored the layer's statistics of the last
    # (validation) step.
    np.testing.assert_allclose(model.get_layer("moe").routing_stats()["expert_load"],
                               spy.last["moe"]["expert_load"], atol=1e-7)
    # Class x expert table, computed in batches of 8 (the layer reads the
    # model input directly).
    table = monitor.class_expert["moe"]
    assert table.shape == (3, 4)
    np.testing.assert_allclose(
        table, top_k_class_table(model.get_layer("moe"), x, labels, 3), atol=1e-9
    )

    # PNG plots.
    for name in ("moe_expert_load", "mmoe_expert_load", "dropped_fraction",
                 "moe_class_expert", "mmoe_task_expert"):
        path = tmp_path / "plots" / f"{name}.png"
        assert path.read_bytes()[:8] == PNG_MAGIC, name
        assert path.stat().st_size > 5000, name

    # TensorBoard: scalars per epoch equal the history; heat maps as images.
    train = read_events(tmp_path / "logs" / "routing" / "train")
    steps = [(step, value) for step, value, _, _ in train["moe/expert_load/expert_1"]]
    assert [s for s, _ in steps] == [0, 1]
    np.testing.assert_allclose([v for _, v in steps], moe["expert_load"][:, 1], atol=1e-6)
    usage = [v for _, v, _, _ in train["mmoe/a_usage/expert_0"]]
    np.testing.assert_allclose(usage, mmoe["task_expert_usage"][:, 0, 0], atol=1e-6)
    for tag in ("mmoe/task_expert", "moe/class_expert"):
        _, _, plugin, image = train[tag][-1]
        assert plugin == "images" and image[2][:8] == PNG_MAGIC, tag
    validation = read_events(tmp_path / "logs" / "routing" / "validation")
    np.testing.assert_allclose([v for _, v, _, _ in validation["moe/dropped_fraction"]],
                               moe["val_dropped_fraction"], atol=1e-6)


def test_monitor_history_alone_matches_layer_statistics():
    """Without plots or logs (no optional extra needed); dense gates."""
    inputs = keras.Input((4,))
    a, b = MultiGateMoE(2, 3, 8, task_names=["a", "b"], name="mmoe")(inputs)
    model = keras.Model(inputs, [a, b])
    model.compile(optimizer="sgd", loss="mse")
    x = np.random.default_rng(1).normal(size=(24, 4)).astype("float32")
    spy = StatsSpy(["mmoe"])
    monitor = RoutingMonitor(log_scalars=False)
    history = model.fit(x, [x, x], batch_size=8, epochs=2, verbose=0,
                        callbacks=[monitor, spy]).history
    record = monitor.history["mmoe"]
    assert record["expert_load"].shape == (2, 3)
    np.testing.assert_allclose(record["expert_load"].sum(axis=1), 1.0, atol=1e-5)
    for stat in ("expert_load", "task_expert_usage", "dropped_fraction"):
        np.testing.assert_allclose(record[stat], spy.epoch_means("mmoe", stat), atol=1e-6)
    np.testing.assert_allclose(record["dropped_fraction"], 0.0)  # dense gates
    assert "mmoe_load_0" not in history  # log_scalars=False
    assert monitor.class_expert == {}


def test_class_tables_of_a_nested_model():
    inner_in = keras.Input((3, 4))
    inner_x = keras.layers.Dense(4, name="inner_dense")(inner_in)
    inner = keras.Model(inner_in, SparseMoE(4, 8, k=2, name="moe")(inner_x), name="inner")
    outer_in = keras.Input((3, 4))
    outer = keras.Model(outer_in, inner(keras.layers.Dense(4, name="outer_dense")(outer_in)))
    x = np.random.default_rng(2).normal(size=(10, 3, 4)).astype("float32")
    labels = np.array([0, 1] * 5)
    monitor = RoutingMonitor(class_data=(x, keras.utils.to_categorical(labels)),
                             batch_size=5)
    monitor.set_model(outer)
    table = monitor.compute_class_tables()["moe"]
    # Reference: the two dense layers and the top-2 router in NumPy.
    features = x.astype("float64")
    for dense in (outer.get_layer("outer_dense"), inner.get_layer("inner_dense")):
        kernel, bias = (keras.ops.convert_to_numpy(w) for w in dense.weights)
        features = features @ kernel + bias
    np.testing.assert_allclose(
        table, top_k_class_table(inner.get_layer("moe"), features, labels, 2), atol=1e-9
    )
    assert monitor.class_names == ["0", "1"]


def test_clear_errors():
    x = np.zeros((4, 3, 2), "float32")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        RoutingMonitor(batch_size=0)
    with pytest.raises(ValueError, match="one label per example"):
        RoutingMonitor(class_data=(x, [0, 1, 2]))
    with pytest.raises(ValueError, match="one integer class per example"):
        RoutingMonitor(class_data=(x, [0.5, 1, 0, 1]))
    with pytest.raises(ValueError, match="class_names must name every class"):
        RoutingMonitor(class_data=(x, [0, 1, 2, 3]), class_names=["a", "b"])
    with pytest.raises(ValueError, match="class_names needs class_data"):
        RoutingMonitor(class_names=["a"])
    with pytest.raises(ValueError, match="plot_every_epoch=True needs a plot_dir"):
        RoutingMonitor(plot_every_epoch=True)

    model = two_layer_model()
    monitor = RoutingMonitor(layers=["moe", "nope"])
    monitor.set_model(model)
    with pytest.raises(ValueError, match=r"no MoE layer named \['nope'\]"):
        monitor.on_train_begin()
    monitor = RoutingMonitor(class_data=(x, [0, 1, 0, 1]), class_layers=["mmoe"])
    monitor.set_model(model)
    with pytest.raises(ValueError, match="class_layers must name monitored token MoE"):
        monitor.on_train_begin()


def test_class_tables_need_a_symbolic_model():
    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.moe = SparseMoE(2, 4, name="moe")

        def call(self, x):
            return self.moe(x)

    model = Subclassed()
    x = np.zeros((4, 3, 2), "float32")
    monitor = RoutingMonitor(class_data=(x, [0, 1, 0, 1]))
    monitor.set_model(model)
    with pytest.raises(ValueError, match="needs a functional or Sequential model"):
        monitor.compute_class_tables()


def test_missing_optional_dependencies_raise_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(ImportError, match=r"log_dir=.*needs TensorFlow|needs TensorFlow"):
        RoutingMonitor(log_dir=tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        RoutingMonitor(plot_dir=tmp_path)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plotting.plot_expert_heatmap(np.eye(2), ["a", "b"])


@needs_matplotlib
def test_plotting_functions_on_their_own(tmp_path):
    load = np.array([[0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.3, 0.2]])
    figure = plotting.plot_expert_load(load, tmp_path / "load.png", title="layer")
    (ax,) = figure.axes
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["expert 0", "expert 1", "expert 2", "expert 3",
                      "uniform 1/E = 25.0%"]
    np.testing.assert_allclose(ax.lines[2].get_ydata(), [0.2, 0.3])
    assert (tmp_path / "load.png").read_bytes()[:8] == PNG_MAGIC

    usage = np.array([[0.7, 0.1, 0.2], [0.0, 0.5, 0.5]])
    figure = plotting.plot_expert_heatmap(usage, ["click", "spend"],
                                          tmp_path / "sub" / "usage.png")
    cells = [t.get_text() for t in figure.axes[0].texts]
    assert cells == ["70%", "10%", "20%", "0%", "50%", "50%"]
    assert [t.get_text() for t in figure.axes[0].get_yticklabels()] == ["click", "spend"]
    assert (tmp_path / "sub" / "usage.png").exists()

    many = np.full((3, 32), 1 / 32)  # more experts than lines: a heat map
    figure = plotting.plot_expert_load({"big": {"expert_load": many}})
    assert len(figure.axes[0].images) == 1

    figure = plotting.plot_dropped_fraction({"a": [0.1, 0.05], "b": [0.0, 0.0]})
    np.testing.assert_allclose(figure.axes[0].lines[0].get_ydata(), [0.1, 0.05])

    with pytest.raises(ValueError, match="must be a non-empty 2-D array"):
        plotting.plot_expert_heatmap(np.ones(3))
    with pytest.raises(ValueError, match="row_labels must have 2 labels"):
        plotting.plot_expert_heatmap(usage, ["only one"])
    with pytest.raises(ValueError, match="must be finite"):
        plotting.plot_expert_load(np.array([[np.nan, 1.0]]))
