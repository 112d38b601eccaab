"""Static-shape, capacity-based token dispatch and combine.

These are pure functions on tensors built only from `keras.ops`, so they run on
TensorFlow, JAX and PyTorch and compile under XLA (`jit_compile=True`): every
shape depends only on the number of tokens `N`, the number of experts `E`, the
number of choices per token `k` and the capacity `C`, never on the routing.

The flow of one sparse MoE call::

    plan = make_dispatch_plan(expert_index, num_experts, capacity)   # who goes where
    buffers = dispatch(tokens, plan)           # (N, d)    -> (E, C, d)   a gather
    outputs = experts(buffers)                 # (E, C, d) -> (E, C, o)
    y = combine(outputs, plan, combine_weights)  # (E, C, o) -> (N, o)   a gather

Priority when an expert is over capacity follows GShard / Switch: all first
choices are placed before any second choice, and within one choice rank the
earlier token wins. A dropped (token, expert) pair contributes zero; the
token's other choices still count.
"""

from fractions import Fraction

import keras
from keras import ops

from keras_moe.utils import replicas


def compute_capacity(num_tokens, num_experts, k, capacity_factor):
    """Expert capacity `C = min(N, ceil(k * N / E * capacity_factor))`.

    The ratio `k * capacity_factor / E` is taken as an exact fraction `p / q`
    (`capacity_factor` rounded to 1e-4, and at least 1e-4), and
    `C = (N p + q - 1) // q` in integer arithmetic, so the same formula
    serves a Python int, a dynamic batch size tensor (TensorFlow graphs) and
    a symbolic dimension (JAX shape-polymorphic export). As `p >= 1`,
    `C >= 1` for every `N >= 1` (a factor below 1e-4, e.g. 1e-5, would
    otherwise round to 0 and give every expert 0 rows); `C = 0` for `N = 0`.

    Args:
        num_tokens: `N`: a Python int, a scalar integer tensor or a symbolic
            dimension.
        num_experts: `E`, a Python int.
        k: choices per token, a Python int.
        capacity_factor: float > 0, or `None` for dropless routing (`C = N`:
            no expert can receive more than every token once).

    Returns:
        The capacity, of the same kind as `num_tokens`.
    """
    if capacity_factor is None:
        return num_tokens
    factor = max(
        Fraction(capacity_factor).limit_denominator(10_000), Fraction(1, 10_000)
    )
    ratio = factor * Fraction(k, num_experts)
    if ratio >= 1:
        return num_tokens
    p, q = ratio.numerator, ratio.denominator
    if hasattr(num_tokens, "dtype"):  # a tensor: avoid int32 overflow
        n = ops.cast(num_tokens, "int64")
        return ops.cast((n * p + (q - 1)) // q, "int32")
    return (num_tokens * p + (q - 1)) // q


class DispatchPlan(dict):
    """Where each (token, choice) pair goes. A `dict` with the keys:

    - `expert_index` `(N, k)` int32: the chosen expert of each pair.
    - `position` `(N, k)` int32: the pair's row in its expert's buffer
      (may be `>= capacity`, then the pair is dropped).
    - `keep` `(N, k)` bool: the pair fits in its expert's buffer.
    - `slot` `(N, k)` int32: `expert * C + position` for kept pairs and the
      trash slot `E * C` for dropped ones.
    - `slot_pair` `(E * C,)` int32: the pair held by each buffer row, as
      the flat index `n * k + j` into the `(N, k)` arrays, `N * k` for an
      empty row.
    - `slot_token` `(E * C,)` int32: the token held by each buffer row
      (`slot_pair // k`), `N` for an empty row.

    plus the Python ints `num_experts` and `num_tokens`/`capacity` (or scalar
    tensors when the token count is dynamic). A plan may describe `R = N T`
    rows of `T` pseudo-tokens per real token (`MultiGateMoE`: one row per
    token and task, token-major); `dispatch` then reads `slot_token` and
    `num_tokens` of the real tokens.
    """

    def __getattr__(self, name):
        # AttributeError, not KeyError, so that `hasattr` and `getattr(...,
        # default)` work (JAX probes its arguments for `__jax_array__`).
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


ORDERS = ("choice", "token")


def _arrival_positions(expert_index, num_experts, valid=None, order="choice"):
    """Position of each pair among the pairs routed to the same expert, in
    the order (choice major, token minor), or with `order="token"` (token
    major, choice minor): a cumulative sum over a one-hot `(k N, E)` matrix.
    Invalid pairs take no position (and get one that only the caller's
    `keep` makes meaningless)."""
    choice_major = order == "choice"

    def flat(x):
        return ops.reshape(ops.transpose(x) if choice_major else x, (-1,))

    one_hot = ops.one_hot(flat(expert_index), num_experts, dtype="int32")
    if valid is not None:
        one_hot = one_hot * ops.cast(flat(valid), "int32")[:, None]
    position = ops.sum((ops.cumsum(one_hot, axis=0) - 1) * one_hot, axis=1)
    shape = ops.shape(expert_index)
    if not choice_major:
        return ops.reshape(position, (shape[0], shape[1]))
    return ops.transpose(ops.reshape(position, (shape[1], shape[0])))


def make_dispatch_plan(
    expert_index, num_experts, capacity, priority=None, valid=None, limit=None,
    order="choice",
):
    """Assigns every (token, choice) pair a row in its expert's buffer.

    Position of pair `(n, j)` routed to expert `e`: the number of pairs routed
    to `e` before it in the order (choice `j` major, token `n` minor), or
    with `order="token"` (token `n` major, choice `j` minor: a token's place
    then depends only on the tokens before it, as a causal model needs).
    With a `priority`, tokens are taken in decreasing priority instead of
    their order (batch-prioritized routing, Riquelme et al. 2021): when an
    expert overflows, its least confident tokens are the ones dropped.

    Args:
        expert_index: `(N, k)` integer tensor with values in `[0, E)`. Each row
            must hold distinct experts (a token sits at most once in an expert).
        num_experts: `E`.
        capacity: `C`, from `compute_capacity`.
        priority: optional `(N,)` float scores; higher goes first.
        valid: optional `(N, k)` bool: the pairs to place. An invalid pair
            (e.g. of a masked padding token) takes no row and no capacity,
            and `keep` is False for it.
        limit: optional capacity actually granted (`<= capacity`, may be a
            tensor): pairs at positions `>= limit` are dropped, while the
            buffers keep their static size `capacity`. Layers pass the
            capacity of the valid tokens, so that padding never changes
            which real pairs fit.
        order: `"choice"` (default) or `"token"`, see above.

    Returns:
        A `DispatchPlan`.
    """
    expert_index = ops.cast(expert_index, "int32")
    if valid is not None:
        valid = ops.cast(valid, "bool")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}. Received: order={order!r}")
    if priority is None:
        position = _arrival_positions(expert_index, num_experts, valid, order)
    else:
        priority = ops.stop_gradient(ops.convert_to_tensor(priority))
        ranking = ops.cast(ops.argsort(-priority), "int32")
        sorted_position = _arrival_positions(
            ops.take(expert_index, ranking, axis=0),
            num_experts,
            None if valid is None else ops.take(valid, ranking, axis=0),
            order,
        )
        # Undo the sort: row ranking[i] of the result is row i of the sorted.
        position = ops.scatter_update(
            ops.zeros_like(expert_index), ranking[:, None], sorted_position
        )
    keep = valid
    if limit is not None:
        fits = position < ops.cast(limit, "int32")
        keep = fits if keep is None else ops.logical_and(keep, fits)
    return plan_from_positions(expert_index, position, num_experts, capacity, keep=keep)


def plan_from_positions(expert_index, position, num_experts, capacity, keep=None):
    """A `DispatchPlan` from positions a router chose itself.

    For routers that assign buffer rows on their own (expert choice, balanced
    assignment). A pair is kept if `keep` (default: all) and
    `position < capacity`; kept pairs of one expert must have distinct
    positions.

    Args:
        expert_index: `(N, k)` int experts.
        position: `(N, k)` int rows in the experts' buffers.
        num_experts: `E`.
        capacity: `C`.
        keep: optional `(N, k)` bool mask.
    """
    expert_index = ops.cast(expert_index, "int32")
    position = ops.cast(position, "int32")
    shape = ops.shape(expert_index)
    num_tokens, k = shape[0], shape[1]
    fits = position < capacity
    keep = fits if keep is None else ops.logical_and(keep, fits)
    trash = num_experts * capacity
    slot = ops.where(keep, expert_index * capacity + position, trash)

    # Inverse map: buffer row -> pair. Dropped pairs all write the trash row
    # E*C (in any order), which is cut off.
    num_pairs = num_tokens * k
    empty = ops.full((trash + 1,), num_pairs, dtype="int32")
    slot_pair = ops.scatter_update(
        empty,
        ops.reshape(slot, (-1, 1)),
        ops.arange(0, num_pairs, dtype="int32"),
    )[:trash]
    slot_token = ops.where(slot_pair < num_pairs, slot_pair // k, num_tokens)

    return DispatchPlan(
        expert_index=expert_index,
        position=position,
        keep=keep,
        slot=slot,
        slot_pair=slot_pair,
        slot_token=slot_token,
        num_experts=num_experts,
        num_tokens=num_tokens,
        capacity=capacity,
    )


def take_rows(table, index):
    """`ops.take(table, index, axis=0)` for a `(rows, d)` table and an index
    tensor of any shape `S`: `(*S, d)`.

    Gathers with the flattened index and reshapes, because JAX's `take`
    drops the index dimensions when `table` has no rows (an empty batch):
    `(0, d)` at `(0, k)` gives `(0, d)` instead of `(0, k, d)`.
    """
    shape = tuple(ops.shape(index)) + (ops.shape(table)[-1],)
    return ops.reshape(ops.take(table, ops.reshape(index, (-1,)), axis=0), shape)


def _custom_gradient(forward, backward):
    """`forward(*xs) -> (y, residuals)` with the gradient rule
    `backward(residuals, dy) -> dxs`, as a `keras.ops.custom_gradient`
    function of `xs` returning `y`."""

    @ops.custom_gradient
    def function(*xs):
        y, residuals = forward(*xs)
        # The rule keeps the output's shape, never the output: on torch the
        # rule is stored in the autograd node that produced `y`, and a rule
        # holding `y` would make a reference cycle through that node, which
        # Python's garbage collector cannot see: every training step's graph
        # would stay in memory (about 100 MB a step in the text example).
        y_shape = ops.shape(y)

        def grad(*args, upstream=None):
            # The output gradient is positional on TensorFlow and JAX, and
            # the `upstream` keyword on torch. TensorFlow passes the gradient
            # of a gather of the output (e.g. `take` of some tokens) as
            # `IndexedSlices`, which a reshape makes dense.
            upstream = args[0] if upstream is None else upstream
            return backward(residuals, ops.reshape(upstream, y_shape))

        return y, grad

    def call(*xs):
        # A variable read inside a TensorFlow custom gradient would need a
        # `variables=` rule: read variables (e.g. passed straight in) first.
        return function(
            *(ops.copy(x) if isinstance(x, keras.Variable) else x for x in xs)
        )

    return call


def dispatch(tokens, plan, custom_gradient=True):
    """Gathers tokens into expert buffers.

    With `custom_gradient` (the default), a gather forward and a gather
    backward: the gradient of token `n` is the sum of the gradients of the
    buffer rows that hold it, `dx[n] = sum_j keep[n, j] * dbuf[slot[n, j]]`,
    read through the plan instead of the scatter-add that autodiff makes of
    a gather (a serial loop on XLA CPU). Layers pass
    `custom_gradient=training`: an inference graph then holds plain gathers
    only, which every exporter handles (a SavedModel exported from JAX
    cannot trace the gradient of a custom rule under symbolic shapes).

    Args:
        tokens: `(N, d)`.
        plan: the `DispatchPlan` of these tokens.
        custom_gradient: use the gather-only gradient rule.

    Returns:
        `(E, C, d)`: row `c` of expert `e` holds the token placed there, or
        zeros if the row is empty.

    No value of one token reaches another token's buffer row or gradient,
    NaN and Inf included: rows read from a stand-in token are replaced
    (`where`), never multiplied by 0 (`NaN * 0 = NaN`).
    """
    num_tokens = plan["num_tokens"]
    slot_token = plan["slot_token"]
    # The "empty" marker N is clamped to a real row and replaced by zeros.
    # (Padding `tokens` with a zero row instead makes XLA's compile time of
    # the gradient explode on TensorFlow: minutes at N=1024.)
    source = ops.minimum(slot_token, num_tokens - 1)
    filled = slot_token < num_tokens
    rows = plan["num_experts"] * plan["capacity"]

    def forward(tokens):
        buffers = ops.take(tokens, source, axis=0)
        return ops.where(filled[:, None], buffers, ops.zeros_like(buffers)), None

    def backward(_, upstream):
        g = take_rows(upstream, ops.minimum(plan["slot"], rows - 1))
        g = ops.where(plan["keep"][..., None], g, ops.zeros_like(g))  # (R, k, d)
        # R = N T rows (T pseudo-tokens per token, token-major).
        g = ops.reshape(g, (num_tokens, -1, ops.shape(g)[-1]))
        return ops.sum(g, axis=1)

    tokens = ops.convert_to_tensor(tokens)
    if custom_gradient:
        buffers = _custom_gradient(forward, backward)(tokens)
    else:
        buffers = forward(tokens)[0]
    d = ops.shape(tokens)[-1]
    return ops.reshape(buffers, (plan["num_experts"], plan["capacity"], d))


def combine(expert_outputs, plan, combine_weights, custom_gradient=True):
    """Gathers expert outputs back to their tokens and mixes them.

    `y[n] = sum_j keep[n, j] * w[n, j] * out[e_nj, pos_nj]`

    With `custom_gradient` (the default; see `dispatch`) the gradients are
    gathers too: `dout[s] = w[pair(s)] * dy[token(s)]` for the pair held by
    buffer row `s`, and `dw[n, j] = keep[n, j] * <out[slot[n, j]], dy[n]>`.

    Args:
        expert_outputs: `(E, C, o)`.
        plan: the `DispatchPlan` used to dispatch.
        combine_weights: `(N, k)` router weights.
        custom_gradient: use the gather-only gradient rule.

    Returns:
        `(N, o)`.

    As in `dispatch`, rows gathered for a dropped pair or an empty buffer
    row are replaced by zeros, never multiplied by 0, in the forward and the
    backward pass: a NaN in one token's row stays in that token.
    """
    rows = plan["num_experts"] * plan["capacity"]
    # Dropped pairs point at the trash slot E*C: clamp it to a real row, and
    # replace what it reads by zeros.
    slot = ops.minimum(plan["slot"], rows - 1)
    keep = plan["keep"]

    def forward(expert_outputs, combine_weights):
        flat = ops.reshape(expert_outputs, (rows, ops.shape(expert_outputs)[-1]))
        gathered = take_rows(flat, slot)  # (N, k, o)
        gathered = ops.where(keep[..., None], gathered, ops.zeros_like(gathered))
        weights = ops.where(keep, ops.cast(combine_weights, gathered.dtype), 0.0)
        # A multiply and a sum over k, not einsum("nk,nko->no"): backends
        # lower that einsum to N tiny batched matmuls.
        y = ops.sum(weights[:, :, None] * gathered, axis=1)
        return y, (gathered, weights)

    def backward(residuals, upstream):  # upstream: (N, o)
        gathered, weights = residuals
        flat_weights = ops.reshape(weights, (-1,))
        num_pairs = ops.shape(flat_weights)[0]
        held = plan["slot_pair"] < num_pairs
        pair = ops.minimum(plan["slot_pair"], num_pairs - 1)
        slot_weights = ops.where(held, ops.take(flat_weights, pair, axis=0), 0.0)
        token = ops.minimum(plan["slot_token"], plan["num_tokens"] - 1)
        d_out = ops.take(upstream, token, axis=0)
        d_out = ops.where(held[:, None], d_out, ops.zeros_like(d_out))
        d_out = d_out * slot_weights[:, None]
        d_weights = ops.where(keep, ops.sum(gathered * upstream[:, None, :], -1), 0.0)
        return (
            ops.cast(ops.reshape(d_out, ops.shape(expert_outputs)), expert_outputs.dtype),
            ops.cast(d_weights, combine_weights.dtype),
        )

    expert_outputs = ops.convert_to_tensor(expert_outputs)
    combine_weights = ops.convert_to_tensor(combine_weights)
    if custom_gradient:
        return _custom_gradient(forward, backward)(expert_outputs, combine_weights)
    return forward(expert_outputs, combine_weights)[0]


def gather_pairs(expert_outputs, plan):
    """The output of every (token, choice) pair: `(E, C, o)` -> `(N, k, o)`,
    zeros for a dropped pair (selected, never multiplied by 0: the row read
    for a dropped pair is another token's, and `NaN * 0 = NaN`)."""
    rows = plan["num_experts"] * plan["capacity"]
    flat = ops.reshape(expert_outputs, (rows, ops.shape(expert_outputs)[-1]))
    gathered = take_rows(flat, ops.minimum(plan["slot"], rows - 1))
    return ops.where(plan["keep"][..., None], gathered, ops.zeros_like(gathered))


def choice_matrix(weights, expert_index, num_experts):
    """The `(N, E)` matrix with `weights[n, j]` at `(n, expert_index[n, j])`
    (rows of `expert_index` hold distinct experts).

    A broadcast multiply and a sum over `k`: written as
    `einsum("nk,nke->ne")` it becomes `N` tiny batched matmuls on torch.
    """
    one_hot = ops.one_hot(expert_index, num_experts, dtype=weights.dtype)
    return ops.sum(weights[..., None] * one_hot, axis=-2)


def dense_gates(plan, combine_weights):
    """The `(N, E)` gate matrix of a plan: `w[n, j]` at `(n, e_nj)` if kept."""
    weights = ops.where(plan["keep"], ops.cast(combine_weights, "float32"), 0.0)
    return choice_matrix(weights, plan["expert_index"], plan["num_experts"])


def expert_counts(plan, selected=None):
    """Tokens routed to each expert before (`routed`) and after (`kept`) the
    capacity cut, both `(E,)` float32, over the global batch under data
    parallelism (`keras_moe.utils.replicas`).

    `selected` `(N, k)` bool marks the pairs a router that places tokens
    itself actually chose (e.g. expert choice); by default every pair counts.
    """
    one_hot = ops.one_hot(plan["expert_index"], plan["num_experts"])
    if selected is not None:
        one_hot = one_hot * ops.cast(selected, one_hot.dtype)[..., None]
    routed = ops.sum(one_hot, axis=(0, 1))
    kept = ops.sum(
        one_hot * ops.cast(plan["keep"], one_hot.dtype)[..., None], axis=(0, 1)
    )
    # Under data parallelism, the counts of the global batch.
    return replicas.cross_replica_sum(routed), replicas.cross_replica_sum(kept)
