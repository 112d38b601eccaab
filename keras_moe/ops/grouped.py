"""A grouped matmul over rows sorted by group: one op, a kernel per backend.

`grouped_matmul(rows, weights, group_sizes)` multiplies each contiguous group
of rows by its own matrix: the expert computation of a dropless MoE once the
(token, expert) pairs are sorted by expert, without the block padding and
per-block weight copies of the portable block path
(`keras_moe.ops.dropless`).

Keras has no such op (no `ragged_dot`), but each backend has a way to run
it, and this module is the one place that chooses: at import, from
`keras.backend.backend()`, it loads the implementation module
`keras_moe.ops.backends.<backend>` (the way Keras picks its backend module),
and at each call it asks that module whether its kernel can run *in the
current tracing context* (`grouped_kernel_available`). Where it cannot (a
compiler that needs static shapes, a device where the kernel is only a dense
fallback, shape inference on meta tensors) and where the kernels are
switched off (`use_kernels(False)`, e.g. for an export that must hold only
portable ops), the portable reference runs instead
(`reference_grouped_matmul`: `keras.ops` only). Which kernel runs where:

| backend | kernel | where it runs |
|---|---|---|
| torch | `torch.nn.functional.grouped_mm` on CPU (float16/32, bfloat16, row strides multiples of 16 bytes); elsewhere one `addmm` per non-empty group | eager only: not under `torch.compile`, `torch.export`, `torch.jit`, fx tracing, on meta/fake or functorch tensors |
| tensorflow | `tf.split` of the real rows by the run-time group sizes, one matmul per group | eagerly and in a `tf.function` without XLA (`jit_compile=False`, SavedModel tracing); not in an XLA context |
| jax | `jax.lax.ragged_dot` | when the default device is a GPU or TPU (on CPU it is a dense fallback) |

Every kernel is tested equal to the reference, outputs and gradients
(`tests/ops/test_grouped_matmul.py`). Gradients are each framework's own
autodiff of its kernel; they are only defined through a framework's
differentiation (no custom rule here).

Only the modules in `keras_moe/ops/backends/` import a framework; this one
imports `keras` and the backend module chosen at import.
"""

import keras
from keras import ops

from keras_moe.ops import backends

_BACKEND = backends.load(keras.backend.backend())
_kernels_enabled = True


class use_kernels:
    """Switches the backend kernels on or off, for the whole process.

    `use_kernels(False)` makes every later `grouped_matmul` run the portable
    reference and `grouped_kernel_available()` return False (e.g. before
    exporting a model, so that the exported graph holds `keras.ops` only);
    `use_kernels(True)` switches them back. Used as a context manager, it
    restores the previous setting on exit:

    >>> from keras_moe.ops import grouped
    >>> with grouped.use_kernels(False):
    ...     grouped.grouped_kernel_available()
    False

    The setting is global (not per thread), and read when an op is traced:
    a compiled function keeps the path it was traced with.

    Args:
        enabled: a bool.
    """

    def __init__(self, enabled):
        global _kernels_enabled
        if not isinstance(enabled, bool):
            raise ValueError(
                f"enabled must be a bool (True or False). Received: "
                f"enabled={enabled!r}"
            )
        self.previous = _kernels_enabled
        self.enabled = enabled
        _kernels_enabled = enabled

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        global _kernels_enabled
        _kernels_enabled = self.previous
        return False


def kernels_enabled():
    """Whether the backend kernels are switched on (`use_kernels`)."""
    return _kernels_enabled


def grouped_kernel_available(rows=None):
    """Whether `grouped_matmul` would run a backend kernel here.

    True when the running backend has a grouped-matmul kernel, the kernels
    are switched on (`use_kernels`) and the kernel can run in the current
    tracing context: eager torch (not under `torch.compile`/export/jit
    tracing), TensorFlow outside an XLA context, JAX on a GPU or TPU. With
    `rows`, the tensor that would be passed is checked too (torch: not a
    meta or fake tensor, as in Keras' shape inference). A planner asks this
    to choose a grouped path over the portable block path.

    Args:
        rows: optional, the `rows` tensor of the call.

    Returns:
        A Python bool.
    """
    if not _kernels_enabled or _BACKEND is None:
        return False
    return bool(_BACKEND.kernel_available(rows))


def grouped_matmul(rows, weights, group_sizes, bias=None):
    """Multiplies each contiguous group of rows by its group's matrix.

    With `start_g = sum_{h < g} group_sizes[h]` and `S = sum_g group_sizes`:

    `out[m] = rows[m] @ weights[g] (+ bias[g])` for
    `start_g <= m < start_g + group_sizes[g]`, and `out[m] = 0` for the
    padding rows `m >= S`.

    Groups may be empty and one group may hold every row. A padding row's
    output is selected to zero (never multiplied by 0), so a NaN in a
    padding row stays out of the output, and a NaN in a row reaches only
    that row's output. Differentiable in `rows`, `weights` and `bias`.

    Runs the backend's kernel where `grouped_kernel_available(rows)`, the
    portable reference elsewhere (see the module docstring).

    Args:
        rows: `(M, K)`, sorted by group.
        weights: `(G, K, N)`.
        group_sizes: `(G,)` integer tensor, `sum(group_sizes) <= M`.
        bias: optional `(G, N)`.

    Returns:
        `(M, N)`.

    Example:

    >>> import keras, numpy as np
    >>> rows = np.ones((5, 2), "float32")
    >>> weights = np.stack([np.eye(2), 2 * np.eye(2)]).astype("float32")
    >>> out = grouped_matmul(rows, weights, np.array([1, 3], "int32"))
    >>> keras.ops.convert_to_numpy(out)
    array([[1., 1.], [2., 2.], [2., 2.], [2., 2.], [0., 0.]], dtype=float32)
    """
    rows, weights, group_sizes, bias = _standardize(rows, weights, group_sizes, bias)
    if grouped_kernel_available(rows):
        return _BACKEND.grouped_matmul(rows, weights, group_sizes, bias)
    return _reference(rows, weights, group_sizes, bias)


def reference_grouped_matmul(rows, weights, group_sizes, bias=None):
    """The portable `grouped_matmul` (`keras.ops` only): every group's matmul
    on every row, then each row selects its own group's product.

    It costs `G` times the FLOPs and holds `G x M x (K + N)` values, so it
    is meant for tests and small sizes; at scale the block path
    (`keras_moe.ops.dropless`) is the portable alternative. A row is masked
    to zero before the matmuls of the groups it is not in, so that a NaN
    row reaches no other group's weight gradient either. The kernels are
    tested against this.

    Args and returns: as `grouped_matmul`.
    """
    return _reference(*_standardize(rows, weights, group_sizes, bias))


def backend_kernels():
    """The running backend's kernels, `{name: function}` (empty if it has
    none), each called as `grouped_matmul` is, on tensors of the backend.
    For tests and benchmarks: `grouped_matmul` chooses the first."""
    return dict(_BACKEND.KERNELS) if _BACKEND is not None else {}


def group_membership(group_sizes, num_rows):
    """`(G, M)` bool: `member[g, m]` iff row `m` is in group `g` (a padding
    row is in none)."""
    group_sizes = ops.cast(group_sizes, "int32")
    end = ops.cumsum(group_sizes)
    start = end - group_sizes
    row = ops.arange(0, num_rows, dtype="int32")[None, :]
    return ops.logical_and(row >= start[:, None], row < end[:, None])


def _standardize(rows, weights, group_sizes, bias):
    rows = ops.convert_to_tensor(rows)
    weights = ops.convert_to_tensor(weights)
    group_sizes = ops.cast(ops.convert_to_tensor(group_sizes), "int32")
    if len(rows.shape) != 2 or len(weights.shape) != 3:
        raise ValueError(
            "grouped_matmul takes rows (M, K) and weights (G, K, N). "
            f"Received: rows.shape={tuple(rows.shape)}, "
            f"weights.shape={tuple(weights.shape)}"
        )
    num_groups, k, n = weights.shape
    if None not in (rows.shape[1], k) and rows.shape[1] != k:
        raise ValueError(
            "rows and weights must agree on K: rows (M, K), weights (G, K, N). "
            f"Received: rows.shape={tuple(rows.shape)}, "
            f"weights.shape={tuple(weights.shape)}"
        )
    if tuple(group_sizes.shape) != (num_groups,):
        raise ValueError(
            "group_sizes must have one entry per group of weights (G,). "
            f"Received: group_sizes.shape={tuple(group_sizes.shape)}, "
            f"weights.shape={tuple(weights.shape)}"
        )
    if bias is not None:
        bias = ops.convert_to_tensor(bias)
        if tuple(bias.shape) != (num_groups, n):
            raise ValueError(
                "bias must be (G, N), one row per group of weights (G, K, N). "
                f"Received: bias.shape={tuple(bias.shape)}, "
                f"weights.shape={tuple(weights.shape)}"
            )
    return rows, weights, group_sizes, bias


def _reference(rows, weights, group_sizes, bias):
    member = group_membership(group_sizes, ops.shape(rows)[0])[:, :, None]
    zero = ops.zeros((), rows.dtype)
    selected = ops.where(member, rows[None, :, :], zero)  # (G, M, K)
    products = ops.einsum("gmk,gkn->gmn", selected, weights)
    if bias is not None:
        products = products + ops.cast(bias, products.dtype)[:, None, :]
    kept = ops.where(member, products, ops.zeros((), products.dtype))
    # One non-zero term per row: the sum is that row's product, exactly.
    return ops.sum(kept, axis=0)
