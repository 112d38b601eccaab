"""Backend kernels: the one home of code that imports a framework.

Everything else in keras_moe is written with `keras.ops` and runs on every
backend. A few ops have a much faster form that only a backend can express
(run-time shapes, a host loop over groups, a primitive Keras does not
expose); such a kernel lives here, in `keras_moe/ops/backends/<backend>.py`,
named after the Keras backend (`tensorflow.py`, `jax.py`, `torch.py`), and
is reached only through a facade op in `keras_moe/ops/` (today one:
`keras_moe.ops.grouped_matmul`, in `grouped.py`). The facade picks the
module at import from `keras.backend.backend()`, the way Keras picks its
backend module, and falls back to a portable `keras.ops` reference wherever
the module says its kernel cannot run. These modules may import their
framework (and only theirs); no other module of the package may, and only
`load` imports them, so that a process imports the framework of its backend
only.

A backend module provides:

- `KERNELS`: `{name: function}`, its implementations of the op, the default
  first, each `(rows, weights, group_sizes, bias) -> out` on tensors of the
  backend (tests call every one of them against the reference);
- `grouped_matmul(rows, weights, group_sizes, bias=None)`: the default;
- `kernel_available(rows=None) -> bool`: whether the default can run in the
  current tracing context (and on `rows`, if given).
"""

import importlib

# Keras backend name -> module of this package. A backend that is not here
# (numpy, openvino) has no kernel: the facade always runs its reference.
MODULES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}


def load(backend):
    """The kernel module of the Keras backend `backend`, or None."""
    name = MODULES.get(backend)
    if name is None:
        return None
    return importlib.import_module(f"{__name__}.{name}")
