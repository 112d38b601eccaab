"""The grouped matmul on PyTorch: host-side group sizes, eager mode only.

In eager mode the group sizes can be read on the host (`.tolist()`, one
device sync on an accelerator), and then the real rows split into groups of
run-time sizes: no padding to blocks and no copy of a weight matrix per
block, which is what the portable block path pays for its static shapes.
Two kernels:

- `grouped_mm` (the default where it runs): `torch.nn.functional.grouped_mm`
  (`torch._grouped_mm`) on the real rows with the groups' end offsets. In
  torch 2.13.0 it runs forward and backward on CPU for float32, bfloat16
  and float16 when every row stride is a multiple of 16 bytes (`K` and `N`
  multiples of 4 in float32), and was faster than the loop (see
  docs/performance.md, "Backend kernels"); its CUDA kernel needs bfloat16
  on SM >= 80, which has not been tested here, so on any other device or
  dtype, or for unaligned sizes, this falls back to the loop. Its output
  and its rows' gradient past the last offset are left uninitialised, so
  only the real rows are passed and the padding rows are added as zeros;
  its backward rejects an expanded (stride 0) output gradient, so the
  gradient is made contiguous first.
- `loop`: one `mm` / `addmm` (with the bias) per non-empty group of a
  `torch.split` of the real rows, `torch.cat`, and zero padding rows.

Autograd differentiates both. Neither can run where the group sizes are not
concrete values: under `torch.compile` (dynamo), `torch.export`, `torch.jit`
scripting or tracing, fx symbolic tracing, on meta or fake tensors (Keras'
shape inference on torch runs a layer on meta tensors) or on functorch
(`vmap`, `torch.func.grad`) tensors; `kernel_available` says so, and the
facade (`keras_moe.ops.grouped`) runs its portable reference there.

This is one of the backend modules of `keras_moe.ops.backends`, the only
modules of the package that import a framework.
"""

import torch
import torch.nn.functional as F
from torch._subclasses import fake_tensor

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _flag(module, name):
    """`module.name()` if torch has it, else False."""
    function = getattr(module, name, None)
    return bool(function()) if function is not None else False


def _in_graph_capture():
    """Whether torch is capturing a graph instead of running eagerly.

    (fx symbolic tracing is read from its flag: `is_fx_tracing()` warns on
    every call in torch 2.13, and `is_fx_symbolic_tracing` is newer.)"""
    fx = getattr(torch.fx, "_symbolic_trace", None)
    return (
        _flag(torch.compiler, "is_compiling")  # dynamo, torch.export (strict)
        or _flag(torch.compiler, "is_exporting")
        or torch.jit.is_scripting()
        or torch.jit.is_tracing()
        or (fx is not None and bool(getattr(fx, "_is_fx_tracing_flag", False)))
    )


def _is_symbolic(tensor):
    """A tensor without concrete values: meta, fake (export, compile) or
    functorch-wrapped (vmap, grad transforms)."""
    if not isinstance(tensor, torch.Tensor):
        return False
    if tensor.device.type == "meta":
        return True
    if fake_tensor.is_fake(tensor):
        return True
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(wrapped(tensor)) if wrapped is not None else False


def kernel_available(rows=None):
    """Whether the kernels can run: eager mode, and `rows` (if given) a
    tensor with values."""
    if _in_graph_capture():
        return False
    return rows is None or not _is_symbolic(rows)


def _host_sizes(rows, group_sizes):
    sizes = [int(s) for s in group_sizes.tolist()]
    total = sum(sizes)
    if total > rows.shape[0] or min(sizes, default=0) < 0:
        raise ValueError(
            "group_sizes must be >= 0 and sum to at most the number of rows "
            f"M={rows.shape[0]}. Received: group_sizes={sizes}"
        )
    return sizes, total


def _pad_rows(out, num_rows):
    """`out` `(S, N)` followed by `num_rows - S` zero rows."""
    return F.pad(out, (0, 0, 0, num_rows - out.shape[0]))


def loop_grouped_matmul(rows, weights, group_sizes, bias=None):
    """One `mm` (`addmm` with the bias) per non-empty group."""
    sizes, total = _host_sizes(rows, group_sizes)
    parts = torch.split(rows[:total], sizes)
    outputs = []
    for g, (size, part) in enumerate(zip(sizes, parts)):
        if size == 0:
            continue
        if bias is None:
            outputs.append(torch.mm(part, weights[g]))
        else:
            outputs.append(torch.addmm(bias[g], part, weights[g]))
    if not outputs:  # no real row: keep the graph connected (zero gradients)
        empty = rows[:0]
        outputs.append(
            torch.mm(empty, weights[0])
            if bias is None
            else torch.addmm(bias[0], empty, weights[0])
        )
    return _pad_rows(torch.cat(outputs), rows.shape[0])


class _ContiguousGradient(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous:
    `grouped_mm`'s backward rejects an expanded one (e.g. of a `sum`)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, gradient):
        return gradient.contiguous()


def _grouped_mm_runs(rows, weights):
    """Whether `grouped_mm` runs on these operands (tested configurations:
    CPU, float32 / bfloat16 / float16, 16-byte aligned row strides)."""
    if _GROUPED_MM is None or weights.shape[0] == 0:
        return False
    dtype = rows.dtype
    size = rows.element_size()
    return (
        rows.device.type == "cpu"
        and weights.device.type == "cpu"
        and dtype in _GROUPED_MM_DTYPES
        and weights.dtype == dtype
        and rows.is_contiguous()
        and weights.is_contiguous()
        and (rows.shape[1] * size) % 16 == 0
        and (weights.shape[2] * size) % 16 == 0
        and rows.data_ptr() % 16 == 0
        and weights.data_ptr() % 16 == 0
    )


def grouped_mm_grouped_matmul(rows, weights, group_sizes, bias=None):
    """`torch.nn.functional.grouped_mm` on the real rows (the loop where it
    does not run, see `_grouped_mm_runs`)."""
    if not _grouped_mm_runs(rows, weights):
        return loop_grouped_matmul(rows, weights, group_sizes, bias)
    sizes, total = _host_sizes(rows, group_sizes)
    if total == 0:  # grouped_mm rejects an operand without rows
        return loop_grouped_matmul(rows, weights, group_sizes, bias)
    offsets = torch.cumsum(group_sizes.to(torch.int32), 0, dtype=torch.int32)
    out = _GROUPED_MM(rows[:total], weights, offs=offsets)
    out = _ContiguousGradient.apply(out)
    if bias is not None:
        counts = torch.tensor(sizes, dtype=torch.int64, device=bias.device)
        out = out + torch.repeat_interleave(bias, counts, dim=0, output_size=total)
    return _pad_rows(out, rows.shape[0])


KERNELS = {"grouped_mm": grouped_mm_grouped_matmul, "loop": loop_grouped_matmul}
grouped_matmul = grouped_mm_grouped_matmul
