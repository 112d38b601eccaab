"""The MMoE paper's task-relatedness experiment on synthetic data.

Ma, Zhao, Yi, Chen, Hong, Chi. "Modeling Task Relationships in Multi-task
Learning with Multi-gate Mixture-of-Experts", KDD 2018, section 4: two
regression tasks on the same inputs whose relatedness is set by the cosine
`p` of their weight vectors. The paper's finding: the less related the
tasks, the larger MMoE's lead over a shared-bottom model and over a one-gate
MoE (OMoE), and MMoE trains more reliably across random starts.

The data generator (section 4.1, as described there; the constants that
section leaves open are flags, and docs/task_relatedness.md lists what was
assumed):

1. `u1, u2`: two orthogonal unit vectors in R^d (d = 100).
2. `w1 = c u1`, `w2 = c (p u1 + sqrt(1 - p^2) u2)`: `cos(w1, w2) = p`.
3. `x ~ N(0, I_d)`.
4. `y_i = w_i.x + sum_{j=1..m} sin(alpha_j w_i.x + beta_j) + eps_i`,
   `eps_i ~ N(0, 0.01)` (variance), m = 10; `alpha_j, beta_j` are shared by
   both tasks and drawn once per data set.

Models (all from keras_moe, the same two task towers Dense(8, relu) ->
Dense(1) on top, about the same number of parameters; see `build`):

- `shared_bottom`: one MLP d -> H -> 16 shared by both towers.
- `omoe`: `MultiGateMoE(num_tasks=1, 8 experts)`: one gate, one mixture fed
  to both towers.
- `mmoe`: `MultiGateMoE(num_tasks=2, 8 experts)`: a gate per task.
- `mmoe_sparse`: the same with sparse top-2 gates (`k=2`).
- `cgc`: `CGC(2 tasks, 3 task experts each, 2 shared)`.
- `ple`: `PLE(2 tasks, 2 levels of 1 + 1 task experts and 2 shared)`.

Each (correlation, seed) draws a fresh data set (new `u1, u2, alpha, beta`
and `x`) and fresh initial weights, as in the paper; every model of that
pair sees the same data. Loss: the sum of the two tasks' MSE, Adam.

Run (JAX is the fastest backend for these small MLPs on CPU; see the doc):

    KERAS_BACKEND=jax python benchmarks/mmoe_task_relatedness.py
    KERAS_BACKEND=jax python benchmarks/mmoe_task_relatedness.py --seeds 20 --epochs 60

It prints a markdown table (mean, std and median of the final test loss
per model and correlation) and saves the loss curves and the distribution
of final losses as PNGs (`--plot-dir`, default docs/images).
"""

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keras_moe imports TensorFlow

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_moe.layers import CGC, PLE, MultiGateMoE  # noqa: E402

MODELS = ("shared_bottom", "omoe", "mmoe", "mmoe_sparse", "cgc", "ple")
TASKS = ("y1", "y2")


# ---------------------------------------------------------------------------
# Data (Ma et al. 2018, section 4.1)
# ---------------------------------------------------------------------------


def synthetic_tasks(rng, n, correlation, dim=100, scale=1.0, num_sin=10,
                    sin_std=0.1, noise_std=0.1):
    """`x (n, dim)`, `y (n, 2)`: two regression tasks whose weight vectors
    have cosine `correlation`; returns also the generator's parameters so
    that a test set can be drawn from the same tasks (`labels`)."""
    # Two orthonormal vectors: QR of a Gaussian (dim, 2) matrix.
    q, _ = np.linalg.qr(rng.normal(size=(dim, 2)))
    u1, u2 = q[:, 0], q[:, 1]
    w1 = scale * u1
    w2 = scale * (correlation * u1 + np.sqrt(max(0.0, 1 - correlation**2)) * u2)
    alpha = rng.normal(0.0, sin_std, num_sin)
    beta = rng.normal(0.0, sin_std, num_sin)
    params = dict(w=np.stack([w1, w2]), alpha=alpha, beta=beta, noise_std=noise_std)
    x = rng.normal(size=(n, dim))
    return x.astype("float32"), labels(rng, x, params), params


def labels(rng, x, params):
    """`y_i = w_i.x + sum_j sin(alpha_j w_i.x + beta_j) + eps_i` for i = 1, 2."""
    z = x @ params["w"].T                                   # (n, 2)
    waves = np.sin(z[..., None] * params["alpha"] + params["beta"]).sum(-1)
    noise = rng.normal(0.0, params["noise_std"], z.shape)
    return (z + waves + noise).astype("float32")


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


def tower(x, name):
    h = keras.layers.Dense(8, activation="relu", name=f"{name}_tower")(x)
    return keras.layers.Dense(1, name=name)(h)


def build(name, dim, experts=8, hidden=16, output=16, shared_hidden=None):
    """One of `MODELS`; two outputs `y1`, `y2`.

    Experts are two-layer MLPs `d -> hidden -> output` (the kit's `Experts`);
    the shared bottom is the same MLP with `shared_hidden` hidden units,
    chosen so that its parameter count matches the MMoE's (`matched_width`).
    """
    inputs = keras.Input((dim,), name="x")
    if name == "shared_bottom":
        h = keras.layers.Dense(shared_hidden, activation="relu", name="bottom_in")(inputs)
        shared = keras.layers.Dense(output, name="bottom_out")(h)
        per_task = [shared, shared]
    elif name == "omoe":
        (shared,) = MultiGateMoE(1, experts, hidden, output_dim=output, name="omoe")(inputs)
        per_task = [shared, shared]
    elif name == "mmoe":
        per_task = MultiGateMoE(2, experts, hidden, output_dim=output, name="mmoe")(inputs)
    elif name == "mmoe_sparse":
        per_task = MultiGateMoE(2, experts, hidden, output_dim=output, k=2,
                                capacity_factor=None, name="mmoe_sparse")(inputs)
    elif name == "cgc":
        # 3 experts per task + 2 shared = 8 experts, as the MMoE.
        per_task = CGC(2, 3, 2, hidden, output_dim=output, name="cgc")(inputs)
    elif name == "ple":
        # Two levels of 1 + 1 per task and 2 shared (4 experts a level, 8 in
        # all); the second level reads the first's 16-wide outputs, so it is
        # small, and the first level's experts are wider (28 for the default
        # hidden 16) to spend the same parameter budget.
        first = int(round(hidden * 1.75))
        per_task = PLE(2, num_levels=2, num_task_experts=1, num_shared_experts=2,
                       hidden_dim=[first, hidden], output_dim=output, name="ple")(inputs)
    else:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    outputs = {t: tower(y, t) for t, y in zip(TASKS, per_task)}
    return keras.Model(inputs, outputs, name=name)


def matched_width(dim, experts, hidden, output):
    """Hidden width of the shared bottom with the MMoE's parameter count."""
    mmoe = build("mmoe", dim, experts, hidden, output).count_params()
    bottom_1 = build("shared_bottom", dim, experts, hidden, output, 1).count_params()
    per_unit = dim + 1 + output                  # one hidden unit's weights
    return max(1, int(round(1 + (mmoe - bottom_1) / per_unit)))


def linear_test_loss(x, y, x_test, y_test):
    """Test loss of least squares (with intercept) per task: how far a
    linear model gets, the reference that shows how non-linear the tasks are."""
    design = np.concatenate([x, np.ones((len(x), 1), x.dtype)], 1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    pred = np.concatenate([x_test, np.ones((len(x_test), 1), x_test.dtype)], 1) @ coef
    return float(((pred - y_test) ** 2).mean(0).sum())


def fresh_model(compiled, name, seed, args):
    """Model `name` with fresh initial weights for `seed` and a fresh Adam.

    Compiling (tracing the train step) costs seconds, training one of these
    small models for 30 epochs about as much: so each model is compiled once
    and every later run loads the weights of a newly built (and newly
    initialised) twin and zeroes the optimizer's state (step counter and
    moments), which is what a new model and optimizer would start from.
    """
    keras.utils.set_random_seed(1000 * seed + MODELS.index(name))
    model = build(name, args.dim, args.experts, args.hidden, args.output,
                  args.shared_hidden)
    if name not in compiled:
        model.compile(optimizer=keras.optimizers.Adam(args.learning_rate),
                      loss={t: "mse" for t in TASKS})
        compiled[name] = model
        return model
    target = compiled[name]
    target.set_weights(model.get_weights())
    for variable in target.optimizer.variables:
        if variable is not target.optimizer._learning_rate:  # keep the rate
            variable.assign(keras.ops.zeros(variable.shape, variable.dtype))
    return target


class EpochTestLoss(keras.callbacks.Callback):
    """Test loss (sum of the task MSEs) after every epoch, without the
    overhead of `validation_data`'s per-epoch evaluate loop setup."""

    def __init__(self, x, y):
        super().__init__()
        self.x, self.y, self.history = x, y, []

    def on_epoch_end(self, epoch, logs=None):
        self.history.append(test_loss(self.model, self.x, self.y))


def test_loss(model, x, y):
    pred = model.predict(x, batch_size=len(x), verbose=0)
    return float(sum(np.mean((pred[t][:, 0] - y[:, i]) ** 2) for i, t in enumerate(TASKS)))


# ---------------------------------------------------------------------------
# Experiment
# ---------------------------------------------------------------------------


def run(args):
    results = {}  # (model, correlation) -> list of dicts (one per seed)
    compiled = {}  # name -> a compiled model reused across runs (see below)
    start = time.time()
    for correlation in args.correlations:
        for seed in range(args.seeds):
            rng = np.random.default_rng((args.data_seed, seed, int(round(correlation * 1000))))
            x, y, params = synthetic_tasks(
                rng, args.train_size, correlation, dim=args.dim, scale=args.scale,
                num_sin=args.num_sin, sin_std=args.sin_std, noise_std=args.noise_std,
            )
            x_test = rng.normal(size=(args.test_size, args.dim)).astype("float32")
            y_test = labels(rng, x_test, params)
            label_corr = float(np.corrcoef(y[:, 0], y[:, 1])[0, 1])
            results.setdefault(("linear", correlation), []).append(dict(
                seed=seed, label_correlation=label_corr,
                final_test=linear_test_loss(x, y, x_test, y_test)))
            for name in args.models:
                model = fresh_model(compiled, name, seed, args)
                curve = EpochTestLoss(x_test, y_test)
                history = model.fit(x, {t: y[:, i] for i, t in enumerate(TASKS)},
                                    batch_size=args.batch_size, epochs=args.epochs,
                                    verbose=0, callbacks=[curve])
                results.setdefault((name, correlation), []).append(dict(
                    seed=seed, label_correlation=label_corr,
                    params=model.count_params(),
                    train_curve=[float(v) for v in history.history["loss"]],
                    test_curve=curve.history, final_test=curve.history[-1],
                ))
            done = results[(args.models[-1], correlation)][-1]
            print(f"p={correlation:<4} seed {seed}: "
                  + "  ".join(f"{m}={results[(m, correlation)][-1]['final_test']:.4f}"
                              for m in args.models)
                  + f"  (label corr {done['label_correlation']:.3f}; "
                  f"{time.time() - start:.0f} s so far)", flush=True)
    return results, time.time() - start


def table(results, args):
    head = "| model | parameters | " + " | ".join(f"p = {c}" for c in args.correlations) + " |"
    lines = [
        f"Final test loss (MSE of task 1 + MSE of task 2; noise floor "
        f"{2 * args.noise_std**2:.3f}), mean ± std over {args.seeds} seeds "
        f"[median], {args.epochs} epochs:",
        "",
        head,
        "|" + "---|" * (2 + len(args.correlations)),
    ]
    for name in args.models:
        cells = []
        for c in args.correlations:
            v = np.array([r["final_test"] for r in results[(name, c)]])
            cells.append(f"{v.mean():.4f} ± {v.std(ddof=1) if len(v) > 1 else 0:.4f} "
                         f"[{np.median(v):.4f}]")
        params = results[(name, args.correlations[0])][0]["params"]
        lines.append(f"| {name} | {params:,} | " + " | ".join(cells) + " |")
    cells = []
    for c in args.correlations:
        v = np.array([r["final_test"] for r in results[("linear", c)]])
        cells.append(f"{v.mean():.4f} ± {v.std(ddof=1) if len(v) > 1 else 0:.4f} "
                     f"[{np.median(v):.4f}]")
    lines.append(f"| *least squares (reference)* | {args.dim + 1:,} x 2 | "
                 + " | ".join(cells) + " |")
    corr = [np.mean([r["label_correlation"] for r in results[(args.models[0], c)]])
            for c in args.correlations]
    lines.append("| *label Pearson correlation* | | "
                 + " | ".join(f"{v:.3f}" for v in corr) + " |")
    if "mmoe" in args.models:
        lines += ["", "MMoE's lead (mean final test loss of the other model minus "
                  "MMoE's, and the seeds where MMoE is lower):", "",
                  "| against | " + " | ".join(f"p = {c}" for c in args.correlations) + " |",
                  "|" + "---|" * (1 + len(args.correlations))]
        for name in args.models:
            if name == "mmoe":
                continue
            cells = []
            for c in args.correlations:
                a = np.array([r["final_test"] for r in results[(name, c)]])
                b = np.array([r["final_test"] for r in results[("mmoe", c)]])
                cells.append(f"{(a - b).mean():+.4f} ({int((b < a).sum())}/{len(a)})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(args.plot_dir, exist_ok=True)
    colors = dict(zip(MODELS, ["tab:red", "tab:orange", "tab:blue", "tab:cyan",
                               "tab:green", "tab:purple"]))
    n = len(args.correlations)
    paths = []
    for kind in ("train_curve", "test_curve"):
        fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.0), sharey=True)
        for ax, c in zip(np.atleast_1d(axes), args.correlations):
            for name in args.models:
                curves = np.array([r[kind] for r in results[(name, c)]])
                epochs = np.arange(1, curves.shape[1] + 1)
                ax.plot(epochs, curves.mean(0), color=colors[name], label=name)
            ax.set_yscale("log")
            ax.set_title(f"correlation p = {c}")
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3, which="both")
        np.atleast_1d(axes)[0].set_ylabel(
            ("training" if kind == "train_curve" else "test") + " loss (mean of seeds)")
        np.atleast_1d(axes)[-1].legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(args.plot_dir, f"{args.tag}_{kind.split('_')[0]}_loss.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.0), sharey=True)
    for ax, c in zip(np.atleast_1d(axes), args.correlations):
        data = [[r["final_test"] for r in results[(name, c)]] for name in args.models]
        ax.boxplot(data, showfliers=False)
        for i, values in enumerate(data):
            jitter = np.random.default_rng(i).uniform(-0.15, 0.15, len(values))
            ax.scatter(i + 1 + jitter, values, s=9, color=colors[args.models[i]], zorder=3)
        ax.set_xticks(range(1, len(args.models) + 1))
        ax.set_xticklabels(args.models, rotation=60, fontsize=7)
        ax.set_yscale("log")
        ax.set_title(f"correlation p = {c}")
        ax.grid(alpha=0.3, axis="y", which="both")
    np.atleast_1d(axes)[0].set_ylabel("final test loss (one dot per seed)")
    fig.tight_layout()
    path = os.path.join(args.plot_dir, f"{args.tag}_final_loss.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return paths + [path]


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--correlations", type=float, nargs="+",
                        default=[1.0, 0.9, 0.5, 0.1])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--seeds", type=int, default=5,
                        help="independent data sets and initialisations per "
                             "correlation (the paper ran 200)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--train-size", type=int, default=10000)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--dim", type=int, default=100, help="input dimension d")
    parser.add_argument("--scale", type=float, default=1.0, help="c: |w_i| = c")
    parser.add_argument("--num-sin", type=int, default=10, help="m sinusoidal terms")
    parser.add_argument("--sin-std", type=float, default=0.1,
                        help="std of alpha_j and beta_j (0.1: variance 0.01)")
    parser.add_argument("--noise-std", type=float, default=0.1,
                        help="std of eps (0.1: variance 0.01)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=16, help="expert hidden width")
    parser.add_argument("--output", type=int, default=16, help="expert output width")
    parser.add_argument("--shared-hidden", type=int, default=None,
                        help="shared-bottom hidden width (default: the MMoE's "
                             "parameter count)")
    parser.add_argument("--data-seed", type=int, default=2018)
    parser.add_argument("--plot-dir", default=os.path.join("docs", "images"))
    parser.add_argument("--tag", default="task_relatedness",
                        help="file name prefix of the plots")
    parser.add_argument("--json", default=None, help="also save all curves here")
    args = parser.parse_args()
    if args.shared_hidden is None:
        args.shared_hidden = matched_width(args.dim, args.experts, args.hidden, args.output)

    print(f"Keras {keras.__version__}, backend {keras.backend.backend()}; "
          f"{len(args.correlations)} correlations x {args.seeds} seeds x "
          f"{len(args.models)} models, {args.epochs} epochs of {args.train_size} examples")
    results, seconds = run(args)
    print()
    print(table(results, args))
    print(f"\n{seconds:.0f} s in all (load average now: "
          f"{', '.join(f'{v:.1f}' for v in os.getloadavg())})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{m}|{c}": v for (m, c), v in results.items()}, f)
    try:
        print("Saved", ", ".join(plot(results, args)))
    except ImportError:
        print("No plots: matplotlib is not installed (pip install matplotlib).")


if __name__ == "__main__":
    main()
