import keras
from keras import ops

from keras_moe.layers import _validation as check


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

    Args:
        num_experts: `E`, the number of experts.
        hidden_dim: `h`, the hidden width of each expert.
        output_dim: `o`, the output width; defaults to the input width `d`.
        activation: the hidden activation (any Keras activation).
        gated: use the gated (GLU) variant.
        use_bias: add biases.
        kernel_initializer: initializer of the kernels. Fan-based
            initializers use the fans of one expert (`d`, `h`).
        bias_initializer: initializer of the biases.
        kernel_regularizer: regularizer applied to each kernel.
        bias_regularizer: regularizer applied to each bias.
        **kwargs: base `Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: `(E, C, d)`: `C` tokens (rows) for each of the `E` experts,
            e.g. the output of `keras_moe.ops.dispatch`.

    Returns:
        `(E, C, o)`.

    Example:

    >>> import numpy as np
    >>> experts = Experts(num_experts=4, hidden_dim=32, output_dim=8)
    >>> experts(np.zeros((4, 10, 16), "float32")).shape
    (4, 10, 8)

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
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_experts = check.positive_int("num_experts", num_experts)
        self.hidden_dim = check.positive_int("hidden_dim", hidden_dim)
        self.output_dim = (
            None
            if output_dim is None
            else check.positive_int("output_dim", output_dim)
        )
        self.activation = keras.activations.get(activation)
        self.gated = bool(gated)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)

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

        self.kernel_in = kernel("kernel_in", (e, d, h))
        self.kernel_gate = kernel("kernel_gate", (e, d, h)) if self.gated else None
        self.kernel_out = kernel("kernel_out", (e, h, o))
        if self.use_bias:
            self.bias_in = bias("bias_in", (e, h))
            self.bias_gate = bias("bias_gate", (e, h)) if self.gated else None
            self.bias_out = bias("bias_out", (e, o))
        else:
            self.bias_in = self.bias_gate = self.bias_out = None

    def call(self, inputs):
        hidden = ops.einsum("ecd,edh->ech", inputs, self.kernel_in)
        if self.use_bias:
            hidden = hidden + self.bias_in[:, None, :]
        if self.gated:
            gate = ops.einsum("ecd,edh->ech", inputs, self.kernel_gate)
            if self.use_bias:
                gate = gate + self.bias_gate[:, None, :]
            hidden = self.activation(gate) * hidden
        else:
            hidden = self.activation(hidden)
        outputs = ops.einsum("ech,eho->eco", hidden, self.kernel_out)
        if self.use_bias:
            outputs = outputs + self.bias_out[:, None, :]
        return outputs

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
            activation=keras.activations.serialize(self.activation),
            gated=self.gated,
            use_bias=self.use_bias,
            kernel_initializer=keras.initializers.serialize(
                self.kernel_initializer
            ),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
            kernel_regularizer=keras.regularizers.serialize(
                self.kernel_regularizer
            ),
            bias_regularizer=keras.regularizers.serialize(self.bias_regularizer),
        )
        return config
