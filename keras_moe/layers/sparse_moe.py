"""`SparseMoE`: the sparsely-gated Mixture-of-Experts feed-forward layer.

The layer holds what is its own (the router, the routed and shared expert
banks, the group terms, the statistics variables) and runs the routed
pipeline of `keras_moe.ops.pipeline`: tokens -> route -> plan (the path
chosen by `keras_moe.ops.planning.choose_path`) -> experts -> statistics.
"""

import keras
from keras import ops

from keras_moe.layers import _pruning
from keras_moe.layers._groups import group_terms, init_group_options
from keras_moe.layers._multitask import check_call_input
from keras_moe.layers._router_options import (
    check_causal_router,
    make_router,
    pop_router_options,
    router_options_config,
)
from keras_moe.layers._shared_experts import init_shared_options, shared_outputs
from keras_moe.layers._routing_ids import full_rank, ids_per_token
from keras_moe.layers._routing_ids import router_tokens as router_tokens_of
from keras_moe.layers._stats import record, statistic
from keras_moe.layers.expert_bank import (
    expert_options_config,
    make_experts,
    pop_expert_options,
    quantized_dtype_config,
)
from keras_moe.ops import pipeline, planning
from keras_moe.utils import validation as check
from keras_moe.utils.layouts import constrain, has_tensor_layout

DISPATCH_MODES = ("sparse", "dense")
# The intermediate tensors that a distribution may lay out (`constrain`),
# with the expert axis first like the expert weights: the `(E, C, d)`
# buffers and the `(E, C, o)` expert outputs (`keras_moe.distribution`).
EXPERT_TENSORS = ("expert_buffers", "expert_outputs")


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
        block_size: rows per block of the dropless block path, at most 4096
            (a call computes up to `E (block_size - 1)` padding rows); `None`
            (default) picks one per shape (`keras_moe.ops.default_block_size`).
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
            a `TopKRouter` built from `k` and the router options below.
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
        causal: `True` for a causal (autoregressive) model: no token's
            output may depend on a later token. The capacity path then
            places pairs token-major (all choices of an earlier token, in
            the flattened `(batch, time)` order, before any of a later one),
            so whether a token is dropped depends only on the tokens before
            it; routers that place tokens themselves (expert choice, BASE)
            or order them by confidence (batch-prioritized routing) look at
            every token and are refused. Dropless routing is causal either
            way. Default False.
        **kwargs: base `Layer` arguments, and:

            - expert options, for the routed and the shared experts (see
              `Experts`): `activation` (default `"gelu"`; a Keras
              activation, or `"gelu_approximate"` / `"quick_gelu"`),
              `gated` (GLU experts; with `activation="silu"`, SwiGLU),
              `use_bias`, `kernel_initializer`, `bias_initializer`,
              `kernel_regularizer`, `bias_regularizer`, `glu_limit` and
              `glu_linear_offset` (GPT-OSS's clamped GLU), `output_scale`
              (a learned output scale per expert);
            - options of the default router (a `ValueError` with
              `router=`: pass them to your router instead):
              `noisy_gating` (default False), `load_balance_weight`
              (default 0.01), `z_loss_weight` (default 0),
              `router_kernel_initializer` (default: Switch's truncated
              normal with 0.1 x LeCun scale), `seed` (of the gating noise).

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
        num_shared_experts=0,
        shared_hidden_dim=None,
        shared_expert_gate=None,
        router=None,
        num_groups=None,
        group_names=None,
        group_balance_weight=0.0,
        local_entropy_weight=0.0,
        global_entropy_weight=0.0,
        global_entropy_threshold=None,
        causal=False,
        **kwargs,
    ):
        expert_options = pop_expert_options(kwargs)
        router_options = pop_router_options(kwargs)
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
        self.causal = check.boolean("causal", causal)
        init_shared_options(
            self, num_shared_experts, shared_hidden_dim, shared_expert_gate
        )
        init_group_options(
            self,
            num_groups,
            group_names,
            group_balance_weight,
            local_entropy_weight,
            global_entropy_weight,
            global_entropy_threshold,
        )
        self.router, self.custom_router = make_router(
            router, self.num_experts, k, router_options
        )
        if self.causal:
            check_causal_router(self.router)
        self.experts = make_experts(
            self, self.num_experts, self.hidden_dim, expert_options, self.output_dim
        )
        self.shared_experts = (
            make_experts(
                self,
                self.num_shared_experts,
                self.shared_hidden_dim or self.hidden_dim,
                expert_options,
                self.output_dim,
                name="shared_experts",
            )
            if self.num_shared_experts
            else None
        )

    @property
    def k(self):
        """Experts per token: the router's `k` (stored there only)."""
        return self.router.k

    @property
    def seed(self):
        """The default router's noise seed (`None` with a custom router)."""
        return None if self.custom_router else self.router.seed

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

    def _layout(self, tensor, name):
        return constrain(tensor, self, name)

    def call(
        self,
        inputs,
        training=None,
        return_routing=False,
        routing_inputs=None,
        mask=None,
        groups=None,
    ):
        check_call_input(self, inputs.shape, self.experts.kernel_in.shape[1])
        view = pipeline.token_view(inputs, mask, self.name, self.compute_dtype)
        router_tokens = view.tokens
        if routing_inputs is not None and full_rank(routing_inputs, view.shape):
            router_tokens = pipeline.mask_rows(
                router_tokens_of(
                    self.name, routing_inputs, view.shape, self.compute_dtype
                ),
                view.valid,
            )
            routing_inputs = None
        if routing_inputs is not None:
            routing_inputs = ids_per_token(self.name, routing_inputs, view.shape)
        factor = planning.capacity_factor_for(
            training, self.capacity_factor, self.eval_capacity_factor
        )
        routing, capacity = pipeline.route(
            self.router,
            router_tokens,
            self.num_experts,
            self.k,
            factor,
            valid=view.valid,
            training=training,
            routing_inputs=routing_inputs,
        )
        path = planning.choose_path(
            factor,
            [self.router],
            self.experts,
            self.dispatch,
            sharded=has_tensor_layout(self, EXPERT_TENSORS[0]),
        )
        plan, selected = planning.plan_dispatch(
            routing,
            self.num_experts,
            capacity,
            valid=view.valid,
            path=path,
            block_size=self.block_size,
            order="token" if self.causal else "choice",
        )
        weights = routing["combine_weights"]
        outputs = pipeline.run_plan(
            view.tokens, plan, weights, self.experts, training, self._layout
        )
        if self.shared_experts is not None:
            outputs = outputs + shared_outputs(self, view.tokens)
        outputs = view.restore(outputs)

        probs = ops.reshape(
            ops.cast(routing["probs"], "float32"), (-1, self.num_experts)
        )
        stats = pipeline.routing_statistics(plan, selected, probs, view.valid)
        balance = routing.get("load_balance_loss", ops.zeros(()))
        record(self, load_balance_loss=balance, **stats)
        group_load = group_terms(
            self,
            groups,
            view.shape,
            probs,
            plan["expert_index"],
            selected,
            view.valid,
            training,
        )
        if group_load is not None:
            record(self, group_expert_load=group_load)
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
            "expert_load": stats["expert_load"],
            "dropped_fraction": stats["dropped_fraction"],
        }

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
            num_shared_experts=self.num_shared_experts,
            shared_hidden_dim=self.shared_hidden_dim,
            shared_expert_gate=self.shared_expert_gate,
            num_groups=self.num_groups,
            group_names=None if self.group_names is None else list(self.group_names),
            group_balance_weight=self.group_balance_weight,
            local_entropy_weight=self.local_entropy_weight,
            global_entropy_weight=self.global_entropy_weight,
            global_entropy_threshold=self.global_entropy_threshold,
            causal=self.causal,
        )
        if self.custom_router:
            config["router"] = keras.saving.serialize_keras_object(self.router)
        else:
            config.update(router_options_config(self.router))
        return quantized_dtype_config(self, config)

