"""Progressive Layered Extraction (PLE): stacked CGC levels."""

import keras

from keras_moe.layers._multitask import fresh_initializer, gate_initializer
from keras_moe.layers.cgc import CGC
from keras_moe.layers.expert_bank import (
    EXPERT_OPTIONS,
    pop_expert_options,
    quantized_dtype_config,
)
from keras_moe.utils import validation as check


@keras.saving.register_keras_serializable(package="keras_moe")
class PLE(keras.layers.Layer):
    """Progressive Layered Extraction: stacked CGC levels.

    `L` levels of `CGC`. Level `l` reads the task inputs `x_t^{l-1}` and the
    shared input `x_s^{l-1}` (all equal to the layer input at `l = 1`):

    `x_t^l = sum_{e in E_t^l u S^l} g_t^l(x_t^{l-1})_e f_e^l(.)`,
    `x_s^l = sum_{e in all experts of level l} g_s^l(x_s^{l-1})_e f_e^l(.)`

    Task gates see only their task's experts and the shared ones; the shared
    gate (every level but the last) sees all experts, so tasks exchange
    information only through the shared path, progressively. The last level
    has no shared gate and returns the `T` task outputs.

    Per-level telemetry: `levels[l].routing_stats()`; `routing_stats()` is
    that of the last level (plus `levels`, the list of all levels' stats).

    Wiring of two tasks and two levels (`E_t`: task `t`'s experts, `S`:
    shared experts):

    ```
    x --+--------------+--------------+
        v              v              v
     [E_1, S]       [E_2, S]     [E_1, E_2, S]      level 1 (shared_output)
      gate_1         gate_2        gate_s
        v              v              v
       x_1            x_2            x_s
        v              v              v
     [E_1, S]       [E_2, S]                        level 2 (last)
      gate_1         gate_2
        v              v
       y_1            y_2
    ```

    Args:
        num_tasks: `T >= 1`.
        num_levels: `L >= 1`.
        num_task_experts: experts per task and level.
        num_shared_experts: shared experts per level.
        hidden_dim: expert hidden width (default 64): an int, or a list of
            one per level.
        output_dim: output width of every level's experts (None: the input
            width): an int/None, or a list of one per level.
        k: `None` (dense gates) or the number of gate weights each gate
            keeps (see `CGC`).
        gate_kernel_initializer: passed to every `CGC` level.
        task_names: `T` distinct names used in telemetry.
        **kwargs: base `Layer` arguments, and the expert options of every
            level (see `Experts`): `activation` (default `"relu"`), `gated`,
            `use_bias`, `kernel_initializer`, `bias_initializer`,
            `kernel_regularizer`, `bias_regularizer`, `glu_limit`,
            `glu_linear_offset`, `output_scale`.

    Call arguments:
        inputs: `(..., d)`, rank >= 2.
        training: training mode.
        mask: bool `inputs.shape[:-1]`, False for padding (Keras passes it
            by itself); handed to every level (see `CGC`).

    Returns:
        A list of `T` tensors `(..., output_dim of the last level or d)`.

    Example:

    >>> import numpy as np
    >>> ple = PLE(num_tasks=2, num_levels=2, num_task_experts=2,
    ...           num_shared_experts=1, hidden_dim=16, output_dim=[12, 8])
    >>> ys = ple(np.random.rand(4, 10).astype("float32"))
    >>> [tuple(y.shape) for y in ys]
    [(4, 8), (4, 8)]
    >>> [level.routing_stats()["task_expert_usage"].shape for level in ple.levels]
    [(3, 5), (2, 5)]

    References:
        Tang, Liu, Zhao, Gong. Progressive Layered Extraction (PLE): A Novel
        Multi-Task Learning (MTL) Model for Personalized Recommendations
        (RecSys 2020).
    """

    def __init__(
        self,
        num_tasks,
        num_levels=2,
        num_task_experts=1,
        num_shared_experts=1,
        hidden_dim=64,
        output_dim=None,
        k=None,
        gate_kernel_initializer=None,
        task_names=None,
        **kwargs,
    ):
        expert_options = pop_expert_options(kwargs, activation="relu")
        super().__init__(**kwargs)
        self.supports_masking = True
        self.num_tasks = check.positive_int("num_tasks", num_tasks, check.MAX_TASKS)
        self.num_levels = check.positive_int("num_levels", num_levels, check.MAX_LEVELS)
        hidden = check.int_per_level("hidden_dim", hidden_dim, self.num_levels)
        outs = check.int_per_level(
            "output_dim", output_dim, self.num_levels, allow_none=True
        )
        self.hidden_dim = hidden if isinstance(hidden_dim, (list, tuple)) else hidden[0]
        self.output_dim = outs if isinstance(output_dim, (list, tuple)) else outs[0]
        self.task_names = check.task_names(task_names, self.num_tasks)
        gate_init = gate_initializer(gate_kernel_initializer)
        self.levels = [
            CGC(
                num_tasks=self.num_tasks,
                num_task_experts=num_task_experts,
                num_shared_experts=num_shared_experts,
                hidden_dim=hidden[level],
                output_dim=outs[level],
                shared_output=level < self.num_levels - 1,
                k=k,
                **expert_options,
                gate_kernel_initializer=fresh_initializer(gate_init, level),
                task_names=self.task_names,
                dtype=self.dtype_policy,
                name=f"{self.name}_level_{level}",
            )
            for level in range(self.num_levels)
        ]
        self.num_task_experts = self.levels[0].num_task_experts
        self.num_shared_experts = self.levels[0].num_shared_experts
        self.k = self.levels[0].k

    def build(self, input_shape):
        shape = check.token_input_shape(type(self).__name__, input_shape)
        for level in self.levels:
            level.build(shape)
            shape = level.compute_output_shape(shape)

    def call(self, inputs, training=None, mask=None):
        x = inputs
        for level in self.levels:
            x = level(x, training=training, mask=mask)
        return x

    def routing_stats(self):
        """The last level's `CGC.routing_stats()`, plus `levels`: every
        level's stats, first to last."""
        levels = [level.routing_stats() for level in self.levels]
        return dict(levels[-1], levels=levels)

    def compute_output_shape(self, input_shape):
        shape = check.token_input_shape(type(self).__name__, input_shape)
        for level in self.levels:
            shape = level.compute_output_shape(shape)
        return shape

    def compute_mask(self, inputs, previous_mask=None):
        # The inputs' token mask on every task's output.
        if previous_mask is None:
            return None
        return [previous_mask] * self.num_tasks

    def compute_output_spec(self, inputs, training=None, mask=None):
        return [
            keras.KerasTensor(s, dtype=self.compute_dtype)
            for s in self.compute_output_shape(tuple(inputs.shape))
        ]

    def get_config(self):
        config = super().get_config()
        first = self.levels[0].get_config()
        config.update(
            num_tasks=self.num_tasks,
            num_levels=self.num_levels,
            num_task_experts=self.num_task_experts,
            num_shared_experts=self.num_shared_experts,
            hidden_dim=self.hidden_dim,
            output_dim=self.output_dim,
            k=self.k,
            **{name: first[name] for name in EXPERT_OPTIONS},
            gate_kernel_initializer=first["gate_kernel_initializer"],
            task_names=list(self.task_names),
        )
        return quantized_dtype_config(self, config)

