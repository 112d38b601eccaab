"""The grouped matmul on JAX: `jax.lax.ragged_dot`, on GPU and TPU.

`jax.lax.ragged_dot(rows, weights, group_sizes)` is exactly this op, traced
with static shapes (the group sizes are a tensor), so it works under
`jax.jit`, `grad` and `vmap`. It is a real grouped kernel on TPU and, with
its Pallas lowering, on GPU; on CPU it lowers to a dense fallback (every
group's matmul on every row, masked), no faster than the portable paths.
So `kernel_available` is True only when JAX's default device is a GPU or a
TPU, and on CPU the facade (`keras_moe.ops.grouped`) runs its portable
reference, which the planner avoids in favour of the block path. The
kernel itself still runs on CPU, which is how the tests check it against
the reference.

The bias is added per row, through the group of each row (found from the
groups' end offsets), and the padding rows (past `sum(group_sizes)`) are
selected to zero with `where`, whatever `ragged_dot` leaves there.

This is one of the backend modules of `keras_moe.ops.backends`, the only
modules of the package that import a framework.
"""

import jax
import jax.numpy as jnp

# Platform names of `jax.default_backend()` with a real `ragged_dot`.
ACCELERATORS = ("gpu", "cuda", "rocm", "tpu")


def kernel_available(rows=None):
    """Whether `ragged_dot` is a real kernel here: a GPU or TPU default
    device."""
    del rows
    return jax.default_backend() in ACCELERATORS


def ragged_dot_grouped_matmul(rows, weights, group_sizes, bias=None):
    """`jax.lax.ragged_dot`, plus the bias of each row's group, with zero
    padding rows."""
    group_sizes = group_sizes.astype(jnp.int32)
    out = jax.lax.ragged_dot(rows, weights, group_sizes)
    end = jnp.cumsum(group_sizes)
    row = jnp.arange(rows.shape[0], dtype=jnp.int32)
    if bias is not None:
        # Row m is in the group whose end is the first one above m.
        group = jnp.searchsorted(end, row, side="right")
        group = jnp.minimum(group, weights.shape[0] - 1)
        out = out + jnp.take(bias, group, axis=0).astype(out.dtype)
    total = end[-1] if weights.shape[0] else 0
    return jnp.where((row < total)[:, None], out, jnp.zeros((), out.dtype))


KERNELS = {"ragged_dot": ragged_dot_grouped_matmul}
grouped_matmul = ragged_dot_grouped_matmul
