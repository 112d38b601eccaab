"""
Title: Multi-worker MoE training with TensorFlow's MultiWorkerMirroredStrategy
Author: keras_moe contributors
Date created: 2026/12/07
Last modified: 2026/12/07
Description: The `SparseMoE` + `MultiGateMoE` model of the JAX and torch
scripts, trained data parallel by several TensorFlow processes (workers) with
`tf.distribute.MultiWorkerMirroredStrategy`; checkpoints that load on any
number of processes.
Accelerator: None (CPU collectives over gRPC; the same script runs on GPU hosts)
"""

"""
## Introduction

Every worker runs this script; `TF_CONFIG` (built here from `--addresses`)
tells each one the cluster and its own index. The strategy mirrors every
variable on every worker and all-reduces the gradients; each worker feeds
its own share of every global batch. The routing statistics, the
auxiliary-loss-free bias and the balancing losses are computed over the
global batch (each mean over tokens is summed over the workers), so the
training equals one process on the global batch. Two workers on one
machine:

```
python examples/distributed/train_tensorflow.py --num-processes 2 --process-id 0 \\
    --addresses 127.0.0.1:12345,127.0.0.1:12346 --output-dir runs/tf &
python examples/distributed/train_tensorflow.py --num-processes 2 --process-id 1 \\
    --addresses 127.0.0.1:12345,127.0.0.1:12346 --output-dir runs/tf
```

On several hosts, list one `host:port` per worker (the same list on every
host) and give each its index, with a shared `--output-dir`. With one
process (the default) it is ordinary training.

## Setup
"""

import argparse
import json
import os
import sys

parser = argparse.ArgumentParser(description="Multi-worker MoE training with TensorFlow")
parser.add_argument("--num-processes", type=int, default=1)
parser.add_argument("--process-id", type=int, default=0)
parser.add_argument("--addresses", default="127.0.0.1:12345,127.0.0.1:12346",
                    help="host:port of every worker, comma-separated, in order")
parser.add_argument("--data", default=os.path.join(os.path.dirname(os.path.abspath(
    __file__)), "..", "data", "mnist_sample.npz"), help="an .npz with x_train, y_train")
parser.add_argument("--train-size", type=int, default=4000)
parser.add_argument("--batch-size", type=int, default=64, help="global batch size")
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--resume", default=None, help="a checkpoint to continue from")
parser.add_argument("--output-dir", default="runs/distributed_tensorflow")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

os.environ["KERAS_BACKEND"] = "tensorflow"
if args.num_processes > 1:
    workers = args.addresses.split(",")
    if len(workers) != args.num_processes:
        parser.error(f"--addresses lists {len(workers)} workers, "
                     f"--num-processes is {args.num_processes}")
    os.environ["TF_CONFIG"] = json.dumps({
        "cluster": {"worker": workers},
        "task": {"type": "worker", "index": args.process_id},
    })

import tensorflow as tf  # noqa: E402

from keras_moe.distribution import multi_worker_mirrored_strategy  # noqa: E402

# The strategy comes first, before any other TensorFlow work. Keras 3's
# `fit` needs two small fixes to use it; `multi_worker_mirrored_strategy`
# has them.
if args.num_processes > 1:
    strategy = multi_worker_mirrored_strategy()
else:
    strategy = tf.distribute.get_strategy()  # the default: one device

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_moe.callbacks import RoutingMetrics  # noqa: E402

from _common import Checkpoint, load_or_build  # noqa: E402 (after the engine's set-up)

keras.utils.set_random_seed(args.seed)
chief = args.process_id == 0
os.makedirs(args.output_dir, exist_ok=True)

"""
## The data

MNIST rows as tokens, two tasks: the digit, and whether it is odd. Global
batch `s` is examples `s B ... (s + 1) B - 1`; worker `p` of `P` takes the
`p`-th contiguous `B / P` of it. `distribute_datasets_from_function` hands
each worker its own pipeline (no automatic sharding, no rebatching).
"""

with np.load(args.data) as data:
    x_all = data["x_train"][: args.train_size].astype("float32") / 255.0
    digits = data["y_train"][: args.train_size].astype("int32")
targets = {"digit": digits, "odd": (digits % 2).astype("float32")[:, None]}
steps = len(x_all) // args.batch_size
local_batch = args.batch_size // args.num_processes


def local_share(array):
    """This process's part of every global batch, in order."""
    array = array[: steps * args.batch_size]
    array = array.reshape((steps, args.num_processes, local_batch) + array.shape[1:])
    return array[:, args.process_id].reshape((steps * local_batch,) + array.shape[3:])


def local_dataset(input_context=None):
    x = local_share(x_all)
    y = {name: local_share(value) for name, value in targets.items()}
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(local_batch).repeat()


if args.num_processes > 1:
    dataset = strategy.distribute_datasets_from_function(local_dataset)
else:
    dataset = local_dataset()

"""
## The model

The same model as the JAX and torch scripts: a token embedding, a residual
`SparseMoE` block (4 experts, top-2, the auxiliary-loss-free selection bias
plus a small Switch loss, dropless), mean pooling, a sparse-gated
`MultiGateMoE` and two task heads. Dropless routing matters here: a
capacity would be computed per worker, on its share of the tokens.
Built, compiled or loaded inside the strategy's scope.
"""


with strategy.scope():
    model, initial_epoch = load_or_build(args.resume)

"""
## Checkpoints and logs

After every epoch every worker calls `save_model`; worker 0 writes
`epoch-NNN.keras` (under a temporary name, then renamed) and appends the
epoch's logs, with `RoutingMetrics`' routing statistics, to `history.jsonl`.
(`Checkpoint` in `_common.py`, the same for the three engines.)
"""


"""
## Training

If a worker dies, the strategy's health checks notice within seconds and
the collectives of the others fail with `UnavailableError`; the worker
prints it and exits. The last checkpoint is whole.
"""

if chief:
    print(f"{args.num_processes} process(es), {strategy.num_replicas_in_sync} "
          f"replica(s), global batch {args.batch_size}", flush=True)
try:
    model.fit(dataset, epochs=args.epochs, steps_per_epoch=steps,
              initial_epoch=initial_epoch, verbose=0,
              callbacks=[RoutingMetrics(), Checkpoint(args.output_dir, args.num_processes, chief)])
except Exception as error:  # a peer died or the cluster broke
    print(f"process {args.process_id}: training failed: "
          f"{type(error).__name__}: {error}", file=sys.stderr, flush=True)
    os._exit(1)
if chief:
    print("done", flush=True)
