"""Plots of what MoE routers learned: expert load over epochs, dropped
fraction over epochs, and class x expert or task x expert heat maps.

The functions take plain NumPy arrays, or the `history` of a
`keras_moe.callbacks.RoutingMonitor`, and return a matplotlib `Figure`
(saved as a PNG when `path` is given). They use matplotlib's object API (a
`Figure` with the Agg canvas, no `pyplot`), so they open no window and keep
no global figure state.

matplotlib is an optional dependency: `pip install matplotlib` (from a
clone: `pip install -e ".[plot]"`, as the README's quickstart does).

Example:

```python
import numpy as np
from keras_moe import plotting

load = np.array([[0.4, 0.3, 0.2, 0.1], [0.3, 0.3, 0.2, 0.2]])  # (epochs, E)
plotting.plot_expert_load(load, "load.png", title="moe")
usage = np.array([[0.7, 0.1, 0.1, 0.1], [0.0, 0.5, 0.5, 0.0]])  # (tasks, E)
plotting.plot_expert_heatmap(usage, ["click", "spend"], "usage.png")
```
"""

import io
import os

import numpy as np

# Experts drawn as lines (one per expert) up to this count; more experts are
# drawn as an expert x epoch heat map.
MAX_LINES = 16
# Heat-map cells get their percentage written in them up to this many cells
# per row and in all.
MAX_ANNOTATED_COLUMNS = 32
MAX_ANNOTATED_CELLS = 800


def require_matplotlib(what="keras_moe.plotting"):
    """Imports matplotlib, or raises an `ImportError` saying how to install
    it. Returns the `matplotlib` module."""
    try:
        import matplotlib
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"{what} needs matplotlib, an optional dependency of keras_moe. "
            "Install it with `pip install matplotlib` (from a clone of "
            f"keras_moe: `pip install -e \".[plot]\"`). ({error})"
        ) from error
    return matplotlib


def _figure(width, height):
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(figure, path, dpi):
    if path is not None:
        directory = os.path.dirname(os.fspath(path))
        if directory:
            os.makedirs(directory, exist_ok=True)
        figure.savefig(path, dpi=dpi, bbox_inches="tight", facecolor="white")
    return figure


def figure_to_png(figure, dpi=100):
    """The PNG bytes of a matplotlib figure (e.g. for a TensorBoard image)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight",
                   facecolor="white")
    return buffer.getvalue()


def _as_matrix(name, value, ndim):
    try:
        array = np.asarray(value, dtype="float64")
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{name} must be a numeric array. Received: {name}={value!r}"
        ) from error
    if array.ndim != ndim or 0 in array.shape:
        raise ValueError(
            f"{name} must be a non-empty {ndim}-D array. Received: {name} with "
            f"shape {array.shape}"
        )
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite. Received: {name}={array!r}")
    return array


def _is_layer_history(value):
    return isinstance(value, dict) and "expert_load" in value


def _load_panels(history):
    """`[(title, load (epochs, E), expert labels or None)]` from an array, a
    layer's history dict, or a whole `RoutingMonitor.history`."""
    if _is_layer_history(history):
        return [(None, history["expert_load"], history.get("expert_labels"))]
    if isinstance(history, dict):
        panels = []
        for name, layer_history in history.items():
            if not _is_layer_history(layer_history):
                raise ValueError(
                    "history must be an (epochs, num_experts) array, one "
                    "layer's history (a dict with 'expert_load'), or a "
                    "RoutingMonitor.history (layer name -> such a dict). "
                    f"Received: history[{name!r}]={layer_history!r}"
                )
            panels.append(
                (name, layer_history["expert_load"], layer_history.get("expert_labels"))
            )
        if not panels:
            raise ValueError("history is empty: no layer to plot. Received: {}")
        return panels
    return [(None, history, None)]


def _expert_labels(labels, count):
    if labels is None:
        return [str(e) for e in range(count)]
    labels = [str(label) for label in labels]
    if len(labels) != count:
        raise ValueError(
            f"expert_labels must have one label per expert. Received: "
            f"{len(labels)} labels for {count} experts"
        )
    return labels


def _epoch_axis(ax, epochs):
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(epochs) == 1:
        ax.set_xlim(epochs[0] - 0.5, epochs[0] + 0.5)
    else:
        ax.set_xlim(epochs[0] - 0.2, epochs[-1] + 0.2)


def _load_lines(ax, load, labels, title):
    from matplotlib.ticker import PercentFormatter

    epochs = np.arange(1, load.shape[0] + 1)
    num_experts = load.shape[1]
    colors = _expert_colors(num_experts)
    for e in range(num_experts):
        ax.plot(epochs, load[:, e], marker="o", markersize=4, linewidth=1.6,
                color=colors[e], label=f"expert {labels[e]}")
    uniform = 1.0 / num_experts
    ax.axhline(uniform, color="black", linestyle="--", linewidth=1.2,
               label=f"uniform 1/E = {uniform:.1%}")
    ax.set_ylim(0, max(float(load.max()), uniform) * 1.12)
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))
    ax.set_ylabel("share of the routing")
    ax.grid(True, alpha=0.3)
    _epoch_axis(ax, epochs)
    ax.set_title(title)
    columns = 1 if num_experts <= 8 else 2
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small",
              ncol=columns, frameon=False)


def _load_image(figure, ax, load, labels, title):
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.ticker import PercentFormatter

    num_experts = load.shape[1]
    uniform = 1.0 / num_experts
    top = max(float(load.max()), uniform * 1.001)
    image = ax.imshow(
        load.T, aspect="auto", cmap="RdBu_r", interpolation="nearest",
        norm=TwoSlopeNorm(vmin=0.0, vcenter=uniform, vmax=top),
        extent=(0.5, load.shape[0] + 0.5, num_experts - 0.5, -0.5),
    )
    ax.set_ylabel("expert")
    step = max(1, num_experts // 16)
    ax.set_yticks(range(0, num_experts, step))
    ax.set_yticklabels(labels[::step])
    _epoch_axis(ax, np.arange(1, load.shape[0] + 1))
    ax.set_xlim(0.5, load.shape[0] + 0.5)
    ax.set_title(title)
    bar = figure.colorbar(image, ax=ax, format=PercentFormatter(xmax=1.0, decimals=1))
    bar.set_label(f"share of the routing (white: uniform 1/E = {uniform:.1%})")


def _expert_colors(count):
    from matplotlib import colormaps

    if count <= 10:
        cmap = colormaps["tab10"]
        return [cmap(i) for i in range(count)]
    cmap = colormaps["tab20"]
    return [cmap(i % 20) for i in range(count)]


def plot_expert_load(history, path=None, *, title=None, expert_labels=None, dpi=120):
    """Per-expert load over epochs, one line per expert, the uniform share
    `1/E` dashed.

    Args:
        history: an `(epochs, E)` array of per-expert load shares (rows sum
            to 1), one layer's `RoutingMonitor.history[name]` (a dict with
            `"expert_load"`), or the whole `RoutingMonitor.history` (one
            panel per layer).
        path: where to save the PNG (directories are created); `None` only
            returns the figure.
        title: the title (of a single panel); default "expert load".
        expert_labels: names of the `E` experts (default `0..E-1`; a
            layer's history may carry its own, e.g. `CGC`'s task experts).
        dpi: resolution of the PNG.

    Returns:
        The matplotlib `Figure`. More than 16 experts are drawn as an
        expert x epoch heat map (white: the uniform share) instead of lines.
    """
    panels = _load_panels(history)
    loads = [(name, _as_matrix("expert_load", load, 2), labels)
             for name, load, labels in panels]
    width = 9.0 if max(load.shape[1] for _, load, _ in loads) > 8 else 8.0
    figure = _figure(width, 3.6 * len(loads))
    axes = figure.subplots(len(loads), 1, squeeze=False)[:, 0]
    for ax, (name, load, labels) in zip(axes, loads):
        labels = _expert_labels(expert_labels if len(loads) == 1 and expert_labels
                                else labels, load.shape[1])
        panel_title = title if (title and len(loads) == 1) else (
            f"{name}: expert load per epoch" if name else "expert load per epoch")
        if load.shape[1] <= MAX_LINES:
            _load_lines(ax, load, labels, panel_title)
        else:
            _load_image(figure, ax, load, labels, panel_title)
    return _save(figure, path, dpi)


def plot_dropped_fraction(history, path=None, *, title=None, dpi=120):
    """Fraction of (token, choice) assignments dropped (over capacity) per
    epoch, one line per layer.

    Args:
        history: a `RoutingMonitor.history` (layer name -> dict with
            `"dropped_fraction"`), a dict of layer name -> `(epochs,)`
            array, or one `(epochs,)` array.
        path: where to save the PNG; `None` only returns the figure.
        title: the title; default "dropped assignments per epoch".
        dpi: resolution of the PNG.

    Returns:
        The matplotlib `Figure`.
    """
    from_monitor = isinstance(history, dict) and all(
        isinstance(v, dict) for v in history.values()
    )
    if from_monitor:
        series = {name: h["dropped_fraction"] for name, h in history.items()
                  if "dropped_fraction" in h}
    elif isinstance(history, dict):
        series = dict(history)
    else:
        series = {"dropped fraction": history}
    if not series:
        raise ValueError(
            "history has no dropped fraction to plot. Received: history with "
            f"keys {sorted(history)}"
        )
    series = {name: _as_matrix(f"dropped_fraction of {name!r}", values, 1)
              for name, values in series.items()}
    from matplotlib.ticker import PercentFormatter

    figure = _figure(8.0, 3.6)
    ax = figure.subplots()
    colors = _expert_colors(len(series))
    top = 0.0
    for (name, values), color in zip(series.items(), colors):
        epochs = np.arange(1, len(values) + 1)
        ax.plot(epochs, values, marker="o", markersize=4, linewidth=1.6,
                color=color, label=name)
        top = max(top, float(values.max()))
    ax.set_ylim(0, max(top * 1.15, 0.01))
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=1))
    ax.set_ylabel("dropped assignments")
    ax.grid(True, alpha=0.3)
    _epoch_axis(ax, np.arange(1, max(len(v) for v in series.values()) + 1))
    ax.set_title(title or "dropped (token, choice) assignments per epoch")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small",
              frameon=False)
    return _save(figure, path, dpi)


def plot_expert_heatmap(matrix, row_labels=None, path=None, *, col_labels=None,
                        title=None, xlabel="expert", ylabel=None,
                        colorbar_label="share of the row", annotate=None, dpi=120):
    """A heat map of a rows x experts matrix of shares (e.g. class x expert
    or task x expert usage), with the percentage written in every cell.

    Args:
        matrix: `(rows, E)` array of shares (typically each row sums to 1).
        row_labels: a label per row (default `0..rows-1`).
        path: where to save the PNG; `None` only returns the figure.
        col_labels: a label per expert (default `0..E-1`).
        title: the title.
        xlabel, ylabel: axis labels.
        colorbar_label: label of the colour bar.
        annotate: write the percentages in the cells (default: when there
            are at most 32 columns and 800 cells).
        dpi: resolution of the PNG.

    Returns:
        The matplotlib `Figure`.
    """
    from matplotlib.ticker import PercentFormatter

    matrix = _as_matrix("matrix", matrix, 2)
    rows, cols = matrix.shape
    row_labels = _labels("row_labels", row_labels, rows)
    col_labels = _labels("col_labels", col_labels, cols)
    if annotate is None:
        annotate = cols <= MAX_ANNOTATED_COLUMNS and rows * cols <= MAX_ANNOTATED_CELLS
    label_width = max(len(label) for label in row_labels)
    width = min(22.0, max(5.0, 0.62 * cols + 0.09 * label_width + 2.6))
    height = min(22.0, max(2.6, 0.42 * rows + 1.5))
    figure = _figure(width, height)
    ax = figure.subplots()
    top = max(float(matrix.max()), 1e-9)
    image = ax.imshow(matrix, cmap="Blues", vmin=0.0, vmax=top, aspect="auto",
                      interpolation="nearest")
    ax.set_xticks(range(cols))
    ax.set_xticklabels(col_labels, rotation=90 if max(map(len, col_labels)) > 3 else 0)
    ax.set_yticks(range(rows))
    ax.set_yticklabels(row_labels)
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.tick_params(length=0)
    if annotate:
        size = "small" if cols <= 16 else "x-small"
        for r in range(rows):
            for c in range(cols):
                value = matrix[r, c]
                dark = value > 0.55 * top
                ax.text(c, r, f"{100 * value:.0f}%", ha="center", va="center",
                        fontsize=size, color="white" if dark else "black")
    bar = figure.colorbar(image, ax=ax, format=PercentFormatter(xmax=1.0, decimals=0),
                          fraction=0.05, pad=0.02)
    bar.set_label(colorbar_label)
    return _save(figure, path, dpi)


def _labels(name, labels, count):
    if labels is None:
        return [str(i) for i in range(count)]
    labels = [str(label) for label in labels]
    if len(labels) != count:
        raise ValueError(
            f"{name} must have {count} labels, one per matrix "
            f"{'row' if name.startswith('row') else 'column'}. Received: "
            f"{len(labels)} labels: {labels}"
        )
    return labels
