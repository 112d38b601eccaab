"""LoRA on expert banks (issue 34): `Experts.enable_lora` and its
forwarding by every layer that owns banks, on every dispatch path, with
int8 base weights, through saving, pruning and adding or merging experts;
and expert dropout."""

import os
import tempfile

import keras
import numpy as np
import pytest

from keras_moe.compression import prune_experts
from keras_moe.layers import (
    CGC,
    PLE,
    Experts,
    MultiGateMoE,
    SoftMoE,
    SparseMoE,
    TopKRouter,
)
from keras_moe.layers.expert_bank import expert_banks
from keras_moe.testing import run_layer_test
from keras_moe.upcycling import add_experts, merge_experts
from tests.conftest import to_numpy, tokens

E, D, H = 4, 6, 8


def _count(variables):
    return sum(int(np.prod(v.shape)) for v in variables)


def _randomize_lora(bank, seed=0):
    """Random factors (B starts at zero, which would hide the LoRA term)."""
    rng = np.random.default_rng(seed)
    for variable in (bank.lora_kernel_a, bank.lora_kernel_b):
        variable.assign(rng.normal(size=variable.shape).astype("float32") * 0.3)


def numpy_lora_experts(bank, x):
    """`act(x W1 + s x A1 B1 + b1) ...` per expert, in NumPy: the LoRA bank's
    function written out (float kernels)."""
    w = {v.path.split("/")[-1]: to_numpy(v) for v in bank.weights}
    scale = bank.lora_alpha / bank.lora_rank
    a, b = w["lora_kernel_a"], w["lora_kernel_b"]
    act = lambda v: to_numpy(bank.activation(v))  # noqa: E731
    offsets = {"a": 0, "b": 0}

    def linear(e, v, name, bias):
        kernel = w[name][e]
        i, o = kernel.shape
        a_part = a[e][offsets_of[name][0] : offsets_of[name][0] + i]
        b_part = b[e][:, offsets_of[name][1] : offsets_of[name][1] + o]
        y = v @ kernel + scale * (v @ a_part) @ b_part
        return y + w[bias][e] if bank.use_bias else y

    offsets_of = {}
    for name in ("kernel_in", "kernel_gate", "kernel_out"):
        if name in w:
            offsets_of[name] = (offsets["a"], offsets["b"])
            offsets["a"] += w[name].shape[1]
            offsets["b"] += w[name].shape[2]
    out = []
    for e in range(bank.num_experts):
        h = linear(e, x[e], "kernel_in", "bias_in")
        if bank.gated:
            h = act(linear(e, x[e], "kernel_gate", "bias_gate")) * h
        else:
            h = act(h)
        out.append(linear(e, h, "kernel_out", "bias_out"))
    return np.stack(out)


def _paths(bank, x):
    """The bank's outputs `(E, C, o)` on the three layouts of the paths."""
    e, c, d = x.shape
    rows = x.reshape(e * c, d)
    experts = np.arange(e, dtype="int32")
    buffers = to_numpy(bank(x))  # builds the bank
    blocks = to_numpy(bank.call_blocks(rows, experts, c)).reshape(e, c, -1)
    grouped = bank.call_grouped(
        rows, np.full((e,), c, "int32"), np.repeat(experts, c)
    )
    return {
        "buffers": buffers,
        "blocks": blocks,
        "grouped": to_numpy(grouped).reshape(e, c, -1),
    }


@pytest.mark.parametrize("gated", [False, True])
def test_lora_counts_outputs_and_numpy_reference_on_every_path(gated):
    x = tokens((E, 3, D))
    bank = Experts(E, H, output_dim=5, gated=gated, activation="silu",
                   bias_initializer="random_normal")
    before = _paths(bank, x)
    base = {v.path: to_numpy(v) for v in bank.weights}
    bank.enable_lora(2, lora_alpha=3.0)
    # Exactly E r (in + out) per kernel, and nothing else trains.
    kernels = [(D, H), (D, H), (H, 5)] if gated else [(D, H), (H, 5)]
    assert _count(bank.trainable_weights) == sum(E * 2 * (i + o) for i, o in kernels)
    assert [w.path.split("/")[-1] for w in bank.trainable_weights] == [
        "lora_kernel_a", "lora_kernel_b"
    ]
    after = _paths(bank, x)
    for path in before:
        np.testing.assert_allclose(after[path], before[path], atol=1e-6, rtol=0)
    _randomize_lora(bank)
    expected = numpy_lora_experts(bank, x)
    assert not np.allclose(expected, before["buffers"], atol=1e-3)
    for path, value in _paths(bank, x).items():
        np.testing.assert_allclose(value, expected, atol=1e-5, err_msg=path)
    for v in bank.weights:  # the base weights did not change
        if v.path in base:
            np.testing.assert_array_equal(to_numpy(v), base[v.path])


def test_layer_contract_with_lora_and_expert_dropout():
    run_layer_test(
        Experts,
        dict(num_experts=E, hidden_dim=H, gated=True, lora_rank=2,
             lora_alpha=4.0, expert_dropout=0.25),
        tokens((E, 3, D)),
        expected_output_shape=(E, 3, D),
        expected_num_trainable_weights=2,
    )


def test_sparse_moe_layer_contract_with_lora_dropout_and_shared_experts():
    run_layer_test(
        SparseMoE,
        dict(num_experts=E, hidden_dim=H, k=2, capacity_factor=None,
             num_shared_experts=1, lora_rank=2, lora_alpha=1.0,
             expert_dropout=0.1, gated=True),
        tokens((2, 3, D)),
        expected_output_shape=(2, 3, D),
        # The router's kernel and the two banks' factors.
        expected_num_trainable_weights=5,
    )


def _save_load(model, x):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.keras")
        model.save(path)
        loaded = keras.saving.load_model(path)
    return loaded, to_numpy(loaded(x))


@pytest.mark.parametrize(
    "make",
    [
        lambda: SparseMoE(E, H, k=2, num_shared_experts=1, eval_capacity_factor=None),
        lambda: SoftMoE(E, H),
        lambda: MultiGateMoE(2, E, H, k=2),
        lambda: CGC(2, 1, 1, H),
        lambda: PLE(2, num_levels=2, hidden_dim=H),
    ],
    ids=["sparse_moe", "soft_moe", "multi_gate_moe", "cgc", "ple"],
)
def test_layers_forward_enable_lora_to_every_bank_and_save(make):
    layer = make()
    x = tokens((2, 3, D))
    inputs = keras.Input((3, D))
    model = keras.Model(inputs, layer(inputs))
    before = to_numpy(model(x))
    layer.enable_lora(2)
    banks = expert_banks(layer)
    assert banks and all(b.lora_enabled for b in banks)
    for before_y, after_y in zip(keras.tree.flatten(before),
                                 keras.tree.flatten(to_numpy(model(x)))):
        np.testing.assert_allclose(after_y, before_y, atol=1e-6, rtol=0)
    lora = [w for b in banks for w in b.trainable_weights]
    assert _count(lora) == sum(
        b.num_experts * 2 * sum(k.shape[1] + k.shape[2] for k in
                                (getattr(b, n) for n in b._kernel_names()))
        for b in banks
    )
    for index, bank in enumerate(banks):
        _randomize_lora(bank, seed=index)
    expected = to_numpy(model(x))
    loaded, got = _save_load(model, x)
    for a, b in zip(keras.tree.flatten(got), keras.tree.flatten(expected)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # Reloaded LoRA-enabled and frozen: only the factors of the banks (and
    # the layer's own router / gates) train.
    reloaded = expert_banks(loaded)
    assert all(b.lora_enabled for b in reloaded)
    assert _count(w for b in reloaded for w in b.trainable_weights) == _count(lora)


def test_lora_on_int8_banks_either_order_and_save():
    x = tokens((2, 3, D))
    for order in ("quantize_first", "lora_first"):
        moe = SparseMoE(E, H, k=2, gated=True, capacity_factor=None, name="moe")
        inputs = keras.Input((3, D))
        model = keras.Model(inputs, moe(inputs))
        if order == "lora_first":
            moe.enable_lora(2)
            model.quantize("int8")
        else:
            model.quantize("int8")
            quantized = to_numpy(model(x))
            moe.enable_lora(2)
            np.testing.assert_allclose(to_numpy(model(x)), quantized, atol=1e-6)
        assert moe.experts.kernel_in.dtype == "int8" and moe.experts.lora_enabled
        assert [w.path.split("/")[-1] for w in moe.experts.trainable_weights] == [
            "lora_kernel_a", "lora_kernel_b"
        ]
        base = to_numpy(model(x))
        _randomize_lora(moe.experts)
        expected = to_numpy(model(x))
        assert not np.allclose(expected, base, atol=1e-3)
        _, got = _save_load(model, x)
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_lora_trains_only_the_factors_in_fit():
    moe = SparseMoE(E, H, k=2, capacity_factor=None)
    inputs = keras.Input((3, D))
    model = keras.Model(inputs, moe(inputs))
    model.build((None, 3, D))
    moe.enable_lora(2)
    moe.router.trainable = False
    # The banks' base weights and the router's kernel (not the layer's
    # statistics, which fit updates).
    frozen = {
        w.path: to_numpy(w)
        for w in moe.experts.weights + moe.router.weights
        if not w.trainable
    }
    assert len(frozen) == 5  # kernel_in, kernel_out, two biases, router
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    model.fit(tokens((8, 3, D)), tokens((8, 3, D), seed=1), epochs=2, verbose=0)
    for w in model.weights:
        if w.path in frozen:
            np.testing.assert_array_equal(to_numpy(w), frozen[w.path], err_msg=w.path)
    assert np.abs(to_numpy(moe.experts.lora_kernel_b)).max() > 0


def test_a_lora_bank_loads_weights_saved_without_lora():
    """Keras' convention: base weights (e.g. pretrained) load into a
    LoRA-enabled layer; the factors restart (B = 0: the base's function)."""
    x = tokens((E, 3, D))
    plain = Experts(E, H, gated=True)
    expected = to_numpy(plain(x))
    lora = Experts(E, H, gated=True, lora_rank=2)
    lora.build(x.shape)
    _randomize_lora(lora)
    store = {}  # what a weights file holds for the bank
    plain.save_own_variables(store)
    lora.load_own_variables(store)
    np.testing.assert_allclose(to_numpy(lora(x)), expected, atol=1e-6)
    np.testing.assert_array_equal(to_numpy(lora.lora_kernel_b), 0.0)


def test_pruning_keeps_the_kept_experts_factors_and_adding_or_merging():
    moe = SparseMoE(E, H, k=2, capacity_factor=None, name="moe",
                    router=TopKRouter(E, k=2, bias_update_rate=0.01))
    inputs = keras.Input((3, D))
    model = keras.Model(inputs, moe(inputs))
    moe.enable_lora(2)
    _randomize_lora(moe.experts)
    kept = [0, 2, 3]
    pruned = prune_experts(model, {"moe": kept}).get_layer("moe")
    assert pruned.experts.lora_enabled
    for name in ("lora_kernel_a", "lora_kernel_b"):
        np.testing.assert_array_equal(
            to_numpy(getattr(pruned.experts, name)),
            to_numpy(getattr(moe.experts, name))[kept],
        )
    x = tokens((2, 3, D))
    bigger = add_experts(moe, 2)  # copies each new expert's factors too
    np.testing.assert_allclose(to_numpy(bigger(x)), to_numpy(moe(x)), atol=1e-5)
    assert bigger.experts.lora_enabled
    with pytest.raises(ValueError, match="LoRA"):
        merge_experts(moe, num_experts=2)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda b: b.enable_lora(0), "rank=0"),
        (lambda b: b.enable_lora(True), "rank=True"),
        (lambda b: b.enable_lora(7), "at most the smallest side"),
        (lambda b: b.enable_lora(2, lora_alpha=-1.0), "lora_alpha=-1.0"),
        (lambda b: [b.enable_lora(2), b.enable_lora(2)], "already enabled"),
        (lambda b: Experts(E, H).enable_lora(2), "not built"),
        (lambda b: SparseMoE(E, H).enable_lora(2), "not built"),
        (lambda b: Experts(E, H, lora_alpha=2.0), "needs lora_rank"),
        (lambda b: Experts(E, H, lora_rank="2"), "lora_rank='2'"),
        (lambda b: Experts(E, H, expert_dropout=1.0), "expert_dropout=1.0"),
        (lambda b: Experts(E, H, expert_dropout="0.1"), "expert_dropout='0.1'"),
    ],
)
def test_bad_lora_and_dropout_arguments(call, match):
    bank = Experts(E, H)
    bank.build((E, None, D))
    with pytest.raises(ValueError, match=match):
        call(bank)


def test_expert_dropout_only_in_training_on_every_path():
    x = tokens((E, 5, D))
    bank = Experts(E, H, expert_dropout=0.5)
    plain = Experts(E, H)
    bank.build(x.shape)
    plain.build(x.shape)
    for a, b in zip(bank.weights, plain.weights):
        b.assign(to_numpy(a))
    rows = x.reshape(-1, D)
    experts = np.arange(E, dtype="int32")
    sizes = np.full((E,), 5, "int32")
    calls = {
        "buffers": lambda layer, t: layer(x, training=t),
        "blocks": lambda layer, t: layer.call_blocks(rows, experts, 5, training=t),
        "grouped": lambda layer, t: layer.call_grouped(rows, sizes, training=t),
    }
    for path, call in calls.items():
        np.testing.assert_allclose(
            to_numpy(call(bank, False)), to_numpy(call(plain, False)), atol=1e-6
        )
        assert not np.allclose(
            to_numpy(call(bank, True)), to_numpy(call(plain, True)), atol=1e-3
        ), path
    # Inside a layer: the training flag reaches the bank on the dropless path.
    moe = SparseMoE(E, H, capacity_factor=None, expert_dropout=0.5)
    y = tokens((2, 3, D))
    np.testing.assert_allclose(to_numpy(moe(y)), to_numpy(moe(y)), atol=0)
    assert not np.allclose(
        to_numpy(moe(y, training=True)), to_numpy(moe(y)), atol=1e-4
    )
