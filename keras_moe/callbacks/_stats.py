"""Which layers report routing statistics, and one reader per model that
reads them once per step for every callback."""

import weakref

import numpy as np

from keras_moe.utils.keras_internals import child_layers


def moe_layers(model):
    """Every layer in `model` (nested models included) that reports routing
    statistics (has `routing_stats()`), in order."""
    found = []

    def visit(layer):
        if hasattr(layer, "routing_stats") and layer not in found:
            found.append(layer)
        for child in child_layers(layer):
            visit(child)

    for layer in model.layers:
        visit(layer)
    return found


class _StatsReader:
    """Reads every MoE layer's `routing_stats()` once per step for all the
    routing callbacks of one model (`RoutingMetrics` and `RoutingMonitor`
    used together read each step's statistics once).

    A step is keyed by `(phase, batch)`; every callback resets the reader
    when a phase begins (train, epoch, test), before any batch of it ends,
    so a key never refers to a step of an earlier phase.
    """

    def __init__(self, model):
        self.model = weakref.ref(model)
        self.layers = moe_layers(model)
        self.key = None
        self.stats = None

    def reset(self, refresh_layers=False):
        self.key = self.stats = None
        model = self.model()
        if refresh_layers and model is not None:
            self.layers = moe_layers(model)

    def read(self, key):
        """`[(layer, stats)]` for the step `key`, read at most once."""
        if key != self.key:
            self.stats = [(layer, layer.routing_stats()) for layer in self.layers]
            self.key = key
        return self.stats


_READERS = weakref.WeakKeyDictionary()


def _stats_reader(model):
    """The shared `_StatsReader` of `model` (pass `callback.model`: on JAX,
    reading that property syncs the model state once per batch)."""
    reader = _READERS.get(model)
    if reader is None:
        reader = _READERS[model] = _StatsReader(model)
    return reader


def _task_names(stats, count):
    return list(stats.get("task_names") or [f"task_{t}" for t in range(count)])


def effective_num_experts(usage):
    """`exp(entropy)` of a usage distribution over experts: 1 when one
    expert gets everything, `E` when all `E` get the same share (0 for an
    all-zero row)."""
    usage = np.asarray(usage, "float64")
    total = usage.sum()
    if total <= 0:
        return 0.0
    p = usage[usage > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))
