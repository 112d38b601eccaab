"""The router contract: the `Router` base class and `RoutingResult`."""

import keras
import numpy as np
import pytest

from keras_moe.layers import (
    BalancedAssignmentRouter,
    DSelectKRouter,
    ExpertChoiceRouter,
    HashRouter,
    Router,
    RoutingResult,
    TaskRouter,
    TopKRouter,
)

# class, constructor arguments, assigns_positions, needs_routing_inputs
ROUTERS = {
    "TopKRouter": (TopKRouter, dict(num_experts=4, k=2), False, False),
    "ExpertChoiceRouter": (ExpertChoiceRouter, dict(num_experts=4, k=2), True, False),
    "BalancedAssignmentRouter": (
        BalancedAssignmentRouter, dict(num_experts=4), False, False),
    "DSelectKRouter": (DSelectKRouter, dict(num_experts=4, k=2), False, False),
    "HashRouter": (HashRouter, dict(num_experts=4, k=2, vocab_size=10), False, True),
    "TaskRouter": (TaskRouter, dict(num_experts=4, num_tasks=3, k=2), False, True),
}


class DotRouter(Router):
    """The smallest router: linear logits, the default top-k call."""

    def build(self, input_shape):
        self.add_router_kernel(input_shape[-1], "glorot_uniform", use_bias=True)

    def expert_logits(self, tokens, training=None):
        return self.linear_logits(tokens)


def call_kwargs(needs_ids, n):
    return {"routing_inputs": np.arange(n, dtype="int32") % 3} if needs_ids else {}


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_every_router_declares_the_contract(name):
    cls, kwargs, assigns_positions, needs_ids = ROUTERS[name]
    assert issubclass(cls, Router)
    assert cls.assigns_positions is assigns_positions
    assert cls.needs_routing_inputs is needs_ids
    # The serialized names of old .keras files.
    assert keras.saving.get_registered_name(cls) == f"keras_moe>{name}"
    assert keras.saving.get_registered_object(f"keras_moe>{name}") is cls
    router = cls(**kwargs)
    config = router.get_config()
    assert config["num_experts"] == 4
    if cls is BalancedAssignmentRouter:  # k is fixed at 1, not an argument
        assert "k" not in config and router.k == 1
    else:
        assert config["k"] == kwargs["k"]


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_every_router_returns_a_routing_result(name):
    cls, kwargs, assigns_positions, needs_ids = ROUTERS[name]
    router = cls(**kwargs)
    x = np.random.default_rng(0).normal(size=(6, 8)).astype("float32")
    routing = router(x, **call_kwargs(needs_ids, 6))
    assert isinstance(routing, RoutingResult)
    assert routing.expert_index is routing["expert_index"]
    k = router.num_choices
    assert tuple(routing.expert_index.shape) == (6, k)
    assert keras.backend.standardize_dtype(routing.expert_index.dtype) == "int32"
    assert tuple(routing.combine_weights.shape) == (6, k)
    assert tuple(routing.probs.shape) == (6, 4)
    assert ("position" in routing and "keep" in routing) is assigns_positions
    # The declared spec is what call returns, key by key.
    spec = router.compute_output_shape(x.shape)
    assert {key: tuple(v.shape) for key, v in routing.items()} == spec


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_a_functional_model_may_output_the_routing(name):
    """`RoutingResult` is a node of Keras' nested structures (not a leaf):
    symbolic calls, functional models and their compiled predict step."""
    cls, kwargs, _, needs_ids = ROUTERS[name]
    router = cls(**kwargs)
    x_in = keras.Input((8,))
    if needs_ids:
        ids_in = keras.Input((), dtype="int32")
        symbolic = router(x_in, routing_inputs=ids_in)
        inputs = [x_in, ids_in]
    else:
        symbolic = router(x_in)
        inputs = x_in
    assert isinstance(symbolic, RoutingResult)
    assert all(isinstance(v, keras.KerasTensor) for v in symbolic.values())
    model = keras.Model(inputs, {"index": symbolic.expert_index, "probs": symbolic.probs})
    x = np.random.default_rng(0).normal(size=(6, 8)).astype("float32")
    data = [x, call_kwargs(True, 6)["routing_inputs"]] if needs_ids else x
    got = model.predict(data, verbose=0)
    assert got["index"].shape == (6, router.num_choices)
    whole = keras.Model(inputs, symbolic)
    out = whole(data)
    assert sorted(out) == sorted(symbolic)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(out["expert_index"]), got["index"])


def test_routing_result_is_a_dict_with_attributes():
    routing = RoutingResult(expert_index=1, probs=2)
    assert isinstance(routing, dict) and routing.probs == 2
    assert RoutingResult(zip(["a"], [1])) == {"a": 1}
    with pytest.raises(AttributeError, match="no field 'priority'"):
        routing.priority
    flat = keras.tree.flatten(routing)
    assert flat == [1, 2]  # sorted keys, as a dict's
    mapped = keras.tree.map_structure(lambda v: v * 10, routing)
    assert isinstance(mapped, RoutingResult) and mapped == {"expert_index": 10, "probs": 20}


def test_the_base_class_is_abstract():
    with pytest.raises(TypeError, match="implement expert_logits"):
        Router(4)

    class Incomplete(Router):
        pass

    with pytest.raises(TypeError, match="Incomplete is an abstract router"):
        Incomplete(4, k=2)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_experts=0), "num_experts must be a positive integer. Received: num_experts=0"),
        (dict(num_experts=4.0), "num_experts=4.0"),
        (dict(num_experts=4, k=0), "k must be a positive integer. Received: k=0"),
        (dict(num_experts=4, k=5), "k must be <= num_experts. Received: k=5, num_experts=4"),
        (dict(num_experts=4, k=True), "k=True"),
    ],
)
def test_shared_validation_names_the_bad_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DotRouter(**kwargs)


def test_the_default_call_routes_top_k_on_the_logits():
    x = np.random.default_rng(1).normal(size=(2, 5, 6)).astype("float32")
    router = DotRouter(4, k=2, name="dot")
    routing = router(x)
    logits = x @ keras.ops.convert_to_numpy(router.kernel) + keras.ops.convert_to_numpy(
        router.bias
    )
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    index = np.argsort(-probs, axis=-1)[..., :2]
    weights = np.take_along_axis(probs, index, axis=-1)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(routing.expert_index), index)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(routing.combine_weights),
        weights / weights.sum(-1, keepdims=True),
        atol=1e-6,
    )
    np.testing.assert_allclose(keras.ops.convert_to_numpy(routing.logits), logits, atol=1e-5)
    assert sorted(routing) == sorted(router.compute_output_shape(x.shape))
    assert router.get_config()["num_experts"] == 4 and router.get_config()["k"] == 2
    assert router.compute_dtype == "float32"
    assert len(router.losses) == 0  # the default call adds no loss


def test_undeclared_field_shapes_say_how_to_fix():
    class Odd(DotRouter):
        routing_fields = ("temperature",)

    with pytest.raises(ValueError, match="override routing_shapes"):
        Odd(4).compute_output_shape((3, 8))


def test_id_routers_need_ids_in_symbolic_calls_too():
    with pytest.raises(ValueError, match="routing_inputs=None"):
        HashRouter(4, k=1)(keras.Input((8,)))


def test_the_default_pruning_hooks_slice_every_expert_axis():
    router = DotRouter(4, k=2)
    router.build((None, 3))
    router.kernel.assign(np.arange(12, dtype="float32").reshape(3, 4))
    router.bias.assign(np.arange(4, dtype="float32"))
    config = router.pruned_config([1, 3])
    assert config["num_experts"] == 2 and config["k"] == 2
    assert router.pruned_config([2])["k"] == 1
    small = DotRouter.from_config(config)
    small.build((None, 3))
    small.copy_pruned_weights(router, [1, 3])
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(small.kernel),
        np.arange(12, dtype="float32").reshape(3, 4)[:, [1, 3]],
    )
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(small.bias), [1.0, 3.0])


def test_the_old_import_paths_still_work():
    from keras_moe.layers import routers

    for name in (
        "TopKRouter", "accepts_mask", "default_router_initializer",
        "routing_output_spec", "SCORE_FUNCTIONS", "INPUT_NORMS", "Router",
        "RoutingResult",
    ):
        assert hasattr(routers, name), name
    assert routers.accepts_mask(TopKRouter(4)) and not routers.accepts_mask(
        keras.layers.Dense(2)
    )
