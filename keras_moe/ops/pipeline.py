"""The routed pipeline: what every routed layer does with its tokens.

    view = token_view(inputs, mask, name, dtype)      # (N, d), (N,) valid
    routing, capacity = route(router, view.tokens, E, k, factor, valid=...)
    path = planning.choose_path(factor, [router], bank, dispatch, sharded)
    plan, selected = planning.plan_dispatch(routing, E, capacity, valid, path)
    rows = run_plan(view.tokens, plan, routing["combine_weights"], bank)
    stats = routing_statistics(plan, selected, routing["probs"], view.valid)
    outputs = view.restore(rows)                      # (..., o), padding 0

`SparseMoE`, `MultiGateMoE` (sparse gates, `T` routers: `route` per task and
`planning.plan_task_dispatch`) and `MixtureOfExperts` (top-k) call these
functions; a layer adds only what is its own (shared experts, task gates,
group losses, the integration of arbitrary expert layers). A new dispatch
path is one branch of `planning.choose_path` / `plan_dispatch`, one branch
of `run_plan` and one method of the expert bank.

The mask is normalised once, in `token_view`, to a `(N,)` bool `valid`
(True: the token counts) that every later step takes under that name.
Masked tokens enter no computation: their rows are selected to zeros
(`where`, so NaN or Inf padding reaches nothing), they take no capacity and
no row, and their outputs are zeros.
"""

from typing import NamedTuple

from keras import ops

from keras_moe.ops import balancing
from keras_moe.ops import dispatching
from keras_moe.ops import dropless
from keras_moe.ops import planning
from keras_moe.utils import validation as check


class TokenView(NamedTuple):
    """The tokens of one call: `tokens` `(N, d)` (masked ones zeroed),
    `valid` `(N,)` bool or `None` (every token counts) and the inputs'
    `shape` `(..., d)`, to give outputs back their leading shape."""

    tokens: object
    valid: object
    shape: object

    def restore(self, outputs):
        """`(N, o)` outputs as `(..., o)`, with the masked tokens' rows
        selected to zeros (not multiplied: no NaN passes)."""
        outputs = mask_rows(outputs, self.valid)
        return ops.reshape(
            outputs, tuple(self.shape[:-1]) + (ops.shape(outputs)[-1],)
        )


def mask_rows(rows, valid):
    """`(N, ...)` rows with those of invalid tokens replaced by zeros."""
    if valid is None:
        return rows
    keep = ops.reshape(valid, (-1,) + (1,) * (len(rows.shape) - 1))
    return ops.where(keep, rows, ops.zeros_like(rows))


def token_view(inputs, mask=None, name="layer", dtype=None):
    """Flattens `(..., d)` inputs to `(N, d)` tokens and normalises the
    Keras `mask` (`inputs.shape[:-1]`, bool or numeric) to `(N,)` bool.

    Args:
        inputs: `(..., d)`.
        mask: optional mask of `inputs.shape[:-1]`.
        name: the layer's name, for the error of a mask of the wrong shape.
        dtype: cast the inputs to this dtype first (a layer's compute dtype:
            integer inputs become floats on every backend).
    """
    if dtype is not None:
        inputs = ops.cast(inputs, dtype)
    shape = ops.shape(inputs)
    valid = check.token_mask(name, mask, inputs)
    tokens = mask_rows(ops.reshape(inputs, (-1, shape[-1])), valid)
    return TokenView(tokens, valid, shape)


def route(router, tokens, num_experts, k, capacity_factor, valid=None,
          training=None, routing_inputs=None):
    """Calls `router` on `(N, d)` tokens with what the call's capacity rules
    give it. Returns `(routing, capacity)`.

    The capacity (`planning.choose_capacity`) is that of `N` tokens with `k`
    choices at `capacity_factor`, granted to the `valid` ones; a router that
    places its tokens itself receives it (`capacity=`), a router whose `call`
    takes a mask receives `mask=valid`, one that routes on ids receives
    `routing_inputs` (one per token).
    """
    capacity = planning.choose_capacity(
        ops.shape(tokens)[0],
        num_experts,
        k,
        capacity_factor,
        num_valid=planning.count_valid(valid),
    )
    kwargs = {"training": training}
    if routing_inputs is not None:
        kwargs["routing_inputs"] = routing_inputs
    granted = planning.router_capacity(router, capacity)
    if granted is not None:
        kwargs["capacity"] = granted
    if valid is not None and planning.accepts_mask(router):
        kwargs["mask"] = valid
    return router(tokens, **kwargs), capacity


def run_plan(tokens, plan, combine_weights, bank, training=False, layout=None,
             mix=True):
    """Runs `(N, d)` tokens through an expert bank along a plan.

    - `"capacity"`: gather into `(E, C, d)` buffers (`dispatching.dispatch`),
      `bank(buffers)`, gather back and mix (`dispatching.combine`);
    - `"blocks"`: expert-sorted blocks through `bank.call_blocks`;
    - `"grouped"`: expert-sorted rows through `bank.call_grouped` (one
      grouped matmul per weight; `keras_moe.ops.grouped_matmul`);
    - `"dense"`: every expert on every token (`bank` on `(E, N, d)`), mixed
      with the plan's gate matrix (`dispatching.dense_gates`).

    A plan of `R = N T` pseudo-tokens (`rows_per_token = T`, as
    `plan_task_dispatch` makes for `T` tasks, token-major) reads each real
    token once.

    Args:
        tokens: `(N, d)`.
        plan: from `planning.plan_dispatch` / `plan_task_dispatch`.
        combine_weights: `(R, k)` router weights.
        bank: the experts: `keras_moe.layers.Experts`, or for the capacity
            path any callable `(E, C, d) -> (E, C, o)`.
        training: use the gather-only custom gradients (layers pass
            `training`; an inference graph holds plain gathers only).
        layout: optional `layout(tensor, name)` applied to the
            `"expert_buffers"` and `"expert_outputs"` of the capacity path
            (a layer's distribution layouts).
        mix: `False` (capacity path only) returns the `(R, k, o)` outputs of
            every pair, zeros for a dropped one, instead of mixing them.

    Returns:
        `(R, o)` outputs (or `(R, k, o)` with `mix=False`).
    """
    path = plan["path"]
    custom = bool(training)
    rows_per_token = plan.get("rows_per_token", 1)
    if path == "blocks":
        return dropless.run_blocks(
            tokens, plan, combine_weights, bank.call_blocks, custom
        )
    if path == "grouped":
        rows = dropless.block_dispatch(tokens, plan, custom_gradient=custom)
        outputs = bank.call_grouped(rows, plan["counts"], plan["block_expert"])
        return dropless.block_combine(
            outputs, plan, combine_weights, custom_gradient=custom
        )
    layout = layout or (lambda tensor, _: tensor)
    if path == "dense":
        num_tokens, d = ops.shape(tokens)[0], ops.shape(tokens)[-1]
        everything = ops.broadcast_to(
            tokens[None], (plan["num_experts"], num_tokens, d)
        )
        outputs = bank(everything)  # (E, N, o)
        gates = dispatching.dense_gates(plan, combine_weights)  # (N T, E)
        gates = ops.reshape(
            ops.cast(gates, outputs.dtype),
            (num_tokens, rows_per_token, plan["num_experts"]),
        )
        mixed = ops.einsum("nte,eno->nto", gates, outputs)
        return ops.reshape(mixed, (-1, ops.shape(outputs)[-1]))
    source = plan
    if rows_per_token > 1:
        source = planning.pseudo_token_plan(
            plan, ops.shape(tokens)[0], rows_per_token
        )
    buffers = layout(
        dispatching.dispatch(tokens, source, custom_gradient=custom),
        "expert_buffers",
    )
    outputs = layout(bank(buffers), "expert_outputs")
    if not mix:
        return dispatching.gather_pairs(outputs, plan)
    return dispatching.combine(
        outputs, plan, combine_weights, custom_gradient=custom
    )


def routing_statistics(plan, selected=None, probs=None, valid=None):
    """The routing statistics of one call, as float32 tensors:

    - `expert_load` `(E,)`: each expert's share of the routed pairs;
    - `dropped_fraction`: the share of routed pairs beyond capacity;
    - `router_entropy` (with `probs` `(N, E)` or `(T, N, E)`): the mean
      entropy (nats) of the routers' distributions over the valid tokens.

    `selected` `(R, k)` bool (from the planner) marks the pairs that count.
    """
    routed, kept = dispatching.expert_counts(plan, selected=selected)
    total = ops.sum(routed)
    denominator = ops.maximum(total, 1.0)
    stats = {
        "expert_load": routed / denominator,
        "dropped_fraction": (total - ops.sum(kept)) / denominator,
    }
    if probs is not None:
        stats["router_entropy"] = balancing.mean_entropy(probs, valid)
    return stats
