"""Multi-gate Mixture-of-Experts (MMoE), with dense or sparse gates.

One shared input, `T` task outputs; the `E` experts are shared and every
task mixes them with its own gate. Like the other multi-task layers
(`keras_moe.layers.cgc`, `keras_moe.layers.ple`), it keeps per-task
expert-usage telemetry in non-trainable variables, updated on every call
(also inside compiled `fit`/`predict`), read with `routing_stats()` or
logged with `keras_moe.callbacks.RoutingMetrics`.
"""

import keras
from keras import ops

from keras_moe.layers import _pruning
from keras_moe.layers._multitask import (
    check_call_input,
    fresh_initializer,
    gate_initializer,
    normalize_rows,
    stats_to_numpy,
)
from keras_moe.layers._stats import record, statistic
from keras_moe.layers.expert_bank import (
    LoraBanks,
    expert_options_config,
    make_experts,
    pop_expert_options,
    quantized_dtype_config,
)
from keras_moe.layers.experts import per_expert_initializer
from keras_moe.layers.routers import TopKRouter
from keras_moe.ops import balancing, pipeline, planning
from keras_moe.ops import dispatching as dispatch_ops
from keras_moe.utils import replicas
from keras_moe.utils import validation as check


@keras.saving.register_keras_serializable(package="keras_moe")
class MultiGateMoE(LoraBanks, keras.layers.Layer):
    """Multi-gate Mixture-of-Experts (MMoE): shared experts, one gate per task,
    with dense softmax gates or sparse, capacity-based top-k gates.

    `E` experts `f_1..f_E` (two-layer MLPs, one `Experts` bank) are shared by
    `T` tasks; task `t` mixes them with its own gate:

    `y_t(x) = sum_e g_t(x)_e f_e(x)`

    - `k=None` (Ma et al. 2018): dense gates `g_t(x) = softmax(x W_t + b_t)`.
      Every expert runs on every token once; the `T` gates are applied with
      one einsum.
    - `k=int`: sparse gates. Task `t` has a `TopKRouter(E, k)`;
      `g_t(x)` is non-zero on its top-`k` experts only (renormalised). The
      `T` tasks' (token, choice) pairs are dispatched together, as `T N`
      pseudo-tokens of one capacity-based dispatch plan (token-major, so no
      task is favoured when an expert overflows): the expert bank runs once
      on `(E, C, d)` buffers with `C = ceil(k T N / E * capacity_factor)`,
      compute proportional to `k T`, not `E`. Pairs beyond an expert's
      capacity are dropped (`capacity_factor` in training,
      `eval_capacity_factor` at inference; `None` = dropless). The routers
      add their load-balancing loss in training.
    - `routers=[r_1, ..., r_T]`: any keras_moe router per task
      (`TopKRouter`, `DSelectKRouter`, `ExpertChoiceRouter`,
      `BalancedAssignmentRouter`, ...). Routers that place tokens themselves
      (expert choice) get a capacity `C_t = ceil(k_t N / E * cf)` of every
      expert's buffer each; so do all tasks when their routers' `k` differ.

    Telemetry of the last call (non-trainable float32 variables):
    `task_expert_usage` `(T, E)`, the share of task `t`'s gate mass going to
    expert `e` (rows sum to 1; kept pairs only for sparse gates),
    `expert_load` `(E,)` (mean of the rows for dense gates, share of the
    routed pairs for sparse ones), `dropped_fraction` (0 for dense gates),
    `router_entropy` (mean entropy of the gates) and `load_balance_loss`
    (mean over the routers that report it, sparse gates only).

    Args:
        num_tasks: `T >= 1`.
        num_experts: `E`.
        hidden_dim: hidden width of each expert.
        output_dim: output width of the experts (and of every task output);
            defaults to the input width.
        k: `None` for dense softmax gates, or the number of experts per
            token and task (sparse gates with default `TopKRouter`s).
        routers: a list of `T` router layers (instead of `k`).
        capacity_factor: training capacity factor (> 0) or `None`.
        eval_capacity_factor: inference capacity factor or `None`
            (default: dropless; then every expert's buffer has `T N` rows,
            the expert compute of dense gates: pass e.g. 2.0 for sparse
            compute at inference).
        load_balance_weight: weight of the Switch load-balancing loss of the
            default sparse routers (ignored for dense gates and `routers`).
        gate_kernel_initializer: initializer of the gate kernels (dense
            gates and default routers). Default: Switch's router init
            (truncated normal, 0.1 x LeCun scale), so gates start nearly
            uniform and every expert gets gradient.
        task_names: `T` distinct names used in telemetry (default
            `task_0, ...`).
        **kwargs: base `Layer` arguments, and the expert options (see
            `Experts`): `activation` (default `"relu"`), `gated`,
            `use_bias`, `kernel_initializer`, `bias_initializer`,
            `kernel_regularizer`, `bias_regularizer`, `glu_limit`,
            `glu_linear_offset`, `output_scale`.

    Call arguments:
        inputs: `(..., d)`, rank >= 2, e.g. `(B, d)`.
        training: training mode (capacity factor, auxiliary losses).
        return_routing: also return a dict with the gates `(T, N, E)`
            (`N` tokens), `task_expert_usage`, `expert_load`,
            `dropped_fraction`, and for sparse gates `expert_index`,
            `combine_weights`, `keep`, `position` `(T, N, k)`, `probs`
            `(T, N, E)` and `capacity`.
        mask: bool `inputs.shape[:-1]`, False for padding (Keras passes the
            inputs' mask by itself). Masked tokens take no capacity, output
            zeros and add nothing to the losses or statistics; every task
            output carries the mask.

    Returns:
        A list of `T` tensors `(..., output_dim or d)`, or
        `(outputs, routing)` with `return_routing=True`.

    Example:

    >>> import numpy as np
    >>> mmoe = MultiGateMoE(num_tasks=2, num_experts=4, hidden_dim=16)
    >>> ys = mmoe(np.random.rand(8, 10).astype("float32"))
    >>> [tuple(y.shape) for y in ys]
    [(8, 10), (8, 10)]
    >>> sparse = MultiGateMoE(2, 8, 16, output_dim=4, k=2, task_names=["ctr", "cvr"])
    >>> ys = sparse(np.random.rand(8, 10).astype("float32"))
    >>> sparse.routing_stats()["task_expert_usage"].shape
    (2, 8)

    References:
        Ma, Zhao, Yi, Chen, Hong, Chi. Modeling Task Relationships in
        Multi-task Learning with Multi-gate Mixture-of-Experts (KDD 2018).
        Shazeer et al. Outrageously Large Neural Networks (2017).
        Fedus, Zoph, Shazeer. Switch Transformers (2021).
    """

    def __init__(
        self,
        num_tasks,
        num_experts,
        hidden_dim,
        output_dim=None,
        k=None,
        routers=None,
        capacity_factor=1.25,
        eval_capacity_factor=None,
        load_balance_weight=0.01,
        gate_kernel_initializer=None,
        task_names=None,
        **kwargs,
    ):
        expert_options = pop_expert_options(kwargs, activation="relu")
        super().__init__(**kwargs)
        self.supports_masking = True
        self.num_tasks = check.positive_int("num_tasks", num_tasks, check.MAX_TASKS)
        self.num_experts = check.positive_int(
            "num_experts", num_experts, check.MAX_EXPERTS
        )
        self.hidden_dim = check.positive_int("hidden_dim", hidden_dim)
        self.output_dim = (
            None if output_dim is None else check.positive_int("output_dim", output_dim)
        )
        self.capacity_factor = check.capacity_factor("capacity_factor", capacity_factor)
        self.eval_capacity_factor = check.capacity_factor(
            "eval_capacity_factor", eval_capacity_factor
        )
        self.load_balance_weight = check.non_negative_float(
            "load_balance_weight", load_balance_weight
        )
        self.gate_kernel_initializer = gate_initializer(gate_kernel_initializer)
        self.task_names = check.task_names(task_names, self.num_tasks)
        self.k = None if k is None else check.k_for_experts(k, self.num_experts)
        self.custom_routers = routers is not None
        if routers is not None:
            if not isinstance(routers, (list, tuple)):
                raise ValueError(
                    "routers must be a list of router layers, one per task. "
                    f"Received: routers={routers!r}"
                )
            routers = [
                keras.saving.deserialize_keras_object(r) if isinstance(r, dict) else r
                for r in routers
            ]
            if len(routers) != self.num_tasks:
                raise ValueError(
                    "routers must have one router per task. Received: "
                    f"len(routers)={len(routers)}, num_tasks={self.num_tasks}"
                )
            for router in routers:
                check.router_layer(router, self.num_experts)
                if self.k is not None and router.k != self.k:
                    raise ValueError(
                        "k must match every router's k (or be None when "
                        f"routers are given). Received: k={self.k}, "
                        f"router.k={router.k} ({router.name})"
                    )
        elif self.k is not None:
            routers = [
                TopKRouter(
                    num_experts=self.num_experts,
                    k=self.k,
                    load_balance_weight=self.load_balance_weight,
                    kernel_initializer=fresh_initializer(
                        self.gate_kernel_initializer, t
                    ),
                    name=f"router_{t}",
                )
                for t in range(self.num_tasks)
            ]
        self.routers = routers
        self.sparse = routers is not None
        self.experts = make_experts(
            self, self.num_experts, self.hidden_dim, expert_options, self.output_dim
        )

    def build(self, input_shape):
        input_shape = check.token_input_shape(type(self).__name__, input_shape)
        d = input_shape[-1]
        t, e = self.num_tasks, self.num_experts
        self.experts.build((e, None, d))
        if self.sparse:
            for router in self.routers:
                if not router.built:  # a router revived from a config is built
                    router.build((None, d))
            self.gate_kernel = self.gate_bias = None
        else:
            # One stacked kernel for the T gates; each gate gets the fans of
            # a Dense(E) layer on d inputs.
            self.gate_kernel = self.add_weight(
                name="gate_kernel",
                shape=(t, d, e),
                initializer=per_expert_initializer(self.gate_kernel_initializer, t),
            )
            self.gate_bias = self.add_weight(
                name="gate_bias", shape=(t, e), initializer="zeros"
            )
        self.task_expert_usage = statistic(self, "task_expert_usage", (t, e))
        self.expert_load = statistic(self, "expert_load", (e,))
        self.dropped_fraction = statistic(self, "dropped_fraction", ())
        self.router_entropy = statistic(self, "router_entropy", ())
        self.load_balance_loss = (
            statistic(self, "load_balance_loss", ()) if self.sparse else None
        )

    # Dense gates ---------------------------------------------------------

    def _dense(self, tokens, valid=None):
        num_tokens = ops.shape(tokens)[0]
        logits = ops.einsum("nd,tde->tne", tokens, self.gate_kernel)
        logits = logits + self.gate_bias[:, None, :]
        gates = ops.softmax(ops.cast(logits, "float32"), axis=-1)  # (T, N, E)
        everything = ops.broadcast_to(
            tokens[None], (self.num_experts, num_tokens, ops.shape(tokens)[-1])
        )
        expert_outputs = self.experts(everything)  # (E, N, o)
        outputs = ops.einsum(
            "tne,eno->tno", ops.cast(gates, expert_outputs.dtype), expert_outputs
        )
        if valid is not None:  # masked tokens: zero outputs, no statistic
            gates = ops.where(valid[None, :, None], gates, 0.0)
            outputs = ops.where(
                valid[None, :, None], outputs, ops.zeros_like(outputs)
            )
        # (T, E); rows sum to 1 (0 without a token)
        usage = balancing.masked_mean(ops.moveaxis(gates, 1, 0), valid)
        routing = {
            "gates": gates,
            "task_expert_usage": usage,
            "expert_load": ops.mean(usage, axis=0),
            "dropped_fraction": ops.zeros((), "float32"),
            "entropy": balancing.mean_entropy(gates, valid),
        }
        return outputs, routing

    # Sparse gates --------------------------------------------------------

    def _sparse(self, tokens, training, valid=None):
        num_tokens = ops.shape(tokens)[0]
        t_count, e = self.num_tasks, self.num_experts
        factor = planning.capacity_factor_for(
            training, self.capacity_factor, self.eval_capacity_factor
        )
        routings = [
            pipeline.route(
                router, tokens, e, router.k, factor, valid=valid, training=training
            )[0]
            for router in self.routers
        ]
        # The T tasks' pairs as N T pseudo-tokens of one plan, token-major.
        plan, selected, weights = planning.plan_task_dispatch(
            routings,
            [router.k for router in self.routers],
            e,
            num_tokens,
            factor,
            valid=valid,
            path=planning.choose_path(factor, self.routers, self.experts),
        )
        combined = pipeline.run_plan(tokens, plan, weights, self.experts, training)
        combined = ops.reshape(combined, (num_tokens, t_count, ops.shape(combined)[-1]))
        # (T, N, o); masked tokens output zeros (a select: no NaN)
        outputs = ops.transpose(pipeline.mask_rows(combined, valid), (1, 0, 2))

        gates = ops.reshape(
            dispatch_ops.dense_gates(plan, weights), (num_tokens, t_count, e)
        )
        gates = ops.transpose(gates, (1, 0, 2))  # (T, N, E), kept pairs only
        # Over the global batch under data parallelism (keras_moe.utils.replicas).
        usage = normalize_rows(replicas.cross_replica_sum(ops.sum(gates, axis=1)))
        probs = ops.stack([r["probs"] for r in routings])
        stats = pipeline.routing_statistics(plan, selected, probs, valid)

        def per_task(x):  # (N T, ...) -> (T, N, ...)
            x = ops.reshape(x, (num_tokens, t_count) + tuple(x.shape[1:]))
            return ops.moveaxis(x, 1, 0)

        balance = [r["load_balance_loss"] for r in routings if "load_balance_loss" in r]
        routing = {
            "gates": gates,
            "task_expert_usage": usage,
            "expert_load": stats["expert_load"],
            "dropped_fraction": stats["dropped_fraction"],
            "entropy": stats["router_entropy"],
            "load_balance_loss": (
                ops.mean(ops.stack([ops.cast(b, "float32") for b in balance]))
                if balance
                else ops.zeros((), "float32")
            ),
            "expert_index": per_task(plan["expert_index"]),
            "combine_weights": per_task(weights),
            "keep": per_task(plan["keep"]),
            "position": per_task(plan["position"]),
            "probs": probs,
            "capacity": plan["capacity"],
        }
        return outputs, routing

    def call(self, inputs, training=None, return_routing=False, mask=None):
        check_call_input(self, inputs.shape, self.experts.kernel_in.shape[1])
        view = pipeline.token_view(inputs, mask, self.name, self.compute_dtype)
        tokens, valid = view.tokens, view.valid
        if self.sparse:
            outputs, routing = self._sparse(tokens, training, valid)
        else:
            outputs, routing = self._dense(tokens, valid)
        record(
            self,
            task_expert_usage=routing["task_expert_usage"],
            expert_load=routing["expert_load"],
            dropped_fraction=routing["dropped_fraction"],
            router_entropy=routing.pop("entropy"),
        )
        if self.sparse:
            record(self, load_balance_loss=routing.pop("load_balance_loss"))
        results = [view.restore(outputs[t]) for t in range(self.num_tasks)]
        if return_routing:
            return results, routing
        return results

    def routing_stats(self):
        """The routing statistics of the last call, as NumPy values:
        `task_expert_usage` `(T, E)`, `expert_load` `(E,)`,
        `dropped_fraction`, `router_entropy`, `task_names` and, for sparse
        gates, `load_balance_loss`."""
        names = [
            "task_expert_usage",
            "expert_load",
            "dropped_fraction",
            "router_entropy",
        ]
        if self.sparse:
            names.append("load_balance_loss")
        stats = stats_to_numpy(self, names)
        stats["task_names"] = list(self.task_names)
        return stats

    def compute_output_shape(self, input_shape):
        input_shape = check.token_input_shape(type(self).__name__, input_shape)
        shape = input_shape[:-1] + (self.output_dim or input_shape[-1],)
        return [shape for _ in range(self.num_tasks)]

    def compute_mask(self, inputs, previous_mask=None):
        # The inputs' mask on every task's output.
        if previous_mask is None:
            return None
        return [previous_mask] * self.num_tasks

    def compute_output_spec(
        self, inputs, training=None, return_routing=False, mask=None
    ):
        if return_routing:
            return super(keras.layers.Layer, self).compute_output_spec(
                inputs, training=training, return_routing=True, mask=mask
            )
        return [
            keras.KerasTensor(shape, dtype=self.compute_dtype)
            for shape in self.compute_output_shape(inputs.shape)
        ]

    def pruned_config(self, kept):
        """This layer's config with the experts `kept` only (a sorted list
        of old indices), for `keras_moe.compression.prune_experts`:
        `num_experts = len(kept)`, `k = min(k, len(kept))`, and each custom
        router's own `pruned_config(kept)`."""
        config = self.get_config()
        count = len(kept)
        config["num_experts"] = count
        if self.k is not None:
            config["k"] = min(self.k, count)
        if self.custom_routers:
            config["routers"] = [
                _pruning.serialized_pruned_router(router, kept)
                for router in self.routers
            ]
        return config

    def copy_pruned_weights(self, source, kept):
        """Copies the weights of `source` (the unpruned layer): each router
        through its own `copy_pruned_weights`, the kept experts, the dense
        gates' kernel and bias columns and the statistics of the kept
        experts."""
        for new, old in zip(self.routers or [], source.routers or []):
            _pruning.pruning_hook(new, "copy_pruned_weights")(old, kept)
        _pruning.copy_sliced(
            self, source, {source.num_experts: list(kept)}, exclude=("routers",)
        )
        _pruning.copy_quantization_state(self, source)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_tasks=self.num_tasks,
            num_experts=self.num_experts,
            hidden_dim=self.hidden_dim,
            output_dim=self.output_dim,
            k=self.k,
            routers=(
                [keras.saving.serialize_keras_object(r) for r in self.routers]
                if self.custom_routers
                else None
            ),
            capacity_factor=self.capacity_factor,
            eval_capacity_factor=self.eval_capacity_factor,
            load_balance_weight=self.load_balance_weight,
            **expert_options_config(self.experts),
            gate_kernel_initializer=keras.initializers.serialize(
                self.gate_kernel_initializer
            ),
            task_names=list(self.task_names),
        )
        return quantized_dtype_config(self, config)

