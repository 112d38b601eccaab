"""Dropless sparse dispatch: expert-sorted rows in blocks (MegaBlocks-style).

The capacity path (`keras_moe.ops.dispatching`) gives every expert a buffer
of `C` rows; dropless routing with it needs `C = N`, so the experts compute
`E N` rows for `k N` useful ones: the cost of running every expert on every
token. Here every (token, choice) pair gets exactly one row instead:

1. The `P = N k` pairs are sorted by expert (stable: expert major, pair
   minor).
2. Each expert's group of rows is padded up to a multiple of the block size
   `B`, so that every block of `B` consecutive rows belongs to one expert.
3. All groups fit in a static row budget `R = ceil((P + E (B - 1)) / B) B`
   (every expert wastes at most `B - 1` rows), so every shape depends only
   on `N`, `k`, `E` and `B`, never on the routing: the whole path compiles
   under XLA.
4. The experts run as one batched matmul over the `R / B` blocks, each with
   its expert's weights (`keras_moe.layers.Experts.call_blocks`).
5. The rows go back to their tokens, weighted by the router weights.

The expert compute is `R` rows: `N k` plus at most `E (B - 1)` of padding,
instead of `E N`. No pair is ever dropped, so the result equals the dense
reference (`SparseMoE(dispatch="dense")`) and does not depend on the rest
of the batch.

The token and row gradients are gathers only (custom rules, as in
`dispatching`): a row's gradient goes back to its token through the plan,
never through the scatter-add that autodiff makes of a gather (a serial loop
on XLA CPU). The expert weights' gradients are autodiff's: the transposed
one-hot matmul, or with many experts the scatter-add of `take` over the
blocks (see `gather_experts`).

Isolation: empty rows are selected to zero (`where`, not a multiply), and
a token reads back only its own rows, so a NaN or Inf in one token never
reaches another token's output or gradient.

References:
    Gale, Narayanan, Young, Zaharia. MegaBlocks: Efficient Sparse Training
    with Mixture-of-Experts (2022).
"""

from keras import ops

from keras_moe.ops.dispatching import _custom_gradient, take_rows


def row_budget(num_pairs, num_experts, block_size):
    """Static row budget `ceil((P + E (B - 1)) / B) B` for `P` pairs.

    `P` may be a Python int, a scalar integer tensor (a dynamic batch in a
    TensorFlow graph) or a symbolic dimension (JAX shape-polymorphic export,
    whose dimensions are >= 1). No pairs (an empty batch) need no rows.
    """
    extra = num_experts * (block_size - 1) + block_size - 1
    budget = ((num_pairs + extra) // block_size) * block_size
    if hasattr(num_pairs, "dtype"):  # a tensor
        return ops.where(num_pairs > 0, budget, 0)
    if isinstance(num_pairs, int):
        return budget if num_pairs > 0 else 0
    return budget  # a symbolic dimension: at least 1 pair


def default_block_size(num_pairs, num_experts):
    """The block size used when a layer is not given one.

    Larger blocks waste more rows (the budget has `E (B - 1)` rows of
    padding on top of the `P = N k` pairs), smaller blocks materialise more
    copies of the expert weights (`P / B` blocks of `d x h` each, written and
    read forward and backward: memory traffic that on a CPU costs about
    `32 / B` of the block matmuls' time). The sum of the two, `E B / P +
    32 / B`, is smallest at `B = sqrt(32 P / E)`; this returns that rounded
    to a power of two in `[16, 256]`. Measured on 2 CPU cores with
    `N = 4096, k = 2` (benchmarks/moe_speed.py --block-sizes): the best `B`
    was 128-256 at `E = 8` and 64-128 at `E = 64`, as the formula gives.
    An unknown `P` (a dynamic batch in a TensorFlow graph) gets 64.
    """
    if num_pairs is None or not isinstance(num_pairs, int):
        return 64
    target = (32 * num_pairs / num_experts) ** 0.5
    block = 16
    while block < 256 and block * 1.5 < target:  # nearest power of two
        block *= 2
    return block


class BlockPlan(dict):
    """Where each (row, choice) pair of a dropless dispatch goes. Keys:

    - `expert_index` `(R, k)` int32, `valid` `(R, k)` bool: the pairs (an
      invalid pair, e.g. of a masked token, takes no row); `keep` is
      `valid` (nothing is dropped), for code written for a `DispatchPlan`.
    - `position` `(R, k)` int32: the pair's rank among its expert's rows.
    - `pair_row` `(R, k)` int32: the pair's row in the sorted, padded
      layout, `num_rows` for an invalid pair.
    - `row_pair` `(num_rows,)` int32: the flat pair (`r k + j`) held by
      each row, `P = R k` for a padding row.
    - `block_expert` `(num_rows / B,)` int32: the expert of each block.
    - `counts` `(E,)` int32: valid pairs per expert.

    plus the Python ints `num_experts`, `block_size`, `k` and
    `rows_per_token` (`T`: the plan's `R` rows are `T` pseudo-tokens per
    real token, token-major, as in `MultiGateMoE`), and `num_rows` /
    `num_tokens` (ints, or scalar tensors for a dynamic batch).
    """

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def make_block_plan(
    expert_index, num_experts, block_size=None, valid=None, rows_per_token=1
):
    """Sorts the (row, choice) pairs by expert into blocks of `block_size`.

    Args:
        expert_index: `(R, k)` integer tensor with values in `[0, E)`.
        num_experts: `E`, a Python int.
        block_size: `B`, a Python int >= 1, or `None` for
            `default_block_size`.
        valid: optional `(R, k)` bool: pairs to place (default: all).
        rows_per_token: `T` pseudo-tokens (rows) per real token.

    Returns:
        A `BlockPlan`.
    """
    expert_index = ops.cast(expert_index, "int32")
    shape = ops.shape(expert_index)
    rows, k = shape[0], shape[1]
    num_pairs = rows * k
    if block_size is None:
        block_size = default_block_size(num_pairs, num_experts)
    num_rows = row_budget(num_pairs, num_experts, block_size)

    flat = ops.reshape(expert_index, (-1,))
    if valid is not None:
        # Invalid pairs go to a bucket E that is sorted last and takes no row.
        flat = ops.where(ops.reshape(valid, (-1,)), flat, num_experts)
    else:
        valid = ops.ones_like(expert_index, dtype="bool")
    pair_ids = ops.arange(0, num_pairs, dtype="int32")
    # A unique key per pair makes any sort stable: expert major, pair minor.
    key = flat * num_pairs + pair_ids
    order = ops.cast(ops.argsort(key), "int32")  # sorted position -> pair
    sorted_expert = ops.take(flat, order, axis=0)

    one_hot = ops.one_hot(flat, num_experts + 1, dtype="int32")
    counts = ops.sum(one_hot, axis=0)[:num_experts]  # (E,)
    start = ops.cumsum(counts) - counts  # first sorted position of each expert
    padded = ((counts + block_size - 1) // block_size) * block_size
    padded_end = ops.cumsum(padded)
    padded_start = padded_end - padded

    placed = sorted_expert < num_experts
    expert_of_sorted = ops.minimum(sorted_expert, num_experts - 1)
    rank = pair_ids - ops.take(start, expert_of_sorted, axis=0)
    row_of_sorted = ops.where(
        placed, ops.take(padded_start, expert_of_sorted, axis=0) + rank, num_rows
    )
    pair_row = ops.scatter_update(
        ops.zeros((num_pairs,), "int32"), order[:, None], row_of_sorted
    )
    row_pair = ops.scatter_update(
        ops.full((num_rows + 1,), num_pairs, dtype="int32"),
        row_of_sorted[:, None],
        order,
    )[:num_rows]

    if block_size == 1:
        # Single rows, no padding: row r holds the r-th sorted pair (the
        # invalid pairs' bucket E last, clamped to a real expert).
        block_expert = ops.minimum(sorted_expert, num_experts - 1)
    else:
        block_start = (
            ops.arange(0, num_rows // block_size, dtype="int32") * block_size
        )
        block_expert = ops.sum(
            ops.cast(padded_end[None, :] <= block_start[:, None], "int32"), axis=1
        )
        block_expert = ops.minimum(block_expert, num_experts - 1)

    valid = ops.cast(valid, "bool")
    pair_row = ops.reshape(pair_row, (rows, k))
    position = ops.where(
        valid, pair_row - ops.take(padded_start, expert_index, axis=0), 0
    )
    return BlockPlan(
        expert_index=expert_index,
        valid=valid,
        keep=valid,
        position=position,
        pair_row=pair_row,
        row_pair=row_pair,
        block_expert=block_expert,
        counts=counts,
        num_experts=num_experts,
        block_size=block_size,
        k=k,
        rows_per_token=rows_per_token,
        num_rows=num_rows,
        num_pairs=num_pairs,
        num_tokens=rows // rows_per_token,
    )


def block_dispatch(tokens, plan, custom_gradient=True):
    """Gathers tokens into the plan's rows: `(N, d)` -> `(num_rows, d)`.

    Padding rows are zero. With `custom_gradient`, the gradient of token `n`
    is the sum of the gradients of its valid pairs' rows, a gather.
    """
    num_pairs = plan["num_pairs"]
    num_tokens = plan["num_tokens"]
    num_rows = plan["num_rows"]
    group = plan["k"] * plan["rows_per_token"]  # pairs per real token
    row_pair = plan["row_pair"]
    filled = row_pair < num_pairs
    source = ops.minimum(row_pair // group, num_tokens - 1)

    def forward(tokens):
        rows = take_rows(tokens, source)
        return ops.where(filled[:, None], rows, ops.zeros_like(rows)), None

    def backward(_, upstream):
        pair_row = ops.reshape(plan["pair_row"], (-1,))
        held = pair_row < num_rows
        g = take_rows(upstream, ops.minimum(pair_row, num_rows - 1))
        g = ops.where(held[:, None], g, ops.zeros_like(g))
        g = ops.reshape(g, (num_tokens, group, ops.shape(g)[-1]))
        return ops.sum(g, axis=1)

    tokens = ops.convert_to_tensor(tokens)
    if custom_gradient:
        return _custom_gradient(forward, backward)(tokens)
    return forward(tokens)[0]


def block_combine(row_outputs, plan, combine_weights, custom_gradient=True):
    """Gathers each pair's row back and mixes: `(num_rows, o)` -> `(R, o)`.

    `y[r] = sum_j valid[r, j] w[r, j] out[pair_row[r, j]]`, with a select
    (not a multiply by 0) so that no other row's value can leak in.
    """
    num_rows = plan["num_rows"]
    num_pairs = plan["num_pairs"]
    k = plan["k"]
    pair_row = plan["pair_row"]
    valid = plan["valid"]
    index = ops.minimum(pair_row, num_rows - 1)

    def forward(row_outputs, combine_weights):
        gathered = take_rows(row_outputs, index)  # (R, k, o)
        weights = ops.cast(combine_weights, gathered.dtype)
        mixed = ops.where(
            valid[..., None], weights[..., None] * gathered, ops.zeros_like(gathered)
        )
        return ops.sum(mixed, axis=1), (gathered, weights)

    def backward(residuals, upstream):  # upstream: (R, o)
        gathered, weights = residuals
        flat_weights = ops.reshape(ops.cast(weights, upstream.dtype), (-1,))
        row_pair = plan["row_pair"]
        held = row_pair < num_pairs
        pair = ops.minimum(row_pair, num_pairs - 1)
        d_rows = take_rows(upstream, pair // k) * ops.take(
            flat_weights, pair, axis=0
        )[:, None]
        d_rows = ops.where(held[:, None], d_rows, ops.zeros_like(d_rows))
        products = ops.sum(gathered * upstream[:, None, :], axis=-1)
        d_weights = ops.where(valid, products, ops.zeros_like(products))
        return (
            ops.cast(d_rows, row_outputs.dtype),
            ops.cast(d_weights, combine_weights.dtype),
        )

    row_outputs = ops.convert_to_tensor(row_outputs)
    combine_weights = ops.convert_to_tensor(combine_weights)
    if custom_gradient:
        return _custom_gradient(forward, backward)(row_outputs, combine_weights)
    return forward(row_outputs, combine_weights)[0]


def gather_experts(values, block_expert, num_experts, block_size):
    """`values[block_expert]`: one expert's weights per block, `(E, ...)` ->
    `(num_blocks, ...)`.

    Few experts for the block size (`8 E <= B`): a one-hot matmul
    `(num_blocks, E) x (E, size)`, whose gradient is the transposed matmul,
    never a scatter-add. It costs `E / B` of the block matmuls' FLOPs, and
    is 10x faster than `take` on torch, whose `index_select` copies large
    rows slowly on CPU (0.06 s against 0.58 s for 72 blocks of 256 x 1024
    weights). More experts: `take` (a copy; the one-hot FLOPs would exceed
    the matmuls': at `E = 128`, `B = 32` a training step took 2.8x the FFN's
    with `take` and 7.8x with the one-hot matmul on TensorFlow).
    """
    if 8 * num_experts > block_size:
        return ops.take(values, block_expert, axis=0)
    shape = tuple(values.shape)
    flat = ops.reshape(values, (num_experts, -1))
    one_hot = ops.one_hot(block_expert, num_experts, dtype=flat.dtype)
    gathered = ops.matmul(one_hot, flat)
    return ops.reshape(gathered, (-1,) + shape[1:])


def run_blocks(tokens, plan, combine_weights, experts, custom_gradient=True):
    """The whole dropless flow: dispatch to rows, the experts on the blocks,
    combine back. `(N, d)` -> `(R, o)` (`R = T N` rows of the plan).

    Args:
        tokens: `(N, d)`.
        plan: the `BlockPlan` of the tokens' routing.
        combine_weights: `(R, k)` router weights.
        experts: a callable `(rows, block_expert, block_size) -> (rows', o)`,
            e.g. `keras_moe.layers.Experts.call_blocks`.
        custom_gradient: use the gather-only gradient rules (layers pass
            `training`).
    """
    rows = block_dispatch(tokens, plan, custom_gradient=custom_gradient)
    outputs = experts(rows, plan["block_expert"], plan["block_size"])
    return block_combine(
        outputs, plan, combine_weights, custom_gradient=custom_gradient
    )
