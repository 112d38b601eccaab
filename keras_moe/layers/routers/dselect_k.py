"""DSelect-k: a differentiable gate that selects (at most) k experts."""

import numbers

import keras
from keras import ops

from keras_moe.utils import validation as check
from keras_moe.layers.routers.base import Router, RoutingResult
from keras_moe.ops import balancing, selection
from keras_moe.utils.tensors import flat_mask


def smooth_step(t, gamma):
    """Hazimeh et al.'s smooth step: 0 below `-gamma/2`, 1 above `gamma/2`,
    and the cubic `-2/gamma^3 t^3 + 3/(2 gamma) t + 1/2` in between.

    It is continuously differentiable, and exactly 0 or 1 (with a zero
    gradient) outside `(-gamma/2, gamma/2)`, which is what makes the gate
    exactly sparse.
    """
    half = gamma / 2.0
    inner = ops.clip(t, -half, half)
    cubic = (-2.0 / gamma**3) * inner**3 + (1.5 / gamma) * inner + 0.5
    zero = ops.zeros_like(t)
    one = ops.ones_like(t)
    return ops.where(
        ops.less_equal(t, -half),
        zero,
        ops.where(ops.greater_equal(t, half), one, cubic),
    )


def num_code_bits(num_experts):
    """`m = ceil(log2 E)` (at least 1): the bits of a selector's code."""
    return max(1, (int(num_experts) - 1).bit_length())


@keras.saving.register_keras_serializable(package="keras_moe")
class DSelectKRouter(Router):
    """DSelect-k router (per-example version): at most `k` experts per
    token, chosen by a differentiable, exactly sparse gate.

    Each of the `k` selectors `i` reads `m = ceil(log2 E)` binary-code
    logits `z_i = x W_z^(i) + b_z^(i)` through the smooth step `S` (see
    `smooth_step`) and puts on code `c` (bits `c_b`, bit 0 least significant)
    the probability

    `r_i(c) = prod_b (S(z_{i,b}) if c_b = 1 else 1 - S(z_{i,b}))`

    (codes `>= E` are dropped and `r_i` renormalised over the `E` experts;
    if a selector puts all its mass on dropped codes, it contributes 0). The
    selectors are mixed by `alpha = softmax(x W_a + b_a)` (`k` weights):

    `w = sum_i alpha_i r_i`   (a distribution over the `E` experts)

    Once every bit is saturated (`|z| >= gamma / 2`) each `r_i` is one-hot,
    so `w` has at most `k` non-zero entries, exactly. The entropy
    regulariser `sum_i H(r_i)` (mean over tokens), added with
    `entropy_weight` in training, pushes each selector to a single expert.

    For `SparseMoE`, `expert_index` is the top-`k` of `w` and
    `combine_weights` are those entries of `w`, not renormalised (they sum
    to at most 1; all the mass of `w` once the gate is sparse).

    Args:
        num_experts: `E`.
        k: number of selectors (experts per token at most), `1 <= k <= E`.
        gamma: width `gamma > 0` of the smooth step's transition region.
        entropy_weight: weight of the entropy regulariser (>= 0).
        kernel_initializer: initializer of `W_z` and `W_a` (default: uniform
            variance scaling with scale `(gamma / 10)^2`, so that the codes
            start inside the smooth region).
        use_bias: learn the biases `b_z`, `b_a`.
        seed: seed of the default kernel initializer.
        **kwargs: base `Layer` arguments; `dtype` defaults to `"float32"`.

    Call arguments:
        inputs: `(..., d)` tokens.
        training: whether to add the entropy loss.
        mask: optional bool, one per token: tokens that count in the
            entropy loss.

    Returns:
        A `RoutingResult` with `expert_index` `(..., k)` int32, `combine_weights`
        `(..., k)`, `probs` `(..., E)` (the gate `w`), `selector_weights`
        `(..., k)` (`alpha`), `selector_probs` `(..., k, E)` (the `r_i`) and
        the scalar unweighted `entropy_loss`.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> router = DSelectKRouter(num_experts=6, k=2, seed=0)
    >>> routing = router(np.random.rand(5, 16).astype("float32"))
    >>> tuple(routing["expert_index"].shape), tuple(routing["probs"].shape)
    ((5, 2), (5, 6))
    >>> bool(np.allclose(keras.ops.convert_to_numpy(routing["probs"]).sum(-1), 1.0, atol=1e-5))
    True

    References:
        Hazimeh et al. DSelect-k: Differentiable Selection in the Mixture
        of Experts with Applications to Multi-Task Learning (NeurIPS 2021).
    """

    routing_fields = ("entropy_loss",)

    def __init__(
        self,
        num_experts,
        k=2,
        gamma=1.0,
        entropy_weight=0.01,
        kernel_initializer=None,
        use_bias=True,
        seed=None,
        **kwargs,
    ):
        super().__init__(num_experts, k=k, **kwargs)
        if (
            isinstance(gamma, bool)
            or not isinstance(gamma, numbers.Real)
            or not 0 < gamma < float("inf")
        ):
            raise ValueError(
                f"gamma must be a finite number > 0. Received: gamma={gamma!r}"
            )
        self.gamma = float(gamma)
        self.entropy_weight = check.non_negative_float(
            "entropy_weight", entropy_weight
        )
        self.kernel_initializer = (
            None
            if kernel_initializer is None
            else check.initializer("kernel_initializer", kernel_initializer)
        )
        self.use_bias = check.boolean("use_bias", use_bias)
        # The second kernel's initializer is seeded `seed + 1`.
        seed = check.seed("seed", seed)
        if seed is not None and seed >= check.MAX_SEED:
            raise ValueError(
                f"seed must be None or an integer in [0, {check.MAX_SEED - 1}]. "
                f"Received: seed={seed!r}"
            )
        self.seed = seed
        self.num_bits = num_code_bits(self.num_experts)

    def _initializer(self, offset):
        if self.kernel_initializer is not None:
            return self.kernel_initializer
        return keras.initializers.VarianceScaling(
            scale=(self.gamma / 10.0) ** 2,
            mode="fan_in",
            distribution="uniform",
            seed=None if self.seed is None else self.seed + offset,
        )

    def build(self, input_shape):
        if self.built:  # e.g. deserialized built, then built again by SparseMoE
            return
        input_shape = check.token_input_shape(type(self).__name__, input_shape)
        d = input_shape[-1]
        self.code_kernel = self.add_weight(
            name="code_kernel",
            shape=(d, self.k * self.num_bits),
            initializer=self._initializer(0),
        )
        self.selector_kernel = self.add_weight(
            name="selector_kernel",
            shape=(d, self.k),
            initializer=self._initializer(1),
        )
        if self.use_bias:
            self.code_bias = self.add_weight(
                name="code_bias", shape=(self.k * self.num_bits,), initializer="zeros"
            )
            self.selector_bias = self.add_weight(
                name="selector_bias", shape=(self.k,), initializer="zeros"
            )
        else:
            self.code_bias = self.selector_bias = None

    def call(self, inputs, training=None, mask=None):
        x = ops.cast(inputs, self.compute_dtype)
        lead = tuple(ops.shape(x)[:-1])
        z = ops.matmul(x, self.code_kernel)
        a = ops.matmul(x, self.selector_kernel)
        if self.use_bias:
            z = z + self.code_bias
            a = a + self.selector_bias
        s = smooth_step(ops.reshape(z, lead + (self.k, self.num_bits)), self.gamma)
        # r over the 2^m codes, built bit by bit: code = sum_b bit_b 2^b.
        r = ops.ones(lead + (self.k, 1), dtype=self.compute_dtype)
        for b in range(self.num_bits):
            bit = s[..., b : b + 1]
            r = ops.concatenate([r * (1.0 - bit), r * bit], axis=-1)
        r = r[..., : self.num_experts]
        if self.num_experts == 1:
            r = ops.ones_like(r)
        elif self.num_experts < 2**self.num_bits:
            total = ops.sum(r, axis=-1, keepdims=True)
            r = r / ops.where(ops.greater(total, 0.0), total, ops.ones_like(total))
        alpha = ops.softmax(a, axis=-1) if self.k > 1 else ops.ones_like(a)
        w = ops.sum(ops.expand_dims(alpha, -1) * r, axis=-2)
        combine_weights, expert_index = selection.top_k(w, self.k)
        positive = ops.greater(r, 0.0)
        r_log_r = ops.where(
            positive, r * ops.log(ops.where(positive, r, ops.ones_like(r))), 0.0
        )
        entropy = -ops.sum(r_log_r, axis=(-2, -1))
        entropy_loss = balancing.masked_mean(
            ops.reshape(entropy, (-1,)),
            flat_mask(mask),
        )
        routing = RoutingResult(
            expert_index=expert_index,
            combine_weights=combine_weights,
            probs=w,
            selector_weights=alpha,
            selector_probs=r,
            entropy_loss=entropy_loss,
        )
        self.add_weighted_losses(
            routing, training, {"entropy_loss": self.entropy_weight}
        )
        return routing

    def routing_shapes(self, lead, training=None):
        shapes = super().routing_shapes(lead, training=training)
        shapes["selector_weights"] = tuple(lead) + (self.k,)
        shapes["selector_probs"] = tuple(lead) + (self.k, self.num_experts)
        return shapes

    def pruned_config(self, kept):
        """This router's config for the experts `kept` only.

        The selectors address experts by binary code, so only a prefix of
        the experts, `kept = [0, ..., E' - 1]`, with `k <= E'`, can be kept:
        the codes of those experts keep their low `ceil(log2 E')` bits
        (the higher bits are 0 for every kept code, so their factor is
        common to all kept codes and cancels in the renormalisation).
        Anything else raises a `ValueError` (renumbering the experts would
        change which code means which expert: retrain instead).
        """
        count = len(kept)
        if list(kept) != list(range(count)):
            raise ValueError(
                f"DSelectKRouter {self.name!r} addresses experts by binary "
                "codes and can only keep a prefix of its experts, "
                f"[0, ..., E' - 1]. Received: kept={list(kept)!r}"
            )
        if self.k > count:
            raise ValueError(
                f"DSelectKRouter {self.name!r} has k={self.k} selectors and "
                f"cannot keep fewer experts. Received: kept={list(kept)!r}"
            )
        return super().pruned_config(kept)

    def copy_pruned_weights(self, source, kept):
        """Copies `source`'s weights, keeping the low `ceil(log2 E')` code
        bits of every selector (see `pruned_config`)."""
        old_bits, new_bits = source.num_bits, self.num_bits
        kernel = ops.convert_to_numpy(source.code_kernel)
        kernel = kernel.reshape(kernel.shape[0], self.k, old_bits)[..., :new_bits]
        self.code_kernel.assign(kernel.reshape(kernel.shape[0], -1))
        self.selector_kernel.assign(ops.convert_to_numpy(source.selector_kernel))
        if self.use_bias:
            bias = ops.convert_to_numpy(source.code_bias)
            bias = bias.reshape(self.k, old_bits)[:, :new_bits]
            self.code_bias.assign(bias.reshape(-1))
            self.selector_bias.assign(ops.convert_to_numpy(source.selector_bias))

    def get_config(self):
        config = super().get_config()
        config.update(
            gamma=self.gamma,
            entropy_weight=self.entropy_weight,
            kernel_initializer=(
                None
                if self.kernel_initializer is None
                else keras.initializers.serialize(self.kernel_initializer)
            ),
            use_bias=self.use_bias,
            seed=self.seed,
        )
        return config
