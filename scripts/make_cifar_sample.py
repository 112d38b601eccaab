#!/usr/bin/env python
"""Builds examples/data/cifar10_sample.npz from the shared CIFAR-10 subset.

    python scripts/make_cifar_sample.py --source ../shared/data/cifar10_small.npz

The sample keeps the rows of the previous, 2,000-image sample first (so
`--train-size 2000` trains on exactly the images it had) and adds
`--per-class` minus 200 more training images of every class, drawn with
`numpy.random.default_rng(1)` from the source's other training rows; the
500 test images are unchanged. The rows of the source that each image comes
from are stored as `train_source_index` / `test_source_index`, so the file
can be checked against (or rebuilt from) the source.
"""

import argparse
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "examples", "data", "cifar10_sample.npz")


def source_rows(images, source):
    """Row of `source` holding each of `images` (exact pixel match)."""
    where = {row.tobytes(): i for i, row in enumerate(source)}
    rows = np.array([where.get(image.tobytes(), -1) for image in images])
    if (rows < 0).any():
        raise ValueError(f"{(rows < 0).sum()} images are not in the source file")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--source", default=os.path.join(ROOT, "..", "shared", "data",
                                                         "cifar10_small.npz"))
    parser.add_argument("--base", default=SAMPLE,
                        help="the sample whose rows come first (its first 2,000 "
                             "training images and its test images)")
    parser.add_argument("--base-size", type=int, default=2000)
    parser.add_argument("--per-class", type=int, default=400,
                        help="training images per class in the new sample")
    parser.add_argument("--output", default=SAMPLE)
    args = parser.parse_args()

    with np.load(args.source) as data:
        source = {key: data[key] for key in data}
    with np.load(args.base) as data:
        base_train = source_rows(data["x_train"][: args.base_size], source["x_train"])
        base_test = source_rows(data["x_test"], source["x_test"])
    rng = np.random.default_rng(1)
    labels = source["y_train"]
    taken = np.zeros(len(labels), bool)
    taken[base_train] = True
    extra = []
    for c in range(10):
        need = args.per_class - int((labels[base_train] == c).sum())
        free = np.flatnonzero((labels == c) & ~taken)
        extra.append(rng.choice(free, size=need, replace=False))
    extra = rng.permutation(np.concatenate(extra))
    train = np.concatenate([base_train, extra]).astype("int32")
    np.savez_compressed(
        args.output,
        x_train=source["x_train"][train], y_train=source["y_train"][train],
        x_test=source["x_test"][base_test], y_test=source["y_test"][base_test],
        class_names=source["class_names"],
        train_source_index=train, test_source_index=base_test.astype("int32"),
    )
    print(f"{args.output}: {len(train)} training images "
          f"({np.bincount(source['y_train'][train], minlength=10).tolist()} per class), "
          f"{len(base_test)} test images, {os.path.getsize(args.output):,} bytes")


if __name__ == "__main__":
    main()
