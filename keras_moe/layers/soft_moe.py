"""`SoftMoE`: every expert slot is a soft mixture of all the tokens of a
sequence (Puigcerver et al. 2024); fully differentiable, no routing."""

import keras
from keras import ops

from keras_moe.layers import _pruning
from keras_moe.layers._stats import statistic
from keras_moe.layers.expert_bank import (
    expert_options_config,
    make_experts,
    pop_expert_options,
    quantized_dtype_config,
)
from keras_moe.utils import validation as check
from keras_moe.utils.tensors import softmax


@keras.saving.register_keras_serializable(package="keras_moe")
class SoftMoE(keras.layers.Layer):
    """Soft Mixture-of-Experts: experts process soft mixtures of tokens.

    For a sequence `X` of `T` tokens `(T, d)` and slot parameters
    `Phi (d, E * S)` (`S = slots_per_expert`), with logits `L = X Phi`:

    - dispatch weights `D = softmax_T(L)` (each slot is a convex combination
      of all tokens), slots `X~ = D^T X` `(E * S, d)`;
    - expert `e` processes its `S` slots: `Y~ = FFN_e(X~)`;
    - combine weights `C = softmax_{E*S}(L)` (each token is a convex
      combination of all slot outputs), `Y = C Y~` `(T, o)`.

    Nothing is dropped and everything is differentiable: every token reaches
    every slot with a positive weight. The cost is that of `E * S` tokens
    per sequence, whatever `T`. Tokens are mixed within a sequence only
    (never across the batch), so the input must be `(B, T, d)`; for
    autoregressive decoding, where a token may not see later tokens, Soft
    MoE does not apply.

    With `normalize=True` (the paper's recipe for large `d`), `X` and the
    columns of `Phi` are L2-normalised and the logits scaled by a learned
    scalar initialised to 1.

    Args:
        num_experts: `E`.
        hidden_dim: hidden width of each expert.
        slots_per_expert: `S`.
        output_dim: output width; defaults to the input width.
        normalize: L2-normalise tokens and slot parameters.
        slot_initializer: initializer of `Phi` (default LeCun normal, as in
            the paper).
        **kwargs: base `Layer` arguments, and the expert options (see
            `Experts`): `activation` (default `"gelu"`), `gated`,
            `use_bias`, `kernel_initializer`, `bias_initializer`,
            `kernel_regularizer`, `bias_regularizer`, `glu_limit`,
            `glu_linear_offset`, `output_scale`.

    Call arguments:
        inputs: `(B, T, d)`.
        mask: bool `(B, T)`, False for padding (Keras passes the inputs'
            mask, e.g. of `Embedding(mask_zero=True)`, by itself). Masked
            tokens feed no slot (their dispatch logits are `-inf`) and
            output zeros, so padding changes no real token's output; a
            sequence with no real token outputs zeros. The mask propagates.

    Returns:
        `(B, T, o)`.

    Example:

    >>> import numpy as np
    >>> moe = SoftMoE(num_experts=4, hidden_dim=32, slots_per_expert=2)
    >>> tuple(moe(np.random.rand(2, 10, 16).astype("float32")).shape)
    (2, 10, 16)

    References:
        Puigcerver, Riquelme, Mustafa, Houlsby. From Sparse to Soft Mixtures
        of Experts (ICLR 2024).
    """

    def __init__(
        self,
        num_experts,
        hidden_dim,
        slots_per_expert=1,
        output_dim=None,
        normalize=False,
        slot_initializer="lecun_normal",
        **kwargs,
    ):
        expert_options = pop_expert_options(kwargs)
        super().__init__(**kwargs)
        self.supports_masking = True
        self.num_experts = check.positive_int(
            "num_experts", num_experts, check.MAX_EXPERTS
        )
        self.hidden_dim = check.positive_int("hidden_dim", hidden_dim, check.MAX_WIDTH)
        self.slots_per_expert = check.positive_int(
            "slots_per_expert", slots_per_expert, check.MAX_EXPERTS
        )
        self.output_dim = (
            None if output_dim is None else check.positive_int("output_dim", output_dim)
        )
        self.normalize = check.boolean("normalize", normalize)
        self.slot_initializer = check.initializer("slot_initializer", slot_initializer)
        self.experts = make_experts(
            self, self.num_experts, self.hidden_dim, expert_options, self.output_dim
        )

    def _check_shape(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) != 3 or input_shape[-1] is None or input_shape[-1] == 0:
            raise ValueError(
                "SoftMoE mixes the tokens of a sequence and expects inputs "
                "(batch, tokens, dim) with a known, nonzero dim. Received: "
                f"input_shape={input_shape}"
            )
        return input_shape

    def build(self, input_shape):
        d = self._check_shape(input_shape)[-1]
        num_slots = self.num_experts * self.slots_per_expert
        check.weight_elements(
            self.name, "slot_kernel", (d, num_slots), input_dim=d,
            num_experts=self.num_experts, slots_per_expert=self.slots_per_expert,
        )
        self.slot_kernel = self.add_weight(
            name="slot_kernel", shape=(d, num_slots), initializer=self.slot_initializer
        )
        self.scale = (
            self.add_weight(name="scale", shape=(), initializer="ones")
            if self.normalize
            else None
        )
        self.experts.build((self.num_experts, None, d))
        self.expert_load = statistic(self, "expert_load", (self.num_experts,))

    def logits(self, inputs):
        """Token-slot logits `(B, T, E * S)`."""
        x, phi = inputs, self.slot_kernel
        if self.normalize:
            x = x * ops.rsqrt(ops.sum(ops.square(x), -1, keepdims=True) + 1e-6)
            phi = phi * ops.rsqrt(ops.sum(ops.square(phi), 0, keepdims=True) + 1e-6)
            phi = phi * self.scale
        return ops.einsum("btd,ds->bts", x, phi)

    def call(self, inputs, mask=None):
        shape = self._check_shape(inputs.shape)
        # Integer inputs as floats on every backend (the dispatch weights
        # are cast to the input dtype, and torch's einsum would not promote).
        inputs = ops.cast(inputs, self.compute_dtype)
        e, s = self.num_experts, self.slots_per_expert
        if mask is not None:
            mask = ops.reshape(
                check.token_mask(self.name, mask, inputs), ops.shape(inputs)[:2]
            )
            # Replaced, not multiplied by 0: a NaN in padding stays out.
            inputs = ops.where(mask[..., None], inputs, ops.zeros_like(inputs))
        logits = ops.cast(self.logits(inputs), "float32")
        if mask is None:
            dispatch = softmax(logits, axis=1)
        else:
            dispatch = softmax(ops.where(mask[..., None], logits, -1e9), axis=1)
            dispatch = ops.where(mask[..., None], dispatch, 0.0)
        dispatch = ops.cast(dispatch, inputs.dtype)
        combine = softmax(logits, axis=2)
        slots = ops.einsum("bts,btd->bsd", dispatch, inputs)  # (B, E*S, d)
        batch = ops.shape(inputs)[0]
        per_expert = ops.reshape(slots, (batch, e, s, shape[-1]))
        per_expert = ops.reshape(
            ops.transpose(per_expert, (1, 0, 2, 3)), (e, -1, shape[-1])
        )
        outputs = self.experts(per_expert)  # (E, B*S, o)
        o = ops.shape(outputs)[-1]
        outputs = ops.transpose(ops.reshape(outputs, (e, batch, s, o)), (1, 0, 2, 3))
        outputs = ops.reshape(outputs, (batch, e * s, o))
        y = ops.einsum("bts,bso->bto", ops.cast(combine, outputs.dtype), outputs)
        if mask is not None:
            combine = ops.where(mask[..., None], combine, 0.0)
            y = ops.where(mask[..., None], y, ops.zeros_like(y))
        # Share of the combine mass that each expert's slots receive.
        load = ops.sum(ops.reshape(combine, (-1, e, s)), axis=(0, 2))
        self.expert_load.assign(
            ops.stop_gradient(load / ops.maximum(ops.sum(load), 1e-9))
        )
        return y

    def routing_stats(self):
        """Per-expert share of the combine weights in the last call; Soft MoE
        drops nothing."""
        return {
            "expert_load": ops.convert_to_numpy(self.expert_load),
            "dropped_fraction": 0.0,
        }

    def compute_output_shape(self, input_shape):
        input_shape = self._check_shape(input_shape)
        return input_shape[:-1] + (self.output_dim or input_shape[-1],)

    def pruned_config(self, kept):
        """This layer's config with the experts `kept` only (a sorted list
        of old indices), for `keras_moe.compression.prune_experts`."""
        return dict(self.get_config(), num_experts=len(kept))

    def copy_pruned_weights(self, source, kept):
        """Copies the weights of `source` (the unpruned layer): the kept
        experts and their `slots_per_expert` slot columns go together."""
        s = source.slots_per_expert
        slots = [e * s + j for e in kept for j in range(s)]
        mapping = {source.num_experts * s: slots, source.num_experts: list(kept)}
        _pruning.copy_sliced(self, source, mapping)
        _pruning.copy_quantization_state(self, source)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_experts=self.num_experts,
            hidden_dim=self.hidden_dim,
            slots_per_expert=self.slots_per_expert,
            output_dim=self.output_dim,
            normalize=self.normalize,
            slot_initializer=keras.initializers.serialize(self.slot_initializer),
            **expert_options_config(self.experts),
        )
        return quantized_dtype_config(self, config)
