"""Customized Gate Control (CGC): task-specific and shared experts, one gate
per task; one level of PLE (`keras_moe.layers.ple`)."""

import keras
from keras import ops

from keras_moe.layers._multitask import (
    as_compute_dtype,
    check_call_input,
    fresh_initializer,
    gate_initializer,
    normalize_rows,
    stats_to_numpy,
)
from keras_moe.layers._stats import record, statistic
from keras_moe.layers.expert_bank import (
    expert_options_config,
    make_experts,
    pop_expert_options,
    quantized_dtype_config,
)
from keras_moe.layers.experts import per_expert_initializer
from keras_moe.ops import balancing, pipeline, selection
from keras_moe.utils import validation as check


def _one_mask(mask):
    """The token mask of a layer called on one tensor or on a list of them
    (`[task_1, ..., task_T, shared]`: the shared input's, or the first
    given), or None."""
    if isinstance(mask, (list, tuple)):
        given = [m for m in mask if m is not None]
        return mask[-1] if mask[-1] is not None else (given[0] if given else None)
    return mask


def _keep_top_k(gates, k):
    """Zeroes all but the `k` largest gate weights of each row, renormalised."""
    n = gates.shape[-1]
    if k is None or k >= n:
        return gates
    _, index = selection.top_k(gates, k)
    mask = ops.sum(ops.one_hot(index, n, dtype=gates.dtype), axis=-2)
    return normalize_rows(gates * mask)


def _is_shape_list(shape):
    """A list of shapes (list inputs) rather than one shape."""
    return (
        isinstance(shape, (list, tuple))
        and len(shape) > 0
        and all(isinstance(s, (list, tuple)) for s in shape)
    )


@keras.saving.register_keras_serializable(package="keras_moe")
class CGC(keras.layers.Layer):
    """Customized Gate Control: task-specific and shared experts, one gate per
    task (one level of PLE).

    `T` tasks, each with `m_t` own experts, and `m_s` shared experts. Task
    `t` reads its input `x_t` (or the common input); its gate mixes its own
    experts and the shared ones only:

    `y_t = sum_{e in E_t u S} g_t(x_t)_e f_e(x_e)`,
    `g_t(x_t) = softmax(x_t W_t + b_t)` over the `m_t + m_s` experts of
    `E_t u S`, where expert `f_e` reads its owner's input (`x_t` for task
    experts of task `t`, the shared input `x_s` for shared experts).

    With `shared_output=True` there is also a shared gate over ALL
    `T m_t + m_s` experts, computed from the shared input:
    `y_s = sum_e g_s(x_s)_e f_e(x_e)`, the shared input of the next level.
    The outputs `[y_1, ..., y_T, y_s]` of one level are the inputs of the
    next one (see `PLE`).

    With `k`, each gate keeps only its `k` largest weights, renormalised
    (all experts are still computed: the layer is small).

    Expert index order (telemetry columns): the task experts of task 0,
    of task 1, ..., then the shared experts.

    Args:
        num_tasks: `T >= 1`.
        num_task_experts: `m_t >= 0`, experts per task.
        num_shared_experts: `m_s >= 0`; `m_t + m_s >= 1`.
        hidden_dim: hidden width of each expert.
        output_dim: output width; defaults to the input width.
        shared_output: also output the shared mixture (last element).
        k: `None` (dense gates) or the number of gate weights kept,
            `k <= m_t + m_s`.
        gate_kernel_initializer: initializer of the gate kernels (default:
            Switch's router init, near-uniform gates at the start).
        task_names: `T` distinct names used in telemetry.
        **kwargs: base `Layer` arguments, and the expert options of every
            bank (see `Experts`): `activation` (default `"relu"`), `gated`,
            `use_bias`, `kernel_initializer`, `bias_initializer`,
            `kernel_regularizer`, `bias_regularizer`, `glu_limit`,
            `glu_linear_offset`, `output_scale`.

    Call arguments:
        inputs: one tensor `(..., d)` read by every branch, or a list of
            `T + 1` tensors `[x_1, ..., x_T, x_s]` of the same shape.
        training: unused (no auxiliary loss), for API symmetry.
        return_routing: also return a dict with `task_gates`
            `(T, N, m_t + m_s)`, `shared_gates` `(N, E_total)` (with
            `shared_output`), `task_expert_usage`, `expert_load`.
        mask: bool, the inputs' shape without the last axis (with a list
            of inputs, one mask or a list of masks: the shared input's
            counts), False for padding; Keras passes it by itself. Masked
            tokens output zeros and count in no gate statistic; every
            output carries the mask.

    Returns:
        A list of `T` tensors `(..., output_dim or d)`, plus the shared
        output as a last element with `shared_output=True`.

    Example:

    >>> import numpy as np
    >>> cgc = CGC(num_tasks=2, num_task_experts=2, num_shared_experts=1,
    ...           hidden_dim=16, output_dim=8, shared_output=True)
    >>> ys = cgc(np.random.rand(4, 10).astype("float32"))
    >>> [tuple(y.shape) for y in ys]
    [(4, 8), (4, 8), (4, 8)]
    >>> cgc.routing_stats()["task_expert_usage"].shape  # (T + 1, 2 * 2 + 1)
    (3, 5)

    References:
        Tang, Liu, Zhao, Gong. Progressive Layered Extraction (PLE): A Novel
        Multi-Task Learning (MTL) Model for Personalized Recommendations
        (RecSys 2020).
    """

    def __init__(
        self,
        num_tasks,
        num_task_experts,
        num_shared_experts,
        hidden_dim,
        output_dim=None,
        shared_output=False,
        k=None,
        gate_kernel_initializer=None,
        task_names=None,
        **kwargs,
    ):
        expert_options = pop_expert_options(kwargs, activation="relu")
        super().__init__(**kwargs)
        self.supports_masking = True
        self.num_tasks = check.positive_int("num_tasks", num_tasks, check.MAX_TASKS)
        self.num_task_experts = check.non_negative_int(
            "num_task_experts", num_task_experts, check.MAX_EXPERTS
        )
        self.num_shared_experts = check.non_negative_int(
            "num_shared_experts", num_shared_experts, check.MAX_EXPERTS
        )
        per_gate = self.num_task_experts + self.num_shared_experts
        if per_gate == 0:
            raise ValueError(
                "A task needs at least one expert. Received: num_task_experts=0, "
                "num_shared_experts=0"
            )
        self.hidden_dim = check.positive_int("hidden_dim", hidden_dim)
        self.output_dim = (
            None if output_dim is None else check.positive_int("output_dim", output_dim)
        )
        self.shared_output = check.boolean("shared_output", shared_output)
        if k is not None:
            k = check.positive_int("k", k)
            if k > per_gate:
                raise ValueError(
                    "k must be <= the experts of one task gate, "
                    "num_task_experts + num_shared_experts. Received: "
                    f"k={k}, num_task_experts={self.num_task_experts}, "
                    f"num_shared_experts={self.num_shared_experts}"
                )
        self.k = k
        self.gate_kernel_initializer = gate_initializer(gate_kernel_initializer)
        self.task_names = check.task_names(task_names, self.num_tasks)
        self.total_experts = self.num_tasks * self.num_task_experts + (
            self.num_shared_experts
        )
        check.positive_int(
            "num_tasks * num_task_experts + num_shared_experts",
            self.total_experts,
            check.MAX_EXPERTS,
        )
        self.task_experts = (
            make_experts(
                self,
                self.num_tasks * self.num_task_experts,
                self.hidden_dim,
                expert_options,
                self.output_dim,
                name="task_experts",
            )
            if self.num_task_experts
            else None
        )
        self.shared_experts = (
            make_experts(
                self,
                self.num_shared_experts,
                self.hidden_dim,
                expert_options,
                self.output_dim,
                name="shared_experts",
            )
            if self.num_shared_experts
            else None
        )

    def _input_dim(self, input_shape):
        name = type(self).__name__
        if _is_shape_list(input_shape):
            shapes = [check.token_input_shape(name, s) for s in input_shape]
            if len(shapes) != self.num_tasks + 1:
                raise ValueError(
                    f"{name} takes one tensor or a list of num_tasks + 1 "
                    "tensors [task_1, ..., task_T, shared]. Received: a list "
                    f"of {len(shapes)} inputs, num_tasks={self.num_tasks}"
                )
            if len({tuple(s[1:]) for s in shapes}) != 1:
                raise ValueError(
                    f"{name}: all inputs must have the same shape apart from "
                    f"the batch size. Received: input shapes {shapes}"
                )
            return shapes[-1]
        return check.token_input_shape(name, input_shape)

    def build(self, input_shape):
        d = self._input_dim(input_shape)[-1]
        t, m = self.num_tasks, self.num_task_experts
        if self.task_experts is not None:
            self.task_experts.build((t * m, None, d))
        if self.shared_experts is not None:
            self.shared_experts.build((self.num_shared_experts, None, d))
        per_gate = m + self.num_shared_experts
        self.task_gate_kernel = self.add_weight(
            name="task_gate_kernel",
            shape=(t, d, per_gate),
            initializer=per_expert_initializer(self.gate_kernel_initializer, t),
        )
        self.task_gate_bias = self.add_weight(
            name="task_gate_bias", shape=(t, per_gate), initializer="zeros"
        )
        if self.shared_output:
            self.shared_gate_kernel = self.add_weight(
                name="shared_gate_kernel",
                shape=(d, self.total_experts),
                initializer=fresh_initializer(self.gate_kernel_initializer, 1),
            )
            self.shared_gate_bias = self.add_weight(
                name="shared_gate_bias",
                shape=(self.total_experts,),
                initializer="zeros",
            )
        else:
            self.shared_gate_kernel = self.shared_gate_bias = None
        rows = t + int(self.shared_output)
        self.task_expert_usage = statistic(
            self, "task_expert_usage", (rows, self.total_experts)
        )
        self.expert_load = statistic(self, "expert_load", (self.total_experts,))
        self.dropped_fraction = statistic(self, "dropped_fraction", ())
        self.router_entropy = statistic(self, "router_entropy", ())

    def _split_inputs(self, inputs):
        if isinstance(inputs, (list, tuple)):
            shapes = [tuple(x.shape) for x in inputs]
            self._input_dim(shapes)  # validates
            inputs = [as_compute_dtype(self, x) for x in inputs]
            return inputs[:-1], inputs[-1]
        return None, as_compute_dtype(self, inputs)

    def call(self, inputs, training=None, return_routing=False, mask=None):
        task_inputs, shared_input = self._split_inputs(inputs)
        expected = (self.task_experts or self.shared_experts).kernel_in.shape[1]
        check_call_input(self, shared_input.shape, expected)
        t, m, s = self.num_tasks, self.num_task_experts, self.num_shared_experts
        view = pipeline.token_view(shared_input, _one_mask(mask), self.name)
        shared_tokens, valid = view.tokens, view.valid
        num_tokens, d = ops.shape(shared_tokens)[0], ops.shape(shared_tokens)[-1]
        if task_inputs is None:
            task_tokens = ops.broadcast_to(shared_tokens[None], (t, num_tokens, d))
        else:
            # (N, T, d), masked tokens zeroed (a select: NaN stays out)
            task_tokens = pipeline.mask_rows(
                ops.stack([ops.reshape(x, (-1, d)) for x in task_inputs], axis=1),
                valid,
            )
            task_tokens = ops.transpose(task_tokens, (1, 0, 2))

        # Experts: task t's experts read task t's input, shared ones x_s.
        candidates = []  # (T, m_t + m_s, N, o): the experts each task mixes
        every = []  # (E_total, N, o) in telemetry order
        if self.task_experts is not None:
            task_out = self.task_experts(ops.repeat(task_tokens, m, axis=0))
            every.append(task_out)
            candidates.append(
                ops.reshape(task_out, (t, m, num_tokens, ops.shape(task_out)[-1]))
            )
        if self.shared_experts is not None:
            shared_out = self.shared_experts(
                ops.broadcast_to(shared_tokens[None], (s, num_tokens, d))
            )
            every.append(shared_out)
            candidates.append(
                ops.broadcast_to(
                    shared_out[None], (t,) + tuple(ops.shape(shared_out))
                )
            )
        candidates = ops.concatenate(candidates, axis=1)
        every = ops.concatenate(every, axis=0)

        logits = ops.einsum("tnd,tde->tne", task_tokens, self.task_gate_kernel)
        logits = logits + self.task_gate_bias[:, None, :]
        task_gates = _keep_top_k(ops.softmax(ops.cast(logits, "float32")), self.k)
        task_y = ops.einsum(
            "tne,teno->tno", ops.cast(task_gates, candidates.dtype), candidates
        )
        if valid is not None:  # masked tokens: no statistic
            task_gates = ops.where(valid[None, :, None], task_gates, 0.0)
        outputs = [view.restore(task_y[i]) for i in range(t)]

        # Telemetry: each task's mean gate, placed at its experts' columns.
        task_usage = balancing.masked_mean(  # (T, m_t + m_s)
            ops.moveaxis(task_gates, 1, 0), valid
        )
        columns = []
        if m:
            own = ops.eye(t, dtype="float32")[:, :, None] * task_usage[:, None, :m]
            columns.append(ops.reshape(own, (t, t * m)))
        if s:
            columns.append(task_usage[:, m:])
        usage = ops.concatenate(columns, axis=1)
        entropy = balancing.mean_entropy(task_gates, valid)
        routing = {"task_gates": task_gates}
        if self.shared_output:
            shared_logits = ops.matmul(shared_tokens, self.shared_gate_kernel)
            shared_logits = shared_logits + self.shared_gate_bias
            shared_gates = _keep_top_k(
                ops.softmax(ops.cast(shared_logits, "float32")), self.k
            )
            shared_y = ops.einsum(
                "ne,eno->no", ops.cast(shared_gates, every.dtype), every
            )
            shared_gates = pipeline.mask_rows(shared_gates, valid)
            outputs.append(view.restore(shared_y))
            usage = ops.concatenate(
                [usage, balancing.masked_mean(shared_gates, valid)[None]], axis=0
            )
            entropy = (t * entropy + balancing.mean_entropy(shared_gates, valid)) / (t + 1)
            routing["shared_gates"] = shared_gates
        expert_load = ops.mean(usage, axis=0)
        record(
            self,
            task_expert_usage=usage,
            expert_load=expert_load,
            router_entropy=entropy,
            dropped_fraction=ops.zeros(()),
        )
        if return_routing:
            routing.update(task_expert_usage=usage, expert_load=expert_load)
            return outputs, routing
        return outputs

    def routing_stats(self):
        """The gate statistics of the last call, as NumPy values:
        `task_expert_usage` `(T [+ 1], E_total)` (rows: tasks, then the
        shared gate; columns: task 0's experts, task 1's, ..., shared),
        `expert_load`, `dropped_fraction` (0), `router_entropy`,
        `task_names` (with `"shared"` last when `shared_output`)."""
        stats = stats_to_numpy(
            self,
            ["task_expert_usage", "expert_load", "dropped_fraction", "router_entropy"],
        )
        stats["task_names"] = list(self.task_names) + (
            ["shared"] if self.shared_output else []
        )
        return stats

    def compute_output_shape(self, input_shape):
        shape = self._input_dim(input_shape)
        out = shape[:-1] + (self.output_dim or shape[-1],)
        return [out for _ in range(self.num_tasks + int(self.shared_output))]

    def compute_mask(self, inputs, previous_mask=None):
        # The inputs' token mask on every output.
        mask = _one_mask(previous_mask)
        if mask is None:
            return None
        return [mask] * (self.num_tasks + int(self.shared_output))

    def compute_output_spec(
        self, inputs, training=None, return_routing=False, mask=None
    ):
        if return_routing:
            return super(keras.layers.Layer, self).compute_output_spec(
                inputs, training=training, return_routing=True
            )
        if isinstance(inputs, (list, tuple)):
            shape = [tuple(x.shape) for x in inputs]
        else:
            shape = tuple(inputs.shape)
        return [
            keras.KerasTensor(s, dtype=self.compute_dtype)
            for s in self.compute_output_shape(shape)
        ]

    def get_config(self):
        config = super().get_config()
        options = (self.task_experts or self.shared_experts)
        config.update(
            num_tasks=self.num_tasks,
            num_task_experts=self.num_task_experts,
            num_shared_experts=self.num_shared_experts,
            hidden_dim=self.hidden_dim,
            output_dim=self.output_dim,
            shared_output=self.shared_output,
            k=self.k,
            **expert_options_config(options),
            gate_kernel_initializer=keras.initializers.serialize(
                self.gate_kernel_initializer
            ),
            task_names=list(self.task_names),
        )
        return quantized_dtype_config(self, config)

