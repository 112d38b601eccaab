"""Porting keras-hub's MoE blocks to keras_moe layers with the same weights.

keras-hub's MoE blocks run every expert on every token and mask the result
(`E / k` times the compute of the chosen experts). `from_keras_hub` returns
a dropless `SparseMoE` that computes the same function from the same
weights, running only the chosen (token, expert) pairs;
`replace_moe_blocks` swaps every MoE block of a built keras-hub backbone for
one. See docs/porting.md for what maps how and the measured parity.

keras-hub is not a dependency: it is imported only by the functions here,
when they are called on one of its layers.

The supported blocks (keras-hub 0.32) and what they map to, for a token `x`:

| keras-hub block | router | experts | extra |
|---|---|---|---|
| `MixtralSparseMoeBlock` | softmax, top-k, renormalised | SwiGLU | - |
| `Qwen3SparseMoeBlock` | softmax, top-k, renormalised if `norm_top_k_prob` | SwiGLU (fused gate/up kernel) | - |
| `QwenSparseMoeBlock` (Qwen1.5/2-MoE) | as Qwen3 | SwiGLU (fused) | a sigmoid-gated shared SwiGLU expert of its own width |
| `Qwen3_5MoeSparseMoeBlock` | softmax, top-k, renormalised | SwiGLU (fused) | as Qwen-MoE |
| `GptOssSparseMoeBlock` | biased logits, top-k, softmax over the k | clamped GLU with biases (interleaved gate/up) | - |
| Gemma 4 (`Gemma4TextDecoderBlock` with `enable_moe_block`, or its `(moe_router, moe_expert_bank)`) | RMS-normalised, `d^-0.5`- and learned-scaled inputs | GeGLU (tanh gelu), per-expert output scale | the router sees the raw `x`, the experts the normalised one |
"""

import warnings

import keras
import numpy as np
from keras import ops

from keras_moe import activations
from keras_moe.layers.keras_hub_block import KerasHubMoEBlock
from keras_moe.layers.routers import TopKRouter
from keras_moe.layers.sparse_moe import SparseMoE
from keras_moe.utils.keras_internals import flatten_layers, replace_sublayer

__all__ = ["KerasHubMoEBlock", "from_keras_hub", "replace_moe_blocks"]

# GPT-OSS' gate activation `g sigmoid(alpha g)`: `quick_gelu` at its alpha.
_GPT_OSS_ALPHA = activations.QUICK_GELU_ALPHA


def _numpy(value):
    return np.array(ops.convert_to_numpy(value))


def _built(block):
    if not block.built:
        raise ValueError(
            f"from_keras_hub needs a built block (its weights are copied). "
            f"Received: {type(block).__name__} {block.name!r}, not built"
        )


def _swiglu_bank(gate, up, out):
    """Experts weights of a bias-free GLU bank: `(E, d, h)` x2, `(E, h, o)`."""
    return {"kernel_gate": gate, "kernel_in": up, "kernel_out": out}


def _fused_gate_up(bank_kernel, hidden):
    """keras-hub's Qwen banks fuse `[gate | up]` on the last axis."""
    return bank_kernel[..., :hidden], bank_kernel[..., hidden:]


def _mlp_weights(mlp):
    """A keras-hub SwiGLU MLP (Qwen's shared expert) as a 1-expert bank."""
    return _swiglu_bank(
        _numpy(mlp._feedforward_gate_dense.kernel)[None],
        _numpy(mlp._feedforward_intermediate_dense.kernel)[None],
        _numpy(mlp._feedforward_output_dense.kernel)[None],
    )


def _mixtral(block):
    if block.router_jitter_noise:
        warnings.warn(
            f"{block.name}: Mixtral's router jitter noise "
            f"(router_jitter_noise={block.router_jitter_noise}, training "
            "only) is not ported: the ported layer routes without it.",
            stacklevel=3,
        )
    bank = block.expert_bank
    return dict(
        num_experts=block.num_experts,
        hidden_dim=block.intermediate_dim,
        k=block.top_k,
        activation=keras.activations.serialize(bank.activation),
        router=dict(renormalize="always", load_balance_weight=block.router_aux_loss_coef),
        router_weights={"kernel": _numpy(block._sparse_feedforward_gate_dense.kernel)},
        expert_weights=_swiglu_bank(
            _numpy(bank._expert_feedforward_gate_dense),
            _numpy(bank._expert_feedforward_intermediate_dense),
            _numpy(bank._expert_feedforward_output_dense),
        ),
    )


def _qwen_routed(block, router_dense, aux_coef, renormalize):
    bank = block.expert_bank
    hidden = bank.intermediate_dim
    gate, up = _fused_gate_up(_numpy(bank._expert_feedforward_gate_dense), hidden)
    activation = getattr(bank, "activation", None)
    return dict(
        num_experts=block.num_experts,
        hidden_dim=hidden,
        k=block.top_k,
        activation=(
            "silu" if activation is None else keras.activations.serialize(activation)
        ),
        router=dict(renormalize=renormalize, load_balance_weight=aux_coef),
        router_weights={"kernel": _numpy(router_dense.kernel)},
        expert_weights=_swiglu_bank(
            gate, up, _numpy(bank._expert_feedforward_output_dense)
        ),
    )


def _qwen3(block):
    return _qwen_routed(
        block,
        block._sparse_feedforward_gate_dense,
        block.router_aux_loss_coefficient,
        "always" if block.norm_top_k_prob else False,
    )


def _with_shared(spec, mlp, gate_dense):
    activation = getattr(mlp, "activation_fn", "silu")
    if activation != spec["activation"]:
        raise NotImplementedError(
            "The shared expert must use the routed experts' activation. "
            f"Received: {activation!r} and {spec['activation']!r}"
        )
    spec.update(
        num_shared_experts=1,
        shared_hidden_dim=mlp.intermediate_dim,
        shared_expert_gate="sigmoid",
        shared_weights=_mlp_weights(mlp),
        gate_kernel=_numpy(gate_dense.kernel),
    )
    return spec


def _qwen(block):
    spec = _qwen_routed(
        block,
        block._sparse_feedforward_gate_dense,
        block.router_aux_loss_coefficient,
        "always" if block.norm_top_k_prob else False,
    )
    return _with_shared(spec, block.shared_expert_dense, block.shared_expert_gate_dense)


def _qwen3_5(block):
    spec = _qwen_routed(
        block, block._router_gate, block.router_aux_loss_coefficient, "always"
    )
    return _with_shared(spec, block.shared_expert, block._shared_expert_gate)


def _gpt_oss(block):
    experts = block.experts
    if experts.alpha != _GPT_OSS_ALPHA:
        raise NotImplementedError(
            "GPT-OSS experts map onto activation='quick_gelu', whose alpha is "
            f"{_GPT_OSS_ALPHA}. Received: alpha={experts.alpha}"
        )
    gate_up = _numpy(experts.gate_up_proj)  # interleaved: gate even, up odd
    gate_up_bias = _numpy(experts.gate_up_proj_bias)
    dense = block.router.router_dense
    router_weights = {"kernel": _numpy(dense.kernel)}
    if dense.use_bias:
        router_weights["bias"] = _numpy(dense.bias)
    # Softmax over the k top logits is the top-k of the softmax over all
    # logits, renormalised (the same selection: softmax is monotone).
    return dict(
        num_experts=block.num_experts,
        hidden_dim=experts.intermediate_dim,
        k=block.top_k,
        activation="quick_gelu",
        glu_limit=float(experts.limit),
        glu_linear_offset=1.0,
        use_bias=True,
        router=dict(renormalize="always", use_bias=dense.use_bias, load_balance_weight=0.0),
        router_weights=router_weights,
        expert_weights={
            "kernel_gate": gate_up[..., ::2],
            "kernel_in": gate_up[..., 1::2],
            "kernel_out": _numpy(experts.down_proj),
            "bias_gate": gate_up_bias[..., ::2],
            "bias_in": gate_up_bias[..., 1::2],
            "bias_out": _numpy(experts.down_proj_bias),
        },
    )


def _gemma4(router, bank):
    _built(router)
    _built(bank)
    d = router.per_dim_scale.shape[0]
    return dict(
        num_experts=bank.num_experts,
        hidden_dim=bank.expert_intermediate_dim,
        k=router.num_experts_per_token,
        activation="gelu_approximate",
        output_scale=True,
        router=dict(
            renormalize="always",
            load_balance_weight=0.0,
            input_norm="rms",
            input_norm_epsilon=router.layer_norm_epsilon,
            input_multiplier=float(d) ** -0.5,
            learned_input_scale=True,
        ),
        router_weights={
            "kernel": _numpy(router.proj.kernel),
            "input_scale": _numpy(router.per_dim_scale),
        },
        expert_weights={
            **_swiglu_bank(
                _numpy(bank.gate_proj), _numpy(bank.up_proj), _numpy(bank.down_proj)
            ),
            "expert_scale": _numpy(bank.per_expert_scale),
        },
    )


_FAMILIES = {
    "MixtralSparseMoeBlock": _mixtral,
    "QwenSparseMoeBlock": _qwen,
    "Qwen3SparseMoeBlock": _qwen3,
    "Qwen3_5MoeSparseMoeBlock": _qwen3_5,
    "GptOssSparseMoeBlock": _gpt_oss,
}
# The keras-hub module of each block, to check that a layer of that class
# name is keras-hub's.
_MODULE_PREFIX = "keras_hub."


def _spec(block):
    if isinstance(block, (tuple, list)) and len(block) == 2:
        names = [type(part).__name__ for part in block]
        if names == ["Gemma4Router", "Gemma4MoEBlock"]:
            return dict(_gemma4(*block), dtype=block[1].dtype_policy)
    name = type(block).__name__
    module = type(block).__module__
    if module.startswith(_MODULE_PREFIX) and name == "Gemma4TextDecoderBlock":
        if not getattr(block, "enable_moe_block", False):
            raise ValueError(
                f"{block.name}: this Gemma4 decoder block has no MoE block "
                "(enable_moe_block=False)."
            )
        bank = block.moe_expert_bank
        return dict(_gemma4(block.moe_router, bank), dtype=bank.dtype_policy)
    if module.startswith(_MODULE_PREFIX) and name in _FAMILIES:
        _built(block)
        return dict(_FAMILIES[name](block), dtype=block.dtype_policy)
    raise ValueError(
        "from_keras_hub supports keras-hub's "
        + ", ".join(sorted(_FAMILIES))
        + ", and Gemma 4's MoE (a Gemma4TextDecoderBlock with "
        "enable_moe_block=True, or its (moe_router, moe_expert_bank) pair). "
        f"Received: {block!r}"
    )


def _assign(variable, value, what):
    if tuple(variable.shape) != tuple(value.shape):
        raise ValueError(
            f"Cannot copy {what}: shape {tuple(value.shape)} into "
            f"{variable.path} {tuple(variable.shape)}"
        )
    variable.assign(value)


def from_keras_hub(block, **kwargs):
    """A `SparseMoE` that computes what a keras-hub MoE block computes, with
    a copy of its weights.

    The layer is dropless (`capacity_factor=None`,
    `eval_capacity_factor=None`), so it computes the same function as the
    block, in training and inference, but runs only the `k` chosen experts
    of each token (expert-sorted blocks) where keras-hub runs all `E`. In
    training it adds the block's load-balancing loss with the block's
    coefficient (Mixtral and the Qwen blocks; GPT-OSS and Gemma 4 have
    none), computed on all tokens: keras-hub drops padded tokens from it
    when given an `attention_mask`, this layer does not.

    The ported layer returns the block's first output only (keras-hub's
    blocks return `(outputs, router_logits)`; see `KerasHubMoEBlock` for a
    drop-in replacement). For Gemma 4 it is called as
    `moe(pre_ffw_norm_moe(x), routing_inputs=x)`: the router sees the raw
    hidden states, the experts the normalised ones, as in
    `Gemma4TextDecoderBlock`.

    Args:
        block: a built keras-hub MoE block: `MixtralSparseMoeBlock`,
            `QwenSparseMoeBlock` (Qwen1.5/2-MoE), `Qwen3SparseMoeBlock`,
            `Qwen3_5MoeSparseMoeBlock`, `GptOssSparseMoeBlock`, or Gemma 4's
            MoE as a `Gemma4TextDecoderBlock` with `enable_moe_block=True`
            or its `(moe_router, moe_expert_bank)` pair.
        **kwargs: `SparseMoE` arguments that override the port's, e.g.
            `capacity_factor=1.25` to train with a capacity (which may drop
            tokens, unlike the block), `dispatch="dense"`, `block_size`,
            `name`.

    Returns:
        A built `SparseMoE`.

    Example:

    >>> from keras_hub.src.models.mixtral.mixtral_decoder import (
    ...     MixtralSparseMoeBlock)
    >>> import numpy as np
    >>> from keras.ops import convert_to_numpy
    >>> block = MixtralSparseMoeBlock(hidden_dim=8, intermediate_dim=16,
    ...                               num_experts=4, top_k=2)
    >>> block.build((None, None, 8))
    >>> moe = from_keras_hub(block)
    >>> x = np.random.rand(2, 3, 8).astype("float32")
    >>> expected = convert_to_numpy(block(x)[0])
    >>> bool(np.allclose(convert_to_numpy(moe(x)), expected, atol=1e-5))
    True
    """
    spec = _spec(block)
    router_options = spec.pop("router")
    router_weights = spec.pop("router_weights")
    expert_weights = spec.pop("expert_weights")
    shared_weights = spec.pop("shared_weights", None)
    gate_kernel = spec.pop("gate_kernel", None)
    d = router_weights["kernel"].shape[0]
    router = TopKRouter(
        num_experts=spec["num_experts"],
        k=spec["k"],
        **router_options,
    )
    options = dict(
        gated=True,
        use_bias=False,
        capacity_factor=None,
        eval_capacity_factor=None,
        router=router,
    )
    options.update(spec)
    options.update(kwargs)
    moe = SparseMoE(**options)
    moe.build((None, d))
    for name, value in router_weights.items():
        _assign(getattr(moe.router, name), value, f"the router's {name}")
    for name, value in expert_weights.items():
        _assign(getattr(moe.experts, name), value, f"the experts' {name}")
    if shared_weights is not None:
        for name, value in shared_weights.items():
            _assign(
                getattr(moe.shared_experts, name), value, f"the shared expert's {name}"
            )
        _assign(moe.shared_gate_kernel, gate_kernel, "the shared expert's gate")
    return moe


# The attribute that holds the MoE block in each keras-hub decoder layer.
_BLOCK_ATTRIBUTES = ("_sparse_moe_block", "mlp", "sparse_moe_block")


def replace_moe_blocks(backbone, **kwargs):
    """Swaps every MoE block of a built keras-hub model for keras_moe's.

    Every `MixtralSparseMoeBlock`, `QwenSparseMoeBlock`,
    `Qwen3SparseMoeBlock`, `Qwen3_5MoeSparseMoeBlock` and
    `GptOssSparseMoeBlock` held by a decoder layer of `backbone` is replaced,
    in place, by a `KerasHubMoEBlock` around `from_keras_hub(block,
    **kwargs)`: the same function from a copy of the same weights, running
    only the chosen experts. The old blocks (and their weights) leave the
    model. Gemma 4, whose decoder block calls its router and expert bank
    separately, is not supported here (port its MoE with `from_keras_hub`).

    A saved model (`.keras`) with replaced blocks reloads as keras-hub's
    original (keras-hub rebuilds its decoders from their configs); save the
    weights of the new blocks, or call `replace_moe_blocks` again after
    loading.

    Args:
        backbone: a built keras-hub backbone (or any model/layer containing
            those blocks).
        **kwargs: passed to `from_keras_hub`.

    Returns:
        The list of the replaced blocks' paths (the new block keeps the old
        one's name).

    Example:

    >>> import numpy as np
    >>> from keras_hub.models import MixtralBackbone
    >>> backbone = MixtralBackbone(
    ...     vocabulary_size=50, num_layers=2, num_query_heads=2,
    ...     num_key_value_heads=1, hidden_dim=8, intermediate_dim=16,
    ...     num_experts=4, top_k=2, sliding_window=8)
    >>> data = {"token_ids": np.ones((1, 5), "int32"),
    ...         "padding_mask": np.ones((1, 5), "int32")}
    >>> before = keras.ops.convert_to_numpy(backbone(data))
    >>> len(replace_moe_blocks(backbone))
    2
    >>> after = keras.ops.convert_to_numpy(backbone(data))
    >>> bool(np.allclose(before, after, atol=1e-4))
    True
    """
    replaced = []
    for layer in list(flatten_layers(backbone, include_self=True)):
        for attribute in _BLOCK_ATTRIBUTES:
            block = getattr(layer, attribute, None)
            if not isinstance(block, keras.layers.Layer):
                continue
            name = type(block).__name__
            if name not in _FAMILIES or not type(block).__module__.startswith(
                _MODULE_PREFIX
            ):
                continue
            path = block.path
            moe = from_keras_hub(block, **dict(dict(name=f"{block.name}_moe"), **kwargs))
            new = KerasHubMoEBlock(
                moe,
                second_output="scores" if name == "GptOssSparseMoeBlock" else "logits",
                name=block.name,
                dtype=block.dtype_policy,
            )
            new.build((None, None, moe.experts.kernel_in.shape[1]))
            replace_sublayer(layer, attribute, new)
            replaced.append(path)
    return replaced
