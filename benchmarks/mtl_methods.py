"""Every task weighting and gradient-balancing method on four multi-task
benchmarks, against single-task models: per-task metrics, Delta_m, the
spread over seeds and the cost per step.

Run it (from the project root; TensorFlow is the fastest backend on CPU):

    python benchmarks/mtl_methods.py                      # the full grid
    python benchmarks/mtl_methods.py --benchmarks multimnist,census \\
        --methods fixed,pcgrad,mgda_ub --seeds 0 --epochs 2
    python benchmarks/mtl_methods.py --timing             # cost per step
    python benchmarks/mtl_methods.py --from-log run.log --plot pareto.png

Every run prints one line

    RESULT benchmark=<name> method=<name> seed=<n> <metric>=<value> ...
        delta_m=<value> step_ms=<value> wall_s=<value>

(`delta_m` in percent against the single-task models of the same seed;
positive is better), so that runs can be collected by script; the end of
a run prints a Markdown table (mean and standard deviation over seeds) and,
with `--plot`, saves a Pareto plot (task 1 metric against task 2, one point
per method). `--from-log` rebuilds the table and plot from saved RESULT
lines. `--timing` measures instead the cost of one train step of every
method, side by side with the same model's plain step (interleaved, the
median of the per-rep ratios), in full-gradient and in representation mode.

## The benchmarks (small, so that the whole grid runs in about an hour on
two CPU cores)

- `multimnist`: MultiMNIST (`keras_moe.datasets.multi_mnist`, two
  overlapping digits, left and right) from `mnist_small.npz`: 10,000
  training canvases, 2,000 test canvases made from the test digits; a
  LeNet-style trunk (two 5x5 convolutions, 10 and 20 channels, a 50-unit
  dense layer) and one 50-unit head per digit, as in Sener and Koltun's
  MultiMNIST model. Metrics: the two accuracies.
- `cifar`: the CIFAR-10 classification + localisation model of
  `benchmarks/cifar_multitask.py` (CNN backbone, a sparse MoE over its
  tokens, an MMoE feeding a class head and a box head; its routing losses
  are `add_loss` losses), a quarter of its width, on 3,000 training
  images pasted on textured 64x64 canvases (one fixed canvas each) and
  1,000 test canvases. Metrics: accuracy and mean box IoU.
- `census`: UCI census income, income > 50K and never-married
  (`benchmarks/census_mmoe.py`'s features), the first 30,000 rows (80%
  train, 20% test), a shared embedding and a 64-unit MMoE with 4 experts,
  one tower per task. Metrics: the two AUCs.
- `synthetic`: the task-relatedness generator of Ma et al.
  (`benchmarks/mmoe_task_relatedness.py`) at correlation 0.5: 8,000
  training and 2,000 test rows of 100 features, a shared-bottom MLP
  (64, 32) and one tower per task. Metrics: the two test MSEs (lower is
  better).

The single-task baseline (`stl`) trains the same model once per task, with
the other task's loss weight at 0. `mgda_ub` is MGDA in representation
mode (Sener and Koltun's MGDA-UB); every other method runs on the full
per-task gradients of the shared parameters. All methods use their
defaults, Adam and the same learning rate: no per-method tuning.

Data: `--data` is the folder holding `mnist_small.npz`,
`cifar10_small.npz` and `census_income_kdd.csv.gz` (default
`../shared/data`, next to the project), or, with one benchmark, the file
itself; `--test-data` gives that benchmark a separate test file (an
`.npz` with `x_test, y_test`, or a census CSV) instead of its split.
"""

import argparse
import importlib.util
import math
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# This folder holds `cifar_compression.py`, whose name shadows a standard
# library module that jax probes for: keep the folder off the path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_moe import weighting as weighting_lib  # noqa: E402
from keras_moe.datasets import multi_mnist  # noqa: E402
from keras_moe.layers import BinaryHead, MultiGateMoE  # noqa: E402
from keras_moe.metrics import delta_m  # noqa: E402
from keras_moe.models import MultiTaskModel  # noqa: E402

DEFAULT_DATA = os.path.join(ROOT, "..", "shared", "data")
BENCHMARKS = ("multimnist", "cifar", "census", "synthetic")
METHODS = tuple(
    sorted({cls.registered_name for cls in weighting_lib.REGISTRY.values()})
) + ("mgda_ub",)
EXTRA_METHODS = {"mgda_ub": ("mgda", True)}  # name: (weighting, representation)


def load_sibling(name):
    """`benchmarks/<name>.py` as a module (its data and model code)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------
# The benchmarks: data, model, metrics
# ---------------------------------------------------------------------------


class Benchmark:
    """One benchmark: `data(args, seed)`, `layers()` (the functional model's
    inputs and outputs), compile arguments and `evaluate`."""

    name = None
    tasks = ()
    metrics = ()  # one per task
    higher_is_better = ()
    epochs = 3
    batch_size = 128
    learning_rate = 1e-3
    data_file = None

    def losses(self):
        raise NotImplementedError

    def evaluate(self, model, x, y):
        raise NotImplementedError


class MultiMNIST(Benchmark):
    name = "multimnist"
    tasks = ("left", "right")
    metrics = ("left_acc", "right_acc")
    higher_is_better = (True, True)
    epochs = 8
    batch_size = 128
    learning_rate = 2e-3
    data_file = "mnist_small.npz"

    def data(self, path, test_path, seed):
        with np.load(path) as data:
            train = multi_mnist(data["x_train"], data["y_train"], seed=0)
            test_source = np.load(test_path) if test_path else data
            test = multi_mnist(test_source["x_test"], test_source["y_test"], seed=1)
        return (
            (train[0], {"left": train[1], "right": train[2]}),
            (test[0], {"left": test[1], "right": test[2]}),
        )

    def layers(self):
        layers = keras.layers
        inputs = keras.Input((28, 28, 1), name="image")
        x = layers.Conv2D(10, 5, activation="relu", name="conv_1")(inputs)
        x = layers.MaxPooling2D()(x)
        x = layers.Conv2D(20, 5, activation="relu", name="conv_2")(x)
        x = layers.MaxPooling2D()(x)
        x = layers.Flatten()(x)
        x = layers.Dense(50, activation="relu", name="shared")(x)
        outputs = {
            task: layers.Dense(10, name=task)(
                layers.Dense(50, activation="relu", name=f"{task}_hidden")(x)
            )
            for task in self.tasks
        }
        return inputs, outputs

    def losses(self):
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        return {task: loss for task in self.tasks}

    def evaluate(self, model, x, y):
        pred = model.predict(x, batch_size=512, verbose=0)
        return {
            f"{task}_acc": float(np.mean(np.argmax(pred[task], -1) == y[task]))
            for task in self.tasks
        }


class Cifar(Benchmark):
    name = "cifar"
    tasks = ("class", "box")
    metrics = ("class_acc", "box_iou")
    higher_is_better = (True, True)
    epochs = 5
    batch_size = 64
    learning_rate = 2e-3
    data_file = "cifar10_small.npz"
    train_images, test_images, width = 3000, 1000, 0.25

    def __init__(self):
        self.module = load_sibling("cifar_multitask")

    def data(self, path, test_path, seed):
        (x, y), (xt, yt), _ = self.module.load_cifar(path)
        if test_path:
            _, (xt, yt), _ = self.module.load_cifar(test_path)
        rng = np.random.default_rng(0)
        pick = rng.permutation(len(x))[: self.train_images]
        images, boxes = self.module.make_canvases(x[pick], np.random.default_rng(1))
        test_images, test_boxes = self.module.make_canvases(
            xt[: self.test_images], np.random.default_rng(2)
        )
        return (
            (images, {"class": y[pick].astype("int32"), "box": boxes}),
            (test_images, {"class": yt[: self.test_images].astype("int32"), "box": test_boxes}),
        )

    def layers(self):
        steps = self.epochs * (self.train_images // self.batch_size)
        model = self.module.build_model(
            width=self.width,
            experts=4,
            hidden=64,
            task_experts=4,
            task_hidden=32,
            bn_momentum=self.module.bn_momentum_for(steps),
        )
        self.heads = {task: model.get_layer(task) for task in self.tasks}
        return model.inputs, {task: head.output for task, head in self.heads.items()}

    def losses(self):
        # The heads' own losses: cross-entropy and BoxLoss (smooth L1 + IoU).
        return {task: head.default_loss() for task, head in self.heads.items()}

    def evaluate(self, model, x, y):
        pred = model.predict(x, batch_size=256, verbose=0)
        return {
            "class_acc": float(np.mean(np.argmax(pred["class"], -1) == y["class"])),
            "box_iou": float(np.mean(self.module.box_iou(pred["box"], y["box"]))),
        }


class Census(Benchmark):
    name = "census"
    tasks = ("income", "never_married")
    metrics = ("income_auc", "never_married_auc")
    higher_is_better = (True, True)
    epochs = 3
    batch_size = 256
    learning_rate = 2e-3
    data_file = "census_income_kdd.csv.gz"
    rows = 30000

    def __init__(self):
        self.module = load_sibling("census_mmoe")

    def data(self, path, test_path, seed):
        m = self.module
        table = m.read_census(path, self.rows)
        labels = m.labels_of(table)
        cells = 2 * labels["income"] + labels["never_married"]
        if test_path:
            train, test = table, m.read_census(test_path)
        else:
            train_index, test_index = m.stratified_split(cells, 0.2, np.random.default_rng(0))
            train, test = m.take(table, train_index), m.take(table, test_index)
        pre = m.Preprocessor().fit(train)
        self.vocabulary_size = pre.vocabulary_size
        return (pre.transform(train), m.labels_of(train)), (pre.transform(test), m.labels_of(test))

    def layers(self):
        m = self.module
        inputs = m.model_inputs()
        features = m.embed(inputs, self.vocabulary_size, m.EMBEDDING_DIM)
        per_task = MultiGateMoE(
            num_tasks=2, num_experts=4, hidden_dim=64, output_dim=32, name="mmoe"
        )(features)
        outputs = {
            task: BinaryHead(hidden_units=[16], name=task)(h)
            for task, h in zip(self.tasks, per_task)
        }
        return inputs, outputs

    def losses(self):
        return {task: keras.losses.BinaryCrossentropy() for task in self.tasks}

    def evaluate(self, model, x, y):
        pred = model.predict(x, batch_size=2048, verbose=0)
        return {
            f"{task}_auc": self.module.roc_auc(y[task], pred[task]) for task in self.tasks
        }


class Synthetic(Benchmark):
    name = "synthetic"
    tasks = ("y1", "y2")
    metrics = ("y1_mse", "y2_mse")
    higher_is_better = (False, False)
    epochs = 5
    batch_size = 128
    learning_rate = 2e-3
    correlation = 0.5

    def __init__(self):
        self.module = load_sibling("mmoe_task_relatedness")

    def data(self, path, test_path, seed):
        rng = np.random.default_rng(0)
        x, y, params = self.module.synthetic_tasks(rng, 8000, self.correlation)
        xt = rng.normal(size=(2000, x.shape[1])).astype("float32")
        yt = self.module.labels(rng, xt, params)
        split = lambda v: {"y1": v[:, :1], "y2": v[:, 1:]}  # noqa: E731
        return (x, split(y)), (xt, split(yt))

    def layers(self):
        layers = keras.layers
        inputs = keras.Input((100,), name="x")
        h = layers.Dense(64, activation="relu", name="bottom_1")(inputs)
        h = layers.Dense(32, activation="relu", name="bottom_2")(h)
        outputs = {
            task: layers.Dense(1, name=task)(
                layers.Dense(8, activation="relu", name=f"{task}_tower")(h)
            )
            for task in self.tasks
        }
        return inputs, outputs

    def losses(self):
        return {task: "mse" for task in self.tasks}

    def evaluate(self, model, x, y):
        pred = model.predict(x, batch_size=2048, verbose=0)
        return {f"{t}_mse": float(np.mean((pred[t] - y[t]) ** 2)) for t in self.tasks}


def make_benchmark(name):
    return {"multimnist": MultiMNIST, "cifar": Cifar, "census": Census,
            "synthetic": Synthetic}[name]()


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def build(bench, method, seed, loss_weights=None):
    """A compiled `MultiTaskModel` of the benchmark trained with `method`
    (`"stl"`: fixed weighting with the given loss weights)."""
    keras.utils.set_random_seed(seed)
    inputs, outputs = bench.layers()
    weighting, representation = EXTRA_METHODS.get(method, (method, None))
    if method == "stl":
        weighting = "fixed"
    if weighting in ("rlw", "pcgrad", "graddrop", "gradvac"):
        weighting = weighting_lib.get(weighting).__class__(seed=seed)
    model = MultiTaskModel(
        inputs, outputs, task_weighting=weighting, representation=representation
    )
    model.compile(
        keras.optimizers.Adam(bench.learning_rate),
        loss=bench.losses(),
        loss_weights=loss_weights,
    )
    return model


class StepTimer(keras.callbacks.Callback):
    """Wall time of the training batches after the first `skip` (the first
    holds the compilation; the median of the rest is robust to the
    retracing of a last, smaller batch)."""

    def __init__(self, skip=2):
        super().__init__()
        self.times, self.seen, self.skip = [], 0, skip

    def on_train_batch_begin(self, batch, logs=None):
        self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen > self.skip:
            self.times.append(time.perf_counter() - self.start)


def train(bench, method, seed, data, epochs, loss_weights=None):
    (x, y), (xt, yt) = data
    model = build(bench, method, seed, loss_weights)
    timer = StepTimer()
    model.fit(x, y, batch_size=bench.batch_size, epochs=epochs, verbose=0,
              callbacks=[timer])
    step_ms = 1000 * statistics.median(timer.times) if timer.times else float("nan")
    return bench.evaluate(model, xt, yt), step_ms


def result_line(bench, method, seed, metrics, delta, step_ms, wall):
    values = " ".join(f"{name}={metrics[name]:.5f}" for name in bench.metrics)
    return (f"RESULT benchmark={bench.name} method={method} seed={seed} {values} "
            f"delta_m={delta:.4f} step_ms={step_ms:.2f} wall_s={wall:.1f}")


def data_paths(args, bench):
    if bench.data_file is None:
        return None, None
    path = args.data
    if os.path.isdir(path):
        path = os.path.join(path, bench.data_file)
    if not os.path.exists(path):
        raise SystemExit(
            f"{bench.name}: no data file {path}. Pass --data (a folder with "
            f"{bench.data_file}, e.g. ../shared/data from the project root)."
        )
    return path, args.test_data


def run_grid(args):
    rows = []
    for name in args.benchmarks:
        bench = make_benchmark(name)
        data = bench.data(*data_paths(args, bench), seed=0)
        epochs = args.epochs or bench.epochs
        for seed in args.seeds:
            start = time.time()
            single, steps = {}, []
            for t, task in enumerate(bench.tasks):
                weights = {other: float(other == task) for other in bench.tasks}
                metrics, step_ms = train(bench, "stl", seed, data, epochs, weights)
                single[bench.metrics[t]] = metrics[bench.metrics[t]]
                steps.append(step_ms)
            line = result_line(bench, "stl", seed, single, 0.0, np.mean(steps), time.time() - start)
            print(line, flush=True)
            rows.append(parse_result(line))
            for method in args.methods:
                start = time.time()
                metrics, step_ms = train(bench, method, seed, data, epochs)
                delta = delta_m(
                    [metrics[m] for m in bench.metrics],
                    [single[m] for m in bench.metrics],
                    list(bench.higher_is_better),
                )
                line = result_line(bench, method, seed, metrics, delta, step_ms,
                                   time.time() - start)
                print(line, flush=True)
                rows.append(parse_result(line))
    return rows


# ---------------------------------------------------------------------------
# Timing: cost per step against the plain step
# ---------------------------------------------------------------------------


def plain_model(bench):
    """The benchmark's model as a plain `keras.Model` (Keras' own step on
    the sum of the task losses): the reference of the cost ratios."""
    keras.utils.set_random_seed(0)
    inputs, outputs = bench.layers()
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.Adam(bench.learning_rate), loss=bench.losses())
    return model


def run_timing(args):
    """The cost of one train step of every method, as a ratio to the plain
    Keras step of the same model, measured side by side (interleaved
    reps, median of the per-rep ratios)."""
    harness = load_sibling("_harness")
    print("| benchmark | method | mode | step / plain step |")
    print("|---|---|---|---|")
    for name in args.benchmarks:
        bench = make_benchmark(name)
        (x, y), _ = bench.data(*data_paths(args, bench), seed=0)
        batch = bench.batch_size
        xb = keras.tree.map_structure(lambda v: v[:batch], x)
        yb = keras.tree.map_structure(lambda v: v[:batch], y)
        for method in args.methods:
            cls = weighting_lib.REGISTRY.get(method)
            if method in EXTRA_METHODS:
                modes = [("representation", EXTRA_METHODS[method][0])]
            elif cls.needs_task_gradients and cls.supports_representation:
                modes = [("parameters", method), ("representation", method)]
            elif cls.needs_task_gradients:  # DB-MTL: no representation mode
                modes = [("parameters", method)]
            else:
                modes = [("norms" if cls.needs_gradient_norms else "losses", method)]
            for mode, weighting in modes:
                keras.backend.clear_session()
                plain = plain_model(bench)
                keras.utils.set_random_seed(0)
                inputs, outputs = bench.layers()
                model = MultiTaskModel(
                    inputs, outputs, task_weighting=weighting,
                    representation=True if mode == "representation" else None,
                )
                model.compile(keras.optimizers.Adam(bench.learning_rate), loss=bench.losses())
                times = harness.interleaved_times(
                    {"plain": plain, "method": model}, xb, yb, warmup=2, reps=args.reps,
                    steps=args.steps_per_rep,
                )
                ratio = harness.median_ratio(times, "method", "plain")
                print(f"| {name} | {weighting} | {mode} | {ratio:.2f} |", flush=True)
                print(f"TIMING benchmark={name} method={weighting} mode={mode} "
                      f"ratio={ratio:.3f} plain_ms={1000 * statistics.median(times['plain']):.2f}",
                      flush=True)


# ---------------------------------------------------------------------------
# Tables and plot
# ---------------------------------------------------------------------------


def parse_result(line):
    fields = dict(item.split("=", 1) for item in line.split()[1:])
    row = {"benchmark": fields.pop("benchmark"), "method": fields.pop("method"),
           "seed": int(fields.pop("seed"))}
    row.update({k: float(v) for k, v in fields.items()})
    return row


def summary(rows):
    """`{benchmark: {method: {column: (mean, std, n)}}}`."""
    grouped = {}
    for row in rows:
        grouped.setdefault(row["benchmark"], {}).setdefault(row["method"], []).append(row)
    out = {}
    for bench, methods in grouped.items():
        out[bench] = {}
        for method, runs in methods.items():
            columns = [k for k in runs[0] if k not in ("benchmark", "method", "seed")]
            out[bench][method] = {
                c: (float(np.mean([r[c] for r in runs])),
                    float(np.std([r[c] for r in runs])), len(runs))
                for c in columns
            }
    return out


def print_table(rows):
    table = summary(rows)
    for name, methods in table.items():
        bench = make_benchmark(name) if name in BENCHMARKS else None
        metrics = bench.metrics if bench else [
            c for c in next(iter(methods.values())) if c not in ("delta_m", "step_ms", "wall_s")
        ]
        seeds = max(v["delta_m"][2] for v in methods.values())
        print(f"\n### {name} ({seeds} seeds; mean ± std)\n")
        print("| method | " + " | ".join(metrics) + " | Δm % | step ms |")
        print("|---" * (len(metrics) + 3) + "|")
        order = sorted(methods, key=lambda m: (m != "stl", -methods[m]["delta_m"][0]))
        for method in order:
            v = methods[method]
            cells = [f"{v[m][0]:.4f} ± {v[m][1]:.4f}" for m in metrics]
            delta = "0 (baseline)" if method == "stl" else f"{v['delta_m'][0]:+.2f} ± {v['delta_m'][1]:.2f}"
            print(f"| {method} | " + " | ".join(cells) + f" | {delta} | {v['step_ms'][0]:.1f} |")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summary(rows)
    names = [b for b in BENCHMARKS if b in table]
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 4.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        bench = make_benchmark(name)
        methods = table[name]
        m1, m2 = bench.metrics
        points = {m: (v[m1][0], v[m2][0]) for m, v in methods.items()}
        sign = [1 if h else -1 for h in bench.higher_is_better]
        front = [
            m for m, (a, b) in points.items()
            if not any(sign[0] * (c - a) >= 0 and sign[1] * (d - b) >= 0 and (c, d) != (a, b)
                       for c, d in points.values())
        ]
        for method, (a, b) in points.items():
            kind = weighting_lib.REGISTRY.get(EXTRA_METHODS.get(method, (method,))[0])
            color = ("black" if method == "stl" else "tab:blue"
                     if kind is not None and not kind.needs_task_gradients
                     and not kind.needs_gradient_norms else "tab:red")
            ax.scatter(a, b, color=color, marker="*" if method in front else "o",
                       s=90 if method in front else 30, zorder=3)
            ax.annotate(method, (a, b), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(m1 + (" (higher is better)" if sign[0] > 0 else " (lower is better)"))
        ax.set_ylabel(m2 + (" (higher is better)" if sign[1] > 0 else " (lower is better)"))
        seeds = max(v["delta_m"][2] for v in methods.values())
        ax.set_title(f"{name}: mean of {seeds} seeds")
        ax.grid(alpha=0.3)
    fig.suptitle("Task 1 against task 2\n(blue: loss-based, red: gradient-based, "
                 "black: single-task; stars: the Pareto front)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(path, dpi=110)
    print(f"saved {path}")


# ---------------------------------------------------------------------------


def names(text, allowed, what):
    chosen = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in allowed]
    if unknown:
        raise SystemExit(f"unknown {what} {unknown}; choose from {', '.join(allowed)}")
    return chosen


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmarks", default=",".join(BENCHMARKS),
                        help=f"comma-separated, from {', '.join(BENCHMARKS)}")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated weighting names (and mgda_ub)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of every run (default: the benchmark's)")
    parser.add_argument("--data", default=DEFAULT_DATA,
                        help="folder of the data files, or the file of the one benchmark")
    parser.add_argument("--test-data", default=None,
                        help="a separate test file for the one benchmark chosen")
    parser.add_argument("--timing", action="store_true",
                        help="measure the cost per step instead of training")
    parser.add_argument("--reps", type=int, default=7, help="timing reps (>= 5)")
    parser.add_argument("--steps-per-rep", type=int, default=1,
                        help="timing: consecutive steps timed per rep (their mean "
                             "step; more averages out the jitter of short steps)")
    parser.add_argument("--from-log", default=None,
                        help="read RESULT lines from this file instead of training")
    parser.add_argument("--plot", default=None, help="save the Pareto plot here (PNG)")
    args = parser.parse_args(argv)
    args.benchmarks = names(args.benchmarks, BENCHMARKS, "benchmarks")
    args.methods = names(args.methods, METHODS, "methods")
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.test_data and len(args.benchmarks) != 1:
        raise SystemExit("--test-data is for one benchmark: give --benchmarks NAME")
    if os.path.isfile(args.data) and len(args.benchmarks) != 1:
        raise SystemExit("--data FILE is for one benchmark; give a folder for several")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.timing:
        run_timing(args)
        return
    if args.from_log:
        with open(args.from_log) as f:
            rows = [parse_result(line.strip()) for line in f if line.startswith("RESULT ")]
    else:
        print(f"backend={keras.backend.backend()} keras={keras.__version__}", flush=True)
        rows = run_grid(args)
    print_table(rows)
    if args.plot:
        plot(rows, args.plot)
    bad = [r for r in rows if not all(math.isfinite(v) for k, v in r.items()
                                      if isinstance(v, float) and k != "step_ms")]
    if bad:
        raise SystemExit(f"non-finite results: {bad}")


if __name__ == "__main__":
    main()
