"""Sums over data-parallel replicas, for the batch statistics of routing.

A router's balancing terms and its routing state are functions of the
whole batch: the Switch loss `E sum_e f_e P_e` multiplies two batch means,
and the auxiliary-loss-free bias moves by the *sign* of each expert's load.
Under data parallelism each replica holds a share of the batch, and neither
the mean of the replicas' losses nor the mean of their sign steps is the
value of the whole batch. `cross_replica_sum` adds a tensor over the
replicas, so a mean over tokens (`sum over replicas / count over replicas`)
is the mean over the global batch, on every replica alike, and the
replicas' routing states stay equal to each other and to one process
training on the global batch.

Each engine decides what a replica is:

- TensorFlow (`tf.distribute`: `MirroredStrategy`,
  `MultiWorkerMirroredStrategy`): inside a replica function
  (`strategy.run`, which `fit` uses) the sum is the replica context's
  `all_reduce`, whose gradient is the all-reduce of the gradients; outside
  one (eager calls, `predict` on one process, the symbolic build) it is the
  identity.
- torch (`torch.distributed`): the sum runs only inside `synchronized()`
  (which `keras_moe.distribution.TorchDataParallel` enters for the length
  of `fit`), as the differentiable all-reduce of
  `torch.distributed.nn.functional`; every process of the group must then
  call the model together. Outside it, a process may call the model alone
  (e.g. only process 0 predicts) without waiting for the others.
- JAX (`keras.distribution`): the identity. Keras runs one SPMD program
  over the global batch, so a mean over tokens already is the global mean;
  the partitioner inserts the collective.

One process (no strategy, no initialised process group) gets the
identity everywhere.
"""

import contextlib

import keras

_TORCH_GROUPS = []


@contextlib.contextmanager
def synchronized(group=None):
    """Within this context, on the torch backend, `cross_replica_sum` sums
    over the processes of the `torch.distributed` process `group` (default:
    all of them). Contexts nest; the innermost group is used."""
    _TORCH_GROUPS.append(group)
    try:
        yield
    finally:
        _TORCH_GROUPS.pop()


def _tensorflow_sum(x):
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return x
    return context.all_reduce(tf.distribute.ReduceOp.SUM, x)


def _torch_sum(x):
    if not _TORCH_GROUPS or x.device.type == "meta":  # meta: shape inference
        return x
    import torch.distributed as dist
    from torch.distributed.nn import functional as distributed_functional

    group = _TORCH_GROUPS[-1]
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return x
    return distributed_functional.all_reduce(x, group=group)


def cross_replica_sum(x):
    """`x` summed over the data-parallel replicas (see the module
    docstring); `x` itself with one replica or on JAX. Differentiable."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return _tensorflow_sum(x)
    if backend == "torch":
        return _torch_sum(x)
    return x
