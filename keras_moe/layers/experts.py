"""Expert banks: `E` feed-forward experts stored as stacked weights.

`Experts` holds the weights of `E` two-layer MLPs (plain or GLU) with the
expert axis first, `(E, in, out)`, and runs them on the layout of each
dispatch path (`keras_moe.ops.planning.choose_path`): `(E, C, d)` capacity
buffers (`call`, one batched einsum), expert-sorted blocks (`call_blocks`)
and expert-sorted rows (`call_grouped`, one grouped matmul per weight, a
backend kernel). One function, `_ffn`, is the expert; each path supplies
only its linear map. int8 quantisation is `Int8ExpertsMixin`
(`_experts_int8.py`); the factory that MoE layers use to own banks is
`keras_moe.layers.expert_bank`.
"""

import keras
from keras import ops

from keras_moe import activations
from keras_moe.layers._experts_int8 import BIAS_NAMES, KERNEL_NAMES  # noqa: F401
from keras_moe.layers._experts_int8 import Int8ExpertsMixin
from keras_moe.ops.dropless import gather_experts
from keras_moe.ops.grouped import grouped_matmul
from keras_moe.utils import validation as check


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


@keras.saving.register_keras_serializable(package="keras_moe")
class Experts(Int8ExpertsMixin, keras.layers.Layer):
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

    The same function on the other layouts of the dispatch paths
    (`keras_moe.ops.planning.choose_path`; `dispatch_paths` says which this
    bank's weights allow): `call_blocks` on expert-sorted blocks (dropless)
    and `call_grouped` on expert-sorted rows through one grouped matmul per
    weight (`keras_moe.ops.grouped_matmul`, a backend kernel).

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


    @property
    def dispatch_paths(self):
        """The dispatch paths this bank runs (`keras_moe.ops.planning`):
        every path with float kernels; capacity buffers only when int8."""
        if self.quantization_mode is not None:
            return ("capacity",)
        return ("capacity", "grouped", "blocks")

    def _ffn(self, x, linear, scale):
        """The expert, `act(x W1 + b1) W2 + b2` (or the GLU form), on any
        layout: `linear(x, kernel_name, bias_name)` is the path's `x W + b`
        with each row's own expert, `scale(y)` its per-expert output scale."""
        hidden = linear(x, "kernel_in", "bias_in")
        if self.gated:
            hidden = self._glu(linear(x, "kernel_gate", "bias_gate"), hidden)
        else:
            hidden = self.activation(hidden)
        outputs = linear(hidden, "kernel_out", "bias_out")
        return scale(outputs) if self.output_scale else outputs

    def _scale_buffers(self, outputs):
        return outputs * self.expert_scale[:, None, None]

    def call(self, inputs):
        def linear(x, kernel, bias):
            y = ops.einsum("ecd,edh->ech", x, getattr(self, kernel))
            return y + getattr(self, bias)[:, None, :] if self.use_bias else y

        return self._ffn(inputs, linear, self._scale_buffers)

    def _check_float(self, method):
        if self.quantization_mode is not None:
            raise ValueError(
                f"{self.name}: {method} needs float kernels; a quantised "
                f"bank ({self.quantization_mode}) runs on (E, C, d) buffers."
            )

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
        self._check_float("call_blocks")

        def weights(variable):
            return gather_experts(
                variable, block_expert, self.num_experts, block_size
            )

        def linear(x, kernel, bias):
            y = ops.einsum("nbd,ndh->nbh", x, weights(getattr(self, kernel)))
            if self.use_bias:
                y = y + weights(getattr(self, bias))[:, None, :]
            return y

        def scale(outputs):
            return outputs * weights(self.expert_scale)[:, None, None]

        x = ops.reshape(rows, (-1, block_size, ops.shape(rows)[-1]))
        outputs = self._ffn(x, linear, scale)
        return ops.reshape(outputs, (-1, ops.shape(outputs)[-1]))

    def call_grouped(self, rows, group_sizes, row_expert=None):
        """Runs the experts on expert-sorted rows, one grouped matmul per
        weight (`keras_moe.ops.grouped_matmul`: a backend kernel where one
        runs, see `keras_moe.ops.grouped_kernel_available`).

        `rows` `(R, d)`: expert `e`'s rows are the `group_sizes[e]` rows
        after those of experts `0..e-1` (a `make_block_plan(block_size=1)`
        layout); rows past `sum(group_sizes)` are padding and give zeros
        (before the output scale). The cost is that of the real rows, with
        no padding to a block size.

        Args:
            rows: `(R, d)`.
            group_sizes: `(E,)` int32 rows per expert.
            row_expert: `(R,)` int32 expert of each row; needed only with
                `output_scale`.

        Returns:
            `(R, o)`.
        """
        self._check_float("call_grouped")

        def linear(x, kernel, bias):
            return grouped_matmul(
                x,
                getattr(self, kernel),
                group_sizes,
                bias=getattr(self, bias) if self.use_bias else None,
            )

        def scale(outputs):
            if row_expert is None:
                raise ValueError(
                    f"{self.name}: call_grouped needs row_expert with "
                    "output_scale=True"
                )
            return outputs * ops.take(self.expert_scale, row_expert, axis=0)[:, None]

        return self._ffn(rows, linear, scale)

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
        self._quantize_int8(mode, config)
