"""keras-hub's LoRA workflow through a backbone whose MoE blocks were
swapped by `replace_moe_blocks` (issue 34): `Backbone.enable_lora(rank,
target_layer_names=[..., "experts"])` reaches the expert banks, and
`save_lora_weights` / `load_lora_weights` carry their factors."""

import keras
import numpy as np
import pytest

from keras_moe import interop
from keras_moe.layers import Experts
from keras_moe.utils.keras_internals import flatten_layers
from tests.conftest import to_numpy

keras_hub = pytest.importorskip(
    "keras_hub", reason="keras-hub is a test-only dependency"
)

DIM, HIDDEN, RANK = 8, 16, 2
TARGETS = ["query", "value", "experts"]


def mixtral_backbone():
    return keras_hub.models.MixtralBackbone(
        vocabulary_size=40, num_layers=2, num_query_heads=2,
        num_key_value_heads=1, hidden_dim=DIM, intermediate_dim=HIDDEN,
        num_experts=4, top_k=2, sliding_window=8,
    )


def _lora_layers(model):
    return [l for l in flatten_layers(model) if getattr(l, "lora_enabled", False)]


def test_save_and_load_lora_weights_through_a_swapped_backbone(tmp_path):
    data = {
        "token_ids": np.random.default_rng(0).integers(0, 40, (2, 5)).astype("int32"),
        "padding_mask": np.ones((2, 5), "int32"),
    }
    first = mixtral_backbone()
    pretrained = first.get_weights()
    interop.replace_moe_blocks(first)
    before = to_numpy(first(data))
    first.enable_lora(RANK, target_layer_names=TARGETS)
    np.testing.assert_allclose(to_numpy(first(data)), before, atol=1e-6, rtol=0)

    banks = [l for l in _lora_layers(first) if isinstance(l, Experts)]
    assert len(banks) == 2
    # Everything else is frozen: only LoRA factors train, and the banks'
    # share is exactly E r (in + out) per kernel (gate, up: 8 -> 16;
    # down: 16 -> 8).
    trainable = first.trainable_weights
    assert {w.path.split("/")[-1] for w in trainable} == {
        "lora_kernel_a", "lora_kernel_b"
    }
    bank_params = sum(int(np.prod(w.shape)) for b in banks for w in b.trainable_weights)
    assert bank_params == 2 * 4 * RANK * 3 * (DIM + HIDDEN)

    rng = np.random.default_rng(1)
    for layer in _lora_layers(first):
        for v in (layer.lora_kernel_a, layer.lora_kernel_b):
            v.assign(rng.normal(size=v.shape).astype("float32") * 0.2)
    expected = to_numpy(first(data))
    assert not np.allclose(expected, before, atol=1e-3)
    path = str(tmp_path / "mixtral.lora.h5")
    first.save_lora_weights(path)

    # A fresh backbone with the same pretrained weights, swapped, LoRA on
    # the same layers: loading the file gives the fine-tuned function.
    second = mixtral_backbone()
    second.set_weights(pretrained)
    interop.replace_moe_blocks(second)
    second.enable_lora(RANK, target_layer_names=TARGETS)
    second.load_lora_weights(path)
    np.testing.assert_allclose(to_numpy(second(data)), expected, atol=1e-5)
