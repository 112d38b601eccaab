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

Keras 3 implements `keras.distribution` on the JAX backend. For data
parallelism on TensorFlow use `tf.distribute.MirroredStrategy` (the routing
statistics and the auxiliary-loss-free selection bias average over replicas).
"""

import re

import keras

from keras_moe.layers.experts import BIAS_NAMES, KERNEL_NAMES
from keras_moe.layers.sparse_moe import EXPERT_TENSORS
from keras_moe.utils.keras_internals import assigned_layout
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


def expert_parallel(device_mesh, expert_axis="expert", batch_axis=None, layout_map=None):
    """An `ExpertParallel` distribution for `device_mesh`: every expert bank
    sharded along `expert_axis`, the batch along `batch_axis`.

    Pass it to `keras.distribution.set_distribution` (or use its `scope()`)
    before building the model. See `ExpertParallel` for the arguments.
    """
    return ExpertParallel(
        device_mesh,
        expert_axis=expert_axis,
        batch_axis=batch_axis,
        layout_map=layout_map,
    )
