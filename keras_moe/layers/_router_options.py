"""The default router of a `SparseMoE` and the options it takes for it."""

import keras

from keras_moe.layers.routers import TopKRouter
from keras_moe.ops import planning
from keras_moe.utils import validation as check

# The options of the default router: SparseMoE argument -> TopKRouter
# argument. Given with `router=`, they raise (they belong to that router).
ROUTER_OPTIONS = {
    "noisy_gating": "noisy_gating",
    "load_balance_weight": "load_balance_weight",
    "z_loss_weight": "z_loss_weight",
    "router_kernel_initializer": "kernel_initializer",
    "seed": "seed",
}


def pop_router_options(kwargs):
    """Takes the default router's options (`ROUTER_OPTIONS`) out of a
    layer's `**kwargs`; `None` values count as not given."""
    options = {name: kwargs.pop(name) for name in ROUTER_OPTIONS if name in kwargs}
    options = {name: value for name, value in options.items() if value is not None}
    if "router_kernel_initializer" in options:  # named as the layer calls it
        check.initializer(
            "router_kernel_initializer", options["router_kernel_initializer"]
        )
    return options


def router_options_config(router):
    """The default router's options as the layer's config entries."""
    config = router.get_config()
    return {name: config[ROUTER_OPTIONS[name]] for name in ROUTER_OPTIONS}


def make_router(router, num_experts, k, options):
    """`router` (a layer or its config, validated), or a `TopKRouter` of
    `num_experts` and `k` (default 2) with the default router's `options`.
    Returns `(router, custom)`."""
    if isinstance(router, dict):
        router = keras.saving.deserialize_keras_object(router)
    if router is None:
        return (
            TopKRouter(
                num_experts=num_experts,
                k=check.k_for_experts(2 if k is None else k, num_experts),
                name="router",
                **{ROUTER_OPTIONS[n]: v for n, v in options.items()},
            ),
            False,
        )
    check.router_layer(router, num_experts)
    if options:
        raise ValueError(
            "Router options go to the router itself when `router` is "
            f"given. Received: router={type(router).__name__}, and "
            + ", ".join(f"{n}={options[n]!r}" for n in sorted(options))
        )
    if k is not None and k != router.k:
        raise ValueError(
            f"k must match the router's k. Received: k={k}, router.k={router.k}"
        )
    return router, True


def check_causal_router(router):
    """Refuses, for `SparseMoE(causal=True)`, a router whose choices for one
    token depend on the other tokens of the batch (later ones included)."""
    reason = None
    if planning.assigns_positions(router) or not getattr(
        router, "token_independent", True
    ):
        reason = "it routes each token by looking at all the tokens of the call"
    elif "priority" in router.routing_shapes((1,)):
        reason = "it orders the tokens by confidence (batch-prioritized routing)"
    if reason:
        raise ValueError(
            f"causal=True refuses router {type(router).__name__}: {reason}, "
            "so a token's output would depend on later tokens. Use a "
            "token-choice router (e.g. TopKRouter without batch_prioritized)."
        )
    return router
