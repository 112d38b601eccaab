"""One home for the expert banks that MoE layers own: their options, the
factory that builds them and their part of a layer's config.

Every layer that owns an `Experts` bank (`SparseMoE`, `SoftMoE`,
`MultiGateMoE`, `CGC`, `PLE`) takes the bank's options as keyword arguments
named as in `Experts` (`activation`, `gated`, `use_bias`, ...: the keys of
`EXPERT_OPTIONS`), collects them with `pop_expert_options`, builds its banks
with `make_experts`, and writes them back in `get_config` with
`expert_options_config`; so an option added to `Experts` reaches every
layer through this table.
"""

import re

import keras

from keras_moe.layers._experts_int8 import resolved_policy
from keras_moe.layers.experts import Experts
from keras_moe.utils.keras_internals import flatten_layers

# The per-expert FFN options of `Experts`, with its defaults; layers that own
# banks take them as keyword arguments (some with another default, e.g. the
# multi-task layers' "relu").
EXPERT_OPTIONS = {
    "activation": "gelu",
    "gated": False,
    "use_bias": True,
    "kernel_initializer": "glorot_uniform",
    "bias_initializer": "zeros",
    "kernel_regularizer": None,
    "bias_regularizer": None,
    "glu_limit": None,
    "glu_linear_offset": 0.0,
    "output_scale": False,
}



def pop_expert_options(kwargs, **defaults):
    """Takes the expert options out of a layer's `**kwargs` (the rest goes
    to the base `Layer`). Returns all of `EXPERT_OPTIONS`, with the given
    values, else the layer's `defaults`, else `Experts`' own."""
    unknown = set(defaults) - set(EXPERT_OPTIONS)
    if unknown:
        raise TypeError(f"Not expert options: {sorted(unknown)}")
    options = dict(EXPERT_OPTIONS, **defaults)
    for name in EXPERT_OPTIONS:
        if name in kwargs:
            options[name] = kwargs.pop(name)
    return options


def make_experts(owner, num_experts, hidden_dim, options, output_dim=None,
                 name="experts"):
    """The `Experts` bank of a layer `owner`: `num_experts` experts of width
    `hidden_dim` with the `options` of `pop_expert_options`, in the owner's
    dtype policy (so mixed precision and int8 policies reach the bank)."""
    return Experts(
        num_experts=num_experts,
        hidden_dim=hidden_dim,
        output_dim=output_dim,
        dtype=owner.dtype_policy,
        name=name,
        **options,
    )


def expert_options_config(experts):
    """The `EXPERT_OPTIONS` of an `Experts` layer, serialized as in its
    `get_config`, for the `get_config` of a layer that owns it."""
    config = experts.get_config()
    return {name: config[name] for name in EXPERT_OPTIONS}


def quantized_dtype_config(layer, config):
    """`config` (from `layer.get_config()`) with the dtype policies of the
    quantised layers under `layer` recorded, so that `from_config` rebuilds
    them quantised.

    A layer that owns expert banks creates them from its own config with
    `dtype=layer.dtype_policy`, so a bank's own quantised policy would be
    lost on reload. This replaces `config["dtype"]` by a
    `keras.dtype_policies.DTypePolicyMap` whose default is the layer's
    policy and which maps the path of each quantised sublayer below the
    layer (a pattern `(.*/)?<layer name>/<sublayer path>`, so the layer may
    sit in another model or scope on reload) to its `int8_from_...` policy.
    Unchanged if nothing under `layer` is quantised. Every keras_moe layer
    that owns an `Experts` bank calls this at the end of `get_config`;
    call it in your own layers that own one.
    """
    entries = {}
    prefix = f"{layer.path}/" if layer.path else None
    for sublayer in flatten_layers(layer, include_self=False):
        if not sublayer.path:
            continue
        policy = resolved_policy(sublayer)
        if policy.quantization_mode is None:
            continue
        if prefix and sublayer.path.startswith(prefix):
            relative = sublayer.path[len(prefix):]
        else:
            relative = sublayer.path.split("/")[-1]
        pattern = "(?:.*/)?" + re.escape(f"{layer.name}/{relative}")
        entries[pattern] = policy
    if not entries:
        return config
    default = layer.dtype_policy
    if isinstance(default, keras.dtype_policies.DTypePolicyMap):
        default = default.default_policy
    config["dtype"] = keras.dtype_policies.serialize(
        keras.dtype_policies.DTypePolicyMap(default_policy=default, policy_map=entries)
    )
    return config
