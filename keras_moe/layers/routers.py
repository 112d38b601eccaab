"""Routers: who sends which token to which expert.

The router contract (what `SparseMoE(router=...)` accepts) is small, so that
token-choice, expert-choice, hashing, balanced-assignment or task routers all
plug into the same dispatch:

- A Keras layer with the attributes `num_experts` (`E`) and `k` (choices per
  token; for routers that choose their own assignment, the average number
  of experts per token used to size the capacity).
- `call(tokens, training=None)` on `(N, d)` tokens, plus a
  `routing_inputs=` argument for routers that route on ids (one per token),
  plus a `capacity=` argument if the class attribute `assigns_positions` is
  `True`.
- It returns a dict with at least `expert_index` `(N, k')` int32,
  `combine_weights` `(N, k')` and `probs` `(N, E)` (the router's
  distribution, used for statistics); optionally `priority` `(N,)` (tokens
  with higher priority are placed first when an expert overflows),
  `position` and `keep` `(N, k')` (the router placed the pairs itself; then
  `keep` marks the pairs it selected), and unweighted losses such as
  `load_balance_loss` and `z_loss`.
- It adds its weighted auxiliary losses itself with `add_loss` in training.
"""

import keras
from keras import ops

from keras_moe.layers import _validation as check
from keras_moe.ops import balancing, selection


def default_router_initializer():
    """Switch Transformer's router init: truncated normal, 0.1 x LeCun scale."""
    return keras.initializers.VarianceScaling(
        scale=0.1, mode="fan_in", distribution="truncated_normal"
    )


@keras.saving.register_keras_serializable(package="keras_moe")
class TopKRouter(keras.layers.Layer):
    """Token-choice top-k router (noisy top-k gating; `k=1` is Switch).

    For a token `x` with router logits `l = x W_r` (plus, in training with
    `noisy_gating=True`, the learned noise `eps * softplus(x W_noise)`,
    `eps ~ N(0, 1)`):

    `p = softmax(l)`, `I = top_k(p)`, `w_j = p_{I_j} / sum_{i in I} p_i`

    The renormalisation applies only for `k > 1`; with `k = 1` the weight is
    the raw probability `p_{I_1}` (as in Switch) so that the task loss still
    trains the router. The router runs in float32 whatever the global dtype
    policy (pass `dtype=` to override), since a softmax over bfloat16 logits
    routes badly.

    In training it adds `load_balance_weight * L_balance` (Switch, see
    `keras_moe.ops.load_balancing_loss`) and `z_loss_weight * L_z` (ST-MoE)
    with `add_loss`. Both values are also returned.

    Args:
        num_experts: `E`.
        k: experts per token, `1 <= k <= E`.
        noisy_gating: add trainable, input-dependent Gaussian noise to the
            logits in training (Shazeer et al. 2017).
        renormalize: renormalise the top-k weights to sum to 1 (`k > 1`).
        use_bias: add a bias to the router logits.
        load_balance_weight: weight of the Switch load-balancing loss.
        z_loss_weight: weight of the router z-loss.
        kernel_initializer: router kernel initializer (default: truncated
            normal with 0.1 x LeCun variance, as in Switch).
        kernel_regularizer: router kernel regularizer.
        seed: seed of the gating noise.
        **kwargs: base `Layer` arguments; `dtype` defaults to `"float32"`.

    Call arguments:
        inputs: `(..., d)` tokens.
        training: whether to add noise and losses.

    Returns:
        A dict with `expert_index` `(..., k)` int32, `combine_weights`
        `(..., k)`, `probs` `(..., E)`, `logits` `(..., E)` and the scalar
        unweighted losses `load_balance_loss` and `z_loss`.

    Example:

    >>> import numpy as np
    >>> router = TopKRouter(num_experts=8, k=2)
    >>> routing = router(np.random.rand(5, 16).astype("float32"))
    >>> tuple(routing["expert_index"].shape), tuple(routing["probs"].shape)
    ((5, 2), (5, 8))

    References:
        Shazeer et al. Outrageously Large Neural Networks: The
        Sparsely-Gated Mixture-of-Experts Layer (2017).
        Fedus, Zoph, Shazeer. Switch Transformers (2021).
        Zoph et al. ST-MoE (2022).
    """

    def __init__(
        self,
        num_experts,
        k=2,
        noisy_gating=False,
        renormalize=True,
        use_bias=False,
        load_balance_weight=0.01,
        z_loss_weight=0.0,
        kernel_initializer=None,
        kernel_regularizer=None,
        seed=None,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.num_experts = check.positive_int("num_experts", num_experts)
        self.k = check.k_for_experts(k, self.num_experts)
        self.noisy_gating = bool(noisy_gating)
        self.renormalize = bool(renormalize)
        self.use_bias = bool(use_bias)
        self.load_balance_weight = check.non_negative_float(
            "load_balance_weight", load_balance_weight
        )
        self.z_loss_weight = check.non_negative_float(
            "z_loss_weight", z_loss_weight
        )
        self.kernel_initializer = keras.initializers.get(
            kernel_initializer or default_router_initializer()
        )
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.seed = seed
        if self.noisy_gating:
            self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        input_shape = check.token_input_shape(type(self).__name__, input_shape)
        d = input_shape[-1]
        self.kernel = self.add_weight(
            name="kernel",
            shape=(d, self.num_experts),
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
        )
        self.bias = (
            self.add_weight(name="bias", shape=(self.num_experts,), initializer="zeros")
            if self.use_bias
            else None
        )
        # Shazeer et al. initialise the noise projection to zero.
        self.noise_kernel = (
            self.add_weight(
                name="noise_kernel", shape=(d, self.num_experts), initializer="zeros"
            )
            if self.noisy_gating
            else None
        )

    def compute_logits(self, inputs, training=False):
        x = ops.cast(inputs, self.compute_dtype)
        logits = ops.matmul(x, self.kernel)
        if self.use_bias:
            logits = logits + self.bias
        if self.noisy_gating and training:
            noise_std = ops.softplus(ops.matmul(x, self.noise_kernel))
            noise = keras.random.normal(
                ops.shape(logits), dtype=logits.dtype, seed=self.seed_generator
            )
            logits = logits + noise * noise_std
        return logits

    def call(self, inputs, training=None):
        logits = self.compute_logits(inputs, training=training)
        probs = ops.softmax(logits, axis=-1)
        top_probs, expert_index = selection.top_k(probs, self.k)
        if self.renormalize and self.k > 1:
            top_probs = top_probs / ops.sum(top_probs, axis=-1, keepdims=True)
        flat_probs = ops.reshape(probs, (-1, self.num_experts))
        balance = balancing.load_balancing_loss(
            flat_probs, ops.reshape(expert_index, (-1, self.k)), self.num_experts
        )
        z_loss = balancing.router_z_loss(ops.reshape(logits, (-1, self.num_experts)))
        if training:
            if self.load_balance_weight:
                self.add_loss(self.load_balance_weight * balance)
            if self.z_loss_weight:
                self.add_loss(self.z_loss_weight * z_loss)
        return {
            "expert_index": expert_index,
            "combine_weights": top_probs,
            "probs": probs,
            "logits": logits,
            "load_balance_loss": balance,
            "z_loss": z_loss,
        }

    def compute_output_shape(self, input_shape):
        input_shape = check.token_input_shape(type(self).__name__, input_shape)
        lead = input_shape[:-1]
        return {
            "expert_index": lead + (self.k,),
            "combine_weights": lead + (self.k,),
            "probs": lead + (self.num_experts,),
            "logits": lead + (self.num_experts,),
            "load_balance_loss": (),
            "z_loss": (),
        }

    def compute_output_spec(self, inputs, training=None):
        shapes = self.compute_output_shape(inputs.shape)
        return {
            name: keras.KerasTensor(
                shape, dtype="int32" if name == "expert_index" else self.compute_dtype
            )
            for name, shape in shapes.items()
        }

    def get_config(self):
        config = super().get_config()
        config.update(
            num_experts=self.num_experts,
            k=self.k,
            noisy_gating=self.noisy_gating,
            renormalize=self.renormalize,
            use_bias=self.use_bias,
            load_balance_weight=self.load_balance_weight,
            z_loss_weight=self.z_loss_weight,
            kernel_initializer=keras.initializers.serialize(
                self.kernel_initializer
            ),
            kernel_regularizer=keras.regularizers.serialize(
                self.kernel_regularizer
            ),
            seed=self.seed,
        )
        return config
