"""
Title: Multi-process MoE training with torch.distributed
Author: keras_moe contributors
Date created: 2026/12/07
Last modified: 2026/12/07
Description: The `SparseMoE` + `MultiGateMoE` model of the JAX and TensorFlow
scripts, trained data parallel by several PyTorch processes over
`torch.distributed` (gloo on CPUs, NCCL on GPUs), with `fit` and its
callbacks; checkpoints that load on any number of processes.
Accelerator: None (gloo; the same script runs on GPU hosts with --engine nccl)
"""

"""
## Introduction

Every process runs this script and joins one `torch.distributed` process
group. The model is an ordinary Keras model; the
`keras_moe.distribution.TorchDataParallel` callback makes `fit` data
parallel: the replicas start from process 0's weights, each gradient is
averaged over the processes as soon as it is computed (what
`DistributedDataParallel` does), and the routing statistics, the
auxiliary-loss-free bias and the balancing losses are computed over the
global batch. Each process feeds its own share of every global batch. Two
processes on one machine, with `torchrun`:

```
torchrun --nproc-per-node 2 --master-addr 127.0.0.1 --master-port 12345 \\
    examples/distributed/train_torch.py --output-dir runs/torch
```

or without it:

```
python examples/distributed/train_torch.py --num-processes 2 --process-id 0 \\
    --addresses 127.0.0.1:12345 --output-dir runs/torch &
python examples/distributed/train_torch.py --num-processes 2 --process-id 1 \\
    --addresses 127.0.0.1:12345 --output-dir runs/torch
```

On several hosts, `torchrun --nnodes N --node-rank R --master-addr host0 ...`
on each, or the flags with process 0's real address, and a shared
`--output-dir`. With one process (the default) it is ordinary training.

## Setup
"""

import argparse
import datetime
import os
import sys

parser = argparse.ArgumentParser(description="Multi-process MoE training with torch")
parser.add_argument("--num-processes", type=int,
                    default=int(os.environ.get("WORLD_SIZE", 1)))
parser.add_argument("--process-id", type=int, default=int(os.environ.get("RANK", 0)))
parser.add_argument("--addresses", default=None,
                    help="host:port of process 0 (default: torchrun's "
                         "MASTER_ADDR:MASTER_PORT)")
parser.add_argument("--engine", default="gloo", help="gloo (CPU) or nccl (GPU)")
parser.add_argument("--timeout", type=int, default=60,
                    help="seconds a collective may wait for the other processes")
parser.add_argument("--data", default=os.path.join(os.path.dirname(os.path.abspath(
    __file__)), "..", "data", "mnist_sample.npz"), help="an .npz with x_train, y_train")
parser.add_argument("--train-size", type=int, default=4000)
parser.add_argument("--batch-size", type=int, default=64, help="global batch size")
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--resume", default=None, help="a checkpoint to continue from")
parser.add_argument("--output-dir", default="runs/distributed_torch")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

os.environ["KERAS_BACKEND"] = "torch"
import torch.distributed as dist  # noqa: E402

if args.num_processes > 1:
    if args.addresses:
        init_method = f"tcp://{args.addresses.split(',')[0]}"
    else:
        init_method = "env://"  # torchrun's MASTER_ADDR and MASTER_PORT
    dist.init_process_group(
        args.engine, init_method=init_method, rank=args.process_id,
        world_size=args.num_processes,
        timeout=datetime.timedelta(seconds=args.timeout),
    )

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_moe.callbacks import RoutingMetrics  # noqa: E402
from keras_moe.distribution import TorchDataParallel  # noqa: E402

from _common import Checkpoint, load_or_build  # noqa: E402 (after the engine's set-up)

keras.utils.set_random_seed(args.seed)
chief = args.process_id == 0
os.makedirs(args.output_dir, exist_ok=True)

"""
## The data

MNIST rows as tokens, two tasks: the digit, and whether it is odd. Global
batch `s` is examples `s B ... (s + 1) B - 1`; process `p` of `P` takes the
`p`-th contiguous `B / P` of it (what a `DistributedSampler` over
contiguous blocks would give).
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

The same model as the JAX and TensorFlow scripts: a token embedding, a
residual `SparseMoE` block (4 experts, top-2, the auxiliary-loss-free
selection bias plus a small Switch loss, dropless), mean pooling, a
sparse-gated `MultiGateMoE` and two task heads. Dropless routing matters
here: a capacity would be computed per process, on its share of the tokens.
"""

model, initial_epoch = load_or_build(args.resume)  # _common.py

"""
## Checkpoints and logs

After every epoch every process calls `save_model`; process 0 writes
`epoch-NNN.keras` (under a temporary name, then renamed) and appends the
epoch's logs, with `RoutingMetrics`' routing statistics, to `history.jsonl`.
(`Checkpoint` in `_common.py`, the same for the three engines.)
"""


"""
## Training

`TorchDataParallel` comes first among the callbacks, so the replicas are
equal before anything else looks at them. If another process dies, the
next all-reduce fails at once (gloo reports the closed connection; a hung
peer fails after `--timeout`); the process prints the error and exits. The
last checkpoint is whole.
"""

callbacks = [RoutingMetrics(), Checkpoint(args.output_dir, args.num_processes, chief)]
if args.num_processes > 1:
    callbacks.insert(0, TorchDataParallel())
if chief:
    print(f"{args.num_processes} process(es), global batch {args.batch_size}",
          flush=True)
try:
    model.fit(x_local, y_local, batch_size=local_batch, epochs=args.epochs,
              initial_epoch=initial_epoch, shuffle=False, verbose=0,
              callbacks=callbacks)
except Exception as error:  # a peer died or the group broke
    print(f"process {args.process_id}: training failed: "
          f"{type(error).__name__}: {error}", file=sys.stderr, flush=True)
    os._exit(1)
if args.num_processes > 1:
    dist.destroy_process_group()
if chief:
    print("done", flush=True)
