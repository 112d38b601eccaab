"""LoRA on expert banks: the low-rank half of `keras_moe.layers.Experts`.

`Experts.enable_lora(rank)` follows Keras' `Dense.enable_lora`: each kernel
`W (E, i, o)` of the bank (`kernel_in`, `kernel_gate`, `kernel_out`) gets
per-expert factors `A (E, i, r)` and `B (E, r, o)`, every linear map of the
experts becomes

`x W[e] + (alpha / r) (x A[e]) B[e]`

on every dispatch path (each path's linear map adds the low-rank term with
its own matmul: batched einsum, blocks, grouped matmul, int8), the base
weights are frozen and `B` starts at zero, so the outputs at enable time
are the bank's. The factors of all kernels live in two float32 variables
named as Keras names them, `lora_kernel_a` `(E, sum i, r)` and
`lora_kernel_b` `(E, r, sum o)` (one slice per kernel), so that keras-hub's
`Backbone.save_lora_weights` / `load_lora_weights`, which read and assign
`layer.lora_kernel_a` and `layer.lora_kernel_b`, reach a bank.

Where this differs from Keras' `Dense` (and why):

- every base weight is frozen, biases and output scales too (PEFT's
  default, `bias="none"`): a LoRA-enabled bank trains exactly
  `E r (i + o)` parameters per kernel, and `save_lora_weights` saves all of
  them (with trainable biases, their fine-tuned values would be lost);
- `.keras` files keep the factors apart from the base weights (Keras merges
  them into the kernel on saving and zeroes them on loading, after which
  both factors are zero and LoRA can no longer train; merging would also
  re-quantise an int8 base): a reloaded bank computes the same function and
  fine-tuning goes on;
- like Keras, a LoRA-enabled bank also loads weights saved without LoRA
  (base weights only, e.g. a pretrained bank): the base is loaded and `B`
  is reset to zero.
"""

import keras
from keras import ops

from keras_moe.utils import validation as check
from keras_moe.utils.keras_internals import unlocked_state

LORA_NAMES = ("lora_kernel_a", "lora_kernel_b")


def buffers_matmul(x, weights):
    """`(E, C, i) x (E, i, o) -> (E, C, o)`: each expert's rows times its
    own weights (the capacity path's product)."""
    return ops.einsum("eci,eio->eco", x, weights)


def _fresh(initializer, index):
    """A copy of a Keras initializer with its own seed (an unseeded one
    draws a new seed; a seeded one takes `seed + index`), so that two
    pieces of the same shape differ."""
    if not isinstance(initializer, keras.initializers.Initializer):
        return initializer
    piece = type(initializer).from_config(initializer.get_config())
    if isinstance(getattr(initializer, "seed", None), int):
        piece.seed = initializer.seed + index
    return piece


def _stacked_initializer(initializer, num_experts, sizes, rank, axis):
    """An initializer of a stacked factor: one piece per kernel, each drawn
    with the fans of one expert's factor (`(i, r)` for `A`, `(r, o)` for
    `B`) and its own seed, concatenated on `axis` (1 for `A`, 2 for `B`)."""
    from keras_moe.layers.experts import per_expert_initializer

    initializer = keras.initializers.get(initializer)

    def initialize(shape, dtype=None):
        pieces = []
        for index, size in enumerate(sizes):
            piece_shape = (
                (num_experts, size, rank) if axis == 1 else (num_experts, rank, size)
            )
            piece = per_expert_initializer(_fresh(initializer, index), num_experts)
            pieces.append(piece(piece_shape, dtype=dtype))
        return ops.concatenate(pieces, axis=axis)

    return initialize


class LoraExpertsMixin:
    """`enable_lora`, the low-rank term of the linear maps and the loading
    of LoRA-enabled banks (mixed into `Experts`)."""

    def _init_lora(self, lora_rank, lora_alpha):
        self.lora_rank = (
            None if lora_rank is None else check.positive_int("lora_rank", lora_rank)
        )
        if lora_alpha is not None:
            if self.lora_rank is None:
                raise ValueError(
                    "lora_alpha scales the LoRA term and needs lora_rank. "
                    f"Received: lora_alpha={lora_alpha!r}, lora_rank=None"
                )
            lora_alpha = check.positive_float("lora_alpha", lora_alpha)
        self.lora_alpha = lora_alpha
        self.lora_enabled = False

    def enable_lora(
        self,
        rank,
        lora_alpha=None,
        a_initializer="he_uniform",
        b_initializer="zeros",
    ):
        """Adds per-expert LoRA factors to every kernel and freezes the base.

        Each kernel `W (E, i, o)` gets `A (E, i, r)` (initialised with
        `a_initializer`, per expert: the fans of one `(i, r)` factor) and
        `B (E, r, o)` (`b_initializer`, zeros by default, so the outputs are
        unchanged); the experts compute `x W + (alpha / r) (x A) B`. Every
        base weight (kernels, biases, output scale) becomes non-trainable,
        so the bank trains `E r (i + o)` parameters per kernel. The base
        may be float or int8 (`quantize("int8")` before or after).

        Args:
            rank: `r`, at most the smallest side of any kernel.
            lora_alpha: the scale numerator (default: `rank`, a scale of 1).
            a_initializer: initializer of `A` (Keras' default, He uniform).
            b_initializer: initializer of `B` (zeros).
        """
        if not self.built:
            raise ValueError(
                f"Cannot enable LoRA on the expert bank {self.name!r}: it is "
                "not built yet (call it once, or build it, first)."
            )
        if self.lora_enabled:
            raise ValueError(
                f"LoRA is already enabled on {self.name!r} (rank "
                f"{self.lora_rank}); it can be enabled once per bank."
            )
        with unlocked_state(self):
            self._add_lora(rank, lora_alpha, a_initializer, b_initializer)

    def _add_lora(self, rank, lora_alpha, a_initializer="he_uniform",
                  b_initializer="zeros"):
        rank = check.positive_int("rank", rank)
        alpha = (
            float(rank)
            if lora_alpha is None
            else check.positive_float("lora_alpha", lora_alpha)
        )
        names = self._kernel_names()
        shapes = [tuple(getattr(self, name).shape) for name in names]
        smallest = min(min(shape[1], shape[2]) for shape in shapes)
        if rank > smallest:
            raise ValueError(
                f"The LoRA rank must be at most the smallest side of the "
                f"bank's kernels, {smallest} (a larger rank adds parameters, "
                f"not expressiveness). Received: rank={rank}, kernel shapes "
                f"{dict(zip(names, shapes))}"
            )
        e = self.num_experts
        base = list(self.weights)  # frozen below (the factors train)
        ins = [shape[1] for shape in shapes]
        outs = [shape[2] for shape in shapes]
        # float32 factors whatever the policy, as Keras' Dense: the updates
        # of low-rank factors underflow in bfloat16.
        self.lora_kernel_a = self.add_weight(
            name="lora_kernel_a",
            shape=(e, sum(ins), rank),
            initializer=_stacked_initializer(a_initializer, e, ins, rank, axis=1),
            dtype="float32",
            regularizer=self.kernel_regularizer,
        )
        self.lora_kernel_b = self.add_weight(
            name="lora_kernel_b",
            shape=(e, rank, sum(outs)),
            initializer=_stacked_initializer(b_initializer, e, outs, rank, axis=2),
            dtype="float32",
            regularizer=self.kernel_regularizer,
        )
        for variable in base:
            variable.trainable = False
        self.lora_enabled = True
        self.lora_rank = rank
        self.lora_alpha = alpha

    def _lora_variables(self):
        if not self.lora_enabled:
            return []
        return [self.lora_kernel_a, self.lora_kernel_b]

    def _lora_slice(self, kernel):
        """`(a0, a1, b0, b1)`: `kernel`'s rows of `lora_kernel_a` and
        columns of `lora_kernel_b` (the kernels in `_kernel_names` order)."""
        a0 = b0 = 0
        for name in self._kernel_names():
            _, i, o = getattr(self, name).shape
            if name == kernel:
                return a0, a0 + i, b0, b0 + o
            a0, b0 = a0 + i, b0 + o
        raise KeyError(kernel)

    def _lora_term(self, x, kernel, matmul, outputs):
        """`outputs + (alpha / r) matmul(matmul(x, A), B)` with `kernel`'s
        factors; `outputs` unchanged without LoRA. `matmul(x, w)` is the
        path's product of rows with per-expert weights `w (E, ., .)`."""
        if not self.lora_enabled:
            return outputs
        a0, a1, b0, b1 = self._lora_slice(kernel)
        a = self.lora_kernel_a[:, a0:a1, :]
        b = self.lora_kernel_b[:, :, b0:b1]
        low_rank = matmul(matmul(x, a), b)
        return outputs + ops.cast(
            self.lora_alpha / self.lora_rank, low_rank.dtype
        ) * low_rank

    def _saved_without_lora(self, store, count):
        """Whether `store` holds the `count - 2` entries of this bank saved
        without LoRA (its base weights only, e.g. a pretrained bank) while
        LoRA is enabled here: then the base is loaded and `B` reset to zero
        (`_reset_lora`), as Keras' `Dense` loads one."""
        return self.lora_enabled and len(store.keys()) == count - len(LORA_NAMES)

    def _reset_lora(self):
        self.lora_kernel_b.assign(ops.zeros(self.lora_kernel_b.shape))

    def load_own_variables(self, store):
        variables = self._trainable_variables + self._non_trainable_variables
        if not self._saved_without_lora(store, len(variables)):
            return super().load_own_variables(store)
        lora = {id(v) for v in self._lora_variables()}
        base = [v for v in variables if id(v) not in lora]
        for index, variable in enumerate(base):
            variable.assign(store[str(index)])
        self._reset_lora()
