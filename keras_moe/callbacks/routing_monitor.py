"""`RoutingMonitor`: per-epoch routing history, TensorBoard summaries,
class x expert tables and plots."""

import os

import keras
import numpy as np

from keras_moe.callbacks._probe import (
    _class_data,
    _expert_labels,
    _feature_function,
    _is_token_layer,
    _name_list,
    _RoutingCounts,
)
from keras_moe.callbacks._stats import _stats_reader, _task_names
from keras_moe.callbacks._summary import (
    _require_tensorflow,
    _safe_name,
    _SummaryWriter,
)
from keras_moe.utils import validation as check


class RoutingMonitor(keras.callbacks.Callback):
    """Records, plots and logs to TensorBoard what every MoE layer's router
    does, epoch by epoch.

    For every layer with `routing_stats()` (`SparseMoE`, `SoftMoE`,
    `MultiGateMoE`, `CGC`, `PLE`, `MixtureOfExperts`; nested models too),
    named `<layer>`, it averages over each epoch's training batches (and
    validation batches, as `val_...`):

    - `expert_load`: the per-expert load `(E,)` (shares summing to 1);
    - `dropped_fraction`: the fraction of (token, choice) assignments
      dropped over capacity (0 for layers that never drop);
    - `task_expert_usage`: for multi-task layers, the task x expert usage
      `(T, E)` (each task's share of its gate mass per expert).

    The full arrays are in `monitor.history[<layer>]`
    (`"expert_load"` `(epochs, E)`, `"dropped_fraction"` `(epochs,)`,
    `"task_expert_usage"` `(epochs, T, E)`, `"task_names"`,
    `"expert_labels"`, and the `val_` arrays when `fit` validates). With
    `log_scalars=True` the epoch means also go into `fit`'s logs and
    `History`: `<layer>_load_<e>`, `<layer>_dropped` and
    `<layer>_<task>_usage_<e>` (the keys and values of
    `RoutingMetrics(per_expert=True)`; used together, the two callbacks read
    each step's statistics once).

    With `class_data=(x, labels)`, it also computes, for every token MoE
    layer (a single-task layer whose call takes `return_routing`:
    `SparseMoE`, `MixtureOfExperts`), the class x expert table: row `c` is
    the share of the router's (token, choice) assignments of the examples
    of class `c` that go to each expert (the gate mass for a dense
    mixture). It runs the model up to the layer's input and calls the
    layer with `return_routing=True` in inference mode, `batch_size`
    examples at a time, at the end of training (and every epoch with
    `plot_every_epoch`); the layer's routing statistics are restored
    afterwards. The latest tables are in `monitor.class_expert`.

    Outputs:

    - `log_dir`: TensorBoard scalars (`<layer>/expert_load/expert_<e>`,
      `<layer>/dropped_fraction`, `<layer>/<task>_usage/expert_<e>`) in
      `log_dir/routing/train` and `log_dir/routing/validation`, and the
      task x expert and class x expert heat maps as images, written with
      `tf.summary` on every Keras backend (needs TensorFlow).
    - `plot_dir`: PNG plots (needs matplotlib: `pip install matplotlib`,
      or `pip install -e ".[plot]"` from a clone) saved at the end of training (and after every
      epoch with `plot_every_epoch=True`): `<layer>_expert_load.png` (load
      over epochs, one line per expert, the uniform share `1/E` dashed),
      `dropped_fraction.png` (every layer), `<layer>_class_expert.png` and
      `<layer>_task_expert.png` (heat maps). See `keras_moe.plotting` to
      draw them yourself from `monitor.history`.

    Args:
        log_dir: directory of the TensorBoard logs, or None.
        plot_dir: directory of the PNG plots, or None.
        class_data: `(x, labels)`: model inputs and one integer class per
            example (or one-hot rows) for the class x expert tables, or None.
        class_names: names of the classes (default `0, 1, ...`).
        class_layers: names of the layers to compute class tables for
            (default: every monitored token MoE layer).
        layers: names of the MoE layers to monitor (default: all).
        plot_every_epoch: also compute the class tables and save the plots
            after every epoch (overwriting the files), not only at the end.
        batch_size: batch size of the class-table passes.
        log_scalars: put the per-expert epoch means into `fit`'s logs.

    Example:

    ```python
    monitor = keras_moe.callbacks.RoutingMonitor(
        plot_dir="plots", log_dir="logs",
        class_data=(x_test, y_test), class_names=["cat", "dog"])
    model.fit(x, y, epochs=5, callbacks=[monitor])
    monitor.history["moe"]["expert_load"]  # (5, E)
    ```

    References:
        Fedus, Zoph, Shazeer. Switch Transformers (2021): per-expert load
        and dropped tokens. Ma et al. Modeling Task Relationships in
        Multi-task Learning with Multi-gate Mixture-of-Experts (KDD 2018):
        per-task expert utilisation.
    """

    def __init__(
        self,
        log_dir=None,
        plot_dir=None,
        class_data=None,
        class_names=None,
        class_layers=None,
        layers=None,
        plot_every_epoch=False,
        batch_size=128,
        log_scalars=True,
    ):
        super().__init__()
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.plot_dir = None if plot_dir is None else os.fspath(plot_dir)
        if self.log_dir is not None:
            _require_tensorflow(self.log_dir)
        if self.plot_dir is not None:
            from keras_moe.plotting import require_matplotlib

            require_matplotlib("RoutingMonitor(plot_dir=...)")
        self.batch_size = check.positive_int("batch_size", batch_size)
        self.plot_every_epoch = check.boolean("plot_every_epoch", plot_every_epoch)
        if self.plot_every_epoch and self.plot_dir is None:
            raise ValueError(
                "plot_every_epoch=True needs a plot_dir. Received: plot_dir=None"
            )
        self.log_scalars = check.boolean("log_scalars", log_scalars)
        self.layer_names = _name_list("layers", layers)
        self.class_layer_names = _name_list("class_layers", class_layers)
        self.class_data, self.class_names = _class_data(class_data, class_names)
        if self.class_layer_names is not None and self.class_data is None:
            raise ValueError(
                "class_layers needs class_data=(x, labels). Received: "
                f"class_layers={self.class_layer_names}, class_data=None"
            )
        self._records = {}
        self.class_expert = {}
        self._last_epoch = 0
        self._feature_fns = {}
        self._writers = None
        self._layers = None

    # ------------------------------------------------------------ results

    @property
    def history(self):
        """`{layer name: {"expert_load": (epochs, E), "dropped_fraction":
        (epochs,), ["task_expert_usage": (epochs, T, E), "task_names"],
        ["group_expert_load": (epochs, G, E), "group_names"],
        "expert_labels", [val_...]}}` as NumPy arrays."""
        result = {}
        for name, record in self._records.items():
            entry = {}
            for key, values in record.items():
                if key in ("task_names", "group_names", "expert_labels"):
                    entry[key] = list(values)
                elif values:
                    entry[key] = np.asarray(values, "float64")
            result[name] = entry
        return result

    # ---------------------------------------------------------- callbacks

    def on_train_begin(self, logs=None):
        reader = _stats_reader(self.model)
        reader.reset(refresh_layers=True)
        found = {layer.name: layer for layer in reader.layers}
        if self.layer_names is None:
            self._layers = list(reader.layers)
        else:
            unknown = [n for n in self.layer_names if n not in found]
            if unknown:
                raise ValueError(
                    f"RoutingMonitor(layers=...): no MoE layer named {unknown} in "
                    f"the model. Received: layers={self.layer_names}; the model's "
                    f"MoE layers are {sorted(found)}"
                )
            self._layers = [found[n] for n in self.layer_names]
        self._class_layers = self._resolve_class_layers()
        if self.log_dir is not None and self._writers is None:
            self._writers = {
                phase: _SummaryWriter(os.path.join(self.log_dir, "routing", phase))
                for phase in ("train", "validation")
            }

    def _resolve_class_layers(self):
        if self.class_data is None:
            return []
        monitored = {layer.name: layer for layer in self._layers}
        if self.class_layer_names is None:
            chosen = [layer for layer in self._layers if _is_token_layer(layer)]
            if not chosen:
                raise ValueError(
                    "RoutingMonitor(class_data=...) found no token MoE layer "
                    "(a single-task layer whose call takes `return_routing`, "
                    "e.g. SparseMoE) among the monitored layers "
                    f"{sorted(monitored)}"
                )
            return chosen
        chosen = []
        for name in self.class_layer_names:
            layer = monitored.get(name)
            if layer is None or not _is_token_layer(layer):
                raise ValueError(
                    f"class_layers must name monitored token MoE layers (whose "
                    f"call takes `return_routing`, not multi-task). Received: "
                    f"{name!r}; the monitored layers are {sorted(monitored)}"
                )
            chosen.append(layer)
        return chosen

    def on_epoch_begin(self, epoch, logs=None):
        self._sums = {"train": {}, "test": {}}
        _stats_reader(self.model).reset()

    def on_test_begin(self, logs=None):
        if hasattr(self, "_sums"):
            self._sums["test"] = {}
        _stats_reader(self.model).reset()

    def on_train_batch_end(self, batch, logs=None):
        self._accumulate("train", batch)

    def on_test_batch_end(self, batch, logs=None):
        if hasattr(self, "_sums") and self._layers is not None:
            self._accumulate("test", batch)

    def _accumulate(self, phase, batch):
        wanted = {id(layer) for layer in self._layers}
        sums = self._sums[phase]
        for layer, stats in _stats_reader(self.model).read((phase, batch)):
            if id(layer) not in wanted:
                continue
            entry = sums.setdefault(layer.name, {"count": 0})
            entry["count"] += 1
            for key in (
                "expert_load",
                "dropped_fraction",
                "task_expert_usage",
                "group_expert_load",
            ):
                if key in stats:
                    value = np.asarray(stats[key], "float64")
                    entry[key] = entry.get(key, 0.0) + value
            if "task_expert_usage" in stats:
                entry["task_names"] = _task_names(
                    stats, np.shape(stats["task_expert_usage"])[0]
                )
            if "group_expert_load" in stats:
                entry["group_names"] = list(stats["group_names"])

    def on_epoch_end(self, epoch, logs=None):
        values = {}
        means = {}
        for phase, prefix in (("train", ""), ("test", "val_")):
            for name, entry in self._sums.get(phase, {}).items():
                mean = {
                    key: value / entry["count"]
                    for key, value in entry.items()
                    if key not in ("count", "task_names", "group_names")
                }
                if "group_names" in entry:
                    self._records.setdefault(name, {})["group_names"] = entry[
                        "group_names"
                    ]
                means.setdefault(phase, {})[name] = (mean, entry.get("task_names"))
                self._record(name, prefix, mean, entry.get("task_names"))
                values.update(self._scalars(name, prefix, mean, entry.get("task_names")))
        if self.log_scalars and logs is not None:
            logs.update(values)
        self._last_epoch = epoch
        if self._writers is not None:
            self._write_summaries(epoch, means)
        if self.plot_every_epoch:
            self._class_tables(epoch)
            self.save_plots()

    def on_train_end(self, logs=None):
        if self._records:
            if not self.plot_every_epoch:  # else done after the last epoch
                self._class_tables(self._last_epoch)
                if self.plot_dir is not None:
                    self.save_plots()
        if self._writers is not None:
            for writer in self._writers.values():
                writer.close()
            self._writers = None

    # ------------------------------------------------------------ helpers

    def _record(self, name, prefix, mean, task_names):
        record = self._records.setdefault(name, {})
        layer = next(layer for layer in self._layers if layer.name == name)
        record.setdefault(
            "expert_labels", _expert_labels(layer, len(mean["expert_load"]))
        )
        for key, value in mean.items():
            record.setdefault(prefix + key, []).append(value)
        if task_names is not None:
            record["task_names"] = list(task_names)

    def _scalars(self, name, prefix, mean, task_names):
        values = {f"{prefix}{name}_dropped": float(mean.get("dropped_fraction", 0.0))}
        for e, share in enumerate(mean["expert_load"]):
            values[f"{prefix}{name}_load_{e}"] = float(share)
        if "task_expert_usage" in mean:
            for task, row in zip(task_names, mean["task_expert_usage"]):
                for e, share in enumerate(row):
                    values[f"{prefix}{name}_{task}_usage_{e}"] = float(share)
        return values

    def _write_summaries(self, epoch, means):
        for phase, per_layer in means.items():
            writer = self._writers["train" if phase == "train" else "validation"]
            scalars = {}
            for name, (mean, task_names) in per_layer.items():
                tag = _safe_name(name)
                for e, share in enumerate(mean["expert_load"]):
                    scalars[f"{tag}/expert_load/expert_{e}"] = share
                scalars[f"{tag}/dropped_fraction"] = mean.get("dropped_fraction", 0.0)
                usage = mean.get("task_expert_usage")
                if usage is None:
                    continue
                for task, row in zip(task_names, usage):
                    for e, share in enumerate(row):
                        scalars[f"{tag}/{_safe_name(task)}_usage/expert_{e}"] = share
                if phase == "train":
                    self._summary_image(
                        writer, f"{tag}/task_expert",
                        self._task_figure(name, usage, task_names), epoch,
                    )
            writer.scalars(scalars, epoch)

    def _summary_image(self, writer, tag, figure_or_matrix, step):
        """Writes a heat map: a matplotlib figure, or (without matplotlib)
        the raw matrix as a grey image."""
        if isinstance(figure_or_matrix, np.ndarray):
            png = writer.matrix_png(figure_or_matrix)
        else:
            from keras_moe.plotting import figure_to_png

            png = figure_to_png(figure_or_matrix)
        writer.image(tag, png, step)

    def _task_figure(self, name, usage, task_names, epoch_count=None, row="task"):
        """The task (or group) x expert heat map (a figure; the matrix
        without matplotlib)."""
        try:
            from keras_moe import plotting

            plotting.require_matplotlib()
        except ImportError:
            return np.asarray(usage)
        epochs = epoch_count or len(self._records[name]["expert_load"])
        return plotting.plot_expert_heatmap(
            usage, task_names, col_labels=self._records[name]["expert_labels"],
            title=f"{name}: each {row}'s routing share per expert (epoch {epochs})",
            ylabel=row, colorbar_label=f"share of the {row}'s routing",
        )

    def _class_figure(self, name, table):
        try:
            from keras_moe import plotting

            plotting.require_matplotlib()
        except ImportError:
            return np.asarray(table)
        epochs = len(self._records[name]["expert_load"]) if name in self._records else 0
        return plotting.plot_expert_heatmap(
            table, self.class_names,
            col_labels=self._records.get(name, {}).get("expert_labels"),
            title=f"{name}: experts chosen for each class's tokens (epoch {epochs})",
            ylabel="class", colorbar_label="share of the class's router choices",
        )

    def compute_class_tables(self):
        """Computes the class x expert table of every class layer (see the
        class docstring) for the current weights; returns
        `{layer name: (classes, E) array}` and keeps it in `class_expert`."""
        if self.class_data is None:
            raise ValueError(
                "compute_class_tables needs class_data=(x, labels). Received: "
                "class_data=None"
            )
        if self._layers is None:  # outside fit
            self._layers = list(_stats_reader(self.model).layers)
            if self.layer_names is not None:
                self._layers = [
                    layer for layer in self._layers if layer.name in self.layer_names
                ]
            self._class_layers = self._resolve_class_layers()
        x, labels = self.class_data
        num_classes = len(self.class_names)
        tables = {}
        for layer in self._class_layers:
            if layer.name not in self._feature_fns:
                self._feature_fns[layer.name] = (
                    _feature_function(self.model, layer, self.batch_size), None
                )
            features, counter = self._feature_fns[layer.name]
            inputs = features(x)
            if counter is None:
                num_experts = getattr(layer, "num_experts", None) or len(
                    np.asarray(layer.routing_stats()["expert_load"])
                )
                probe_in = keras.Input(inputs.shape[1:], dtype=str(inputs.dtype))
                counter = keras.Model(
                    probe_in, _RoutingCounts(layer, num_experts)(probe_in)
                )
                self._feature_fns[layer.name] = (features, counter)
            # The routing call overwrites the layer's statistics: restore them.
            saved = [keras.ops.convert_to_numpy(v) for v in layer.non_trainable_variables]
            try:
                counts = counter.predict(inputs, batch_size=self.batch_size, verbose=0)
            finally:
                for variable, value in zip(layer.non_trainable_variables, saved):
                    variable.assign(value)
            counts = np.asarray(counts, "float64")
            table = np.zeros((num_classes, counts.shape[1]))
            np.add.at(table, labels, counts)
            totals = table.sum(axis=1, keepdims=True)
            tables[layer.name] = np.divide(
                table, totals, out=np.zeros_like(table), where=totals > 0
            )
        self.class_expert = tables
        return tables

    def _class_tables(self, epoch):
        if not self._class_layers:
            return
        tables = self.compute_class_tables()
        if self._writers is not None:
            for name, table in tables.items():
                self._summary_image(
                    self._writers["train"], f"{_safe_name(name)}/class_expert",
                    self._class_figure(name, table), epoch,
                )

    def save_plots(self, plot_dir=None):
        """Saves the PNG plots of the recorded history (and the latest class
        tables) into `plot_dir` (default: the constructor's); returns the
        paths written."""
        from keras_moe import plotting

        plot_dir = os.fspath(plot_dir) if plot_dir is not None else self.plot_dir
        if plot_dir is None:
            raise ValueError(
                "save_plots needs a directory: pass plot_dir here or to "
                "RoutingMonitor. Received: plot_dir=None"
            )
        history = self.history
        if not history:
            return []
        os.makedirs(plot_dir, exist_ok=True)
        paths = []
        for name, record in history.items():
            path = os.path.join(plot_dir, f"{_safe_name(name)}_expert_load.png")
            plotting.plot_expert_load(
                record, path, title=f"{name}: expert load per epoch "
                "(share of the routing, epoch mean)",
            )
            paths.append(path)
            if "task_expert_usage" in record:
                path = os.path.join(plot_dir, f"{_safe_name(name)}_task_expert.png")
                usage = record["task_expert_usage"][-1]
                self._task_figure(name, usage, record["task_names"]).savefig(
                    path, dpi=120, bbox_inches="tight", facecolor="white"
                )
                paths.append(path)
            if "group_expert_load" in record:
                # Per-group routing (e.g. modality x expert, LIMoE's table).
                path = os.path.join(plot_dir, f"{_safe_name(name)}_group_expert.png")
                figure = self._task_figure(
                    name, record["group_expert_load"][-1], record["group_names"],
                    row="group",
                )
                figure.savefig(path, dpi=120, bbox_inches="tight", facecolor="white")
                paths.append(path)
        path = os.path.join(plot_dir, "dropped_fraction.png")
        plotting.plot_dropped_fraction(history, path)
        paths.append(path)
        for name, table in self.class_expert.items():
            path = os.path.join(plot_dir, f"{_safe_name(name)}_class_expert.png")
            self._class_figure(name, table).savefig(
                path, dpi=120, bbox_inches="tight", facecolor="white"
            )
            paths.append(path)
        return paths

