"""
Title: Multi-gate Mixture-of-Experts on the census-income data
Author: keras_moe contributors
Date created: 2026/11/23
Last modified: 2026/12/05
Description: Predict income > 50K and "never married" for the same person with
one `MultiGateMoE` (the MMoE paper's census experiment), then see which experts
each task uses.
Accelerator: None
"""

"""
## Introduction

Multi-gate Mixture-of-Experts (MMoE, Ma et al., KDD 2018) shares a bank of
experts between tasks and gives every task its own gate over them: tasks
that are related share experts, tasks that conflict can use different ones.
The paper's first public experiment uses the UCI Census-Income (KDD) table
with two binary tasks on the same people:

- **income**: the person earns more than 50,000 USD a year (6.2% positive);
- **never married**: `marital_stat == "Never married"` (43% positive).

This example trains one MMoE on them with `model.fit` on a dict of targets,
measures each task's test AUC and prints each task's expert usage. It takes
about a minute on a 2-core CPU. `benchmarks/census_mmoe.py` runs the
paper's whole comparison (single-task networks, shared bottom, MMoE with
dense and sparse gates, PLE; several seeds); its numbers are in
`docs/census.md`.

## Setup
"""

import argparse
import csv
import gzip
import importlib.util
import logging
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
parser = argparse.ArgumentParser(description="MMoE on the census-income data")
parser.add_argument("--data",
                    default=os.path.join(ROOT, "..", "shared", "data",
                                         "census_income_kdd.csv.gz"),
                    help="the census CSV (.csv or .csv.gz); default: "
                         "../shared/data/census_income_kdd.csv.gz relative to the "
                         "project root")
parser.add_argument("--rows", type=int, default=None, help="use only the first N rows")
parser.add_argument("--epochs", type=int, default=30, help="at most (early stopping)")
parser.add_argument("--batch-size", type=int, default=1024)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()


# TensorFlow's C++ log lines (oneDNN notices, CPU features) say nothing about
# this example: hide them unless you chose a log level. They are written
# while TensorFlow's libraries load, so stderr is pointed at /dev/null
# meanwhile (an import error is still printed: stderr is back by then).
# Keras loads TensorFlow, when it is installed, on the first `model.save`
# under every backend: under JAX and PyTorch it is loaded here, quietly.
if "TF_CPP_MIN_LOG_LEVEL" not in os.environ:
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    _stderr, _devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(_devnull, 2)
    try:
        import keras

        if importlib.util.find_spec("tensorflow") is not None:
            import tensorflow  # noqa: F401
    finally:
        os.dup2(_stderr, 2)
        os.close(_stderr)
        os.close(_devnull)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_moe.layers import BinaryHead, MultiGateMoE, default_compile_args  # noqa: E402

if not os.path.exists(args.data):
    parser.error(f"the census file {os.path.normpath(args.data)} does not exist. Pass "
                 "the UCI census-income (KDD) table as a CSV (plain or gzipped) with "
                 "--data PATH.")
keras.utils.set_random_seed(args.seed)

"""
## The data

The file holds 79,809 rows of UCI's `census-income.test`: 7 continuous and
32 nominal attributes per person, plus the two 0/1 label columns
`income_50k` and `never_married`. `row_id`, `instance_weight` and
`marital_stat` (the source of the second label) are not features.

It is read with `csv` and NumPy only, and every value stays a string until
it is encoded: `hispanic_origin` has a genuine category `NA` and `?` marks a
missing value, and both stay categories of their own.
"""

TASKS = {"income": "income_50k", "never_married": "never_married"}
MONEY = ["wage_per_hour", "capital_gains", "capital_losses", "dividends_from_stocks"]
CONTINUOUS = ["age"] + MONEY + ["num_persons_worked_for_employer", "weeks_worked_in_year"]
NOMINAL = [
    "class_of_worker", "detailed_industry_recode", "detailed_occupation_recode",
    "education", "enroll_in_edu_inst_last_wk", "major_industry_code",
    "major_occupation_code", "race", "hispanic_origin", "sex",
    "member_of_a_labor_union", "reason_for_unemployment",
    "full_or_part_time_employment_stat", "tax_filer_stat",
    "region_of_previous_residence", "state_of_previous_residence",
    "detailed_household_and_family_stat", "detailed_household_summary_in_household",
    "migration_code_change_in_msa", "migration_code_change_in_reg",
    "migration_code_move_within_reg", "live_in_this_house_1_year_ago",
    "migration_prev_res_in_sunbelt", "family_members_under_18",
    "country_of_birth_father", "country_of_birth_mother", "country_of_birth_self",
    "citizenship", "own_business_or_self_employed",
    "fill_inc_questionnaire_for_veterans_admin", "veterans_benefits", "year",
]

opener = gzip.open if args.data.endswith(".gz") else open
with opener(args.data, "rt", newline="", encoding="utf-8") as f:
    reader = csv.reader(f)
    header = [name.strip() for name in next(reader)]
    records = [[value.strip() for value in record] for record in reader if record]
records = records[: args.rows]
table = {name: np.asarray(column, dtype=str) for name, column in zip(header, zip(*records))}
labels = {task: table[column].astype("float32") for task, column in TASKS.items()}
print(f"Keras {keras.__version__}, backend {keras.backend.backend()}; {len(records)} rows "
      f"from {os.path.basename(args.data)}")

"""
The rows are split once, stratified on the four (income, never married)
cells: 20% for the test, and 10% of the rest as the validation set that
early stopping watches.
"""

rng = np.random.default_rng(20240531)


def stratified_split(cells, fraction):
    """Index arrays `(rest, held_out)`: `fraction` of every cell held out."""
    rest, held = [], []
    for cell in np.unique(cells):
        index = rng.permutation(np.flatnonzero(cells == cell))
        n = int(round(fraction * len(index)))
        held.append(index[:n])
        rest.append(index[n:])
    return np.sort(np.concatenate(rest)), np.sort(np.concatenate(held))


cells = 2 * labels["income"] + labels["never_married"]
rest, test_rows = stratified_split(cells, 0.2)
fit_part, val_part = stratified_split(cells[rest], 0.1)
train_rows, val_rows = rest[fit_part], rest[val_part]
print(f"{len(train_rows)} train / {len(val_rows)} validation / {len(test_rows)} test rows")

"""
## Features

- Continuous: the four money columns are mostly zero with a long tail, so
  they go through `log1p` first; then every column is standardised with the
  training rows' mean and standard deviation.
- Nominal: each column's vocabulary comes from the training rows; a value
  never seen there maps to the column's index 0. All 32 columns share one
  `Embedding` table, each column owning a block of rows: its codes are
  shifted by the column's offset.
"""

numeric = np.stack([np.log1p(np.maximum(table[c].astype("float64"), 0.0)) if c in MONEY
                    else table[c].astype("float64") for c in CONTINUOUS], axis=1)
mean, std = numeric[train_rows].mean(axis=0), numeric[train_rows].std(axis=0) + 1e-6
numeric = ((numeric - mean) / std).astype("float32")

codes, offset = [], 0
for column in NOMINAL:
    vocabulary = np.unique(table[column][train_rows])
    position = np.minimum(np.searchsorted(vocabulary, table[column]), len(vocabulary) - 1)
    known = vocabulary[position] == table[column]
    codes.append(offset + np.where(known, position + 1, 0))
    offset += len(vocabulary) + 1  # + the unknown index 0
codes = np.stack(codes, axis=1).astype("int32")
vocabulary_size = offset


def part(rows):
    """`(x, y)` of the given rows: input and target dicts."""
    x = {"numeric": numeric[rows], "categorical": codes[rows]}
    return x, {task: y[rows] for task, y in labels.items()}


(x_train, y_train), (x_val, y_val), (x_test, y_test) = map(
    part, (train_rows, val_rows, test_rows)
)

"""
## The model

Embeddings (4 numbers per nominal column) and the continuous features make
a 135-number input. `MultiGateMoE` holds 8 expert feed-forward networks
(64 hidden units, 32 outputs) and one softmax gate per task; it returns one
mixture per task. Each task then has its own tower: a `BinaryHead` with a
32-unit hidden layer and a sigmoid output, which knows its loss (binary
cross-entropy) and metrics (AUC, accuracy), so `default_compile_args`
compiles the two-output model in one line.
"""

inputs = {
    "numeric": keras.Input((len(CONTINUOUS),), name="numeric"),
    "categorical": keras.Input((len(NOMINAL),), dtype="int32", name="categorical"),
}
embedded = keras.layers.Embedding(vocabulary_size, 4, name="embedding")(inputs["categorical"])
embedded = keras.layers.Flatten(name="flatten")(embedded)
x = keras.layers.Concatenate(name="features")([inputs["numeric"], embedded])
income, never_married = MultiGateMoE(
    num_tasks=2,
    num_experts=8,
    hidden_dim=64,
    output_dim=32,
    task_names=list(TASKS),
    name="mmoe",
)(x)
outputs = {
    "income": BinaryHead(hidden_units=[32], name="income")(income),
    "never_married": BinaryHead(hidden_units=[32], name="never_married")(never_married),
}
model = keras.Model(inputs, outputs, name="mmoe")
model.compile(optimizer=keras.optimizers.Adam(2e-3), **default_compile_args(model))
print(f"{model.name}: {model.count_params():,} parameters")

"""
## Training

Adam, the learning rate multiplied by 0.3 whenever the validation loss (the
sum of both tasks' losses) stalls for an epoch, and early stopping after 3
such epochs with the best weights restored.
"""

model.fit(
    x_train,
    y_train,
    validation_data=(x_val, y_val),
    batch_size=args.batch_size,
    epochs=args.epochs,
    callbacks=[
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.3, patience=1,
                                          min_lr=1e-5),
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=3,
                                      restore_best_weights=True),
    ],
    verbose=2,
)

"""
## Test AUC

The AUC is computed exactly: the probability that a random positive
scores above a random negative (the Mann-Whitney statistic, ties counting
one half), from the ranks of the scores. `keras.metrics.AUC` approximates
it with a fixed number of thresholds.
"""


def roc_auc(y_true, scores):
    y = y_true.reshape(-1) > 0.5
    _, inverse, counts = np.unique(scores.reshape(-1), return_inverse=True,
                                   return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]  # average ranks, from 1
    n_pos, n_neg = y.sum(), (~y).sum()
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


predictions = model.predict(x_test, batch_size=4096, verbose=0)
for task in TASKS:
    auc = roc_auc(y_test[task], np.asarray(predictions[task], "float64"))
    print(f"Test AUC {task}: {auc:.4f}")

"""
## Which experts each task uses

The multi-task layers keep statistics of their last call. One `predict` of
a probe model (the inputs up to the MMoE) over the whole test set in one
batch leaves each task's share of gate weight per expert in
`routing_stats()["task_expert_usage"]`: two rows that differ show the
tasks using the shared experts differently.
"""

mmoe = model.get_layer("mmoe")
probe = keras.Model(model.inputs, mmoe.output)
probe.predict(x_test, batch_size=len(test_rows), verbose=0)
usage = np.asarray(mmoe.routing_stats()["task_expert_usage"])
print("\nExpert usage on the test set (% of each task's gate weight):")
print(" " * 15 + " ".join(f"{e:>5d}" for e in range(usage.shape[1])))
for task, row in zip(TASKS, usage):
    print(f"{task:<14s} " + " ".join(f"{100 * v:5.1f}" for v in row))
