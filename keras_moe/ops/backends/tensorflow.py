"""The grouped matmul on TensorFlow: run-time shapes outside XLA.

Outside XLA, TensorFlow's tensors may have shapes known only at run time,
eagerly and in a graph (`tf.function` with `jit_compile=False`, as
`model.compile(jit_compile=False)` builds, and the functions a SavedModel
export traces). So the real rows, `rows[:sum(group_sizes)]`, are split by
the group sizes (`tf.split` with `num=G`: `G` pieces of run-time length),
each piece is multiplied by its group's matrix, and the products are
concatenated and padded with zero rows back to `M`. No block padding and no
per-block weight copy, unlike the portable block path.

The weights and bias are unstacked (`tf.unstack`), not indexed: the
gradient of `G` slices `weights[g]` would be `G` dense `(G, K, N)` tensors
summed, the gradient of an unstack is one stack.

Inside an XLA context (`tf.function(jit_compile=True)`, which Keras uses
for `jit_compile=True`, and TPU replication) every shape must be static, so
`kernel_available` is False there and the facade (`keras_moe.ops.grouped`)
runs its portable reference, which the planner avoids in favour of the
block path.

This is one of the backend modules of `keras_moe.ops.backends`, the only
modules of the package that import a framework.
"""

import tensorflow as tf

try:
    # TensorFlow's own XLA test (private: TensorFlow exports none).
    from tensorflow.python.ops import control_flow_util
except ImportError:  # pragma: no cover - a TensorFlow that moved it
    control_flow_util = None


def in_xla_context():
    """Whether the op being traced will be compiled by XLA.

    `tf.function(jit_compile=True)` enters an `XLAControlFlowContext` while
    it traces its body (and TPU replication a `TPUReplicateContext`, also an
    XLA context); `control_flow_util.GraphOrParentsInXlaContext` walks the
    default graph and its outer graphs for one, which is how TensorFlow's
    own ops choose an XLA-friendly form (e.g. `TensorArray`, `while_loop`).
    Walking the outer graphs matters: a `tf.function` traced inside an XLA
    function is compiled with it. Reading the function's `jit_compile`
    attribute instead would miss that nesting and auto-clustering. One case
    it cannot see: a `tf.function` already traced outside XLA and then
    called from inside an XLA function keeps its first trace (a Keras layer
    is not a `tf.function` of its own, so `fit` never does that).

    Without that private function, any graph counts as XLA (the reference
    compiles everywhere); eager execution is never XLA.
    """
    if tf.executing_eagerly():
        return False
    graph = tf.compat.v1.get_default_graph()
    if control_flow_util is None:
        return True
    return bool(control_flow_util.GraphOrParentsInXlaContext(graph))


def kernel_available(rows=None):
    """Whether the kernel can run: not in an XLA context."""
    del rows  # any TensorFlow tensor will do
    return not in_xla_context()


def split_grouped_matmul(rows, weights, group_sizes, bias=None):
    """`tf.split` of the real rows by the run-time group sizes, one matmul
    per group, concatenated and padded with zero rows."""
    num_groups = weights.shape[0]
    group_sizes = tf.cast(group_sizes, tf.int32)
    total = tf.reduce_sum(group_sizes)
    pieces = tf.split(rows[:total], group_sizes, num=num_groups, axis=0)
    matrices = tf.unstack(weights, num=num_groups, axis=0)
    biases = tf.unstack(bias, num=num_groups, axis=0) if bias is not None else None
    outputs = []
    for g, (piece, matrix) in enumerate(zip(pieces, matrices)):
        product = tf.matmul(piece, matrix)
        if biases is not None:
            product = product + biases[g]
        outputs.append(product)
    out = tf.concat(outputs, axis=0)
    out = tf.pad(out, [[0, tf.shape(rows)[0] - total], [0, 0]])
    return tf.ensure_shape(out, [rows.shape[0], weights.shape[-1]])


KERNELS = {"split": split_grouped_matmul}
grouped_matmul = split_grouped_matmul
