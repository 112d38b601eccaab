"""Token-choice top-k routing: noisy top-k, Switch, V-MoE, DeepSeek-V3."""

import keras
import numpy as np
from keras import ops

from keras_moe.utils import validation as check
from keras_moe.layers.routers.base import (
    Router,
    RoutingResult,
    default_router_initializer,
)
from keras_moe.ops import balancing, dispatching, selection
from keras_moe.utils.tensors import flat_mask, softmax

SCORE_FUNCTIONS = ("softmax", "sigmoid")
INPUT_NORMS = ("rms",)


@keras.saving.register_keras_serializable(package="keras_moe")
class TopKRouter(Router):
    """Token-choice top-k router: noisy top-k, Switch, V-MoE and DeepSeek-V3
    routing and every balancing method for them, behind one layer.

    For a token `x` with router logits `l = x' W_r (+ b)` (plus, in training
    with `noisy_gating=True`, the learned noise `eps * softplus(x W_noise)`,
    `eps ~ N(0, 1)`), where `x' = x` by default or, with the input options,

    `x' = rms(x) * m * a`,  `rms(x) = x / sqrt(mean(x^2) + epsilon)`

    (`input_norm="rms"`: a parameter-free RMS normalisation; `m =
    input_multiplier`, a constant; `a` a learned per-feature scale `(d,)`,
    initialised to ones, with `learned_input_scale=True`; Gemma 4 uses all
    three with `m = d^-0.5`), the scores are `s = softmax(l)` (default) or
    `s = sigmoid(l)` (`score_function="sigmoid"`, DeepSeek-V3). Then

    `I = top_k(s + beta)`, `w_j = s_{I_j} / sum_{i in I} s_i`

    where `beta` is the per-expert selection bias of auxiliary-loss-free
    balancing (zero unless `bias_update_rate > 0`; it changes which experts
    are picked, never the weights). The renormalisation applies for `k > 1`
    (and always for sigmoid scores); with softmax and `k = 1` the weight is
    the raw probability (Switch), so the task loss still trains the router.

    Group-limited routing (DeepSeek-V3's `n_group` / `topk_group`): with
    `num_expert_groups=G` and `top_expert_groups=M`, the experts form `G`
    groups of `E / G` consecutive experts; each token scores a group by the
    sum of its two largest `s + beta`, keeps its `M` best groups, and takes
    its top `k` in them (`ops.limit_to_top_groups`); the weights are as
    above. Router jitter (Switch, Mixtral): with `jitter_noise=eps`, in
    training the router's input is multiplied elementwise by
    `u ~ U(1 - eps, 1 + eps)` before the input options; inference is
    unchanged.
    The router runs in float32 whatever the global dtype policy (pass
    `dtype=` to override), since a softmax over bfloat16 logits routes badly.

    Balancing, all combinable, each computed on every call and returned
    unweighted; in training, `weight * loss` is added with `add_loss`:

    - `load_balance_weight`: Switch/GShard loss `E sum_e f_e P_e`, with `P`
      the router distribution before top-k (`keras_moe.ops.
      load_balancing_loss`).
    - `importance_weight`: Shazeer's `CV(importance)^2`, importance = the
      sum over tokens of the gate weights.
    - `load_weight`: Shazeer's `CV(load)^2` with the smooth load estimator
      of noisy top-k (needs `noisy_gating=True`).
    - `z_loss_weight`: ST-MoE router z-loss.
    - `bias_update_rate` (`gamma`): auxiliary-loss-free balancing. After
      each training call, `beta_e += gamma * sign(mean load - load_e)`: a
      non-trainable state outside the optimizer that saves and loads.

    `batch_prioritized=True` (V-MoE): when an expert overflows its capacity,
    the tokens with the highest top-1 score keep their place, not the
    earliest ones.

    Args:
        num_experts: `E`.
        k: experts per token, `1 <= k <= E`.
        score_function: `"softmax"` or `"sigmoid"`.
        noisy_gating: add trainable, input-dependent Gaussian noise to the
            logits in training (Shazeer et al. 2017).
        renormalize: renormalise the top-k weights to sum to 1: `True` for
            `k > 1` (at `k = 1` a softmax router keeps the raw probability,
            as Switch does, so the task loss trains the router), `"always"`
            also at `k = 1` (weight 1.0, as keras-hub's Mixtral and
            Qwen-MoE blocks), `False` never.
        batch_prioritized: order the tokens by top-1 score for capacity.
        use_bias: add a (trainable) bias to the router logits.
        input_norm: `None` (default) or `"rms"`: normalise the router's
            input by its root mean square (no learned parameters).
        input_norm_epsilon: the `epsilon` of `input_norm` (default 1e-6).
        input_multiplier: a constant `m` the router's input is multiplied
            by (after `input_norm`; default 1.0).
        learned_input_scale: multiply the router's input by a learned
            per-feature scale (`input_scale`, `(d,)`, initialised to ones;
            default False).
        load_balance_weight: weight of the Switch load-balancing loss.
        importance_weight: weight of the importance CV^2 loss.
        load_weight: weight of the (noisy) load CV^2 loss.
        z_loss_weight: weight of the router z-loss.
        bias_update_rate: step of the aux-loss-free selection bias (0: off).
        kernel_initializer: router kernel initializer (default: truncated
            normal with 0.1 x LeCun variance, as in Switch).
        kernel_regularizer: router kernel regularizer.
        seed: seed of the gating noise and of the jitter.
        jitter_noise: `eps` in [0, 1) of the multiplicative router jitter in
            training (default 0: off).
        num_expert_groups: `None` (default) or `G`, dividing `E`: routing
            limited to the `top_expert_groups` best of `G` expert groups.
        top_expert_groups: `M`, `1 <= M <= G` with `k <= M E / G` (needs
            `num_expert_groups`).
        **kwargs: base `Layer` arguments; `dtype` defaults to `"float32"`.

    Call arguments:
        inputs: `(..., d)` tokens.
        training: whether to add noise, losses and bias updates.
        mask: optional bool, `inputs.shape[:-1]` or `(N,)`: tokens that
            count. Masked tokens (padding) are still routed (the layer
            drops their pairs) but add nothing to any loss or bias update.

    Returns:
        A `RoutingResult` with `expert_index` `(..., k)` int32, `combine_weights`
        `(..., k)`, `probs` `(..., E)` (the scores normalised to sum to 1),
        `logits` `(..., E)`, `priority` `(...)` (top-1 score, only with
        `batch_prioritized`) and the scalar unweighted losses
        `load_balance_loss`, `importance_loss`, `z_loss` and, with noisy
        gating, `load_loss`.

    Example:

    >>> import numpy as np
    >>> router = TopKRouter(num_experts=8, k=2)
    >>> routing = router(np.random.rand(5, 16).astype("float32"))
    >>> tuple(routing["expert_index"].shape), tuple(routing["probs"].shape)
    ((5, 2), (5, 8))

    References:
        Shazeer et al. Outrageously Large Neural Networks: The
        Sparsely-Gated Mixture-of-Experts Layer (2017).
        Lepikhin et al. GShard (2020). Fedus, Zoph, Shazeer. Switch
        Transformers (2021). Riquelme et al. Scaling Vision with Sparse
        Mixture of Experts (V-MoE, 2021). Zoph et al. ST-MoE (2022).
        Wang et al. Auxiliary-Loss-Free Load Balancing Strategy for
        Mixture-of-Experts (2024); DeepSeek-AI, DeepSeek-V3 (2024; group
        limited routing). Jiang et al. Mixtral of Experts (2024; jitter).
    """

    routing_fields = ("logits", "load_balance_loss", "importance_loss", "z_loss")

    def __init__(
        self,
        num_experts,
        k=2,
        score_function="softmax",
        noisy_gating=False,
        renormalize=True,
        batch_prioritized=False,
        use_bias=False,
        load_balance_weight=0.01,
        importance_weight=0.0,
        load_weight=0.0,
        z_loss_weight=0.0,
        bias_update_rate=0.0,
        kernel_initializer=None,
        kernel_regularizer=None,
        seed=None,
        input_norm=None,
        input_norm_epsilon=1e-6,
        input_multiplier=1.0,
        learned_input_scale=False,
        jitter_noise=0.0,
        num_expert_groups=None,
        top_expert_groups=None,
        **kwargs,
    ):
        super().__init__(num_experts, k=k, **kwargs)
        self.score_function = check.one_of(
            "score_function", score_function, SCORE_FUNCTIONS
        )
        self.noisy_gating = check.boolean("noisy_gating", noisy_gating)
        if not (isinstance(renormalize, str) and renormalize == "always"):
            try:
                renormalize = check.boolean("renormalize", renormalize)
            except ValueError:
                raise ValueError(
                    "renormalize must be True, False or 'always'. Received: "
                    f"renormalize={renormalize!r}"
                ) from None
        self.renormalize = renormalize
        self.batch_prioritized = check.boolean("batch_prioritized", batch_prioritized)
        self.use_bias = check.boolean("use_bias", use_bias)
        self.input_norm = None if input_norm is None else check.one_of(
            "input_norm", input_norm, INPUT_NORMS
        )
        self.input_norm_epsilon = check.positive_float(
            "input_norm_epsilon", input_norm_epsilon
        )
        self.input_multiplier = check.finite_float(
            "input_multiplier", input_multiplier
        )
        self.learned_input_scale = check.boolean(
            "learned_input_scale", learned_input_scale
        )
        for name, value in (
            ("load_balance_weight", load_balance_weight),
            ("importance_weight", importance_weight),
            ("load_weight", load_weight),
            ("z_loss_weight", z_loss_weight),
            ("bias_update_rate", bias_update_rate),
        ):
            setattr(self, name, check.non_negative_float(name, value))
        if self.load_weight and not self.noisy_gating:
            raise ValueError(
                "The load loss estimates load from the gating noise and needs "
                f"noisy_gating=True. Received: load_weight={load_weight}, "
                "noisy_gating=False"
            )
        self.kernel_initializer = check.initializer(
            "kernel_initializer", kernel_initializer or default_router_initializer()
        )
        self.kernel_regularizer = check.regularizer(
            "kernel_regularizer", kernel_regularizer
        )
        self.seed = check.seed("seed", seed)
        self.jitter_noise = check.dropout_rate("jitter_noise", jitter_noise)
        self._init_groups(num_expert_groups, top_expert_groups)
        if self.noisy_gating or self.jitter_noise:
            self.seed_generator = keras.random.SeedGenerator(seed)

    def _init_groups(self, num_expert_groups, top_expert_groups):
        if num_expert_groups is None:
            if top_expert_groups is not None:
                raise ValueError(
                    "top_expert_groups limits the routing to groups of experts "
                    "and needs num_expert_groups. Received: "
                    f"top_expert_groups={top_expert_groups!r}"
                )
            self.num_expert_groups = self.top_expert_groups = None
            return
        e = self.num_experts
        groups = check.positive_int("num_expert_groups", num_expert_groups)
        if e % groups:
            raise ValueError(
                "num_expert_groups must divide num_experts. Received: "
                f"num_expert_groups={num_expert_groups!r}, num_experts={e}"
            )
        top = groups if top_expert_groups is None else check.positive_int(
            "top_expert_groups", top_expert_groups
        )
        if top > groups or self.k > top * (e // groups):
            raise ValueError(
                "top_expert_groups must be <= num_expert_groups and hold at "
                "least k experts (k <= top_expert_groups * num_experts / "
                f"num_expert_groups). Received: top_expert_groups={top}, "
                f"num_expert_groups={groups}, num_experts={e}, k={self.k}"
            )
        self.num_expert_groups, self.top_expert_groups = groups, top

    def build(self, input_shape):
        input_shape = check.token_input_shape(type(self).__name__, input_shape)
        d, e = input_shape[-1], self.num_experts
        self.add_router_kernel(
            d, self.kernel_initializer, self.kernel_regularizer, self.use_bias
        )
        # Shazeer et al. initialise the noise projection to zero.
        self.noise_kernel = (
            self.add_weight(name="noise_kernel", shape=(d, e), initializer="zeros")
            if self.noisy_gating
            else None
        )
        self.input_scale = (
            self.add_weight(name="input_scale", shape=(d,), initializer="ones")
            if self.learned_input_scale
            else None
        )
        self.selection_bias = (
            self.add_weight(
                name="selection_bias",
                shape=(e,),
                initializer="zeros",
                trainable=False,
                # Replicas (tf.distribute) apply the mean of their updates.
                aggregation="mean",
            )
            if self.bias_update_rate
            else None
        )

    def router_inputs(self, inputs, training=False):
        """`x'`: the inputs in the router's dtype, jittered (in training)
        and normalised and scaled as the input options say (the identity
        by default)."""
        x = ops.cast(inputs, self.compute_dtype)
        if training and self.jitter_noise:
            x = x * keras.random.uniform(
                ops.shape(x),
                minval=1.0 - self.jitter_noise,
                maxval=1.0 + self.jitter_noise,
                dtype=x.dtype,
                seed=self.seed_generator,
            )
        if self.input_norm == "rms":
            mean_square = ops.mean(ops.square(x), axis=-1, keepdims=True)
            x = x * ops.power(mean_square + self.input_norm_epsilon, -0.5)
        if self.input_multiplier != 1.0:
            x = x * self.input_multiplier
        if self.input_scale is not None:
            x = x * self.input_scale
        return x

    def compute_logits(self, inputs, training=False):
        """Returns `(clean logits, noisy logits or None, noise std or None)`."""
        x = self.router_inputs(inputs, training=training)
        logits = self.linear_logits(x)
        if not (self.noisy_gating and training):
            return logits, None, None
        noise_std = ops.softplus(ops.matmul(x, self.noise_kernel)) + 1e-6
        noise = keras.random.normal(
            ops.shape(logits), dtype=logits.dtype, seed=self.seed_generator
        )
        return logits, logits + noise * noise_std, noise_std

    def call(self, inputs, training=None, mask=None):
        clean, noisy, noise_std = self.compute_logits(inputs, training=training)
        logits = clean if noisy is None else noisy
        if self.score_function == "softmax":
            scores = softmax(logits, axis=-1)
            probs = scores
        else:
            scores = ops.sigmoid(logits)
            probs = scores / ops.sum(scores, axis=-1, keepdims=True)
        if self.selection_bias is not None or self.num_expert_groups:
            choice = ops.stop_gradient(scores)
            if self.selection_bias is not None:
                choice = choice + self.selection_bias
            if self.num_expert_groups:
                choice = selection.limit_to_top_groups(
                    choice, self.num_expert_groups, self.top_expert_groups
                )
            _, expert_index = selection.top_k(choice, self.k)
            top = ops.take_along_axis(scores, expert_index, axis=-1)
        else:
            top, expert_index = selection.top_k(scores, self.k)
        if self.renormalize == "always" or (
            self.renormalize and (self.k > 1 or self.score_function == "sigmoid")
        ):
            top = top / ops.sum(top, axis=-1, keepdims=True)

        e = self.num_experts
        flat_index = ops.reshape(expert_index, (-1, self.k))
        flat_probs = ops.reshape(probs, (-1, e))
        gates = dispatching.choice_matrix(
            ops.reshape(top, (-1, self.k)), flat_index, e
        )
        mask = flat_mask(mask)
        if mask is not None:  # padding adds nothing to a loss
            gates = ops.where(mask[:, None], gates, ops.zeros_like(gates))
        losses = {
            "load_balance_loss": balancing.load_balancing_loss(
                flat_probs, flat_index, e, mask=mask
            ),
            "importance_loss": balancing.cv_squared(balancing.token_sum(gates)),
            "z_loss": balancing.router_z_loss(
                ops.reshape(logits, (-1, e)), mask=mask
            ),
        }
        if noisy is not None:
            losses["load_loss"] = balancing.cv_squared(
                balancing.noisy_top_k_load(
                    ops.reshape(clean, (-1, e)),
                    ops.reshape(noisy, (-1, e)),
                    ops.reshape(noise_std, (-1, e)),
                    self.k,
                    mask=mask,
                )
            )
        self.add_weighted_losses(
            losses,
            training,
            {
                "load_balance_loss": self.load_balance_weight,
                "importance_loss": self.importance_weight,
                "load_loss": self.load_weight,
                "z_loss": self.z_loss_weight,
            },
        )
        if training:
            if self.selection_bias is not None:
                load = ops.mean(
                    balancing.masked_mean(
                        ops.one_hot(flat_index, e, dtype="float32"), mask
                    ),
                    axis=0,
                )
                step = self.bias_update_rate * ops.sign(ops.mean(load) - load)
                self.selection_bias.assign(self.selection_bias + step)
        routing = RoutingResult(
            expert_index=expert_index,
            combine_weights=top,
            probs=probs,
            logits=logits,
            **losses,
        )
        if self.batch_prioritized:
            routing["priority"] = ops.max(scores, axis=-1)
        return routing

    def routing_shapes(self, lead, training=None):
        shapes = super().routing_shapes(lead, training=training)
        if self.batch_prioritized:
            shapes["priority"] = tuple(lead)
        if self.noisy_gating and training:
            shapes["load_loss"] = ()
        return shapes

    def pruned_config(self, kept):
        """The base rule (`num_experts = len(kept)`), and with expert
        groups: the groups that keep experts stay (`M` capped at their
        count), which needs each of them to keep as many experts, so that
        consecutive experts still form the same groups."""
        config = super().pruned_config(kept)
        if not self.num_expert_groups:
            return config
        size = self.num_experts // self.num_expert_groups
        counts = np.bincount(np.asarray(kept) // size, minlength=self.num_expert_groups)
        left = counts[counts > 0]
        top = min(self.top_expert_groups, len(left))
        if len(set(left.tolist())) != 1 or config["k"] > top * left[0]:
            raise ValueError(
                "Pruning a group-limited router keeps its groups only if each "
                "group that keeps experts keeps as many of them, at least k "
                "in its top groups. Received: experts kept per group "
                f"{counts.tolist()}, k={config['k']}; pass keep={{layer: "
                "[indices]}} with as many experts in each group"
            )
        config.update(num_expert_groups=len(left), top_expert_groups=top)
        return config

    def get_config(self):
        config = super().get_config()
        config.update(
            score_function=self.score_function,
            noisy_gating=self.noisy_gating,
            renormalize=self.renormalize,
            batch_prioritized=self.batch_prioritized,
            use_bias=self.use_bias,
            load_balance_weight=self.load_balance_weight,
            importance_weight=self.importance_weight,
            load_weight=self.load_weight,
            z_loss_weight=self.z_loss_weight,
            bias_update_rate=self.bias_update_rate,
            kernel_initializer=keras.initializers.serialize(
                self.kernel_initializer
            ),
            kernel_regularizer=keras.regularizers.serialize(
                self.kernel_regularizer
            ),
            seed=self.seed,
            input_norm=self.input_norm,
            input_norm_epsilon=self.input_norm_epsilon,
            input_multiplier=self.input_multiplier,
            learned_input_scale=self.learned_input_scale,
            jitter_noise=self.jitter_noise,
            num_expert_groups=self.num_expert_groups,
            top_expert_groups=self.top_expert_groups,
        )
        return config
