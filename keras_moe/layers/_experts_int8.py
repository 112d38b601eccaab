"""int8 expert banks: the quantisation half of `keras_moe.layers.Experts`.

Keras' hook: `Model.quantize` calls `quantize` on every leaf layer, and
`Layer.__call__` runs `quantized_call` -> `_int8_call` instead of `call`
once the dtype policy is `int8_from_<policy>`. `Experts` takes this mixin
for those methods, the int8 weights and their saving: each kernel
`W (E, i, o)` becomes int8 values `q` and float32 scales `s (E, o)`, one
per expert and output channel, `W ~ q / s` (see `Experts`).
"""

import keras
import numpy as np
from keras import ops

from keras_moe.utils.keras_internals import mark_quantized, untrack_variable

# The kernels of an expert bank, in the order they are saved; each has the
# expert axis first and its input axis second: (E, in, out).
KERNEL_NAMES = ("kernel_in", "kernel_gate", "kernel_out")
BIAS_NAMES = ("bias_in", "bias_gate", "bias_out")
# The weights-file entry of a quantised bank that records whether its
# activations are quantised too (the bank's own config is not saved when an
# MoE layer owns it: the MoE layer rebuilds it from its own config).
_ACTIVATION_FLAG = "int8_activations"


def resolved_policy(layer):
    """The dtype policy that applies to `layer` (resolving a policy map)."""
    policy = layer.dtype_policy
    if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
        return policy[layer.path] if layer.path else policy.default_policy
    return policy


class Int8ExpertsMixin:
    """int8 quantisation, the int8 forward pass and the saving of an int8
    expert bank (mixed into `Experts`)."""


    def _kernel_names(self):
        return [n for n in KERNEL_NAMES if getattr(self, n, None) is not None]

    def _bias_names(self):
        return [n for n in BIAS_NAMES if getattr(self, n, None) is not None]

    def _quantize_int8(self, mode, config=None):
        """Quantises the kernels to int8 in place (see `Experts.quantize`)."""
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
        current = resolved_policy(self)
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
        def linear(x, kernel, bias):
            y = self._int8_matmul(x, kernel)
            return y + getattr(self, bias)[:, None, :] if self.use_bias else y

        return self._ffn(inputs, linear, self._scale_buffers)

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
