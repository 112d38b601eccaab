"""`RoutingMetrics`: routing statistics in `fit`'s logs."""


import keras
import numpy as np

from keras_moe.callbacks._stats import (
    _stats_reader,
    _task_names,
    effective_num_experts,
)
from keras_moe.utils import validation as check


class RoutingMetrics(keras.callbacks.Callback):
    """Adds every MoE layer's routing statistics to `fit`'s logs.

    For each layer with `routing_stats()` (`SparseMoE`, `SoftMoE`, ...), named
    `<layer>`, it logs after each batch (so the progress bar shows them) and,
    averaged over the epoch, into `history` (with `val_` versions from the
    validation pass):

    - `<layer>_dropped`: fraction of (token, choice) assignments dropped;
    - `<layer>_load_cv`: coefficient of variation of the per-expert load
      (0 is perfect balance);
    - `<layer>_max_load`: largest per-expert load share;
    - `<layer>_balance_loss`, `<layer>_entropy`: load-balancing loss and
      router entropy, where the layer reports them;
    - `<layer>_load_<e>` for every expert `e` with `per_expert=True`;
    - for multi-task layers (`MultiGateMoE`, `CGC`, `PLE`: their stats have
      `task_expert_usage`), per task `<layer>_<task>_experts`, the effective
      number of experts the task uses, `exp(H(u_t))` with `u_t` its usage
      row (1: one expert; `E`: all alike), and with `per_expert=True`
      `<layer>_<task>_usage_<e>`, its share on expert `e`.

    Statistics are read from the layers' non-trainable state after each
    step, so they are those of the step's batch; this works on every
    backend, jitted or not (on JAX it syncs the model state once per batch).

    Example:

    ```python
    model.fit(x, y, callbacks=[keras_moe.callbacks.RoutingMetrics()])
    ```
    """

    def __init__(self, per_expert=False):
        super().__init__()
        self.per_expert = check.boolean("per_expert", per_expert)

    def _read(self, key):
        values = {}
        for layer, stats in _stats_reader(self.model).read(key):
            load = np.asarray(stats["expert_load"], "float64")
            name = layer.name
            values[f"{name}_dropped"] = float(stats.get("dropped_fraction", 0.0))
            mean = load.mean()
            values[f"{name}_load_cv"] = float(load.std() / mean) if mean > 0 else 0.0
            values[f"{name}_max_load"] = float(load.max())
            if "load_balance_loss" in stats:
                values[f"{name}_balance_loss"] = float(stats["load_balance_loss"])
            if "router_entropy" in stats:
                values[f"{name}_entropy"] = float(stats["router_entropy"])
            if self.per_expert:
                for e, share in enumerate(load):
                    values[f"{name}_load_{e}"] = float(share)
            if "task_expert_usage" in stats:
                values.update(self._task_values(name, stats))
        return values

    def _task_values(self, name, stats):
        usage = np.asarray(stats["task_expert_usage"], "float64")
        tasks = _task_names(stats, len(usage))
        values = {}
        for task, row in zip(tasks, usage):
            values[f"{name}_{task}_experts"] = effective_num_experts(row)
            if self.per_expert:
                for e, share in enumerate(row):
                    values[f"{name}_{task}_usage_{e}"] = float(share)
        return values

    def _accumulate(self, store, logs, key):
        values = self._read(key)
        for name, value in values.items():
            store.setdefault(name, []).append(value)
        if logs is not None:
            logs.update(values)

    def on_train_begin(self, logs=None):
        _stats_reader(self.model).reset(refresh_layers=True)

    def on_epoch_begin(self, epoch, logs=None):
        self._train, self._val = {}, {}
        _stats_reader(self.model).reset()

    def on_train_batch_end(self, batch, logs=None):
        self._accumulate(self._train, logs, ("train", batch))

    def on_test_begin(self, logs=None):
        self._val = {}
        _stats_reader(self.model).reset()

    def on_test_batch_end(self, batch, logs=None):
        self._accumulate(self._val, None, ("test", batch))

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        logs.update({k: float(np.mean(v)) for k, v in self._train.items()})
        logs.update({f"val_{k}": float(np.mean(v)) for k, v in self._val.items()})
