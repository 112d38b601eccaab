"""PLACEHOLDER until the k31 branch (backend kernels) is merged."""

from keras import ops


def grouped_kernel_available():
    return False


def grouped_matmul(rows, weights, group_sizes, bias=None):
    ends = ops.cumsum(group_sizes)
    starts = ends - group_sizes
    index = ops.arange(0, ops.shape(rows)[0], dtype=ends.dtype)
    member = (index[:, None] >= starts[None]) & (index[:, None] < ends[None])
    out = ops.einsum("md,edh->meh", rows, weights)
    if bias is not None:
        out = out + bias[None]
    out = ops.where(member[..., None], out, ops.zeros_like(out))
    return ops.sum(out, axis=1)
