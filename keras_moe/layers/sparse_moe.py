"""`SparseMoE`: the sparsely-gated Mixture-of-Experts feed-forward layer.

One class, over the ~500 lines of the other modules: about 170 lines are
its docstring (the math, the 30 arguments, the call arguments, an example)
and 150 its constructor's checks; routing, capacity and plans are
`keras_moe.ops.planning`, the expert bank `keras_moe.layers.experts`.
"""

import keras
import numpy as np
from keras import ops

from keras_moe.layers import _pruning
from keras_moe.layers._stats import statistic
from keras_moe.layers.experts import Experts, expert_options_config
from keras_moe.layers.experts import quantized_dtype_config
from keras_moe.layers.routers import TopKRouter, accepts_mask
from keras_moe.ops import balancing
from keras_moe.ops import dispatching as dispatch_ops
from keras_moe.ops import dropless as dropless_ops
from keras_moe.ops import planning
from keras_moe.utils import validation as check
from keras_moe.utils.layouts import constrain, has_tensor_layout

DISPATCH_MODES = ("sparse", "dense")
SHARED_EXPERT_GATES = ("sigmoid",)
# The intermediate tensors that a distribution may lay out (`constrain`),
# with the expert axis first like the expert weights: the `(E, C, d)`
# buffers and the `(E, C, o)` expert outputs (`keras_moe.distribution`).
EXPERT_TENSORS = ("expert_buffers", "expert_outputs")


def _full_rank(value, shape):
    """Whether `routing_inputs` has the inputs' rank: then it is the router's
    inputs `(..., d)`, not ids (ids have one dimension fewer, at least)."""
    value_shape = getattr(value, "shape", None)
    if value_shape is None:
        value_shape = np.shape(value)
    return len(value_shape) == len(shape)


@keras.saving.register_keras_serializable(package="keras_moe")
class SparseMoE(keras.layers.Layer):
    """Sparsely-gated Mixture-of-Experts feed-forward layer.

    Each token `x` (every position of an input `(..., d)`) is sent to the `k`
    experts its router picks and the outputs are mixed with the router
    weights:

    `y(x) = sum_{j=1..k} keep_j(x) * w_j(x) * FFN_{e_j(x)}(x)`

    plus, with `S` shared experts, `sum_{s=1..S} g_s(x) * FFN_s(x)`, where
    `g_s = 1` or, with `shared_expert_gate="sigmoid"`,
    `g_s = sigmoid(x w_s)` (Qwen-MoE).

    With a capacity factor `c`, expert `e` holds at most
    `C = ceil(k N / E * c)` of the `N` tokens of a call; an assignment beyond
    that is dropped (`keep = 0`, the token's other choices still count;
    first choices of all tokens are placed before second choices, earlier
    tokens first). `capacity_factor` applies in training,
    `eval_capacity_factor` in inference. `None` (the inference default) is
    dropless: every assignment is computed, so a prediction never depends on
    the rest of the batch.

    `dispatch="sparse"` computes only the chosen experts, in static shapes
    that compile with `jit_compile=True` on TensorFlow and JAX. With a
    capacity factor, tokens are gathered into `(E, C, d)` buffers (expert
    compute `~ k c N` rows). Dropless, the `N k` (token, expert) pairs are
    sorted by expert into blocks of `block_size` rows, each expert's group
    padded to whole blocks, and the experts run as one batched matmul over
    the blocks (`keras_moe.ops.make_block_plan`, MegaBlocks-style): expert
    compute `N k + E (block_size - 1)` rows at most.
    `dispatch="dense"` runs every expert on every token and masks (as
    keras-hub's MoE blocks do): the same function, `E / k` times the compute;
    it is the numerical reference.

    In training the router adds the Switch load-balancing loss
    (`load_balance_weight`) and optionally the z-loss with `add_loss`.
    Routing statistics of the last call are kept in non-trainable variables
    (`expert_load`, `dropped_fraction`, `load_balance_loss`,
    `router_entropy`; read them with `routing_stats()`, or log them during
    `fit` with `keras_moe.callbacks.RoutingMetrics`), and
    `return_routing=True` returns the whole routing.

    Args:
        num_experts: `E`, number of experts.
        hidden_dim: hidden width of each expert.
        k: experts per token (`1` is Switch routing). `None` (the
            default in the signature) means 2, or the router's `k` when
            `router` is given.
        output_dim: output width; defaults to the input width.
        capacity_factor: training capacity factor (> 0) or `None`
            (dropless); default 1.25.
        eval_capacity_factor: inference capacity factor (> 0) or `None`
            (dropless, the default).
        dispatch: `"sparse"` or `"dense"`.
        block_size: rows per block of the dropless path, at most 4096 (a
            call computes up to `E (block_size - 1)` padding rows); `None`
            (default) picks one per shape
            (`keras_moe.ops.default_block_size`).
        activation: expert activation (a Keras activation, or
            `"gelu_approximate"` / `"quick_gelu"`, see
            `keras_moe.activations`).
        gated: gated (GLU) experts; with `activation="silu"`, SwiGLU.
        use_bias: biases in the experts.
        kernel_initializer, bias_initializer, kernel_regularizer,
        bias_regularizer: passed to `Experts`.
        glu_limit, glu_linear_offset: the clamped GLU of GPT-OSS, passed to
            `Experts` (default: off).
        output_scale: a learned output scale per expert (`Experts`;
            default False).
        num_shared_experts: experts that every token uses, added to the
            routed mixture (DeepSeekMoE, Dai et al. 2024); default 0.
        shared_hidden_dim: hidden width of the shared experts (default
            `hidden_dim`).
        shared_expert_gate: `None` (default: shared experts are added as
            they are) or `"sigmoid"`: shared expert `s` is weighted by its
            own gate `sigmoid(x w_s)`, `w_s` a learned `(d,)` vector
            (`shared_gate_kernel`, `(d, S)`, no bias, initialised and
            regularised like the expert kernels), as in Qwen-MoE:
            `y = routed(x) + sum_s sigmoid(x w_s) FFN_s(x)`.
        router: a router layer (see `keras_moe.layers.routers`), e.g.
            `TopKRouter(num_experts, k=1, batch_prioritized=True)`. Default:
            a `TopKRouter` built from `k` and the options below, which are
            only for that default router (pass them to your router instead).
        noisy_gating: noisy top-k gating in training (default False).
        load_balance_weight: weight of the load-balancing loss (default
            0.01).
        z_loss_weight: weight of the router z-loss (default 0).
        router_kernel_initializer: initializer of the router kernel
            (default: Switch's truncated normal with 0.1 x LeCun scale).
        seed: seed of the gating noise.
        num_groups: `G`, number of token groups (modalities, languages,
            ...) for the per-group balancing and statistics below; `None`
            (default): no groups. Tokens get their group with
            `layer(x, groups=ids)`.
        group_names: optional `G` names for the statistics and plots.
        group_balance_weight: weight of the per-group Switch loss
            `mean_g E sum_e f_{g,e} P_{g,e}`
            (`keras_moe.ops.group_load_balancing_loss`): each group is
            balanced on its own, so one modality cannot take every expert.
        local_entropy_weight, global_entropy_weight: weights of LIMoE's
            local (per-token) and per-group global entropy losses
            (`keras_moe.ops.entropy_losses`).
        global_entropy_threshold: LIMoE's threshold `tau` (nats) of the
            global loss, `max(0, tau - H(pbar_g))`; `None`: `-H(pbar_g)`.
        **kwargs: base `Layer` arguments.

    Call arguments:
        inputs: `(..., d)`, rank >= 2, e.g. `(B, d)` or `(B, T, d)`.
        training: training mode (capacity factor, noise, aux losses).
        return_routing: also return the routing dict (`expert_index`,
            `combine_weights`, `probs`, `keep`, `position` per token, and
            `capacity`, `expert_load`, `dropped_fraction`).
        routing_inputs: extra routing input for routers that need one
            (token ids for `HashRouter`, task ids for `TaskRouter`): one id
            per token (`inputs.shape[:-1]`) or per example (`(B,)`). A
            tensor of the inputs' shape `(..., d)` is instead what the router
            sees in place of `inputs` (the experts, and the shared experts'
            gates, still see `inputs`): Gemma 4 routes the raw hidden states
            and feeds its experts normalised ones.
        mask: bool `inputs.shape[:-1]`, False for padding; Keras passes the
            mask of the inputs (e.g. of `Embedding(mask_zero=True)`) by
            itself when the layer is called on one tensor (with
            `routing_inputs` or `groups`, pass it explicitly). Masked tokens take no
            capacity, output zeros and add nothing to the losses, the
            statistics or `return_routing`'s counts; the mask propagates to
            the output.
        groups: int group of each token (`inputs.shape[:-1]`) or example
            (`(B,)`), in `[0, num_groups)`, e.g. the modality; for the
            per-group losses and `group_expert_load`. Default: group 0.

    Returns:
        `(..., output_dim)`, or `(outputs, routing)` with `return_routing`.

    Example:

    >>> import numpy as np
    >>> moe = SparseMoE(num_experts=8, hidden_dim=32, k=2)
    >>> tuple(moe(np.random.rand(2, 10, 16).astype("float32")).shape)
    (2, 10, 16)

    References:
        Shazeer et al. Outrageously Large Neural Networks (2017).
        Lepikhin et al. GShard (2020). Fedus, Zoph, Shazeer. Switch
        Transformers (2021). Gale et al. MegaBlocks (2022).
    """

    def __init__(
        self,
        num_experts,
        hidden_dim,
        k=None,
        output_dim=None,
        capacity_factor=1.25,
        eval_capacity_factor=None,
        dispatch="sparse",
        block_size=None,
        activation="gelu",
        gated=False,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        glu_limit=None,
        glu_linear_offset=0.0,
        output_scale=False,
        num_shared_experts=0,
        shared_hidden_dim=None,
        shared_expert_gate=None,
        router=None,
        noisy_gating=None,
        load_balance_weight=None,
        z_loss_weight=None,
        router_kernel_initializer=None,
        seed=None,
        num_groups=None,
        group_names=None,
        group_balance_weight=0.0,
        local_entropy_weight=0.0,
        global_entropy_weight=0.0,
        global_entropy_threshold=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.supports_masking = True
        self.num_experts = check.positive_int(
            "num_experts", num_experts, check.MAX_EXPERTS
        )
        self.hidden_dim = check.positive_int("hidden_dim", hidden_dim, check.MAX_WIDTH)
        self.output_dim = (
            None if output_dim is None else check.positive_int("output_dim", output_dim)
        )
        self.capacity_factor = check.capacity_factor("capacity_factor", capacity_factor)
        self.eval_capacity_factor = check.capacity_factor(
            "eval_capacity_factor", eval_capacity_factor
        )
        self.dispatch = check.one_of("dispatch", dispatch, DISPATCH_MODES)
        self.block_size = check.block_size("block_size", block_size)
        self.num_shared_experts = check.non_negative_int(
            "num_shared_experts", num_shared_experts, check.MAX_EXPERTS
        )
        self.shared_hidden_dim = (
            None
            if shared_hidden_dim is None
            else check.positive_int(
                "shared_hidden_dim", shared_hidden_dim, check.MAX_WIDTH
            )
        )
        self.shared_expert_gate = (
            None
            if shared_expert_gate is None
            else check.one_of(
                "shared_expert_gate", shared_expert_gate, SHARED_EXPERT_GATES
            )
        )
        if not self.num_shared_experts and (
            self.shared_hidden_dim is not None or self.shared_expert_gate is not None
        ):
            raise ValueError(
                "shared_hidden_dim and shared_expert_gate configure shared "
                "experts and need num_shared_experts >= 1. Received: "
                f"num_shared_experts={num_shared_experts!r}, "
                f"shared_hidden_dim={shared_hidden_dim!r}, "
                f"shared_expert_gate={shared_expert_gate!r}"
            )
        self.seed = check.seed("seed", seed)
        self.num_groups = (
            None
            if num_groups is None
            else check.positive_int("num_groups", num_groups, check.MAX_TASKS)
        )
        self.group_balance_weight = check.non_negative_float(
            "group_balance_weight", group_balance_weight
        )
        self.local_entropy_weight = check.non_negative_float(
            "local_entropy_weight", local_entropy_weight
        )
        self.global_entropy_weight = check.non_negative_float(
            "global_entropy_weight", global_entropy_weight
        )
        self.global_entropy_threshold = (
            None
            if global_entropy_threshold is None
            else check.non_negative_float(
                "global_entropy_threshold", global_entropy_threshold
            )
        )
        if self.num_groups is None:
            if group_names is not None or self.group_balance_weight:
                raise ValueError(
                    "group_names and group_balance_weight need num_groups. "
                    f"Received: num_groups=None, group_names={group_names!r}, "
                    f"group_balance_weight={group_balance_weight}"
                )
            self.group_names = None
        else:
            self.group_names = check.task_names(
                group_names, self.num_groups, label="group"
            )
        if router_kernel_initializer is not None:
            check.initializer("router_kernel_initializer", router_kernel_initializer)
        router_args = dict(
            noisy_gating=noisy_gating,
            load_balance_weight=load_balance_weight,
            z_loss_weight=z_loss_weight,
            kernel_initializer=router_kernel_initializer,
        )
        if isinstance(router, dict):
            router = keras.saving.deserialize_keras_object(router)
        self.custom_router = router is not None
        if router is None:
            self.k = check.k_for_experts(2 if k is None else k, self.num_experts)
            router = TopKRouter(
                num_experts=self.num_experts,
                k=self.k,
                seed=seed,
                name="router",
                **{n: v for n, v in router_args.items() if v is not None},
            )
        else:
            check.router_layer(router, self.num_experts)
            given = sorted(n for n, v in router_args.items() if v is not None)
            if given:
                raise ValueError(
                    "Router options go to the router itself when `router` is "
                    f"given. Received: router={type(router).__name__}, and "
                    + ", ".join(f"{n}={router_args[n]!r}" for n in given)
                )
            if k is not None and k != router.k:
                raise ValueError(
                    f"k must match the router's k. Received: k={k}, "
                    f"router.k={router.k}"
                )
            self.k = router.k
        self.router = router
        expert_args = dict(
            hidden_dim=self.hidden_dim,
            output_dim=self.output_dim,
            activation=activation,
            gated=gated,
            glu_limit=glu_limit,
            glu_linear_offset=glu_linear_offset,
            output_scale=output_scale,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            dtype=self.dtype_policy,
        )
        self.experts = Experts(
            num_experts=self.num_experts, name="experts", **expert_args
        )
        self.shared_experts = (
            Experts(
                num_experts=self.num_shared_experts,
                name="shared_experts",
                **dict(expert_args, hidden_dim=self.shared_hidden_dim or hidden_dim),
            )
            if self.num_shared_experts
            else None
        )

    def build(self, input_shape):
        input_shape = check.token_input_shape(type(self).__name__, input_shape)
        d = input_shape[-1]
        if not self.router.built:  # a router revived from a config is built
            self.router.build((None, d))
        self.experts.build((self.num_experts, None, d))
        if self.shared_experts is not None:
            self.shared_experts.build((self.num_shared_experts, None, d))
        self.shared_gate_kernel = (
            self.add_weight(
                name="shared_gate_kernel",
                shape=(d, self.num_shared_experts),
                initializer=self.experts.kernel_initializer,
                regularizer=self.experts.kernel_regularizer,
            )
            if self.shared_expert_gate and self.num_shared_experts
            else None
        )

        for name, shape in (
            ("expert_load", (self.num_experts,)),
            ("dropped_fraction", ()),
            ("load_balance_loss", ()),
            ("router_entropy", ()),
        ):
            setattr(self, name, statistic(self, name, shape))
        self.group_expert_load = (
            statistic(self, "group_expert_load", (self.num_groups, self.num_experts))
            if self.num_groups
            else None
        )

    def _check_call_input(self, inputs):
        shape = tuple(inputs.shape)
        check.token_input_shape(type(self).__name__, shape)
        expected = self.experts.kernel_in.shape[1]
        if shape[-1] != expected:
            raise ValueError(
                f"{self.name}: the last input dimension must be {expected}, "
                f"as when the layer was built. Received: input shape {shape}"
            )

    def _uses_blocks(self):
        """Dropless sparse calls run on expert-sorted blocks (a capacity of
        `N` rows per expert would cost what the dense dispatch costs), except
        for routers that place tokens themselves, int8 banks, and expert
        parallelism (a distribution that shards the `(E, C, d)` expert
        buffers: blocks mix experts, so they would gather every expert's
        weights onto every device). Only with `capacity_factor=None`
        (`keras_moe.ops.planning.plan_dispatch` checks that)."""
        return (
            self.dispatch == "sparse"
            and not planning.assigns_positions(self.router)
            and self.experts.quantization_mode is None
            and not has_tensor_layout(self, EXPERT_TENSORS[0])
        )

    def _route(self, tokens, num_tokens, training, routing_inputs, valid):
        """Routes the `(N, d)` tokens and plans their dispatch
        (`keras_moe.ops.planning`). `valid` `(N,)` bool (or None): the
        tokens that count; the others take no capacity and no row. Returns
        `(routing, plan, selected)`, where `selected` `(N, k)` bool (or
        None: all) marks the pairs that count in the statistics."""
        capacity = planning.choose_capacity(
            num_tokens,
            self.num_experts,
            self.k,
            planning.capacity_factor_for(
                training, self.capacity_factor, self.eval_capacity_factor
            ),
            num_valid=planning.count_valid(valid),
        )
        kwargs = {"training": training}
        if routing_inputs is not None:
            kwargs["routing_inputs"] = routing_inputs
        granted = planning.router_capacity(self.router, capacity)
        if granted is not None:
            kwargs["capacity"] = granted
        if valid is not None and accepts_mask(self.router):
            kwargs["mask"] = valid
        routing = self.router(tokens, **kwargs)
        plan, selected = planning.plan_dispatch(
            routing,
            self.num_experts,
            capacity,
            valid=valid,
            blocks=capacity.factor is None and self._uses_blocks(),
            block_size=self.block_size,
        )
        return routing, plan, selected

    def _routing_inputs_per_token(self, routing_inputs, shape):
        """Broadcasts `(B,)` or `(...)` ids to one id per token, `(N,)`."""
        routing_inputs = ops.convert_to_tensor(routing_inputs)
        lead = tuple(shape[:-1])
        rank = len(routing_inputs.shape)
        if rank > len(lead):
            raise ValueError(
                f"{self.name}: routing_inputs must have the leading shape of "
                "the inputs (one id per example or per token). Received: "
                f"routing_inputs shape {tuple(routing_inputs.shape)}, inputs "
                f"shape {tuple(shape)}"
            )
        expanded = ops.reshape(
            routing_inputs,
            tuple(ops.shape(routing_inputs)) + (1,) * (len(lead) - rank),
        )
        return ops.reshape(ops.broadcast_to(expanded, lead), (-1,))

    def _router_tokens(self, routing_inputs, shape):
        """`routing_inputs` `(..., d)` as the router's `(N, d)` tokens."""
        routing_inputs = ops.cast(routing_inputs, self.compute_dtype)
        given, expected = tuple(routing_inputs.shape), tuple(shape)
        if len(given) != len(expected) or any(
            a is not None and b is not None and a != b
            for a, b in zip(given, expected)
        ):
            raise ValueError(
                f"{self.name}: routing_inputs of the inputs' rank are the "
                "router's inputs and must have the shape of the inputs. Received: "
                f"routing_inputs shape {given}, inputs shape {expected}"
            )
        return ops.reshape(routing_inputs, (-1, ops.shape(routing_inputs)[-1]))

    def _shared_outputs(self, tokens):
        """The shared experts' `(N, o)` sum, each gated if so configured."""
        shared_in = ops.broadcast_to(
            tokens[None], (self.num_shared_experts,) + tuple(ops.shape(tokens))
        )
        shared = self.shared_experts(shared_in)  # (S, N, o)
        if self.shared_gate_kernel is not None:
            gates = ops.sigmoid(ops.matmul(tokens, self.shared_gate_kernel))
            shared = shared * ops.transpose(gates)[:, :, None]
        return ops.sum(shared, axis=0)

    def call(
        self,
        inputs,
        training=None,
        return_routing=False,
        routing_inputs=None,
        mask=None,
        groups=None,
    ):
        self._check_call_input(inputs)
        # Integer inputs as floats on every backend (torch's einsum would
        # not promote them), as Keras' normalization layers do.
        inputs = ops.cast(inputs, self.compute_dtype)
        shape = ops.shape(inputs)
        d = shape[-1]
        tokens = ops.reshape(inputs, (-1, d))
        num_tokens = ops.shape(tokens)[0]
        router_tokens = tokens
        if routing_inputs is not None and _full_rank(routing_inputs, shape):
            router_tokens = self._router_tokens(routing_inputs, shape)
            routing_inputs = None
        if routing_inputs is not None:
            routing_inputs = self._routing_inputs_per_token(routing_inputs, shape)
        valid = check.token_mask(self.name, mask, inputs)
        if valid is not None:
            # Masked tokens enter no computation (a select, so NaN or Inf
            # padding reaches no output and no gradient, its own included).
            tokens = ops.where(valid[:, None], tokens, ops.zeros_like(tokens))
            router_tokens = ops.where(
                valid[:, None], router_tokens, ops.zeros_like(router_tokens)
            )
        routing, plan, selected = self._route(
            router_tokens, num_tokens, training, routing_inputs, valid
        )
        weights = routing["combine_weights"]
        if isinstance(plan, dropless_ops.BlockPlan):
            outputs = dropless_ops.run_blocks(
                tokens, plan, weights, self.experts.call_blocks, bool(training)
            )
        elif self.dispatch == "sparse":
            buffers = dispatch_ops.dispatch(
                tokens, plan, custom_gradient=bool(training)
            )
            buffers = constrain(buffers, self, EXPERT_TENSORS[0])
            expert_outputs = constrain(
                self.experts(buffers), self, EXPERT_TENSORS[1]
            )
            outputs = dispatch_ops.combine(
                expert_outputs, plan, weights, custom_gradient=bool(training)
            )
        else:
            everything = ops.broadcast_to(
                tokens[None], (self.num_experts,) + tuple(ops.shape(tokens))
            )
            gates = dispatch_ops.dense_gates(plan, weights)
            expert_outputs = self.experts(everything)
            outputs = ops.einsum(
                "ne,eno->no", ops.cast(gates, expert_outputs.dtype), expert_outputs
            )
        if self.shared_experts is not None:
            outputs = outputs + self._shared_outputs(tokens)
        if valid is not None:  # masked tokens output zeros (select: no NaN)
            outputs = ops.where(valid[:, None], outputs, ops.zeros_like(outputs))
        outputs = ops.reshape(outputs, tuple(shape[:-1]) + (ops.shape(outputs)[-1],))

        # Routers that place tokens themselves mark the pairs they chose;
        # masked tokens' pairs do not count.
        routed, kept = dispatch_ops.expert_counts(plan, selected=selected)
        total = ops.sum(routed)
        expert_load = routed / ops.maximum(total, 1.0)
        dropped_fraction = (total - ops.sum(kept)) / ops.maximum(total, 1.0)
        balance = routing.get("load_balance_loss", ops.zeros(()))
        self.expert_load.assign(ops.stop_gradient(expert_load))
        self.dropped_fraction.assign(ops.stop_gradient(dropped_fraction))
        self.load_balance_loss.assign(ops.stop_gradient(ops.cast(balance, "float32")))
        probs = ops.reshape(
            ops.cast(routing["probs"], "float32"), (-1, self.num_experts)
        )
        entropy = -balancing.masked_mean(
            ops.sum(probs * ops.log(probs + 1e-9), axis=-1), valid
        )
        self.router_entropy.assign(ops.stop_gradient(entropy))
        group_load = self._group_terms(
            groups, shape, probs, plan["expert_index"], selected, valid, training
        )
        if not return_routing:
            return outputs
        extra = {} if group_load is None else {"group_expert_load": group_load}
        return outputs, {
            **extra,
            "expert_index": plan["expert_index"],
            "combine_weights": weights,
            "probs": routing["probs"],
            "keep": plan["keep"],
            "position": plan["position"],
            "capacity": plan["capacity"],
            "expert_load": expert_load,
            "dropped_fraction": dropped_fraction,
        }

    def _group_terms(
        self, groups, shape, probs, expert_index, selected, valid, training
    ):
        """Per-group statistics and, in training, the per-group and entropy
        losses. Returns the `(G, E)` group x expert load (or None)."""
        entropy_weights = self.local_entropy_weight or self.global_entropy_weight
        if self.num_groups is None and not entropy_weights:
            if groups is not None:
                raise ValueError(
                    f"{self.name}: groups= needs num_groups set in the "
                    "constructor. Received: num_groups=None"
                )
            return None
        g = self.num_groups or 1
        if groups is None:  # every token in group 0
            ids = ops.zeros((ops.shape(probs)[0],), dtype="int32")
        else:
            ids = self._routing_inputs_per_token(groups, shape)
        if training and entropy_weights:
            local, global_ = balancing.entropy_losses(
                probs, ids, g, mask=valid, threshold=self.global_entropy_threshold
            )
            if self.local_entropy_weight:
                self.add_loss(self.local_entropy_weight * local)
            if self.global_entropy_weight:
                self.add_loss(self.global_entropy_weight * global_)
        if self.num_groups is None:
            return None
        if training and self.group_balance_weight:
            self.add_loss(
                self.group_balance_weight
                * balancing.group_load_balancing_loss(
                    probs, expert_index, self.num_experts, ids, g, mask=valid
                )
            )
        load = balancing.group_expert_load(
            expert_index, self.num_experts, ids, g, mask=valid, selected=selected
        )
        self.group_expert_load.assign(ops.stop_gradient(load))
        return load

    def routing_stats(self):
        """The routing statistics of the last call, as NumPy values; with
        `num_groups`, also `group_expert_load` `(G, E)` and `group_names`."""
        stats = {
            "expert_load": ops.convert_to_numpy(self.expert_load),
            "dropped_fraction": float(ops.convert_to_numpy(self.dropped_fraction)),
            "load_balance_loss": float(
                ops.convert_to_numpy(self.load_balance_loss)
            ),
            "router_entropy": float(ops.convert_to_numpy(self.router_entropy)),
        }
        if self.group_expert_load is not None:
            stats["group_expert_load"] = ops.convert_to_numpy(self.group_expert_load)
            stats["group_names"] = list(self.group_names)
        return stats

    def compute_output_shape(self, input_shape):
        input_shape = check.token_input_shape(type(self).__name__, input_shape)
        return input_shape[:-1] + (self.output_dim or input_shape[-1],)

    def compute_output_spec(
        self,
        inputs,
        training=None,
        return_routing=False,
        routing_inputs=None,
        mask=None,
        groups=None,
    ):
        if return_routing:
            # Trace `call` itself for the nested routing structure.
            return super(keras.layers.Layer, self).compute_output_spec(
                inputs,
                training=training,
                return_routing=True,
                routing_inputs=routing_inputs,
                mask=mask,
                groups=groups,
            )
        return keras.KerasTensor(
            self.compute_output_shape(inputs.shape), dtype=self.compute_dtype
        )

    def pruned_config(self, kept):
        """This layer's config with the experts `kept` only (a sorted list
        of old indices), for `keras_moe.compression.prune_experts`:
        `num_experts = len(kept)`, the router's own `pruned_config(kept)`
        and its `k`. Shared experts are kept whole."""
        config = self.get_config()
        config["num_experts"] = len(kept)
        router = _pruning.pruning_hook(self.router, "pruned_config")(kept)
        config["k"] = router.get("k", self.k)
        if self.custom_router:
            config["router"] = _pruning.serialized_pruned_router(self.router, kept)
        return config

    def copy_pruned_weights(self, source, kept):
        """Copies the weights of `source` (the unpruned layer) into this
        pruned layer: the router through its own `copy_pruned_weights`; the
        kept experts' kernels and biases (int8 values and scales of a
        quantised bank) and their `expert_load`; everything else (shared
        experts and their gate) as it is."""
        _pruning.pruning_hook(self.router, "copy_pruned_weights")(source.router, kept)
        _pruning.copy_sliced(
            self, source, {source.num_experts: list(kept)}, exclude=("router",)
        )
        _pruning.copy_quantization_state(self, source)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_experts=self.num_experts,
            hidden_dim=self.hidden_dim,
            k=self.k,
            output_dim=self.output_dim,
            capacity_factor=self.capacity_factor,
            eval_capacity_factor=self.eval_capacity_factor,
            dispatch=self.dispatch,
            block_size=self.block_size,
            **expert_options_config(self.experts),
            glu_limit=self.experts.glu_limit,
            glu_linear_offset=self.experts.glu_linear_offset,
            output_scale=self.experts.output_scale,
            num_shared_experts=self.num_shared_experts,
            shared_hidden_dim=self.shared_hidden_dim,
            shared_expert_gate=self.shared_expert_gate,
            seed=self.seed,
            num_groups=self.num_groups,
            group_names=None if self.group_names is None else list(self.group_names),
            group_balance_weight=self.group_balance_weight,
            local_entropy_weight=self.local_entropy_weight,
            global_entropy_weight=self.global_entropy_weight,
            global_entropy_threshold=self.global_entropy_threshold,
        )
        if self.custom_router:
            config["router"] = keras.saving.serialize_keras_object(self.router)
        else:
            router = self.router.get_config()
            config.update(
                noisy_gating=router["noisy_gating"],
                load_balance_weight=router["load_balance_weight"],
                z_loss_weight=router["z_loss_weight"],
                router_kernel_initializer=router["kernel_initializer"],
            )
        return quantized_dtype_config(self, config)
