"""Capacity, path and plan: the planning rules every routed layer shares.

A routed layer (through `keras_moe.ops.pipeline`) does, on each call of its
`N` tokens and `E` experts:

1. picks the capacity factor: `capacity_factor` in training,
   `eval_capacity_factor` in inference (`capacity_factor_for`);
2. computes the capacity `C` of every expert's buffer (`choose_capacity`).
   The buffers keep a static size from `N`; with a token mask, the capacity
   actually granted is that of the valid tokens (a tensor), so padding never
   changes which real pairs fit;
3. calls its router, and hands that capacity to a router that places the
   tokens in the buffers itself (`router_capacity`);
4. chooses the dispatch path (`choose_path`: capacity buffers, dropless
   blocks, a grouped-matmul kernel, or the dense reference), the one place
   that choice is made;
5. turns the routing into that path's plan (`plan_dispatch`;
   `plan_task_dispatch` for the `T` routers of a multi-task layer): a
   capacity plan (`make_dispatch_plan`, or `plan_from_positions` for a
   router that placed its tokens) or, dropless, expert-sorted rows
   (`make_block_plan`).

Everything here is a function of tensors and Python values (routers and
banks are only asked what they declare), so the layers share one
implementation of the capacity and path rules.
"""

import inspect
from typing import NamedTuple

from keras import ops

from keras_moe.ops import dispatching
from keras_moe.ops import dropless
from keras_moe.ops import grouped


class Capacity(NamedTuple):
    """The capacity of one call.

    - `factor`: the capacity factor in use (`None`: dropless).
    - `capacity`: `C`, the static size of each expert's buffer, from `N`.
    - `limit`: the capacity granted to the valid tokens (a scalar tensor)
      when a token mask is given and `factor` is not `None`, else `None`.
    """

    factor: object
    capacity: object
    limit: object = None

    @property
    def granted(self):
        """The capacity the tokens actually get: `limit`, or `capacity`."""
        return self.capacity if self.limit is None else self.limit


def capacity_factor_for(training, capacity_factor, eval_capacity_factor):
    """`capacity_factor` in training, `eval_capacity_factor` in inference."""
    return capacity_factor if training else eval_capacity_factor


def count_valid(valid):
    """The number of `True` tokens of the `(N,)` bool `valid`, or `None`."""
    return None if valid is None else ops.sum(ops.cast(valid, "int32"))


def _limit(num_valid, num_experts, k, capacity_factor):
    if num_valid is None or capacity_factor is None:
        return None
    return dispatching.compute_capacity(num_valid, num_experts, k, capacity_factor)


def choose_capacity(num_tokens, num_experts, k, capacity_factor, num_valid=None):
    """The `Capacity` of `N = num_tokens` tokens with `k` choices each:
    `C = compute_capacity(N, E, k, capacity_factor)` and, given the count of
    valid tokens `num_valid` (`count_valid`), the capacity they are granted,
    `compute_capacity(num_valid, E, k, capacity_factor)`.

    Example:

    >>> choose_capacity(8, 4, 2, 1.0).capacity
    4
    >>> choose_capacity(8, 4, 2, None)  # dropless: C = N
    Capacity(factor=None, capacity=8, limit=None)
    """
    return Capacity(
        capacity_factor,
        dispatching.compute_capacity(num_tokens, num_experts, k, capacity_factor),
        _limit(num_valid, num_experts, k, capacity_factor),
    )


def assigns_positions(router):
    """Whether `router` places the tokens in the expert buffers itself (as
    expert choice does: it takes a `capacity=` call argument and returns
    `position` and `keep`). The one place this is asked: a router that does
    not declare `assigns_positions` (a duck-typed one) places nothing."""
    return bool(getattr(router, "assigns_positions", False))


def accepts_mask(router):
    """Whether a router's `call` takes the `mask=` argument."""
    return "mask" in inspect.signature(router.call).parameters


def router_capacity(router, capacity):
    """The `capacity=` call argument of `router` (its granted capacity), or
    `None` for a router that does not place tokens itself."""
    return capacity.granted if assigns_positions(router) else None


# The dispatch paths, in the order `choose_path` prefers them.
PATHS = ("dense", "capacity", "grouped", "blocks")


def bank_paths(bank):
    """The dispatch paths an expert bank can run: its `dispatch_paths`
    attribute (`keras_moe.layers.Experts` says which its weights allow),
    or only the capacity buffers for any other callable on `(E, C, d)`."""
    return tuple(getattr(bank, "dispatch_paths", ("capacity",)))


def choose_path(capacity_factor, routers=(), bank=None, dispatch="sparse",
                sharded=False):
    """The dispatch path of one call: the one place it is chosen.

    - `"dense"`: `dispatch="dense"`, every expert on every token, masked
      (the numerical reference; capacity drops still apply).
    - `"capacity"`: `(E, C, d)` buffers. With a capacity factor; for a
      router that places its tokens itself (expert choice, BASE); for a bank
      that runs on buffers only (e.g. int8 kernels); and when a distribution
      shards the buffers (`sharded`: blocks mix experts, so every device
      would gather every expert's weights). Dropless (`capacity_factor=None`)
      it holds `C = N` rows per expert: exact, at the dense cost.
    - `"grouped"`: dropless, the `N k` pairs sorted by expert and run through
      one grouped matmul (`keras_moe.ops.grouped_matmul`), where a backend
      kernel runs in the current context (`grouped_kernel_available`).
    - `"blocks"`: dropless, expert-sorted blocks (`make_block_plan`, the
      portable path and the reference of the grouped kernels).

    Args:
        capacity_factor: the call's capacity factor (`None`: dropless).
        routers: the routers of the call (one, or one per task).
        bank: the expert bank (see `bank_paths`); `None`: any path.
        dispatch: the layer's `"sparse"` or `"dense"`.
        sharded: whether a distribution lays out the expert buffers.
    """
    if dispatch == "dense":
        return "dense"
    paths = PATHS if bank is None else bank_paths(bank)
    if (
        capacity_factor is not None
        or sharded
        or any(assigns_positions(r) for r in routers)
    ):
        return "capacity"
    if "grouped" in paths and grouped.grouped_kernel_available():
        return "grouped"
    return "blocks" if "blocks" in paths else "capacity"


def _selected_pairs(routing, valid):
    """`(N, k)` bool pairs that count: the router's `keep` (routers that
    place tokens mark their choices) and the valid tokens; `None`: all."""
    selected = routing.get("keep")
    if valid is not None:
        valid_pairs = ops.broadcast_to(
            valid[:, None], ops.shape(routing["expert_index"])
        )
        selected = (
            valid_pairs if selected is None else ops.logical_and(selected, valid_pairs)
        )
    return selected


def plan_dispatch(
    routing, num_experts, capacity, valid=None, path="capacity", block_size=None,
    order="choice",
):
    """The dispatch plan of one router's routing of `N` tokens, for `path`
    (`choose_path`).

    Args:
        routing: the router's dict: `expert_index` `(N, k)` and, optionally,
            `keep` `(N, k)` (the pairs the router chose), `position`
            `(N, k)` (for a router that placed its tokens) and `priority`
            `(N,)`.
        num_experts: `E`.
        capacity: the call's `Capacity` (`choose_capacity`).
        valid: optional `(N,)` bool, the tokens that count; the others take
            no capacity and no row.
        path: `"capacity"` or `"dense"` (a `DispatchPlan`: buffers of
            `capacity.capacity` rows, pairs beyond `capacity.granted`
            dropped), `"blocks"` (a `BlockPlan` of `block_size` rows per
            block) or `"grouped"` (a `BlockPlan` of single rows: the pairs
            sorted by expert, contiguous, for a grouped matmul).
        block_size: rows per block of `"blocks"` (`None`:
            `default_block_size`).
        order: which pairs take an overflowing expert's capacity first:
            `"choice"` (GShard / Switch: every token's first choice before
            any second choice) or `"token"` (all choices of an earlier token
            before any of a later one: a token's fate depends only on the
            tokens before it, as a causal model needs).

    Returns:
        `(plan, selected)`: the plan (its `path` key says which) and
        `selected` `(N, k)` bool, the pairs that count in statistics (or
        `None`: all).
    """
    expert_index = routing["expert_index"]
    selected = _selected_pairs(routing, valid)
    if path in ("blocks", "grouped"):
        plan = dropless.make_block_plan(
            expert_index,
            num_experts,
            block_size=1 if path == "grouped" else block_size,
            valid=selected,
        )
        plan["capacity"] = capacity.capacity
    elif "position" in routing:
        plan = dispatching.plan_from_positions(
            expert_index,
            routing["position"],
            num_experts,
            capacity.capacity,
            keep=selected,
        )
    else:
        plan = dispatching.make_dispatch_plan(
            expert_index,
            num_experts,
            capacity.capacity,
            priority=routing.get("priority"),
            valid=selected,
            limit=capacity.limit,
            order=order,
        )
    plan["path"] = path
    return plan, selected


def pad_choices(values, k):
    """`(N, k')` per-choice values zero-padded to `(N, k)` (routers of
    different widths in one plan)."""
    width = values.shape[-1]
    return values if width == k else ops.pad(values, ((0, 0), (0, k - width)))


def _token_major(values):
    """`T` arrays `(N, ...)` as one `(N T, ...)`, token-major (row
    `n T + t` is token `n` of task `t`)."""
    stacked = ops.stack(values, axis=1)
    return ops.reshape(stacked, (-1,) + tuple(stacked.shape[2:]))


def plan_task_dispatch(
    routings, ks, num_experts, num_tokens, capacity_factor, valid=None,
    path="capacity",
):
    """One dispatch plan for the routings of `T` routers (one per task) of
    the same `N` tokens, as `N T` pseudo-tokens, token-major (pseudo-token
    `n T + t` is token `n` of task `t`), so the expert bank runs once.

    - `path` `"blocks"` or `"grouped"` (dropless, see `choose_path`):
      every pair gets one row of expert-sorted blocks (single rows for the
      grouped matmul).
    - Routers of one width `k`, none placing its tokens: all `k T N` pairs
      compete for one capacity `C = compute_capacity(T N, E, k, cf)`,
      token-major, so no task is favoured when an expert overflows.
    - Otherwise each task `t` gets its own block of every expert's buffer,
      of `C_t = compute_capacity(N, E, k_t, cf)` rows.

    Args:
        routings: the `T` routing dicts (see `plan_dispatch`).
        ks: the `T` routers' `k`.
        num_experts: `E`.
        num_tokens: `N`.
        capacity_factor: the call's capacity factor (`None`: dropless).
        valid: optional `(N,)` bool, the tokens that count.
        path: the dispatch path (`choose_path` with the `T` routers).

    Returns:
        `(plan, selected, combine_weights)`: the plan of the `N T`
        pseudo-tokens, the `(N T, k)` bool pairs that count in statistics
        (or `None`: all) and the `(N T, k)` combine weights, `k` the widest
        router's (narrower ones zero-padded).
    """
    t_count, e = len(routings), num_experts
    num_valid = count_valid(valid)
    widths = [r["expert_index"].shape[-1] for r in routings]
    placed = any("position" in r for r in routings)
    joint = len(set(widths)) == 1 and not placed

    def real(pairs):  # (N, k') bool pairs of the valid tokens only
        return pairs if valid is None else ops.logical_and(pairs, valid[:, None])

    if path in ("blocks", "grouped"):
        # Dropless: every pair gets one row of the expert-sorted blocks
        # (keras_moe.ops.dropless), at the cost of the k T N pairs.
        k = max(widths)
        own = [ops.cast(r["expert_index"], "int32") for r in routings]
        index = _token_major([pad_choices(i, k) for i in own])
        pairs = _token_major(
            [real(pad_choices(ops.ones_like(i), k) > 0) for i in own]
        )
        plan = dropless.make_block_plan(
            index,
            e,
            block_size=1 if path == "grouped" else None,
            valid=pairs,
            rows_per_token=t_count,
        )
        plan["capacity"] = num_tokens * t_count
        selected = None if valid is None else pairs
    elif joint:
        # All pairs compete for one capacity, token-major.
        k = widths[0]
        capacity = dispatching.compute_capacity(
            num_tokens * t_count, e, k, capacity_factor
        )
        priorities = [r.get("priority") for r in routings]
        priority = (
            _token_major([ops.cast(p, "float32") for p in priorities])
            if all(p is not None for p in priorities)
            else None
        )
        pairs = (
            None
            if valid is None
            else _token_major(
                [real(ops.ones_like(r["expert_index"]) > 0) for r in routings]
            )
        )
        plan = dispatching.make_dispatch_plan(
            _token_major([r["expert_index"] for r in routings]),
            e,
            capacity,
            priority=priority,
            valid=pairs,
            limit=_limit(
                None if num_valid is None else num_valid * t_count,
                e,
                k,
                capacity_factor,
            ),
        )
        selected = pairs
    else:
        # Each task gets its own block of every expert's buffer.
        k = max(widths)
        indices, positions, keeps, chosen = [], [], [], []
        capacity = 0
        for router_k, routing, width in zip(ks, routings, widths):
            cap = dispatching.compute_capacity(num_tokens, e, router_k, capacity_factor)
            index = ops.cast(routing["expert_index"], "int32")
            if "position" in routing:
                position = ops.cast(routing["position"], "int32")
                keep = routing.get("keep")
                keep = real(ops.ones_like(index) > 0 if keep is None else keep)
                picked = keep
                keep = ops.logical_and(keep, position < cap)
            else:
                picked = real(ops.ones_like(index) > 0)
                own = dispatching.make_dispatch_plan(
                    index,
                    e,
                    cap,
                    priority=routing.get("priority"),
                    valid=None if valid is None else picked,
                    limit=_limit(num_valid, e, router_k, capacity_factor),
                )
                position, keep = own["position"], own["keep"]
            position = position + capacity
            if width < k:
                pad = ((0, 0), (0, k - width))
                index = ops.pad(index, pad)
                position = ops.pad(position, pad)
                keep = ops.pad(ops.cast(keep, "int32"), pad) > 0
                picked = ops.pad(ops.cast(picked, "int32"), pad) > 0
            indices.append(index)
            positions.append(position)
            keeps.append(keep)
            chosen.append(picked)
            capacity = capacity + cap
        plan = dispatching.plan_from_positions(
            _token_major(indices),
            _token_major(positions),
            e,
            capacity,
            keep=_token_major(keeps),
        )
        selected = _token_major(chosen)

    weights = _token_major([pad_choices(r["combine_weights"], k) for r in routings])
    plan["path"] = path
    plan["rows_per_token"] = t_count
    return plan, selected, weights


def pseudo_token_plan(plan, num_tokens, rows_per_token):
    """The capacity plan of `N T` pseudo-tokens (`rows_per_token = T`, see
    `plan_task_dispatch`) as a plan of the `N` real tokens: pseudo-token
    `n T + t` is token `n`, and the empty-row marker `T N` becomes `N`. So
    `dispatch` gathers straight from the tokens (`combine` takes the
    pseudo-token plan)."""
    return dispatching.DispatchPlan(
        plan,
        slot_token=plan["slot_token"] // rows_per_token,
        num_tokens=num_tokens,
    )
