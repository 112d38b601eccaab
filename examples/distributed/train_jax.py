"""
Title: Multi-process MoE training with JAX (data and expert parallelism)
Author: keras_moe contributors
Date created: 2026/12/07
Last modified: 2026/12/07
Description: A `SparseMoE` + `MultiGateMoE` model trained by several JAX
processes with `keras.distribution`: data parallel, or with the experts split
across the processes; checkpoints that load on any number of processes.
Accelerator: None (CPU collectives over gloo; the same script runs on GPU/TPU hosts)
"""

"""
## Introduction

One program runs in every process; `jax.distributed` connects them (process
0 is the coordinator) and `keras.distribution` lays the model out over the
global device mesh, so XLA compiles one SPMD program for the global batch.
Each process feeds its own share of every batch.

- `--parallel data`: `keras.distribution.DataParallel`: every process
  holds the whole model, gradients are all-reduced.
- `--parallel expert`: `keras_moe.distribution.expert_parallel` on a mesh
  whose `expert` axis spans the processes: each process holds only its
  experts' shard of every expert bank; tokens travel to their experts.

Either way the training is the one of a single process on the global batch:
the routing, the auxiliary-loss-free bias and the balancing losses are
computed over all tokens. Two processes on one machine:

```
python examples/distributed/train_jax.py --num-processes 2 --process-id 0 \\
    --addresses 127.0.0.1:12345 --output-dir runs/jax &
python examples/distributed/train_jax.py --num-processes 2 --process-id 1 \\
    --addresses 127.0.0.1:12345 --output-dir runs/jax
```

On several hosts, run it once per host with the coordinator's real address
(`--addresses host0:12345`) and a shared `--output-dir`. With one process
(the default) it is ordinary training.

## Setup
"""

import argparse
import os
import sys

parser = argparse.ArgumentParser(description="Multi-process MoE training with JAX")
parser.add_argument("--num-processes", type=int, default=1)
parser.add_argument("--process-id", type=int, default=0)
parser.add_argument("--addresses", default="127.0.0.1:12345",
                    help="host:port of process 0, the coordinator")
parser.add_argument("--parallel", choices=("data", "expert"), default="data")
parser.add_argument("--data", default=os.path.join(os.path.dirname(os.path.abspath(
    __file__)), "..", "data", "mnist_sample.npz"), help="an .npz with x_train, y_train")
parser.add_argument("--train-size", type=int, default=4000)
parser.add_argument("--batch-size", type=int, default=64, help="global batch size")
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--resume", default=None, help="a checkpoint to continue from")
parser.add_argument("--output-dir", default="runs/distributed_jax")
parser.add_argument("--heartbeat-timeout", type=int, default=20,
                    help="seconds after which a silent process counts as dead")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

os.environ["KERAS_BACKEND"] = "jax"
import jax  # noqa: E402

# CPU devices talk over gloo (TCP); GPUs and TPUs use their own collectives.
jax.config.update("jax_cpu_collectives_implementation", "gloo")
if args.num_processes > 1:
    jax.distributed.initialize(
        coordinator_address=args.addresses.split(",")[0],
        num_processes=args.num_processes,
        process_id=args.process_id,
        heartbeat_timeout_seconds=args.heartbeat_timeout,
    )

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_moe.callbacks import RoutingMetrics  # noqa: E402
from keras_moe.distribution import expert_parallel  # noqa: E402

from _common import Checkpoint, load_or_build  # noqa: E402 (after the engine's set-up)

# Every process must create the same initial weights.
keras.utils.set_random_seed(args.seed)
chief = jax.process_index() == 0
os.makedirs(args.output_dir, exist_ok=True)

"""
## The distribution

The mesh lists the global devices of all processes. Data parallelism shards
the batch over them; expert parallelism shards the batch and the experts
over one `expert` axis (tokens and experts share the devices, as in
GShard). `auto_shard_dataset=False`: each process passes its own share.
"""

devices = keras.distribution.list_devices()
if args.parallel == "expert":
    mesh = keras.distribution.DeviceMesh((len(devices),), ("expert",), devices)
    distribution = expert_parallel(mesh, auto_shard_dataset=False)
elif len(devices) > 1:
    distribution = keras.distribution.DataParallel(
        devices=devices, auto_shard_dataset=False
    )
else:
    distribution = None
if distribution is not None:
    keras.distribution.set_distribution(distribution)

"""
## The data

MNIST rows as tokens (28 tokens of 28 pixels), two tasks: the digit, and
whether it is odd. Global batch `s` is examples `s B ... (s + 1) B - 1`;
process `p` of `P` takes the `p`-th contiguous `B / P` of it.
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


x_local = local_share(x_all)
y_local = {name: local_share(value) for name, value in targets.items()}

"""
## The model

A token embedding, a residual `SparseMoE` block (4 experts, top-2, the
auxiliary-loss-free selection bias of DeepSeek-V3 plus a small Switch loss,
dropless), mean pooling, and a sparse-gated `MultiGateMoE` feeding the two
task heads. No dropout: the processes must compute the same function as
one process would.
"""

# Loaded inside the distribution: the weights are laid out (sharded) anew.
model, initial_epoch = load_or_build(args.resume)  # _common.py

"""
## Checkpoints and logs

After every epoch all processes call `save_model`: it gathers the expert
shards, and process 0 writes `epoch-NNN.keras` (under a temporary name,
then renamed: a crash never leaves half a file). Process 0 also appends the
epoch's logs, with `RoutingMetrics`' routing statistics, to `history.jsonl`.
(`Checkpoint` in `_common.py`, the same for the three engines.)
"""


"""
## Training

If another process dies, the next collective fails at once (gloo reports
the closed connection); the process prints the error and exits, without
waiting for `jax.distributed`'s shutdown barrier. The last checkpoint is
whole.
"""

if chief:
    print(f"{args.num_processes} process(es), {len(devices)} device(s), "
          f"{args.parallel} parallel, global batch {args.batch_size}", flush=True)
try:
    model.fit(x_local, y_local, batch_size=local_batch, epochs=args.epochs,
              initial_epoch=initial_epoch, shuffle=False, verbose=0,
              callbacks=[RoutingMetrics(), Checkpoint(args.output_dir, args.num_processes, chief)])
except Exception as error:  # a peer died or the mesh broke
    print(f"process {args.process_id}: training failed: "
          f"{type(error).__name__}: {error}", file=sys.stderr, flush=True)
    os._exit(1)

"""
## What each process holds

With `--parallel expert`, every expert bank is split: this process's shard
has `E / P` experts. The routers, the embedding and the heads are whole.
"""

for variable in model.weights:
    if "experts" in variable.path:
        shard = variable.value.addressable_shards[0]
        print(f"process {args.process_id}: {variable.path} {tuple(variable.shape)} "
              f"holds {tuple(shard.data.shape)} at {shard.index[0]}", flush=True)
        break
if chief:
    print("done", flush=True)
