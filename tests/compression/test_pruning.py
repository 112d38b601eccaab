"""Expert pruning (keras_moe.compression.pruning)."""

import doctest
import os
import tempfile
import warnings

import keras
import numpy as np
import pytest

from keras_moe import compression
from keras_moe.compression import expert_usage, prune_experts, select_experts
from keras_moe.layers import (
    CGC,
    BoxHead,
    ClassificationHead,
    DSelectKRouter,
    HashRouter,
    MixtureOfExperts,
    MultiGateMoE,
    SoftMoE,
    SparseMoE,
    TopKRouter,
    default_compile_args,
)
from tests.conftest import (
    PRUNE,
    ROUTER_CASES,
    cases_with,
    moe_model,
    randomize,
    to_numpy,
    zeros,
)


def numpy_experts(weights, kept, x):
    """`FFN_e(x)` for the kept experts, `(len(kept), N, o)`, GELU experts."""
    gelu = lambda v: to_numpy(keras.activations.gelu(v))  # noqa: E731
    out = []
    for e in kept:
        h = gelu(x @ weights["kernel_in"][e] + weights["bias_in"][e])
        out.append(h @ weights["kernel_out"][e] + weights["bias_out"][e])
    return np.stack(out)


def test_pruned_layer_matches_reference_from_kept_experts():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 4, 8)).astype("float32")
    moe = zeros(SparseMoE, 6, 12, k=2, eval_capacity_factor=None, name="moe")
    model = moe_model(moe)
    weights = {v.path.split("/")[-1]: to_numpy(v) for v in moe.experts.weights}
    router_kernel = to_numpy(moe.router.kernel)
    kept = [0, 2, 5]
    pruned = prune_experts(model, {"moe": kept})
    layer = pruned.get_layer("moe")
    assert (layer.num_experts, layer.k, layer.router.num_experts) == (3, 2, 3)

    tokens = x.reshape(-1, 8)
    logits = tokens @ router_kernel[:, kept]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1)[:, :2]
    w = np.take_along_axis(probs, top, -1)
    w /= w.sum(-1, keepdims=True)
    ffn = numpy_experts(weights, kept, tokens)  # (3, N, 8)
    n = np.arange(len(tokens))
    expected = w[:, 0, None] * ffn[top[:, 0], n] + w[:, 1, None] * ffn[top[:, 1], n]
    got = pruned.predict(x, verbose=0).reshape(-1, 8)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_pruning_unused_experts_changes_nothing():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(32, 4, 8)).astype("float32")
    # Custom TopKRouter with a bias, a selection bias and noise: all sliced.
    router = zeros(
        TopKRouter, 6, k=2, use_bias=True, noisy_gating=True, bias_update_rate=0.01
    )
    moe = zeros(SparseMoE, 6, 12, router=router, eval_capacity_factor=None, name="moe")
    inputs = keras.Input((4, 8))
    tokens = moe(inputs)
    pooled = keras.layers.GlobalAveragePooling1D()(tokens)
    gates = [zeros(TopKRouter, 5, k=2, use_bias=True, name=f"gate_{t}") for t in range(2)]
    a, b = zeros(MultiGateMoE, 2, 5, 8, routers=gates, name="mmoe")(pooled)
    model = randomize(keras.Model(inputs, [a, b]))
    # Experts 1 and 4 of the token MoE, 3 of the MMoE: never in any top-k.
    router.bias.assign(np.array([0, -1e3, 0, 0, -1e3, 0], "float32"))
    for gate in gates:
        gate.bias.assign(np.array([0, 0, 0, -1e3, 0], "float32"))
    expected = model.predict(x, verbose=0)
    usage = expert_usage(model, x)
    assert usage["moe"][[1, 4]].max() == 0 and usage["mmoe"][3] == 0
    keep = {"moe": [0, 2, 3, 5], "mmoe": [0, 1, 2, 4]}
    pruned = prune_experts(model, keep, usage=usage)
    for got, want in zip(pruned.predict(x, verbose=0), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    new_router = pruned.get_layer("moe").router
    for name in ("kernel", "bias", "noise_kernel", "selection_bias"):
        old = to_numpy(getattr(router, name))
        np.testing.assert_array_equal(
            to_numpy(getattr(new_router, name)), old[..., [0, 2, 3, 5]]
        )
    np.testing.assert_array_equal(
        to_numpy(pruned.get_layer("mmoe").routers[1].bias), [0, 0, 0, 0]
    )


PRUNED = 6  # experts in each layer; every row's prune_keep keeps 4


def test_every_router_family_prunes_through_its_hooks():
    """Each router of ROUTER_CASES (tests/conftest.py), in one model (one
    compile), prunes itself; tokens whose experts are all kept keep their
    outputs (the row makes the dropped experts unreachable, or, for the
    hash table, only such tokens are compared); the pruned model saves."""
    rng = np.random.default_rng(5)
    x = rng.random((16, 4, 8)).astype("float32")  # > 0: see _kernel_columns
    cases = cases_with(ROUTER_CASES, PRUNE)
    x_in = keras.Input((4, 8))
    inputs, data, outputs, routers, ids = [x_in], [x], [], {}, {}
    for i, case in enumerate(cases):
        routers[case.id] = case.make(PRUNED, zeros=True)
        moe = zeros(SparseMoE, PRUNED, 8, router=routers[case.id],
                    eval_capacity_factor=None, name=case.id)
        kwargs = case.call_kwargs((16, 4), seed=i)
        if kwargs:
            ids_in = keras.Input((4,), dtype="int32")
            inputs.append(ids_in)
            ids[case.id] = kwargs["routing_inputs"]
            data.append(ids[case.id])
            outputs.append(moe(x_in, routing_inputs=ids_in))
        else:
            outputs.append(moe(x_in))
    # MultiGateMoE prunes each task's router through the same hooks.
    dselect = next(case for case in cases if case.id == "dselect_k")
    gates = [dselect.make(PRUNED, zeros=True) for _ in range(2)]
    outputs += zeros(MultiGateMoE, 2, PRUNED, 8, routers=gates, eval_capacity_factor=None,
                     name="mmoe")(keras.layers.Flatten()(x_in))
    model = randomize(keras.Model(inputs, outputs))
    for case in cases:
        if case.unreachable is not None:
            case.unreachable(routers[case.id], case.prune_keep)
    for gate in gates:
        dselect.unreachable(gate, dselect.prune_keep)
    expected = model.predict(data, verbose=0)

    keep = {case.id: list(case.prune_keep) for case in cases}
    keep["mmoe"] = list(dselect.prune_keep)
    pruned = prune_experts(model, keep)
    got = pruned.predict(data, verbose=0)
    for name in [case.id for case in cases] + ["mmoe"]:
        assert pruned.get_layer(name).num_experts == 4, name
    for i, case in enumerate(cases):
        same = np.ones((16, 4), bool)
        if case.unreachable is None:  # the tokens routed to kept experts
            kwargs = {"routing_inputs": ids[case.id].reshape(-1)} if case.id in ids else {}
            routing = routers[case.id](x.reshape(-1, 8), **kwargs)
            index = to_numpy(routing["expert_index"]).reshape(16, 4, -1)
            same = np.isin(index, case.prune_keep).all(axis=-1)
            assert same.any() and not same.all(), case.id
        np.testing.assert_allclose(
            got[i][same], expected[i][same], rtol=1e-5, atol=1e-6, err_msg=case.id
        )
    for a, b in zip(got[len(cases):], expected[len(cases):]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg="mmoe")
    assert pruned.get_layer("dselect_k").router.num_bits == 2

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pruned.keras")
        pruned.save(path)
        reloaded = keras.saving.load_model(path)
    for a, b in zip(reloaded.predict(data, verbose=0), got):
        np.testing.assert_array_equal(a, b)


def test_a_pruned_hash_table_renumbers_kept_experts_and_spreads_dropped_ones():
    """The hash table: ids of kept experts keep them (renumbered), and the
    slots of dropped experts are spread over the kept ones."""
    router = HashRouter(6, k=2, vocab_size=20, seed=0)
    router.build((None, 8))
    keep = [0, 2, 3, 5]
    small = HashRouter.from_config(router.pruned_config(keep))
    small.build((None, 8))
    small.copy_pruned_weights(router, keep)
    old_table = to_numpy(router.table)
    table = to_numpy(small.table)
    both_kept = np.isin(old_table, keep).all(axis=1)
    assert both_kept.any() and not both_kept.all()
    renumber = {e: i for i, e in enumerate(keep)}
    np.testing.assert_array_equal(
        table[both_kept], np.vectorize(renumber.get)(old_table[both_kept])
    )
    assert (table[:, 0] != table[:, 1]).all()
    loads = np.bincount(table.ravel(), minlength=4)
    assert loads.max() - loads.min() <= 2, loads


def test_routers_that_cannot_be_pruned_say_why():
    hashed = HashRouter(4, k=1)  # arithmetic hash: no table to remap
    with pytest.raises(ValueError, match="no table.*vocab_size"):
        hashed.pruned_config([0, 1])
    dselect = DSelectKRouter(4, k=2)
    with pytest.raises(ValueError, match=r"k=2 selectors.*\[0\]"):
        dselect.pruned_config([0])
    assert dselect.pruned_config([0, 1, 2])["num_experts"] == 3


def test_mixture_of_keras_experts_prunes_whole_experts():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(16, 8)).astype("float32")
    experts = [keras.layers.Dense(4, kernel_initializer="zeros", name=f"e{i}")
               for i in range(3)]
    inputs = keras.Input((8,))
    mix = MixtureOfExperts(experts, k=2, eval_capacity_factor=None, name="mix")
    model = randomize(keras.Model(inputs, mix(inputs)))
    mix.gate.bias.assign(np.array([0.0, -1e3, 0.0], "float32"))  # expert 1 unused
    expected = model.predict(x, verbose=0)
    pruned = prune_experts(model, {"mix": [0, 2]})
    layer = pruned.get_layer("mix")
    assert [e.name for e in layer.experts] == ["e0", "e2"] and layer.k == 2
    np.testing.assert_allclose(pruned.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(
        to_numpy(layer.experts[1].kernel), to_numpy(experts[2].kernel)
    )
    with pytest.raises(ValueError, match="at least 2 experts"):
        prune_experts(model, {"mix": [0]})
    gated = MixtureOfExperts(
        [keras.layers.Dense(4) for _ in range(2)], gate=keras.layers.Dense(2), name="g"
    )
    with pytest.raises(ValueError, match="custom gate"):
        gated.pruned_config([0, 1])


def test_select_experts_keeps_the_most_used():
    inputs = keras.Input((4, 8))
    model = keras.Model(inputs, zeros(SparseMoE, 5, 8, name="moe")(inputs))
    usage = {"moe": np.array([0.1, 0.4, 0.0, 0.4, 0.1])}  # ties: lower index
    assert select_experts(model, 3, usage) == {"moe": [0, 1, 3]}
    assert select_experts(model, {"moe": 1}, usage) == {"moe": [1]}
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        select_experts(model, 2, {"moe": np.ones(4)})


def test_pruned_model_trains_saves_and_caps_k():
    rng = np.random.default_rng(3)
    x = rng.random((32, 4, 8)).astype("float32")
    y = {"class": rng.integers(0, 3, 32),
         "box": np.tile([[0.2, 0.2, 0.6, 0.6]], (32, 1)).astype("float32")}
    inputs = keras.Input((4, 8))
    tokens = zeros(SparseMoE, 4, 8, k=2, name="moe")(inputs)
    tokens = tokens + zeros(SoftMoE, 3, 8, slots_per_expert=2, name="soft")(tokens)
    pooled = keras.layers.GlobalAveragePooling1D()(tokens)
    a, b = zeros(MultiGateMoE, 2, 4, 8, name="mmoe")(pooled)  # dense gates
    model = keras.Model(inputs, {"class": zeros(ClassificationHead, 3, name="class")(a),
                                 "box": BoxHead(name="box")(b)})
    randomize(model)
    model.predict_on_batch(x)  # routing statistics of one batch
    pruned = prune_experts(model, 1)  # last-batch statistics
    assert [pruned.get_layer(n).num_experts for n in ("moe", "soft", "mmoe")] == [1, 1, 1]
    assert pruned.get_layer("moe").k == 1
    soft, kept = model.get_layer("soft"), select_experts(model, 1)["soft"][0]
    np.testing.assert_array_equal(
        to_numpy(pruned.get_layer("soft").slot_kernel),
        to_numpy(soft.slot_kernel)[:, 2 * kept : 2 * kept + 2],
    )
    pruned.compile("adam", **default_compile_args(pruned))
    history = pruned.fit(x, y, epochs=1, batch_size=16, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    expected = pruned.predict(x, verbose=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pruned.keras")
        pruned.save(path)
        reloaded = keras.saving.load_model(path)
    again = reloaded.predict(x, verbose=0)
    for name in expected:
        np.testing.assert_array_equal(again[name], expected[name])


def test_pruning_a_quantized_model_equals_quantizing_the_pruned_one():
    x = np.random.default_rng(4).random((8, 4, 8)).astype("float32")
    model = moe_model(zeros(SparseMoE, 5, 16, k=2, eval_capacity_factor=None, name="moe"))
    keep = {"moe": [1, 2, 4]}
    float_pruned = prune_experts(model, keep)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.quantize("int8")
        float_pruned.quantize("int8")
    pruned = prune_experts(model, keep)  # per-expert scales: slicing commutes
    bank = pruned.get_layer("moe").experts
    assert bank.quantization_mode == "int8" and bank.kernel_in.shape[0] == 3
    np.testing.assert_array_equal(
        pruned.predict(x, verbose=0), float_pruned.predict(x, verbose=0)
    )


def test_errors():
    inputs = keras.Input((4, 8))
    # DSelect-k addresses experts by binary code: only a prefix can be kept.
    router = DSelectKRouter(4, k=2, kernel_initializer="zeros")
    x = zeros(SparseMoE, 4, 8, router=router, name="ds")(inputs)
    x = zeros(SparseMoE, 4, 8, name="moe")(x)
    ys = zeros(CGC, 2, 2, 1, hidden_dim=8, name="cgc")(x)
    model = keras.Model(inputs, ys)
    with pytest.raises(ValueError, match=r"DSelectKRouter '.*prefix.*\[1, 3\]"):
        prune_experts(model, {"ds": [1, 3]})
    with pytest.raises(ValueError, match="CGC 'cgc' is not prunable"):
        prune_experts(model, 2)  # every MoE layer, CGC included
    with pytest.raises(ValueError, match="keep must be <= num_experts. Received: keep=5"):
        prune_experts(model, {"moe": 5})
    with pytest.raises(ValueError, match="does not have at its top level"):
        prune_experts(model, {"nope": 2})
    with pytest.raises(ValueError, match="distinct indices"):
        prune_experts(model, {"moe": [0, 0]})
    with pytest.raises(ValueError, match="Received: keep=2.5"):
        prune_experts(model, 2.5)
    with pytest.raises(ValueError, match="never called"):
        prune_experts(moe_model(zeros(SparseMoE, 4, 8, name="fresh")), 2)


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.moe = zeros(SparseMoE, 4, 8, name="moe")

    def call(self, x):
        return self.moe(x)


def test_subclassed_models_are_refused():
    model = Subclassed()
    with pytest.raises(ValueError, match="functional or Sequential"):
        prune_experts(model, 2)


@pytest.mark.parametrize("module", ["usage", "pruning", "distillation"])
def test_docstring_examples(module):
    module = getattr(compression, module)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
