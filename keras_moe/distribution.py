"""Expert parallelism on Keras' distribution API (`keras.distribution`).

Expert parallelism shards each expert bank along its expert axis: with `E`
experts on a mesh axis of size `P`, every device holds `E / P` experts, the
tokens are dispatched to the devices of their experts and the outputs come
back (GShard, Lepikhin et al. 2020). In Keras this is a `ModelParallel`
distribution whose layouts put the first (expert) dimension of every expert
weight on an `"expert"` mesh axis and the batch on a `"batch"` axis; XLA's
SPMD partitioner then inserts the collectives. The model code does not
change: only the distribution (and, on a real cluster, the mesh) does.

```python
import keras
import keras_moe

mesh = keras.distribution.DeviceMesh(
    shape=(2, 4), axis_names=("batch", "expert"),
    devices=keras.distribution.list_devices(),
)
keras.distribution.set_distribution(keras_moe.distribution.expert_parallel(mesh))
model = build_model()          # expert banks are created sharded
model.compile(...); model.fit(...)
```

Keras 3 implements `keras.distribution` on the JAX backend. The other
engines train data parallel over several processes with the helpers here:
`multi_worker_mirrored_strategy()` (TensorFlow's
`MultiWorkerMirroredStrategy`, with two Keras 3 incompatibilities mended)
and the `TorchDataParallel` callback (`torch.distributed`). On every
engine the routing statistics, balancing losses and the auxiliary-loss-free
selection bias are those of the global batch (`keras_moe.utils.replicas`),
and `save_model` writes one `.keras` checkpoint from all processes.
"""

import os
import re
import tempfile

import keras

from keras_moe.layers.experts import BIAS_NAMES, KERNEL_NAMES
from keras_moe.layers.sparse_moe import EXPERT_TENSORS
from keras_moe.utils import replicas
from keras_moe.utils.keras_internals import assigned_layout, swap_value
from keras_moe.utils.layouts import constrain, has_tensor_layout  # noqa: F401

# The variables of an `Experts` bank (keras_moe.layers.Experts), as the bank
# names them: each has the expert axis first.
EXPERT_WEIGHTS = KERNEL_NAMES + BIAS_NAMES
_EXPERT_WEIGHT = re.compile(r"(^|/)(" + "|".join(EXPERT_WEIGHTS) + r")$")


def _check_axis(mesh, name, value):
    if value not in mesh.axis_names:
        raise ValueError(
            f"{name} must be an axis of the device mesh. Received: "
            f"{name}={value!r}, mesh axis names {tuple(mesh.axis_names)}"
        )


class ExpertParallel(keras.distribution.ModelParallel):
    """A `keras.distribution.ModelParallel` that shards every expert bank.

    Every variable of a `keras_moe.layers.Experts` bank (`kernel_in`,
    `kernel_gate`, `kernel_out` and the biases, in `SparseMoE`, `SoftMoE`,
    `MultiGateMoE`, `CGC`, `PLE`) whose number of experts is divisible by the
    size of the `expert_axis` gets the layout `(expert_axis, None, ...)`:
    device `p` of that axis holds experts `p E/P ... (p+1) E/P - 1`. A bank
    whose expert count does not divide (e.g. one shared expert) stays
    replicated. The `(E, C, d)` expert buffers of `SparseMoE` get the same
    layout, so each device runs only its own experts. Other variables follow
    `layout_map` (default: replicated); the batch is sharded on `batch_axis`.

    Args:
        device_mesh: a `keras.distribution.DeviceMesh` with an axis named
            `expert_axis` (and usually one named `batch_axis`).
        expert_axis: mesh axis that shards the experts.
        batch_axis: mesh axis that shards the batch; default: `"batch"` if
            the mesh has it, else `expert_axis` (then tokens and experts
            share the devices, as in GShard).
        layout_map: optional `keras.distribution.LayoutMap` on the same mesh
            for the other variables (e.g. tensor parallelism of the dense
            layers); entries for expert weights take precedence over the
            automatic expert layout.
        auto_shard_dataset: passed to `ModelParallel`.

    Example:

    ```python
    devices = keras.distribution.list_devices()            # 8 devices
    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "expert"), devices)
    keras.distribution.set_distribution(ExpertParallel(mesh))
    ```

    References:
        Lepikhin et al. GShard: Scaling Giant Models with Conditional
        Computation and Automatic Sharding (2020).
    """

    def __init__(
        self,
        device_mesh,
        expert_axis="expert",
        batch_axis=None,
        layout_map=None,
        auto_shard_dataset=True,
    ):
        if not isinstance(device_mesh, keras.distribution.DeviceMesh):
            raise ValueError(
                "device_mesh must be a keras.distribution.DeviceMesh. "
                f"Received: device_mesh={device_mesh!r}"
            )
        _check_axis(device_mesh, "expert_axis", expert_axis)
        if batch_axis is None:
            batch_axis = "batch" if "batch" in device_mesh.axis_names else expert_axis
        _check_axis(device_mesh, "batch_axis", batch_axis)
        if layout_map is None:
            layout_map = keras.distribution.LayoutMap(device_mesh)
        elif layout_map.device_mesh is not device_mesh:
            raise ValueError(
                "layout_map must be built on the same device mesh as "
                f"device_mesh. Received: layout_map on {layout_map.device_mesh}, "
                f"device_mesh={device_mesh}"
            )
        super().__init__(
            layout_map=layout_map,
            batch_dim_name=batch_axis,
            auto_shard_dataset=auto_shard_dataset,
        )
        self.layout_map = layout_map  # ours: ModelParallel keeps it private
        self.expert_axis = expert_axis
        self.expert_axis_size = device_mesh.shape[
            list(device_mesh.axis_names).index(expert_axis)
        ]

    def _expert_layout(self, rank):
        return keras.distribution.TensorLayout(
            (self.expert_axis,) + (None,) * (rank - 1), self.device_mesh
        )

    def get_variable_layout(self, variable):
        if assigned_layout(variable) is not None:
            return assigned_layout(variable)
        explicit = self.layout_map[variable.path]
        if explicit is not None:
            return explicit
        shape = tuple(variable.shape)
        if (
            _EXPERT_WEIGHT.search(variable.path)
            and shape
            and shape[0] % self.expert_axis_size == 0
        ):
            return self._expert_layout(len(shape))
        return super().get_variable_layout(variable)

    def get_tensor_layout(self, path):
        explicit = self.layout_map[path]
        if explicit is not None:
            return explicit
        if path.rsplit("/", 1)[-1] in EXPERT_TENSORS:
            return self._expert_layout(3)
        return None


def expert_parallel(
    device_mesh,
    expert_axis="expert",
    batch_axis=None,
    layout_map=None,
    auto_shard_dataset=True,
):
    """An `ExpertParallel` distribution for `device_mesh`: every expert bank
    sharded along `expert_axis`, the batch along `batch_axis`.

    Pass it to `keras.distribution.set_distribution` (or use its `scope()`)
    before building the model. See `ExpertParallel` for the arguments; with
    several processes that each feed their own share of the batch (NumPy
    arrays, a per-process pipeline), pass `auto_shard_dataset=False`.
    """
    return ExpertParallel(
        device_mesh,
        expert_axis=expert_axis,
        batch_axis=batch_axis,
        layout_map=layout_map,
        auto_shard_dataset=auto_shard_dataset,
    )


# -- Several processes ------------------------------------------------------


def process_index():
    """This process's index in a multi-process run (0 on one process): JAX
    `jax.process_index()`, TensorFlow the task of `TF_CONFIG` (workers
    numbered after a `chief`, if the cluster has one), torch the
    `torch.distributed` rank. Process 0 is the one that writes files."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.process_index()
    if backend == "tensorflow":
        if not os.environ.get("TF_CONFIG"):
            return 0
        import tensorflow as tf

        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        spec = resolver.cluster_spec().as_dict()
        if resolver.task_type == "chief":
            return 0
        return len(spec.get("chief", ())) + int(resolver.task_id or 0)
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _state_variables(model):
    """Every variable that `model.save` writes: the model's, then the
    optimizer's (moments of sharded weights are sharded too)."""
    found = list(model.variables)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None:
        found += list(optimizer.variables)
    return found


def _gather_sharded(model):
    """On JAX, replaces every variable of `model` that is split across
    devices by a replicated copy (an all-gather; every process must call
    this, in the same order) and returns `(variable, old value)` pairs to put
    back. Elsewhere (or with nothing split), returns `[]`."""
    if keras.backend.backend() != "jax":
        return []
    import jax

    swapped = []
    for variable in _state_variables(model):
        value = variable.value
        sharding = getattr(value, "sharding", None)
        if sharding is None or sharding.is_fully_replicated:
            continue
        replicated = jax.sharding.NamedSharding(
            sharding.mesh, jax.sharding.PartitionSpec()
        )
        gathered = jax.jit(lambda x: x, out_shardings=replicated)(value)
        swapped.append((variable, swap_value(variable, gathered)))
    return swapped


def save_model(model, filepath):
    """Saves `model` (weights, optimizer state, config) as a `.keras` file
    from a run over one or several processes.

    Every process calls it at the same point (as it calls `fit`): on JAX
    the expert shards that other processes hold are gathered first (an
    all-gather per sharded variable; `model.save` alone fails on an array
    that spans processes), and on TensorFlow each worker reads its
    variables as `tf.distribute` expects. Process 0 (`process_index()`)
    writes `filepath`; the others write a scratch copy and delete it. The
    file is written under a temporary name and renamed, so a crash during
    the write leaves the previous checkpoint of that name intact.

    The result loads anywhere: `keras.models.load_model(filepath)` on one
    process, or inside a distribution or strategy scope on several, where
    the weights are sharded again as the distribution says.

    Args:
        model: a compiled or uncompiled Keras model.
        filepath: path ending in `.keras`.

    Returns:
        True on the process that wrote `filepath`, else False.
    """
    filepath = os.fspath(filepath)
    if not filepath.endswith(".keras"):
        raise ValueError(
            f"filepath must end in '.keras'. Received: filepath={filepath!r}"
        )
    writer = process_index() == 0
    directory = os.path.dirname(os.path.abspath(filepath))
    scratch_dir = directory if writer else tempfile.mkdtemp()
    scratch = os.path.join(
        scratch_dir, f".{os.path.basename(filepath)[:-6]}.{os.getpid()}.tmp.keras"
    )
    swapped = _gather_sharded(model)
    try:
        model.save(scratch)
    finally:
        for variable, value in swapped:
            swap_value(variable, value)
    if writer:
        os.replace(scratch, filepath)
    else:
        os.remove(scratch)
        os.rmdir(scratch_dir)
    return writer


def multi_worker_mirrored_strategy(cluster_resolver=None, communication_options=None):
    """`tf.distribute.MultiWorkerMirroredStrategy` that Keras 3's `fit` can
    use: synchronous data parallelism over several TensorFlow processes
    (workers), configured by `TF_CONFIG` (or `cluster_resolver`).

    Keras 3.15's TensorFlow trainer calls `strategy.reduce` on a nested
    data batch when it builds the model (the multi-worker strategy reduces
    single values only) and with `axis=0` on scalar logs (which have no axis
    0); both fail on this strategy (keras-team/keras#20585, #20329). This
    subclass reduces each value of a structure on its own, over the replica
    axis only for scalars. Nothing else changes.

    Call it at the start of the program, before other TensorFlow work, on
    every worker; build and compile the model inside its `scope()`.

    Args:
        cluster_resolver: passed to `MultiWorkerMirroredStrategy`.
        communication_options: passed to `MultiWorkerMirroredStrategy`
            (e.g. `tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=...)`).
    """
    import tensorflow as tf

    class MultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
        def reduce(self, reduce_op, value, axis):
            def one(item):
                local = self.experimental_local_results(item)[0]
                rank = getattr(getattr(local, "shape", None), "rank", None)
                return super(MultiWorkerMirroredStrategy, self).reduce(
                    reduce_op, item, axis if rank else None
                )

            return tf.nest.map_structure(one, value)

    return MultiWorkerMirroredStrategy(
        cluster_resolver=cluster_resolver,
        communication_options=communication_options,
    )


class TorchDataParallel(keras.callbacks.Callback):
    """Synchronous data parallelism in `fit` on the torch backend, over the
    processes of `torch.distributed` (started with `torchrun` or
    `torch.distributed.init_process_group`).

    Each process feeds `fit` its own share of every global batch. When
    training begins, every model variable is broadcast from process 0 (the
    replicas start equal, as `DistributedDataParallel` makes them), and each
    trainable variable gets a hook that replaces its gradient by the mean
    over the processes as soon as backpropagation has accumulated it
    (`DistributedDataParallel`'s all-reduce, one per variable, without
    buckets). During `fit` the routing statistics, balancing losses and the
    selection bias of auxiliary-loss-free routing are computed over the
    global batch (`keras_moe.utils.replicas.synchronized`), so the replicas'
    routing state stays equal and equal to one process on the global batch.
    The numbers in `fit`'s logs (loss, metrics: this process's share) are
    averaged over the processes after every batch and epoch, as TensorFlow
    and JAX log them; put the callback first, so the others see them.
    When training ends the hooks are removed: a process may then call the
    model alone (e.g. only process 0 predicts).

    Keras' own guide wraps the model in `DistributedDataParallel` and writes
    the training loop by hand; this callback keeps `fit` and its callbacks
    (`RoutingMetrics`, checkpoints) instead.

    Args:
        group: the `torch.distributed` process group (default: all
            processes).

    Example:

    ```python
    torch.distributed.init_process_group("gloo")  # env:// from torchrun
    model.fit(x_local, y_local, batch_size=global_batch // world_size,
              callbacks=[keras_moe.distribution.TorchDataParallel()])
    ```
    """

    def __init__(self, group=None):
        super().__init__()
        self.group = group
        self._hooks = []
        self._context = None

    def on_train_begin(self, logs=None):
        if keras.backend.backend() != "torch":
            raise ValueError(
                "TorchDataParallel needs the torch backend. Received: "
                f"keras.backend.backend()={keras.backend.backend()!r}"
            )
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            raise ValueError(
                "TorchDataParallel needs an initialised torch.distributed "
                "process group (torch.distributed.init_process_group)."
            )
        world = dist.get_world_size(self.group)
        with torch.no_grad():
            for variable in _state_variables(self.model):
                dist.broadcast(
                    variable.value.data, src=dist.get_global_rank(self.group, 0)
                    if self.group is not None else 0, group=self.group,
                )

        def average(parameter):
            dist.all_reduce(parameter.grad, group=self.group)
            parameter.grad.div_(world)

        self._hooks = [
            variable.value.register_post_accumulate_grad_hook(average)
            for variable in self.model.trainable_variables
        ]
        self._context = replicas.synchronized(self.group)
        self._context.__enter__()

    def _average_logs(self, logs):
        """Replaces each number of `logs` (the loss and metrics of this
        process's share) by its mean over the processes: the global batch's,
        as TensorFlow's and JAX's `fit` log them."""
        if not logs:
            return
        import torch
        import torch.distributed as dist

        keys = sorted(logs)
        values = torch.tensor([float(logs[key]) for key in keys], dtype=torch.float64)
        dist.all_reduce(values, group=self.group)
        values /= dist.get_world_size(self.group)
        logs.update(zip(keys, values.tolist()))

    def on_train_batch_end(self, batch, logs=None):
        self._average_logs(logs)

    def on_epoch_end(self, epoch, logs=None):
        self._average_logs(logs)

    def on_train_end(self, logs=None):
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._context is not None:
            self._context.__exit__(None, None, None)
            self._context = None
