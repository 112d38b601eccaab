"""Expert-choice routing: every expert picks its own tokens."""

import keras
from keras import ops

from keras_moe.utils import validation as check
from keras_moe.layers.routers.base import (
    Router,
    RoutingResult,
    default_router_initializer,
)
from keras_moe.ops import balancing
from keras_moe.ops import dispatching
from keras_moe.utils.tensors import flat_mask


@keras.saving.register_keras_serializable(package="keras_moe")
class ExpertChoiceRouter(Router):
    """Expert-choice router: each expert takes its top-`C` tokens.

    Token-choice routers let every token pick `k` experts, so popular experts
    overflow and others idle. Expert choice (Zhou et al. 2022) turns the
    selection around. For the `N` tokens of a call, with scores

    `S = softmax(X W_r (+ b))`, `S` of shape `(N, E)`, softmax over experts,

    expert `e` takes the `C` tokens with the highest `S[:, e]`:

    `keep[n, e] = n in top_C(S[:, e])`, `w[n, e] = keep[n, e] * S[n, e]`,

    `y(x_n) = sum_e w[n, e] * FFN_e(x_n)`.

    Every expert processes exactly `C` tokens, so the load is balanced by
    construction (no load-balancing loss, and `load_balance_loss` is 0); a
    token may be taken by any number of experts, from 0 (it then passes
    through the residual connection only) to `E`. `k` is the *average*
    number of experts per token: `C = ceil(k N / E)` when the router is
    called on its own, and inside `SparseMoE` the layer's capacity
    `C = min(N, ceil(k N / E * capacity_factor))` (use
    `capacity_factor=1.0` for the paper's `C = k N / E`; `None` makes every
    expert take every token).

    The router declares `assigns_positions = True`: it returns the
    token-major form of the router contract with one column per expert
    (`k' = E`): `expert_index[n] = (0, ..., E - 1)`, `keep[n, e]` whether
    expert `e` took token `n`, and `position[n, e]` the token's rank in
    expert `e`'s choice (its row in the expert's buffer; meaningless where
    `keep` is False). Ties in `S[:, e]` go in the backend's sort order. The
    selection is made of two `argsort`s over `(E, N)`, so it exports from
    every backend and compiles with XLA, and `C` may be a Python int or a
    scalar tensor (a dynamic batch size).

    The choice depends on the other tokens of the call (the batch), also at
    inference; for causal decoding this is the known limitation of expert
    choice. The router runs in float32 whatever the global dtype policy
    (pass `dtype=` to override).

    Args:
        num_experts: `E`.
        k: average experts per token, `1 <= k <= E`; sets the capacity.
        use_bias: add a (trainable) bias to the router logits.
        z_loss_weight: weight of the router z-loss (ST-MoE), added with
            `add_loss` in training.
        kernel_initializer: router kernel initializer (default: truncated
            normal with 0.1 x LeCun variance, as in Switch).
        kernel_regularizer: router kernel regularizer.
        **kwargs: base `Layer` arguments; `dtype` defaults to `"float32"`.

    Call arguments:
        inputs: `(..., d)` tokens; all `N` positions of the call compete.
        training: whether to add the z-loss.
        capacity: `C`, tokens per expert: a Python int or a scalar integer
            tensor, `1 <= C <= N`. Default `ceil(k N / E)` (at most `N`).
        mask: optional bool, `inputs.shape[:-1]` or `(N,)`: tokens that
            count. Experts never choose a masked token (and the default `C`
            counts only the others); the z-loss skips them.

    Returns:
        A `RoutingResult` with `expert_index` `(..., E)` int32, `combine_weights`
        `(..., E)`, `keep` `(..., E)` bool, `position` `(..., E)` int32,
        `probs` `(..., E)` (= `S`), `logits` `(..., E)`, and the scalar
        unweighted losses `load_balance_loss` (0) and `z_loss`.

    Example:

    >>> import numpy as np
    >>> router = ExpertChoiceRouter(num_experts=4, k=2)
    >>> routing = router(np.random.rand(6, 8).astype("float32"))
    >>> np.asarray(routing["keep"]).sum(axis=0).tolist()  # C = 2 * 6 / 4
    [3, 3, 3, 3]

    References:
        Zhou et al. Mixture-of-Experts with Expert Choice Routing
        (NeurIPS 2022). Zoph et al. ST-MoE (2022) for the z-loss.
    """

    token_independent = False

    assigns_positions = True
    routing_fields = ("logits", "load_balance_loss", "z_loss")

    def __init__(
        self,
        num_experts,
        k=2,
        use_bias=False,
        z_loss_weight=0.0,
        kernel_initializer=None,
        kernel_regularizer=None,
        **kwargs,
    ):
        super().__init__(num_experts, k=k, **kwargs)
        self.use_bias = check.boolean("use_bias", use_bias)
        self.z_loss_weight = check.non_negative_float("z_loss_weight", z_loss_weight)
        self.kernel_initializer = check.initializer(
            "kernel_initializer", kernel_initializer or default_router_initializer()
        )
        self.kernel_regularizer = check.regularizer(
            "kernel_regularizer", kernel_regularizer
        )

    def build(self, input_shape):
        if self.built:
            return
        input_shape = check.token_input_shape(type(self).__name__, input_shape)
        self.add_router_kernel(
            input_shape[-1],
            self.kernel_initializer,
            self.kernel_regularizer,
            self.use_bias,
        )

    @property
    def num_choices(self):
        """`E`: every token has one column per expert."""
        return self.num_experts

    def default_capacity(self, num_tokens):
        """`C = min(N, ceil(k N / E))`."""
        return dispatching.compute_capacity(num_tokens, self.num_experts, self.k, 1.0)

    def call(self, inputs, training=None, capacity=None, mask=None):
        e = self.num_experts
        shape = ops.shape(inputs)
        tokens = ops.reshape(ops.cast(inputs, self.compute_dtype), (-1, shape[-1]))
        num_tokens = ops.shape(tokens)[0]
        mask = flat_mask(mask)
        if capacity is None:
            capacity = self.default_capacity(
                num_tokens if mask is None else ops.sum(ops.cast(mask, "int32"))
            )

        logits = self.linear_logits(tokens)
        scores = ops.softmax(logits, axis=-1)  # (N, E)

        # Expert e's choice: its tokens by decreasing score. `order[e, i]`
        # is the token at rank i; `rank[e, n]`, the inverse permutation, is
        # token n's rank (a second argsort, so that `C` may be a tensor and
        # no shape depends on it).
        ranked = ops.stop_gradient(scores)
        if mask is not None:  # masked tokens rank last (scores are >= 0)
            ranked = ops.where(mask[:, None], ranked, -1.0)
        by_expert = ops.transpose(ranked)  # (E, N)
        order = ops.argsort(-by_expert, axis=-1)
        rank = ops.argsort(order, axis=-1)
        position = ops.cast(ops.transpose(rank), "int32")  # (N, E)
        keep = position < ops.cast(capacity, "int32")
        if mask is not None:
            keep = ops.logical_and(keep, mask[:, None])
        combine_weights = ops.where(keep, scores, ops.zeros_like(scores))
        expert_index = ops.broadcast_to(
            ops.arange(0, e, dtype="int32")[None, :], ops.shape(position)
        )

        z_loss = balancing.router_z_loss(logits, mask=mask)
        self.add_weighted_losses(
            {"z_loss": z_loss}, training, {"z_loss": self.z_loss_weight}
        )

        lead = tuple(shape[:-1])

        def unflatten(x):
            return ops.reshape(x, lead + (e,))

        return RoutingResult(
            expert_index=unflatten(expert_index),
            combine_weights=unflatten(combine_weights),
            keep=unflatten(keep),
            position=unflatten(position),
            probs=unflatten(scores),
            logits=unflatten(logits),
            load_balance_loss=ops.zeros((), dtype="float32"),
            z_loss=z_loss,
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            use_bias=self.use_bias,
            z_loss_weight=self.z_loss_weight,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            kernel_regularizer=keras.regularizers.serialize(self.kernel_regularizer),
        )
        return config
