"""Causal language models: routing never lets a token see its future.

In a decoder, a token's output may depend on the tokens before it only. A
`SparseMoE` computes every token on its own, except where a capacity makes
tokens compete for room in an expert: then whether a token is kept depends on
the tokens placed before it. Dropless routing (`capacity_factor=None`) has no
competition; with a capacity, `causal=True` places the (token, expert) pairs
token by token in the flattened `(batch, time)` order, so a token is kept or
dropped by earlier tokens only (with `k=1` choice-major placement is that
order already). Expert choice, BASE and batch-prioritized routing place tokens
by looking at all of them, so `causal=True` refuses them.

The checks: change the later tokens of one sequence (positions `> t`) and the
outputs at positions `<= t` of that sequence stay the same, in training and
in inference, for every routing mode `examples/text_moe_gpt.py` and
`benchmarks/text_moe_vs_dense.py` offer; and in a whole causal model
(`MultiHeadAttention(use_causal_mask=True)` + `SparseMoE`), the logits too.
The refusal of look-ahead routers and the `causal` config round trip are
tested with the layer (`tests/layers/test_sparse_moe.py`); here, the leak
they prevent (and that the check sees it) and every mode of the example.
"""

import keras
import numpy as np
import pytest

from keras_moe.layers import ExpertChoiceRouter, SparseMoE
from tests.conftest import tokens

B, T, D = 2, 12, 8
CUT = 5  # positions 0..CUT are the past, CUT+1.. the future

# The routing modes of the language-model example and its runner (their
# layers are built with causal=True), with a small capacity factor where
# there is one (so that tokens are dropped); and dropless routing without
# causal=True, which is causal anyway, and the choice-major capacity with
# k=1 (the same order as token-major).
CAUSAL_MODES = {
    "dropless_top1": dict(num_experts=4, k=1, capacity_factor=None, causal=True),
    "dropless_top2": dict(num_experts=4, k=2, capacity_factor=None, causal=True),
    "capacity_top1": dict(num_experts=4, k=1, capacity_factor=0.5, causal=True),
    "capacity_top2": dict(num_experts=4, k=2, capacity_factor=0.5, causal=True),
    "capacity_top2_eval": dict(
        num_experts=4, k=2, capacity_factor=0.5, eval_capacity_factor=0.5, causal=True
    ),
    "dropless_top2_shared_not_causal": dict(
        num_experts=4, k=2, capacity_factor=None, num_shared_experts=1
    ),
    "capacity_top1_not_causal": dict(num_experts=4, k=1, capacity_factor=0.5),
}


def moe(options):
    options = dict(options)
    options.setdefault("eval_capacity_factor", None)
    layer = SparseMoE(hidden_dim=16, seed=3, **options)
    layer.build((None, T, D))
    # A larger router kernel than Switch's initialisation: decided routing,
    # so that a small capacity really drops pairs.
    kernel = layer.router.weights[0]
    kernel.assign(tokens(tuple(kernel.shape), seed=7))
    return layer


def future_changed(x, row, seed):
    """`x` with the future (positions > CUT) of sequence `row` redrawn."""
    changed = np.array(x)
    changed[row, CUT + 1:] = tokens(changed[row, CUT + 1:].shape, seed=seed)
    return changed


def past_difference(call, x, row, seeds=(11, 12, 13)):
    """Largest change of sequence `row`'s past outputs over a few redrawn
    futures."""
    base = keras.ops.convert_to_numpy(call(x))[row, : CUT + 1]
    worst = 0.0
    for seed in seeds:
        out = keras.ops.convert_to_numpy(call(future_changed(x, row, seed)))
        worst = max(worst, float(np.max(np.abs(out[row, : CUT + 1] - base))))
    return worst


def check_causal(layer, training):
    x = tokens((B, T, D), seed=0)
    for row in range(B):
        diff = past_difference(lambda v: layer(v, training=training), x, row)
        assert diff < 1e-5, (row, diff)
    factor = layer.capacity_factor if training else layer.eval_capacity_factor
    if factor is not None:  # the capacity really drops pairs: not vacuous
        _, routing = layer(x, training=training, return_routing=True)
        assert float(keras.ops.convert_to_numpy(routing["dropped_fraction"])) > 0


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("mode", sorted(CAUSAL_MODES))
def test_layer_is_causal(mode, training):
    check_causal(moe(CAUSAL_MODES[mode]), training)


def test_choice_major_capacity_leaks():
    """Why `causal=True` exists: with a capacity and `k=2`, pairs are placed
    choice by choice, so a later token's first choice can take the room of
    an earlier token's second choice. The check above sees it (so it is not
    vacuous)."""
    layer = moe(dict(num_experts=4, k=2, capacity_factor=0.5))
    x = tokens((B, T, D), seed=0)
    diffs = [past_difference(lambda v: layer(v, training=True), x, row)
             for row in range(B)]
    assert max(diffs) > 1e-3, diffs


def test_expert_choice_leaks():
    """Expert choice picks each expert's tokens among all of them, the
    future included: not for causal models (the example does not offer it)."""
    layer = SparseMoE(
        4, 16, capacity_factor=0.5, eval_capacity_factor=0.5,
        router=ExpertChoiceRouter(4, k=1),
    )
    layer.build((None, T, D))
    layer.router.weights[0].assign(tokens(tuple(layer.router.weights[0].shape), seed=7))
    x = tokens((B, T, D), seed=0)
    diffs = [past_difference(lambda v: layer(v, training=False), x, row)
             for row in range(B)]
    assert max(diffs) > 1e-3, diffs


# -- a whole decoder ---------------------------------------------------------


def tiny_decoder(options, vocab=32, dim=16):
    """Embedding -> causal self-attention -> SparseMoE -> logits, every
    residual: the example's block, tiny."""
    ids = keras.Input((T,), dtype="int32")
    x = keras.layers.Embedding(vocab, dim)(ids)
    h = keras.layers.MultiHeadAttention(2, dim // 2)(x, x, use_causal_mask=True)
    x = x + h
    layer = SparseMoE(hidden_dim=32, eval_capacity_factor=None, seed=3, **options)
    x = x + layer(keras.layers.LayerNormalization()(x))
    model = keras.Model(ids, keras.layers.Dense(vocab)(x))
    kernel = layer.router.weights[0]
    kernel.assign(tokens(tuple(kernel.shape), seed=7))
    return model


def check_decoder(options):
    model = tiny_decoder(options)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 32, (B, T)).astype("int32")
    for training in (True, False):
        base = keras.ops.convert_to_numpy(model(x, training=training))
        for row in range(B):
            changed = np.array(x)
            changed[row, CUT + 1:] = rng.integers(0, 32, T - CUT - 1)
            out = keras.ops.convert_to_numpy(model(changed, training=training))
            diff = float(np.max(np.abs(out[row, : CUT + 1] - base[row, : CUT + 1])))
            assert diff < 1e-5, (training, row, diff)


def test_decoder_is_causal():
    check_decoder(dict(num_experts=4, k=1, capacity_factor=None, causal=True))


def test_decoder_with_causal_capacity_is_causal():
    check_decoder(dict(num_experts=4, k=2, capacity_factor=0.5, causal=True))
