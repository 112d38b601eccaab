"""The router contract: the `Router` base class and `RoutingResult`."""

import keras
import numpy as np
import pytest

from keras_moe.layers import HashRouter, Router, RoutingResult, TopKRouter
from tests.conftest import CONTRACT, router_cases


class DotRouter(Router):
    """The smallest router: linear logits, the default top-k call."""

    def build(self, input_shape):
        self.add_router_kernel(input_shape[-1], "glorot_uniform", use_bias=True)

    def expert_logits(self, tokens, training=None):
        return self.linear_logits(tokens)


@pytest.mark.parametrize("case", router_cases(CONTRACT))
def test_every_router_declares_the_contract(case):
    cls = case.cls
    assert issubclass(cls, Router)
    assert cls.assigns_positions is case.assigns_positions
    assert cls.needs_routing_inputs is case.needs_routing_inputs
    # Registered under its class name (the names old .keras files load by:
    # tests/layers/routers/test_old_files.py; never rename one).
    name = f"keras_moe>{cls.__name__}"
    assert keras.saving.get_registered_name(cls) == name
    assert keras.saving.get_registered_object(name) is cls
    router = case.make(4)
    config = router.get_config()
    assert config["num_experts"] == 4
    if "k" in case.kwargs:
        assert config["k"] == case.kwargs["k"] == router.k
    else:  # a router whose k is fixed (BASE: 1) does not take it
        assert "k" not in config and router.k == 1


@pytest.mark.parametrize("case", router_cases(CONTRACT))
def test_every_router_returns_a_routing_result(case):
    router = case.make(4)
    x = np.random.default_rng(0).normal(size=(6, 8)).astype("float32")
    routing = router(x, **case.call_kwargs((6,)))
    assert isinstance(routing, RoutingResult)
    assert routing.expert_index is routing["expert_index"]
    k = router.num_choices
    assert tuple(routing.expert_index.shape) == (6, k)
    assert keras.backend.standardize_dtype(routing.expert_index.dtype) == "int32"
    assert tuple(routing.combine_weights.shape) == (6, k)
    assert tuple(routing.probs.shape) == (6, 4)
    assert ("position" in routing and "keep" in routing) is case.assigns_positions
    # The declared spec is what call returns, key by key.
    spec = router.compute_output_shape(x.shape)
    assert {key: tuple(v.shape) for key, v in routing.items()} == spec


@pytest.mark.parametrize("case", router_cases(CONTRACT))
def test_a_functional_model_may_output_the_routing(case):
    """`RoutingResult` is a node of Keras' nested structures (not a leaf):
    symbolic calls, functional models and their compiled predict step."""
    router = case.make(4)
    inputs, symbolic = case.model(router, (8,))
    assert isinstance(symbolic, RoutingResult)
    assert all(isinstance(v, keras.KerasTensor) for v in symbolic.values())
    model = keras.Model(inputs, {"index": symbolic.expert_index, "probs": symbolic.probs})
    data = case.data(np.random.default_rng(0).normal(size=(6, 8)).astype("float32"))
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
