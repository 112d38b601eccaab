"""The census-income experiment of the MMoE paper: five models, several seeds.

The experiment of Ma et al. (KDD 2018, task group 1): predict income > 50K
and "never married" from the same person, with single-task MLPs, a
shared-bottom network, MMoE with dense and with sparse top-2 gates, and PLE,
and compare their test AUCs (mean and spread over seeds). The measured
numbers are in docs/census.md. `examples/census_mmoe.py` is the example to
read: one MMoE, one run, top to bottom, on the same data and features.

Run it (any backend, from the project root):

    python benchmarks/census_mmoe.py                       # all 5 models, 3 seeds
    python benchmarks/census_mmoe.py --models mmoe,ple --seeds 1
    python benchmarks/census_mmoe.py --rows 3000 --epochs 1 --seeds 1   # smoke test
    KERAS_BACKEND=jax python benchmarks/census_mmoe.py --data path/to/census.csv.gz

## The data

The UCI Census-Income (KDD) table (1994/95 Current Population Surveys): one
row per person, 7 continuous and 32 nominal attributes. The file read by
default (`../shared/data/census_income_kdd.csv.gz`, next to the repository)
holds 79,809 rows of UCI's `census-income.test` with two 0/1 label columns:

- `income_50k`: the person earns more than 50,000 USD a year (6.2% positive);
- `never_married`: `marital_stat == "Never married"` (43% positive).

`row_id` (an id), `instance_weight` (the survey's sampling weight),
`marital_stat` (the source of the second label) and the labels are not
features. Any CSV with the same columns works (`--data`), plain or gzipped.
The file is parsed with `csv` + NumPy only; every value stays a string until
it is encoded, so the genuine `hispanic_origin` category `NA` stays a category
(pandas would need `keep_default_na=False`), and `?` (missing) is a category
of its own as well.

Unless `--test-data` gives a separate test file, the rows are split once
(`--split-seed`), stratified on the four (income, never-married) cells: 20%
test, and 10% of the rest as the validation set that early stopping watches.
The split is the same for every model and seed, so the models are compared on
the same test rows and the spread over `--seeds` is that of the training.

## Features

- Continuous: `age`, `wage_per_hour`, `capital_gains`, `capital_losses`,
  `dividends_from_stocks`, `num_persons_worked_for_employer`,
  `weeks_worked_in_year`. The four money columns are mostly zero with a long
  tail, so they go through `log1p` first; then every column is standardised
  with the training part's mean and standard deviation.
- Nominal: the other 32 columns (codes such as `detailed_industry_recode`
  included). Each column's vocabulary comes from the training part only;
  a value never seen in training maps to the column's index 0. All columns
  share one `keras.layers.Embedding` table, each column owning a contiguous
  block of rows (its offset is added during preprocessing), and the
  `32 x embedding_dim` embeddings are flattened and concatenated with the
  continuous features.

## The models

Every model maps the same input `x` to two sigmoid outputs, `income` and
`never_married`, and is trained with `model.fit` on a dict of targets with a
binary cross-entropy per task (summed), Adam (learning rate multiplied by
`--lr-decay` whenever the validation loss stalls for an epoch) and early
stopping on the validation loss (`--patience`, best weights restored).
Multi-task models stop on the sum of both tasks' validation losses; the
single-task networks each on their own.

1. `single_task`: two separate networks (own embedding + MLP), each trained
   on its own task: the baseline without any sharing.
2. `shared_bottom`: one embedding + MLP shared by both tasks, then a small
   tower per task (Caruana 1997).
3. `mmoe`: `MultiGateMoE(num_tasks=2, num_experts=8)`: 8 expert FFNs shared
   by the tasks, each task mixing all of them with its own softmax gate
   (Ma et al. 2018), then the towers.
4. `mmoe_sparse`: the same with `k=2`: each task's gate is a sparse top-2
   router with a capacity, so each example runs through 2 experts per task
   instead of 8 (dropless at inference: `eval_capacity_factor=None`, so a
   prediction never depends on the rest of its batch).
5. `ple`: Progressive Layered Extraction (Tang et al. 2020): two levels of
   task-specific plus shared experts with gates per task.

The multi-task layers keep routing statistics; after training each MoE model
is run once over the whole test set, and the share of each task's routing
weight that goes to each expert (`routing_stats()["task_expert_usage"]`) is
printed, to show how differently the two tasks use the shared experts.

## Metric

The test AUC of each task, computed exactly (rank statistic with average
ranks for ties, `roc_auc` below); on the first evaluation it is cross-checked
against a brute-force pair count and `keras.metrics.AUC(num_thresholds=10000)`.
The table reports mean ± standard deviation over `--seeds` seeds, with
parameter counts and training times, and is written to
`<output-dir>/census_results.md`. See `docs/census.md` for measured numbers.

References:
    Ma, Zhao, Yi, Chen, Hong, Chi. Modeling Task Relationships in Multi-task
    Learning with Multi-gate Mixture-of-Experts. KDD 2018.
    Tang, Liu, Zhao, Gong. Progressive Layered Extraction (PLE). RecSys 2020.
"""

import argparse
import csv
import gzip
import json
import os
import time

import keras
import numpy as np

from keras_moe.layers import PLE, BinaryHead, MultiGateMoE

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_DATA = os.path.join(ROOT, "..", "shared", "data", "census_income_kdd.csv.gz")

TASKS = ("income", "never_married")
LABEL_COLUMNS = {"income": "income_50k", "never_married": "never_married"}
NOT_FEATURES = ("row_id", "instance_weight", "marital_stat", "income_50k", "never_married")
MONEY_COLUMNS = ("wage_per_hour", "capital_gains", "capital_losses", "dividends_from_stocks")
CONTINUOUS_COLUMNS = (
    "age",
    "wage_per_hour",
    "capital_gains",
    "capital_losses",
    "dividends_from_stocks",
    "num_persons_worked_for_employer",
    "weeks_worked_in_year",
)
NOMINAL_COLUMNS = (
    "class_of_worker",
    "detailed_industry_recode",
    "detailed_occupation_recode",
    "education",
    "enroll_in_edu_inst_last_wk",
    "major_industry_code",
    "major_occupation_code",
    "race",
    "hispanic_origin",
    "sex",
    "member_of_a_labor_union",
    "reason_for_unemployment",
    "full_or_part_time_employment_stat",
    "tax_filer_stat",
    "region_of_previous_residence",
    "state_of_previous_residence",
    "detailed_household_and_family_stat",
    "detailed_household_summary_in_household",
    "migration_code_change_in_msa",
    "migration_code_change_in_reg",
    "migration_code_move_within_reg",
    "live_in_this_house_1_year_ago",
    "migration_prev_res_in_sunbelt",
    "family_members_under_18",
    "country_of_birth_father",
    "country_of_birth_mother",
    "country_of_birth_self",
    "citizenship",
    "own_business_or_self_employed",
    "fill_inc_questionnaire_for_veterans_admin",
    "veterans_benefits",
    "year",
)
MODELS = ("single_task", "shared_bottom", "mmoe", "mmoe_sparse", "ple")
MOE_LAYER_NAME = {"mmoe": "mmoe", "mmoe_sparse": "mmoe", "ple": "ple"}

# Sizes shared by the models (the towers are the same everywhere).
EMBEDDING_DIM = 4
SINGLE_TASK_UNITS = (128, 64)
SHARED_BOTTOM_UNITS = (128, 64)
TOWER_UNITS = (32,)
NUM_EXPERTS = 8
EXPERT_HIDDEN = 64
EXPERT_OUTPUT = 32
PLE_TASK_EXPERTS = 2
PLE_SHARED_EXPERTS = 2


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def read_census(path, rows=None):
    """Columns of a census CSV (plain or gzipped) as NumPy string arrays.

    Nothing is converted: `NA` and `?` stay the strings they are. `rows`
    keeps only the first `rows` data rows.
    """
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = [name.strip() for name in next(reader)]
        records = []
        for record in reader:
            if rows is not None and len(records) >= rows:
                break
            if record:
                records.append([value.strip() for value in record])
    needed = CONTINUOUS_COLUMNS + NOMINAL_COLUMNS + tuple(LABEL_COLUMNS.values())
    missing = [name for name in needed if name not in header]
    if missing:
        raise ValueError(f"{path} lacks the columns {missing}")
    bad = [i for i, record in enumerate(records) if len(record) != len(header)]
    if bad:
        raise ValueError(
            f"{path}: data row {bad[0] + 1} has {len(records[bad[0]])} fields, "
            f"the header has {len(header)}"
        )
    columns = list(zip(*records)) if records else [()] * len(header)
    return {name: np.asarray(col, dtype=str) for name, col in zip(header, columns)}


def labels_of(table):
    return {task: table[col].astype("float32") for task, col in LABEL_COLUMNS.items()}


def stratified_split(cells, fraction, rng):
    """Index arrays `(rest, held_out)`: `fraction` of every cell held out."""
    rest, held = [], []
    for cell in np.unique(cells):
        index = rng.permutation(np.flatnonzero(cells == cell))
        n = int(round(fraction * len(index)))
        held.append(index[:n])
        rest.append(index[n:])
    return np.sort(np.concatenate(rest)), np.sort(np.concatenate(held))


class Preprocessor:
    """Encodes a census table into `{"numeric": (N, 7), "categorical": (N, 32)}`.

    Statistics and vocabularies come from the rows given to `fit` only.
    """

    def fit(self, table):
        numeric = self._numeric(table)
        self.mean = numeric.mean(axis=0)
        self.std = numeric.std(axis=0) + 1e-6
        self.vocabularies = [np.unique(table[col]) for col in NOMINAL_COLUMNS]
        sizes = np.array([len(v) + 1 for v in self.vocabularies])  # + unknown
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.vocabulary_size = int(sizes.sum())
        return self

    @staticmethod
    def _numeric(table):
        columns = []
        for col in CONTINUOUS_COLUMNS:
            values = table[col].astype("float64")
            columns.append(np.log1p(np.maximum(values, 0.0)) if col in MONEY_COLUMNS else values)
        return np.stack(columns, axis=1)

    def transform(self, table):
        numeric = (self._numeric(table) - self.mean) / self.std
        codes = []
        for col, vocab, offset in zip(NOMINAL_COLUMNS, self.vocabularies, self.offsets):
            values = table[col]
            pos = np.minimum(np.searchsorted(vocab, values), len(vocab) - 1)
            known = vocab[pos] == values
            codes.append(offset + np.where(known, pos + 1, 0))
        return {
            "numeric": numeric.astype("float32"),
            "categorical": np.stack(codes, axis=1).astype("int32"),
        }


def take(table, index):
    return {name: values[index] for name, values in table.items()}


def load_splits(args):
    """`(x, y)` dicts for train / validation / test, and the preprocessor."""
    table = read_census(args.data, args.rows)
    features = CONTINUOUS_COLUMNS + NOMINAL_COLUMNS
    ignored = [c for c in table if c not in features and c not in NOT_FEATURES]
    if ignored:
        print(f"Ignoring columns that are not census features: {ignored}")
    n = len(table["age"])
    rng = np.random.default_rng(args.split_seed)
    labels = labels_of(table)
    cells = 2 * labels["income"] + labels["never_married"]
    if args.test_data:
        test = read_census(args.test_data)
        train_index = np.arange(n)
    else:
        train_index, test_index = stratified_split(cells, 0.2, rng)
        test = take(table, test_index)
    fit_index, val_index = stratified_split(cells[train_index], 0.1, rng)
    train = take(table, train_index[fit_index])
    val = take(table, train_index[val_index])
    pre = Preprocessor().fit(train)
    return [(pre.transform(part), labels_of(part)) for part in (train, val, test)], pre


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


def model_inputs():
    return {
        "numeric": keras.Input((len(CONTINUOUS_COLUMNS),), name="numeric"),
        "categorical": keras.Input((len(NOMINAL_COLUMNS),), dtype="int32", name="categorical"),
    }


def embed(inputs, vocabulary_size, embedding_dim, prefix=""):
    """Continuous features + flattened per-column embeddings, `(B, 7 + 32 e)`."""
    embedded = keras.layers.Embedding(
        vocabulary_size, embedding_dim, name=f"{prefix}embedding"
    )(inputs["categorical"])
    embedded = keras.layers.Flatten(name=f"{prefix}flatten")(embedded)
    return keras.layers.Concatenate(name=f"{prefix}features")([inputs["numeric"], embedded])


def mlp(x, units, prefix):
    for i, width in enumerate(units):
        x = keras.layers.Dense(width, activation="relu", name=f"{prefix}dense_{i}")(x)
    return x


def head(task, dropout=0.0):
    """`(layer, loss, metrics)` of a task: a `BinaryHead` tower (a small MLP
    and a sigmoid output) that knows its loss (binary cross-entropy) and
    metrics (AUC, accuracy)."""
    layer = BinaryHead(hidden_units=list(TOWER_UNITS), dropout=dropout, name=task)
    return layer, layer.default_loss(), layer.default_metrics()


def towers(features, tasks, dropout=0.0):
    """A tower + head per task on `features[t]`: outputs, losses, metrics."""
    outputs, losses, metrics = {}, {}, {}
    for task, x in zip(tasks, features):
        layer, losses[task], metrics[task] = head(task, dropout)
        outputs[task] = layer(x)
    return outputs, losses, metrics


def multitask_layer(name, args):
    """The MultiGateMoE / PLE layer of model `name`."""
    task_names = list(TASKS)
    if name in ("mmoe", "mmoe_sparse"):
        sparse = name == "mmoe_sparse"
        return MultiGateMoE(
            num_tasks=len(TASKS),
            num_experts=NUM_EXPERTS,
            hidden_dim=EXPERT_HIDDEN,
            output_dim=EXPERT_OUTPUT,
            k=2 if sparse else None,
            capacity_factor=args.capacity_factor,
            eval_capacity_factor=None,
            task_names=task_names,
            name="mmoe",
        )
    return PLE(
        num_tasks=len(TASKS),
        num_levels=2,
        num_task_experts=PLE_TASK_EXPERTS,
        num_shared_experts=PLE_SHARED_EXPERTS,
        hidden_dim=EXPERT_HIDDEN,
        output_dim=EXPERT_OUTPUT,
        task_names=task_names,
        name="ple",
    )


def build_models(name, vocabulary_size, args):
    """A list of `(model, losses, metrics)`: one model for both tasks, or
    (`single_task`) one model per task."""
    if name == "single_task":
        built = []
        for task in TASKS:
            inputs = model_inputs()
            x = embed(inputs, vocabulary_size, args.embedding_dim, prefix=f"{task}_")
            x = mlp(x, SINGLE_TASK_UNITS, prefix=f"{task}_mlp_")
            outputs, losses, metrics = towers([x], [task], args.dropout)
            model = keras.Model(inputs, outputs, name=f"single_task_{task}")
            built.append((model, losses, metrics))
        return built
    inputs = model_inputs()
    x = embed(inputs, vocabulary_size, args.embedding_dim)
    if name == "shared_bottom":
        x = mlp(x, SHARED_BOTTOM_UNITS, prefix="bottom_")
        features = [x] * len(TASKS)
    else:
        features = multitask_layer(name, args)(x)
    outputs, losses, metrics = towers(features, TASKS, args.dropout)
    return [(keras.Model(inputs, outputs, name=name), losses, metrics)]


# ---------------------------------------------------------------------------
# Metric
# ---------------------------------------------------------------------------


def roc_auc(y_true, scores):
    """Exact ROC AUC: the Mann-Whitney statistic with average ranks for ties.

    `P(score of a random positive > score of a random negative)`, ties
    counting one half. NaN if a class is absent.
    """
    y = np.asarray(y_true).reshape(-1) > 0.5
    s = np.asarray(scores, dtype="float64").reshape(-1)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2.0)[inverse]  # 1-based average ranks
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def pairwise_auc(y_true, scores):
    """Brute-force AUC over all (positive, negative) pairs (for the check)."""
    y = np.asarray(y_true).reshape(-1) > 0.5
    s = np.asarray(scores, dtype="float64").reshape(-1)
    diff = s[y][:, None] - s[~y][None, :]
    if diff.size == 0:
        return float("nan")
    return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def check_auc(y_true, probabilities):
    """Our AUC against a brute-force count and keras.metrics.AUC."""
    exact = roc_auc(y_true, probabilities)
    rng = np.random.default_rng(0)
    sample = rng.choice(len(y_true), size=min(len(y_true), 3000), replace=False)
    # Rounding creates ties, which the brute force counts as one half.
    rounded = np.round(probabilities[sample], 2)
    brute_diff = abs(roc_auc(y_true[sample], rounded) - pairwise_auc(y_true[sample], rounded))
    metric = keras.metrics.AUC(num_thresholds=10000)
    metric.update_state(y_true.reshape(-1, 1), probabilities.reshape(-1, 1))
    keras_auc = float(keras.ops.convert_to_numpy(metric.result()))
    print(f"AUC check: ours {exact:.6f}, keras.metrics.AUC(num_thresholds=10000) "
          f"{keras_auc:.6f} (|diff| {abs(exact - keras_auc):.1e}); vs brute-force "
          f"pair count on 3,000 rounded scores |diff| {brute_diff:.1e}")
    assert not brute_diff > 1e-9, brute_diff  # NaN when a class is absent
    if abs(exact - keras_auc) > 1e-3:
        # keras' AUC buckets the scores into 10,000 thresholds: it is only
        # close when the scores are spread out (not after a 1-epoch smoke run).
        print("  (keras' thresholded AUC differs by more than 1e-3: scores too "
              "concentrated for 10,000 thresholds)")


# ---------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------


def fit_and_predict(model, losses, metrics, data, args):
    (x_train, y_train), (x_val, y_val), (x_test, _) = data
    tasks = list(losses)
    model.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate),
        loss=losses,
        metrics=metrics,
    )
    stop = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=args.patience, restore_best_weights=True
    )
    callbacks = [stop]
    if args.lr_decay:
        callbacks.append(keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", factor=args.lr_decay, patience=1, min_lr=1e-5, verbose=0))
    history = model.fit(
        x_train,
        {t: y_train[t] for t in tasks},
        validation_data=(x_val, {t: y_val[t] for t in tasks}),
        batch_size=args.batch_size,
        epochs=args.epochs,
        callbacks=callbacks,
        verbose=args.verbose,
    )
    epochs = len(history.history["loss"])
    predictions = model.predict(x_test, batch_size=4096, verbose=0)
    if not isinstance(predictions, dict):
        predictions = {tasks[0]: predictions}
    return {t: np.asarray(predictions[t], "float64").reshape(-1) for t in tasks}, epochs


def expert_usage(model, name, x_test):
    """Runs the model's multi-task layer once on the whole test set (one
    batch) and returns its `routing_stats()` (per-task expert usage, ...)."""
    layer = model.get_layer(MOE_LAYER_NAME[name])
    # One compiled predict call: the layer's statistics variables keep the
    # values of that call on every backend.
    probe = keras.Model(model.inputs, layer.output)
    probe.predict(x_test, batch_size=len(x_test["numeric"]), verbose=0)
    return layer.routing_stats()


def expert_labels(layer):
    """Column labels of `task_expert_usage`: `0..E-1` for MMoE; for PLE the
    experts of task 0, of task 1, ..., then the shared ones (CGC's order)."""
    if isinstance(layer, PLE):
        labels = [f"{task[:3]}{i}" for task in TASKS for i in range(layer.num_task_experts)]
        return labels + [f"sh{i}" for i in range(layer.num_shared_experts)]
    return [str(e) for e in range(layer.num_experts)]


def format_usage(usage, labels, rows):
    """A `(rows, experts)` usage table in percent."""
    usage = np.asarray(usage)
    lines = ["  " + " " * 14 + " ".join(f"{label:>6s}" for label in labels)]
    for row_name, row in zip(rows, usage):
        lines.append(f"  {row_name:<14s}" + " ".join(f"{100 * v:6.1f}" for v in row))
    return "\n".join(lines)


def report_usage(model, name, x_test):
    """Prints (and returns) each task's expert usage on the test set."""
    layer = model.get_layer(MOE_LAYER_NAME[name])
    stats = expert_usage(model, name, x_test)
    labels = expert_labels(layer)
    print(f"Expert usage on the test set ({name}; % of each task's gate weight):")
    levels = stats.get("levels", [stats])
    for level, level_stats in enumerate(levels):
        usage = np.asarray(level_stats["task_expert_usage"])
        rows = list(TASKS) + ["shared gate"] * (len(usage) - len(TASKS))
        if len(levels) > 1:
            print(f" level {level}:")
        print(format_usage(usage, labels, rows))
    if "dropped_fraction" in stats and name == "mmoe_sparse":
        print(f"  dropped at inference: {stats['dropped_fraction']:.2%} "
              "(eval_capacity_factor=None: dropless)")
    return [np.asarray(s["task_expert_usage"]).tolist() for s in levels]


def mean_std(values):
    values = np.asarray(values, dtype="float64")
    std = values.std(ddof=1) if len(values) > 1 else 0.0
    return f"{values.mean():.4f} ± {std:.4f}"


def results_table(results, seeds):
    lines = [
        "| model | income AUC | never-married AUC | params | train time (s) | epochs |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {mean_std(r['auc']['income'])} | "
            f"{mean_std(r['auc']['never_married'])} | {r['params']:,} | "
            f"{np.mean(r['time']):.0f} | {np.mean(r['epochs']):.1f} |"
        )
    lines.append("")
    lines.append(f"Test AUC, mean ± std over {seeds} seed(s); train time and epochs "
                 "are per seed (single_task: both networks together).")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="census CSV (.csv or .csv.gz)")
    parser.add_argument("--test-data", default=None,
                        help="a separate test CSV with the same columns: train on all of "
                             "--data (minus the validation part) and evaluate on this")
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--epochs", type=int, default=30, help="at most (early stopping)")
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--lr-decay", type=float, default=0.3,
                        help="multiply the learning rate by this when the validation "
                             "loss stalls for an epoch (0: constant)")
    parser.add_argument("--capacity-factor", type=float, default=1.25,
                        help="training capacity factor of the sparse MMoE")
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="dropout rate before every layer of the task towers")
    parser.add_argument("--embedding-dim", type=int, default=EMBEDDING_DIM)
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    parser.add_argument("--split-seed", type=int, default=20240531)
    parser.add_argument("--rows", type=int, default=None,
                        help="use only the first N rows of --data (smoke tests)")
    parser.add_argument("--verbose", type=int, default=2, help="Keras fit verbosity")
    parser.add_argument("--output-dir", default="runs/census_mmoe")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
    for flag, path in (("--data", args.data), ("--test-data", args.test_data)):
        if path is not None and not os.path.exists(path):
            parser.error(
                f"the census file {os.path.normpath(path)} does not exist. This "
                "runner reads the UCI census-income (KDD) table as a CSV (plain or "
                "gzipped); the default is ../shared/data/census_income_kdd.csv.gz "
                f"relative to the project root. Pass its location with {flag} PATH."
            )
    return args


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    data, pre = load_splits(args)
    (x_train, y_train), (x_val, _), (x_test, y_test) = data
    print(f"Keras {keras.__version__}, backend {keras.backend.backend()}; data {args.data}")
    print(f"{len(x_train['numeric'])} train / {len(x_val['numeric'])} validation / "
          f"{len(x_test['numeric'])} test rows; {len(CONTINUOUS_COLUMNS)} continuous + "
          f"{len(NOMINAL_COLUMNS)} nominal features ({pre.vocabulary_size} embedding rows)")
    print("Positive rate (train / test): " + ", ".join(
        f"{t} {y_train[t].mean():.3f} / {y_test[t].mean():.3f}" for t in TASKS))

    results, checked = {}, False
    for name in args.models:
        r = results[name] = {"auc": {t: [] for t in TASKS}, "time": [], "epochs": []}
        for seed in range(args.seeds):
            keras.backend.clear_session()
            keras.utils.set_random_seed(seed)
            built = build_models(name, pre.vocabulary_size, args)
            r["params"] = sum(model.count_params() for model, _, _ in built)
            print(f"\n== {name}, seed {seed}: {r['params']:,} parameters")
            start, epochs = time.time(), []
            for model, losses, metrics in built:
                probabilities, n_epochs = fit_and_predict(model, losses, metrics, data, args)
                epochs.append(n_epochs)
                for task, p in probabilities.items():
                    if not checked:
                        check_auc(y_test[task], p)
                        checked = True
                    r["auc"][task].append(roc_auc(y_test[task], p))
            r["time"].append(time.time() - start)
            r["epochs"].append(float(np.mean(epochs)))
            print(f"{name}, seed {seed}: test AUC " + ", ".join(
                f"{t} {r['auc'][t][-1]:.4f}" for t in TASKS)
                + f"; {r['time'][-1]:.0f} s, {epochs} epochs")
            if name in MOE_LAYER_NAME and seed == 0:
                r["task_expert_usage"] = report_usage(built[0][0], name, x_test)

    table = results_table(results, args.seeds)
    print("\n" + table)
    os.makedirs(args.output_dir, exist_ok=True)
    header = (f"# Census-income (KDD), MMoE task group 1\n\n"
              f"Backend {keras.backend.backend()}, data `{os.path.basename(args.data)}`"
              f"{'' if args.rows is None else f' (first {args.rows} rows)'}"
              f"{f', test data `{os.path.basename(args.test_data)}`' if args.test_data else ''}, "
              f"{len(x_train['numeric'])} train / {len(x_val['numeric'])} validation / "
              f"{len(x_test['numeric'])} test rows, batch {args.batch_size}, "
              f"lr {args.learning_rate} (x{args.lr_decay} on a stalled epoch), "
              f"at most {args.epochs} epochs (patience {args.patience}), "
              f"embedding dim {args.embedding_dim}.\n\n")
    path = os.path.join(args.output_dir, "census_results.md")
    with open(path, "w") as f:
        f.write(header + table + "\n")
    with open(os.path.join(args.output_dir, "census_results.json"), "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=1)
    print(f"\nWrote {path}; total time {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
