import re

import keras
import numpy as np
from keras import ops

from keras_moe import activations
from keras_moe.ops.dropless import gather_experts
from keras_moe.utils import validation as check
from keras_moe.utils.keras_internals import (
    flatten_layers,
    mark_quantized,
    untrack_variable,
)

# The kernels of an expert bank, in the order they are saved; each has the
# expert axis first and its input axis second: (E, in, out).
KERNEL_NAMES = ("kernel_in", "kernel_gate", "kernel_out")
BIAS_NAMES = ("bias_in", "bias_gate", "bias_out")
# The weights-file entry of a quantised bank that records whether its
# activations are quantised too (the bank's own config is not saved when an
# MoE layer owns it: the MoE layer rebuilds it from its own config).
_ACTIVATION_FLAG = "int8_activations"


def per_expert_initializer(initializer, num_experts):
    """Returns an initializer whose fans are those of one expert.

    Keras' fan-based initializers (Glorot, He, LeCun: all `VarianceScaling`)
    read a stacked kernel `(E, d, h)` as a convolution kernel with receptive
    field `E` and so shrink the variance `E` times. Scaling by `E` gives each
    expert the variance of a `Dense(h)` layer on `d` inputs.
    """
    initializer = keras.initializers.get(initializer)
    if isinstance(initializer, keras.initializers.VarianceScaling):
        return keras.initializers.VarianceScaling(
            scale=initializer.scale * num_experts,
            mode=initializer.mode,
            distribution=initializer.distribution,
            seed=initializer.seed,
        )
    return initializer


# The per-expert FFN options that MoE layers take and pass to their Experts.
EXPERT_OPTIONS = (
    "activation",
    "gated",
    "use_bias",
    "kernel_initializer",
    "bias_initializer",
    "kernel_regularizer",
    "bias_regularizer",
)


def expert_options_config(experts):
    """The `EXPERT_OPTIONS` of an `Experts` layer, serialized as in its
    `get_config`, for the `get_config` of a layer that owns it."""
    config = experts.get_config()
    return {name: config[name] for name in EXPERT_OPTIONS}


def _resolved_policy(layer):
    """The dtype policy that applies to `layer` (resolving a policy map)."""
    policy = layer.dtype_policy
    if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
        return policy[layer.path] if layer.path else policy.default_policy
    return policy


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
        policy = _resolved_policy(sublayer)
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


@keras.saving.register_keras_serializable(package="keras_moe")
class Experts(keras.layers.Layer):
    """A bank of `E` feed-forward experts run as one batched einsum.

    Each expert `e` is a two-layer MLP applied to its own buffer of tokens:

    `y[e] = act(x[e] W1[e] + b1[e]) W2[e] + b2[e]`

    or, with `gated=True` (GLU family; `activation="silu"` gives SwiGLU,
    `"gelu"` gives GEGLU):

    `y[e] = (act(x[e] Wg[e] + bg[e]) * (x[e] W1[e] + b1[e])) W2[e] + b2[e]`

    with stacked weights `W1, Wg: (E, d, h)`, `W2: (E, h, o)`. All experts
    run in one `einsum("ecd,edh->ech")`, so the cost is that of the tokens in
    the buffers, whatever `E`.

    Two options of the GLU (both off by default) give GPT-OSS's clamped
    GLU: with `glu_limit=L` the gate branch is clamped from above and the
    linear branch on both sides, and `glu_linear_offset=c` is added to the
    linear branch:

    `g = min(x Wg + bg, L)`, `u = clip(x W1 + b1, -L, L)`,
    `y = (act(g) * (u + c)) W2 + b2`

    (GPT-OSS: `L = 7`, `c = 1`, `activation="quick_gelu"`, i.e.
    `act(g) = g sigmoid(1.702 g)`). With `output_scale=True` each expert's
    output is multiplied by its own learned scalar `s[e]` (initialised to
    1; Gemma 4's per-expert scale): `y[e] = s[e] (... W2[e] + b2[e])`.

    int8: `layer.quantize("int8")` (or `model.quantize("int8")`, which
    reaches every bank of every MoE layer) replaces each kernel `W (E, i, o)`
    by int8 values `q` and float32 scales `s (E, o)`, one per expert and
    output channel: `s[e, j] = 127 / max_i |W[e, i, j]|`,
    `q = round(W s)`, `W ~ q / s`. With Keras' default
    `Int8QuantizationConfig()` the inputs of each matmul are quantised too,
    per row (token): `x ~ q_x / s_x`, `x W ~ (q_x q) / (s_x s)`, an
    int8 x int8 matmul; with `Int8QuantizationConfig(
    activation_quantizer=None)` only the weights are (`x W ~ (x q) / s`).
    Biases stay float and trainable; the int8 kernels and scales are not
    trainable; gradients still flow to the inputs (straight through the
    rounding of the activations). A quantised bank saves and loads with
    `.keras`, also inside an MoE layer. See docs/compression.md.

    Args:
        num_experts: `E`, the number of experts.
        hidden_dim: `h`, the hidden width of each expert.
        output_dim: `o`, the output width; defaults to the input width `d`.
        activation: the hidden activation (any Keras activation, or
            `"gelu_approximate"` / `"quick_gelu"` from
            `keras_moe.activations`).
        gated: use the gated (GLU) variant.
        glu_limit: `None` (default) or a number `L > 0`: clamp the gate
            branch to `<= L` and the linear branch to `[-L, L]` before they
            are multiplied (needs `gated=True`).
        glu_linear_offset: a number `c` added to the linear branch of the
            GLU, `act(g) * (u + c)` (default 0; needs `gated=True` when not
            0).
        output_scale: learn one output scale per expert (`(E,)`,
            initialised to ones; default False).
        use_bias: add biases.
        kernel_initializer: initializer of the kernels. Fan-based
            initializers use the fans of one expert (`d`, `h`).
        bias_initializer: initializer of the biases.
        kernel_regularizer: regularizer applied to each kernel.
        bias_regularizer: regularizer applied to each bias.
        quantization_config: set by `quantize("int8", config=...)` and kept
            in the config of a quantised bank (a
            `keras.quantizers.Int8QuantizationConfig`); leave it `None`.
        **kwargs: base `Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: `(E, C, d)`: `C` tokens (rows) for each of the `E` experts,
            e.g. the output of `keras_moe.ops.dispatch`.

    Returns:
        `(E, C, o)`.

    Example:

    >>> import numpy as np
    >>> experts = Experts(num_experts=4, hidden_dim=32, output_dim=8)
    >>> tuple(experts(np.zeros((4, 10, 16), "float32")).shape)
    (4, 10, 8)
    >>> experts.quantize("int8")
    >>> experts.kernel_in.dtype, tuple(experts(np.zeros((4, 10, 16), "float32")).shape)
    ('int8', (4, 10, 8))

    References:
        Shazeer et al. Outrageously Large Neural Networks: The Sparsely-Gated
        Mixture-of-Experts Layer (2017). Shazeer, GLU Variants Improve
        Transformer (2020).
    """

    def __init__(
        self,
        num_experts,
        hidden_dim,
        output_dim=None,
        activation="gelu",
        gated=False,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        quantization_config=None,
        glu_limit=None,
        glu_linear_offset=0.0,
        output_scale=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_experts = check.positive_int(
            "num_experts", num_experts, check.MAX_EXPERTS
        )
        self.hidden_dim = check.positive_int("hidden_dim", hidden_dim, check.MAX_WIDTH)
        self.output_dim = (
            None
            if output_dim is None
            else check.positive_int("output_dim", output_dim, check.MAX_WIDTH)
        )
        if isinstance(quantization_config, dict):
            quantization_config = keras.saving.deserialize_keras_object(
                quantization_config
            )
        self.quantization_config = quantization_config
        self.activation = activations.get(activation)
        self.gated = check.boolean("gated", gated)
        self.glu_limit = (
            None if glu_limit is None else check.positive_float("glu_limit", glu_limit)
        )
        self.glu_linear_offset = check.finite_float(
            "glu_linear_offset", glu_linear_offset
        )
        if not self.gated and (self.glu_limit is not None or self.glu_linear_offset):
            raise ValueError(
                "glu_limit and glu_linear_offset apply to the GLU and need "
                f"gated=True. Received: glu_limit={glu_limit!r}, "
                f"glu_linear_offset={glu_linear_offset!r}, gated={gated!r}"
            )
        self.output_scale = check.boolean("output_scale", output_scale)
        self.use_bias = check.boolean("use_bias", use_bias)
        self.kernel_initializer = check.initializer(
            "kernel_initializer", kernel_initializer
        )
        self.bias_initializer = check.initializer("bias_initializer", bias_initializer)
        self.kernel_regularizer = check.regularizer(
            "kernel_regularizer", kernel_regularizer
        )
        self.bias_regularizer = check.regularizer("bias_regularizer", bias_regularizer)

    def _check_input_shape(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(
                "Experts expects inputs of shape (num_experts, capacity, "
                f"dim), a rank-3 tensor. Received: input_shape={input_shape}"
            )
        if input_shape[0] is not None and input_shape[0] != self.num_experts:
            raise ValueError(
                "The first input dimension must equal num_experts. Received: "
                f"input_shape={input_shape}, num_experts={self.num_experts}"
            )
        if input_shape[-1] is None:
            raise ValueError(
                "The last input dimension must be known. Received: "
                f"input_shape={input_shape}"
            )

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        self._check_input_shape(input_shape)
        d = input_shape[-1]
        e, h = self.num_experts, self.hidden_dim
        o = self.output_dim or d
        for name, shape in (("kernel_in", (e, d, h)), ("kernel_out", (e, h, o))):
            check.weight_elements(
                self.name, name, shape, num_experts=e, input_dim=d,
                hidden_dim=h, output_dim=o,
            )
        kernel_init = per_expert_initializer(self.kernel_initializer, e)

        def kernel(name, shape):
            return self.add_weight(
                name=name,
                shape=shape,
                initializer=kernel_init,
                regularizer=self.kernel_regularizer,
            )

        def bias(name, shape):
            return self.add_weight(
                name=name,
                shape=shape,
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
            )

        if self.quantization_mode is None:
            self.kernel_in = kernel("kernel_in", (e, d, h))
            self.kernel_gate = kernel("kernel_gate", (e, d, h)) if self.gated else None
            self.kernel_out = kernel("kernel_out", (e, h, o))
        else:  # revived from the config of a quantised bank
            self.quantized_build(
                input_shape, self.quantization_mode, self.quantization_config
            )
        if self.use_bias:
            self.bias_in = bias("bias_in", (e, h))
            self.bias_gate = bias("bias_gate", (e, h)) if self.gated else None
            self.bias_out = bias("bias_out", (e, o))
        else:
            self.bias_in = self.bias_gate = self.bias_out = None
        self.expert_scale = (
            self.add_weight(name="expert_scale", shape=(e,), initializer="ones")
            if self.output_scale
            else None
        )

    def _glu(self, gate, hidden):
        """`act(gate) * hidden` with the GLU options (clamp, offset)."""
        if self.glu_limit is not None:
            gate = ops.minimum(gate, self.glu_limit)
            hidden = ops.clip(hidden, -self.glu_limit, self.glu_limit)
        if self.glu_linear_offset:
            hidden = hidden + self.glu_linear_offset
        return self.activation(gate) * hidden

    def call(self, inputs):
        hidden = ops.einsum("ecd,edh->ech", inputs, self.kernel_in)
        if self.use_bias:
            hidden = hidden + self.bias_in[:, None, :]
        if self.gated:
            gate = ops.einsum("ecd,edh->ech", inputs, self.kernel_gate)
            if self.use_bias:
                gate = gate + self.bias_gate[:, None, :]
            hidden = self._glu(gate, hidden)
        else:
            hidden = self.activation(hidden)
        outputs = ops.einsum("ech,eho->eco", hidden, self.kernel_out)
        if self.use_bias:
            outputs = outputs + self.bias_out[:, None, :]
        if self.output_scale:
            outputs = outputs * self.expert_scale[:, None, None]
        return outputs

    def call_blocks(self, rows, block_expert, block_size):
        """Runs the experts on expert-sorted rows in blocks (dropless).

        `rows` `(R, d)` are `R / B` blocks of `B` consecutive rows, block
        `b` for expert `block_expert[b]` (a `keras_moe.ops.make_block_plan`
        layout). Each block is multiplied by its own expert's weights, in
        one batched matmul over the blocks, so the cost is that of the `R`
        rows, whatever `E`:

        `y[b] = act(x[b] W1[e_b] + b1[e_b]) W2[e_b] + b2[e_b]`

        (or the gated form, with the same GLU options and output scale as
        `call`, so both paths compute the same function).

        Args:
            rows: `(R, d)`, `R` a multiple of `block_size`.
            block_expert: `(R / B,)` int32 expert of each block.
            block_size: `B`, rows per block.

        Returns:
            `(R, o)`.
        """
        if self.quantization_mode is not None:
            raise ValueError(
                f"{self.name}: call_blocks needs float kernels; a quantised "
                f"bank ({self.quantization_mode}) runs on (E, C, d) buffers."
            )
        d = ops.shape(rows)[-1]
        x = ops.reshape(rows, (-1, block_size, d))

        def weights(variable):
            return gather_experts(
                variable, block_expert, self.num_experts, block_size
            )

        hidden = ops.einsum("nbd,ndh->nbh", x, weights(self.kernel_in))
        if self.use_bias:
            hidden = hidden + weights(self.bias_in)[:, None, :]
        if self.gated:
            gate = ops.einsum("nbd,ndh->nbh", x, weights(self.kernel_gate))
            if self.use_bias:
                gate = gate + weights(self.bias_gate)[:, None, :]
            hidden = self._glu(gate, hidden)
        else:
            hidden = self.activation(hidden)
        outputs = ops.einsum("nbh,nho->nbo", hidden, weights(self.kernel_out))
        if self.use_bias:
            outputs = outputs + weights(self.bias_out)[:, None, :]
        if self.output_scale:
            outputs = outputs * weights(self.expert_scale)[:, None, None]
        return ops.reshape(outputs, (-1, ops.shape(outputs)[-1]))

    def compute_output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        self._check_input_shape(input_shape)
        return input_shape[:-1] + (self.output_dim or input_shape[-1],)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_experts=self.num_experts,
            hidden_dim=self.hidden_dim,
            output_dim=self.output_dim,
            activation=activations.serialize(self.activation),
            gated=self.gated,
            glu_limit=self.glu_limit,
            glu_linear_offset=self.glu_linear_offset,
            output_scale=self.output_scale,
            use_bias=self.use_bias,
            kernel_initializer=keras.initializers.serialize(
                self.kernel_initializer
            ),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
            kernel_regularizer=keras.regularizers.serialize(
                self.kernel_regularizer
            ),
            bias_regularizer=keras.regularizers.serialize(self.bias_regularizer),
            quantization_config=keras.saving.serialize_keras_object(
                self.quantization_config
            ),
        )
        return config

    # int8 quantisation ---------------------------------------------------
    # Keras' hook: `Model.quantize` calls `quantize` on every leaf layer;
    # `Layer.__call__` runs `quantized_call` -> `_int8_call` instead of `call`
    # once the dtype policy is `int8_from_<policy>`.

    def _kernel_names(self):
        return [n for n in KERNEL_NAMES if getattr(self, n, None) is not None]

    def _bias_names(self):
        return [n for n in BIAS_NAMES if getattr(self, n, None) is not None]

    def quantize(self, mode=None, type_check=True, config=None):
        """Quantises the kernels to int8 in place (Keras' `quantize` hook).

        Per expert and output channel abs-max scales (see the class
        docstring). `config` is a `keras.quantizers.Int8QuantizationConfig`:
        its `activation_quantizer` (default: per-row `AbsMaxQuantizer`;
        `None` for weight-only) and the value range of its
        `weight_quantizer` are used; the weight scales always reduce over the
        input axis of each expert. Only `mode="int8"` is supported.
        """
        if type_check and type(self) is not Experts:
            raise NotImplementedError(
                f"Layer {type(self).__name__} does not have a `quantize` "
                "method implemented."
            )
        if mode != "int8":
            raise NotImplementedError(
                "Experts supports only int8 quantization. Received: "
                f"mode={mode!r}"
            )
        quantization = keras.quantizers.QuantizationConfig
        weight_quantizer = quantization.weight_quantizer_or_default(
            config, keras.quantizers.AbsMaxQuantizer()
        )
        values = {}
        for name in self._kernel_names():
            kernel = getattr(self, name)
            quantized, scale = weight_quantizer(kernel, axis=1, to_numpy=True)
            scale = ops.convert_to_numpy(scale)
            expected = (kernel.shape[0], 1, kernel.shape[2])
            if tuple(scale.shape) != expected:
                raise ValueError(
                    "The weight quantizer must return one scale per expert "
                    f"and output channel, {expected}. Received: scale shape "
                    f"{tuple(scale.shape)} for {name} {tuple(kernel.shape)}"
                )
            values[name] = (quantized, scale[:, 0, :])
        shapes = {name: tuple(getattr(self, name).shape) for name in values}
        for name in values:
            # Untrack the float kernel (as `Layer.__delattr__` does, without
            # its `gc.collect()` per variable: about 0.3 s each).
            untrack_variable(self, getattr(self, name))
            super(keras.layers.Layer, self).__delattr__(name)
        self.quantized_build(None, mode, config, kernel_shapes=shapes)
        for name, (quantized, scale) in values.items():
            getattr(self, name).assign(quantized)
            getattr(self, f"{name}_scale").assign(scale)
        current = _resolved_policy(self)
        if current.quantization_mode is None:
            # Under a policy map (an MoE layer revived from a config), the
            # setter records the new policy in the map at this layer's path.
            self.dtype_policy = keras.dtype_policies.get(
                f"{mode}_from_{current.name}"
            )

    def quantized_build(self, input_shape, mode, config=None, kernel_shapes=None):
        if mode != "int8":
            raise NotImplementedError(
                "Experts supports only int8 quantization. Received: "
                f"mode={mode!r}"
            )
        if kernel_shapes is None:
            d = input_shape[-1]
            e, h = self.num_experts, self.hidden_dim
            o = self.output_dim or d
            kernel_shapes = {"kernel_in": (e, d, h), "kernel_out": (e, h, o)}
            if self.gated:
                kernel_shapes["kernel_gate"] = (e, d, h)
        self._int8_build(kernel_shapes, config)
        mark_quantized(self)

    def _int8_build(self, kernel_shapes, config=None):
        self.quantization_config = config
        self.inputs_quantizer = (
            keras.quantizers.QuantizationConfig.activation_quantizer_or_default(
                config, keras.quantizers.AbsMaxQuantizer()
            )
        )
        self.kernel_gate = None
        for name in KERNEL_NAMES:
            if name not in kernel_shapes:
                continue
            shape = tuple(kernel_shapes[name])
            setattr(
                self,
                name,
                self.add_weight(
                    name=name,
                    shape=shape,
                    initializer="zeros",
                    dtype="int8",
                    trainable=False,
                ),
            )
            setattr(
                self,
                f"{name}_scale",
                self.add_weight(
                    name=f"{name}_scale",
                    shape=(shape[0], shape[2]),
                    initializer="ones",
                    trainable=False,
                ),
            )

    def _int8_matmul(self, x, name):
        """`x (E, C, i) @ W (E, i, o)` with `W ~ q / s` int8."""
        kernel = ops.convert_to_tensor(getattr(self, name))
        scale = ops.cast(getattr(self, f"{name}_scale"), self.compute_dtype)
        scale = scale[:, None, :]
        if self.inputs_quantizer is None:  # weight-only
            float_kernel = ops.cast(kernel, self.compute_dtype)
            return ops.einsum("eci,eio->eco", x, float_kernel) / scale
        quantizer = self.inputs_quantizer
        compute_dtype = self.compute_dtype

        @ops.custom_gradient
        def matmul(x, kernel, scale):
            def grad_fn(*args, upstream=None):
                if upstream is None:
                    (upstream,) = args
                # Straight through the rounding of x: the gradient of x W.
                float_kernel = ops.cast(kernel, compute_dtype)
                grad = ops.einsum("eco,eio->eci", upstream / scale, float_kernel)
                return grad, None, None

            quantized, x_scale = quantizer(x, axis=-1)  # x_scale (E, C, 1)
            products = ops.einsum("eci,eio->eco", quantized, kernel)  # int32
            outputs = ops.cast(products, compute_dtype) / (
                ops.cast(x_scale, compute_dtype) * scale
            )
            return outputs, grad_fn

        return matmul(x, kernel, scale)

    def _int8_call(self, inputs, training=None):
        hidden = self._int8_matmul(inputs, "kernel_in")
        if self.use_bias:
            hidden = hidden + self.bias_in[:, None, :]
        if self.gated:
            gate = self._int8_matmul(inputs, "kernel_gate")
            if self.use_bias:
                gate = gate + self.bias_gate[:, None, :]
            hidden = self._glu(gate, hidden)
        else:
            hidden = self.activation(hidden)
        outputs = self._int8_matmul(hidden, "kernel_out")
        if self.use_bias:
            outputs = outputs + self.bias_out[:, None, :]
        if self.output_scale:
            outputs = outputs * self.expert_scale[:, None, None]
        return outputs

    def _int8_variable_names(self):
        kernels = self._kernel_names()
        names = kernels + self._bias_names() + [f"{n}_scale" for n in kernels]
        return names + (["expert_scale"] if self.output_scale else [])

    def save_own_variables(self, store):
        if not self.built or self.quantization_mode is None:
            return super().save_own_variables(store)
        for i, name in enumerate(self._int8_variable_names()):
            store[str(i)] = getattr(self, name)
        store[_ACTIVATION_FLAG] = np.array(self.inputs_quantizer is not None, "int8")

    def load_own_variables(self, store):
        quantized_store = _ACTIVATION_FLAG in store
        if self.built and quantized_store and self.quantization_mode is None:
            # A quantised bank saved inside an MoE layer: the MoE layer has
            # rebuilt it as float from its own config; quantise it first.
            activations = bool(np.asarray(store[_ACTIVATION_FLAG]))
            self.quantize(
                "int8",
                config=keras.quantizers.Int8QuantizationConfig(
                    activation_quantizer="default" if activations else None
                ),
            )
        if not self.built or self.quantization_mode is None:
            if quantized_store:
                raise ValueError(
                    f"Layer '{self.name}' is not built and cannot load the "
                    "weights of a quantised expert bank."
                )
            return super().load_own_variables(store)
        if not quantized_store:
            raise ValueError(
                f"Layer '{self.name}' is quantised ({self.quantization_mode}) "
                "and cannot load the weights of a float expert bank: load "
                "them into a float bank, then call quantize()."
            )
        names = self._int8_variable_names()
        if len(store.keys()) != len(names) + 1:
            raise ValueError(
                f"Layer '{self.name}' expected {len(names)} variables, but "
                f"received {len(store.keys()) - 1} variables during loading. "
                f"Expected: {names}"
            )
        for i, name in enumerate(names):
            getattr(self, name).assign(store[str(i)])
        activations = bool(np.asarray(store[_ACTIVATION_FLAG]))
        if activations != (self.inputs_quantizer is not None):
            self.inputs_quantizer = (
                keras.quantizers.AbsMaxQuantizer() if activations else None
            )
            self.quantization_config = keras.quantizers.Int8QuantizationConfig(
                activation_quantizer="default" if activations else None
            )
