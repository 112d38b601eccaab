"""BASE-layer routing: a balanced assignment of tokens to experts."""

import keras
from keras import ops

from keras_moe.utils import validation as check
from keras_moe.layers.routers.base import (
    Router,
    RoutingResult,
    default_router_initializer,
)
from keras_moe.ops import dispatching
from keras_moe.utils.tensors import flat_mask, softmax

# Sinkhorn iterations are unrolled into the graph: a ceiling keeps an edited
# file from building a graph of millions of ops (BASE used a few).
MAX_ITERATIONS = 1000


def sinkhorn_log_plan(affinities, num_iterations, temperature, mask=None):
    """Log of an entropic balanced transport plan between tokens and experts.

    On standardised affinities `A = (a - mean(a)) / std(a)` (so that
    `temperature` does not depend on the scale of the router weights),
    `num_iterations` rounds of log-domain Sinkhorn scaling of `A / temperature`
    alternately make every row sum to 1 (each token is assigned once) and
    every column sum to `N / E` (each expert gets its share).

    Args:
        affinities: `(N, E)` float32.
        num_iterations: Python int >= 0 (0: the standardised affinities).
        temperature: Python float > 0.

    Returns:
        `(N, E)` log-plan.
    """
    a = ops.cast(affinities, "float32")
    shape = ops.shape(a)
    if mask is None:
        a = (a - ops.mean(a)) / (ops.std(a) + 1e-6)
        count = ops.cast(shape[0], "float32")
    else:
        # Masked tokens (padding) are left out of the statistics and the
        # transport: their rows are held at a log-mass of -1e9 (exp: 0).
        keep = flat_mask(mask)[:, None]
        a = ops.where(keep, a, 0.0)
        count = ops.sum(ops.cast(keep, "float32"))
        entries = ops.maximum(count * ops.cast(shape[1], "float32"), 1.0)
        mean = ops.sum(a) / entries
        var = ops.sum(ops.where(keep, ops.square(a - mean), 0.0)) / entries
        a = (a - mean) / (ops.sqrt(var) + 1e-6)
    log_plan = a / temperature
    log_share = ops.log(ops.maximum(count, 1.0) / ops.cast(shape[1], "float32"))

    def masked(log_plan):
        return log_plan if mask is None else ops.where(keep, log_plan, -1e9)

    log_plan = masked(log_plan)
    for _ in range(num_iterations):
        log_plan = masked(log_plan - ops.logsumexp(log_plan, axis=1, keepdims=True))
        log_plan = log_plan - ops.logsumexp(log_plan, axis=0, keepdims=True)
        log_plan = masked(log_plan + log_share)
    return log_plan


def capacity_constrained_assignment(scores, capacity, max_rounds, mask=None):
    """Assigns every token one expert, no expert more than `capacity` tokens.

    In rounds: every unassigned token proposes to its highest-scoring expert
    that still has room; each expert accepts its best proposers up to its
    remaining room. A round either fills some expert or assigns every
    proposer, so if `E * capacity >= N` all tokens are assigned after at
    most `E` rounds (the loop stops early when they are).

    Args:
        scores: `(N, E)` float preferences (no gradient flows through).
        capacity: Python int or scalar int tensor.
        max_rounds: Python int, `E` for the guarantee.

    Returns:
        `(N,)` int32 experts (`-1` for tokens left unassigned, only possible
        if `E * capacity < N`).
    """
    scores = ops.stop_gradient(ops.cast(scores, "float32"))
    num_experts = ops.shape(scores)[1]
    capacity = ops.cast(capacity, "int32")
    lowest = ops.convert_to_tensor(float("-inf"), dtype="float32")

    def cond(round_, assigned, load):
        return ops.logical_and(round_ < max_rounds, ops.any(assigned < 0))

    def body(round_, assigned, load):
        has_room = (load < capacity)[None, :]
        choice = ops.cast(
            ops.argmax(ops.where(has_room, scores, lowest), axis=-1), "int32"
        )
        proposes = ops.logical_and(
            ops.one_hot(choice, num_experts, dtype="bool"), (assigned < 0)[:, None]
        )  # (N, E)
        # Rank of each proposer among its expert's proposers, best first.
        key = ops.transpose(ops.where(proposes, scores, lowest))  # (E, N)
        rank = ops.argsort(ops.argsort(-key, axis=-1), axis=-1)
        room = (capacity - load)[:, None]
        accepts = ops.logical_and(ops.transpose(proposes), rank < room)
        accepted = ops.any(accepts, axis=0)
        assigned = ops.where(accepted, choice, assigned)
        load = load + ops.sum(ops.cast(accepts, "int32"), axis=1)
        return round_ + 1, assigned, load

    num_tokens = ops.shape(scores)[0]
    _, assigned, _ = ops.while_loop(
        cond,
        body,
        (
            ops.convert_to_tensor(0, dtype="int32"),
            # A masked token starts "assigned" to expert 0: it never
            # proposes and takes no room.
            ops.full((num_tokens,), -1, dtype="int32")
            if mask is None
            else ops.where(flat_mask(mask), -1, 0),
            ops.zeros((num_experts,), dtype="int32"),
        ),
    )
    return assigned


@keras.saving.register_keras_serializable(package="keras_moe")
class BalancedAssignmentRouter(Router):
    """BASE-layer router: in training, a balanced assignment of tokens.

    BASE layers (Lewis et al. 2021) give every token exactly one expert
    (`k = 1`) and, in training, solve a balanced assignment: every expert
    receives the same number of tokens while the total affinity
    `sum_n a[n, e_n]` stays high, with affinities `a = X W_r` (one learned
    embedding per expert, the columns of `W_r`). No auxiliary loss is
    needed. This layer computes the assignment in two steps, all in
    `keras.ops` on the `N` tokens of the call:

    1. Entropic optimal transport: `num_iterations` log-domain Sinkhorn
       iterations on `A / temperature` (`A` the affinities standardised over
       the call) give a plan whose rows sum to 1 and columns to `N / E`;
       its logarithm is each token's preference over experts.
    2. Capacity-constrained greedy: in rounds, every unassigned token
       proposes to its preferred expert that still has room, and each
       expert accepts its most preferred proposers up to
       `ceil(N / E)` tokens (at most `E` rounds).

    **Guarantee** (training): every token gets exactly one expert and every
    expert at most `ceil(N / E)` tokens, i.e. the maximum load is within one
    token of the mean. (Sinkhorn alone, followed by an argmax, is only
    approximately balanced: how closely depends on the number of
    iterations, the temperature and the data; step 2 makes it exact, and
    step 1 makes step 2 rarely need to move a token away from its plan.)
    Inside `SparseMoE` the training capacity is `ceil(N / E *
    capacity_factor)`, so with `capacity_factor >= 1` no token is dropped.
    The routing is not differentiable; the router learns through the gate.

    At inference (`training=False`) each token takes the greedy argmax of
    its affinities, as in BASE; this is not balanced (tokens are dropped if
    an expert overflows `SparseMoE`'s `eval_capacity_factor`).

    The gate is `combine_weights = sigmoid(a[n, e_n])`, as BASE mixes
    `h + sigmoid(h . w_e) f_e(h)`; `probs = softmax(a)`.

    Args:
        num_experts: `E`.
        num_iterations: Sinkhorn iterations (>= 0; 0 skips step 1 and the
            greedy works on the raw affinities).
        temperature: entropic temperature (> 0) on standardised affinities;
            lower is closer to the optimal assignment but needs more
            iterations.
        kernel_initializer: router kernel initializer (default: truncated
            normal with 0.1 x LeCun variance, as in Switch).
        **kwargs: base `Layer` arguments; `dtype` defaults to `"float32"`.

    Call arguments:
        inputs: `(..., d)` tokens; all `N` positions of the call are assigned
            together.
        training: balanced assignment (True) or greedy argmax.
        mask: optional bool, `inputs.shape[:-1]` or `(N,)`: tokens that
            count; the balanced assignment is over those only (masked
            tokens get expert 0 and take no room). Tokens with a NaN or
            Inf affinity are left out in the same way, so that they change
            no other token's expert.

    Returns:
        A `RoutingResult` with `expert_index` `(..., 1)` int32, `combine_weights`
        `(..., 1)`, `probs` `(..., E)` and `logits` `(..., E)` (the
        affinities).

    Example:

    >>> import numpy as np
    >>> router = BalancedAssignmentRouter(num_experts=4)
    >>> x = np.random.rand(32, 8).astype("float32") + 3.0  # all alike
    >>> index = np.asarray(router(x, training=True)["expert_index"])
    >>> np.bincount(index[:, 0], minlength=4).tolist()
    [8, 8, 8, 8]

    References:
        Lewis, Bhosale, Dettmers, Goyal, Zettlemoyer. BASE Layers:
        Simplifying Training of Large, Sparse Models (ICML 2021).
        Cuturi. Sinkhorn Distances (NeurIPS 2013).
    """

    token_independent = False

    routing_fields = ("logits",)

    def __init__(
        self,
        num_experts,
        num_iterations=8,
        temperature=0.3,
        kernel_initializer=None,
        **kwargs,
    ):
        # One expert per token: k is fixed, not an argument.
        super().__init__(num_experts, k=1, **kwargs)
        self.num_iterations = check.non_negative_int(
            "num_iterations", num_iterations, maximum=MAX_ITERATIONS
        )
        temperature = check.non_negative_float("temperature", temperature)
        if temperature == 0:
            raise ValueError(
                f"temperature must be > 0. Received: temperature={temperature!r}"
            )
        self.temperature = temperature
        self.kernel_initializer = check.initializer(
            "kernel_initializer", kernel_initializer or default_router_initializer()
        )

    def build(self, input_shape):
        if self.built:
            return
        input_shape = check.token_input_shape(type(self).__name__, input_shape)
        self.add_router_kernel(input_shape[-1], self.kernel_initializer)

    def balanced_assignment(self, affinities, mask=None):
        """`(N, E)` affinities -> `(N,)` int32 balanced experts; with a
        `mask` `(N,)`, over the tokens it keeps (the others get expert 0)."""
        num_tokens = ops.shape(affinities)[0]
        if mask is not None:
            num_tokens = ops.sum(ops.cast(mask, "int32"))
        log_plan = sinkhorn_log_plan(
            ops.stop_gradient(affinities),
            self.num_iterations,
            self.temperature,
            mask=mask,
        )
        capacity = dispatching.compute_capacity(num_tokens, self.num_experts, 1, 1.0)
        return capacity_constrained_assignment(
            log_plan, capacity, self.num_experts, mask=mask
        )

    def call(self, inputs, training=None, mask=None):
        shape = ops.shape(inputs)
        tokens = ops.reshape(ops.cast(inputs, self.compute_dtype), (-1, shape[-1]))
        affinities = self.linear_logits(tokens)  # (N, E)
        if training:
            # A token whose affinities are not finite (a NaN or Inf feature)
            # is left out of the assignment like padding: in it, the
            # standardisation and the transport would spread NaN to every
            # token. It keeps expert 0 and its NaN stays in its own output.
            finite = ops.all(ops.isfinite(affinities), axis=-1)
            if mask is not None:
                finite = ops.logical_and(
                    flat_mask(mask), finite
                )
            expert = self.balanced_assignment(affinities, mask=finite)
        else:
            expert = ops.cast(ops.argmax(affinities, axis=-1), "int32")
        expert_index = expert[:, None]
        chosen = ops.take_along_axis(affinities, expert_index, axis=-1)
        lead = tuple(shape[:-1])
        return RoutingResult(
            expert_index=ops.reshape(expert_index, lead + (1,)),
            combine_weights=ops.reshape(ops.sigmoid(chosen), lead + (1,)),
            probs=ops.reshape(
                softmax(affinities, axis=-1), lead + (self.num_experts,)
            ),
            logits=ops.reshape(affinities, lead + (self.num_experts,)),
        )

    def get_config(self):
        config = super().get_config()
        del config["k"]  # always 1, not an argument
        config.update(
            num_iterations=self.num_iterations,
            temperature=self.temperature,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
        )
        return config
