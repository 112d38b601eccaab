"""keras_moe.interop: keras-hub's six MoE blocks ported onto SparseMoE.

For every block: the outputs (inference and training), the load-balancing
loss where keras-hub has one, and the gradient with respect to the inputs
must equal keras-hub's to `ATOL`. Tiny dims; Gaussian weights with 1 /
fan-in variance so that the routing is far from uniform. keras-hub is a
test-only dependency (see tests/layers/test_keras_hub_parity.py for how it
is installed); this module is skipped without it.
"""

import keras
import numpy as np
import pytest
from keras import ops

keras_hub = pytest.importorskip(
    "keras_hub",
    reason=(
        "keras-hub is a test-only dependency, not installed: "
        "pip install --no-deps keras-hub==0.32.0 && pip install tokenizers regex"
    ),
)

from keras_hub.src.models.gemma4 import gemma4_layers, gemma4_moe  # noqa: E402
from keras_hub.src.models.gpt_oss import gpt_oss_decoder  # noqa: E402
from keras_hub.src.models.mixtral import mixtral_decoder  # noqa: E402
from keras_hub.src.models.qwen3_5_moe import qwen3_5_moe_decoder  # noqa: E402
from keras_hub.src.models.qwen3_moe import qwen3_moe_decoder  # noqa: E402
from keras_hub.src.models.qwen_moe import qwen_moe_decoder  # noqa: E402

from keras_moe import interop  # noqa: E402
from keras_moe.layers import SparseMoE  # noqa: E402
from tests.conftest import input_gradients  # noqa: E402

BATCH, SEQ, DIM, HIDDEN, SHARED, EXPERTS, K = 2, 5, 16, 12, 20, 8, 2
ATOL = 1e-5


def mixtral():
    return mixtral_decoder.MixtralSparseMoeBlock(
        hidden_dim=DIM, intermediate_dim=HIDDEN, num_experts=EXPERTS, top_k=K
    )


def qwen():
    return qwen_moe_decoder.QwenSparseMoeBlock(
        hidden_dim=DIM,
        moe_intermediate_dim=HIDDEN,
        shared_expert_intermediate_dim=SHARED,
        num_experts=EXPERTS,
        top_k=K,
        norm_top_k_prob=False,
    )


def qwen3():
    return qwen3_moe_decoder.Qwen3SparseMoeBlock(
        hidden_dim=DIM,
        moe_intermediate_dim=HIDDEN,
        num_experts=EXPERTS,
        top_k=K,
        norm_top_k_prob=True,
    )


def qwen3_5():
    return qwen3_5_moe_decoder.Qwen3_5MoeSparseMoeBlock(
        hidden_dim=DIM,
        moe_intermediate_dim=HIDDEN,
        shared_expert_intermediate_size=SHARED,
        num_experts=EXPERTS,
        top_k=K,
    )


def gpt_oss():
    return gpt_oss_decoder.GptOssSparseMoeBlock(
        hidden_dim=DIM, intermediate_dim=HIDDEN, num_experts=EXPERTS, top_k=K
    )


class Gemma4MoE(keras.layers.Layer):
    """Gemma 4's MoE path as in `Gemma4TextDecoderBlock.call`: the router on
    the raw `x`, the expert bank on `pre_ffw_norm_moe(x)`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.norm = gemma4_layers.RMSNormalization(epsilon=1e-6, name="norm")
        self.router = gemma4_moe.Gemma4Router(
            num_experts=EXPERTS, num_experts_per_token=K, name="router"
        )
        self.bank = gemma4_moe.Gemma4MoEBlock(
            num_experts=EXPERTS,
            hidden_dim=DIM,
            expert_intermediate_dim=HIDDEN,
            name="bank",
        )

    def build(self, input_shape):
        for layer in (self.norm, self.router, self.bank):
            layer.build(input_shape)

    def call(self, x):
        normed = self.norm(x)
        flat = ops.reshape(normed, (-1, DIM))
        return ops.reshape(self.bank(flat, self.router(x)), ops.shape(x)), None


class PortedGemma4(keras.layers.Layer):
    """The port: `moe(norm(x), routing_inputs=x)`, sharing the norm."""

    def __init__(self, norm, moe, **kwargs):
        super().__init__(**kwargs)
        self.norm, self.moe = norm, moe

    def call(self, x, training=None):
        return self.moe(self.norm(x), routing_inputs=x, training=training)


# name: (factory, keras-hub's load-balancing loss function or None)
BLOCKS = {
    "mixtral": (mixtral, mixtral_decoder.compute_load_balancing_loss),
    "qwen_moe": (qwen, qwen_moe_decoder.compute_load_balancing_loss),
    "qwen3_moe": (qwen3, qwen3_moe_decoder.compute_load_balancing_loss),
    "qwen3_5_moe": (qwen3_5, qwen3_5_moe_decoder.compute_load_balancing_loss),
    "gpt_oss": (gpt_oss, None),
    "gemma4": (Gemma4MoE, None),
}


class OutputOnly(keras.layers.Layer):
    """A keras-hub MoE block without its second output."""

    def __init__(self, block, **kwargs):
        super().__init__(**kwargs)
        self.block = block

    def call(self, inputs, training=None):
        return self.block(inputs, training=training)[0]


def randomise(block, seed=7):
    """Gaussian kernels with 1 / fan-in variance; biases and learned scales
    near their init (so that each one matters)."""
    rng = np.random.default_rng(seed)
    for variable in block.weights:
        shape = tuple(variable.shape)
        name = variable.path.split("/")[-1]
        if "scale" in name:
            value = 1.0 + 0.3 * rng.normal(size=shape)
        elif len(shape) >= 2:
            value = rng.normal(size=shape) * shape[-2] ** -0.5
        else:
            value = 0.3 * rng.normal(size=shape)
        variable.assign(value.astype("float32"))


def make_pair(name):
    factory, _ = BLOCKS[name]
    block = factory()
    block.build((BATCH, SEQ, DIM))
    randomise(block)
    if name == "gemma4":
        moe = interop.from_keras_hub((block.router, block.bank))
        return OutputOnly(block), PortedGemma4(block.norm, moe), moe
    return OutputOnly(block), interop.from_keras_hub(block), None


def inputs(name, seed=0):
    x = np.random.default_rng(seed).normal(size=(BATCH, SEQ, DIM))
    # GPT-OSS: large enough inputs that its clamp (7) cuts some of the
    # gate and linear pre-activations (checked below).
    return (x * (4.0 if name == "gpt_oss" else 1.0)).astype("float32")


def max_diff(a, b):
    return float(np.max(np.abs(np.asarray(ops.convert_to_numpy(a)) - np.asarray(ops.convert_to_numpy(b)))))


@pytest.mark.parametrize("name", list(BLOCKS))
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_outputs_and_aux_loss_match(name, training):
    hub, ported, _ = make_pair(name)
    moe = ported if isinstance(ported, SparseMoE) else ported.moe
    assert isinstance(moe, SparseMoE) and moe.capacity_factor is None
    x = inputs(name)
    expected = hub(x, training=training)
    got = ported(x, training=training)
    assert max_diff(expected, got) <= ATOL, max_diff(expected, got)

    # keras-hub adds its weighted loss in training only, as our router does.
    hub_losses = [float(ops.convert_to_numpy(v)) for v in hub.losses]
    moe_losses = [float(ops.convert_to_numpy(v)) for v in moe.losses]
    has_aux = BLOCKS[name][1] is not None
    assert len(hub_losses) == (1 if training and has_aux else 0)
    assert len(moe_losses) == len(hub_losses), (hub_losses, moe_losses)
    assert abs(sum(hub_losses) - sum(moe_losses)) <= ATOL, (hub_losses, moe_losses)
    if has_aux:  # the unweighted loss, in both modes
        logits = hub.block(x)[1]
        expected_lb = float(ops.convert_to_numpy(BLOCKS[name][1](logits, EXPERTS, K)))
        got_lb = moe.routing_stats()["load_balance_loss"]
        assert abs(expected_lb - got_lb) <= ATOL, (expected_lb, got_lb)


@pytest.mark.parametrize("name", list(BLOCKS))
def test_input_gradients_match(name):
    # The gradient of sum(outputs) (plus the aux loss, in training) with
    # respect to every input row; the ported layer uses its custom dropless
    # gradient rules in training.
    hub, ported, _ = make_pair(name)
    x = inputs(name, seed=3)
    rows = list(range(BATCH))
    expected = input_gradients(hub, x, rows)
    got = input_gradients(ported, x, rows)
    assert np.abs(expected).max() > 1e-2  # a real signal, not two zeros
    assert max_diff(expected, got) <= ATOL, max_diff(expected, got)


def test_gpt_oss_clamp_is_exercised():
    # The parity above means something for the clamp only if it cuts.
    hub, _, _ = make_pair("gpt_oss")
    experts = hub.block.experts
    flat = inputs("gpt_oss").reshape(-1, DIM)
    gate_up = np.einsum(
        "th,ehm->etm", flat, ops.convert_to_numpy(experts.gate_up_proj)
    ) + ops.convert_to_numpy(experts.gate_up_proj_bias)[:, None]
    assert (gate_up[..., ::2] > 7).mean() > 0.01
    assert (np.abs(gate_up[..., 1::2]) > 7).mean() > 0.01


def test_gemma4_from_a_decoder_block():
    from keras_hub.src.models.gemma4.gemma4_decoder_block import (
        Gemma4TextDecoderBlock,
    )

    block = Gemma4TextDecoderBlock(
        hidden_dim=DIM,
        intermediate_dim=24,
        head_dim=4,
        num_query_heads=2,
        num_key_value_heads=1,
        enable_moe_block=True,
        num_experts=EXPERTS,
        expert_intermediate_dim=HIDDEN,
        num_experts_per_token=K,
    )
    block.build((BATCH, SEQ, DIM))
    randomise(block)
    moe = interop.from_keras_hub(block)
    x = inputs("gemma4")
    normed = block.pre_ffw_norm_moe(x)
    expected = block.moe_expert_bank(
        ops.reshape(normed, (-1, DIM)), block.moe_router(x)
    )
    got = moe(normed, routing_inputs=x)
    assert max_diff(ops.reshape(expected, (BATCH, SEQ, DIM)), got) <= ATOL


def test_overrides_and_errors():
    block = mixtral()
    with pytest.raises(ValueError, match="not built"):
        interop.from_keras_hub(block)
    block.build((None, None, DIM))
    moe = interop.from_keras_hub(block, capacity_factor=1.5, name="ported")
    assert moe.capacity_factor == 1.5 and moe.name == "ported"
    with pytest.raises(ValueError, match="supports keras-hub's"):
        interop.from_keras_hub(keras.layers.Dense(3))


def mixtral_backbone():
    return keras_hub.models.MixtralBackbone(
        vocabulary_size=40,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=DIM,
        intermediate_dim=HIDDEN,
        num_experts=4,
        top_k=2,
        sliding_window=8,
    )


def test_replace_moe_blocks_in_a_mixtral_backbone():
    backbone = mixtral_backbone()
    rng = np.random.default_rng(0)
    for variable in backbone.weights:
        if len(variable.shape) >= 2:
            value = rng.normal(size=variable.shape) * variable.shape[-2] ** -0.5
            variable.assign(value.astype("float32"))
    data = {
        "token_ids": rng.integers(0, 40, size=(2, 6)).astype("int32"),
        "padding_mask": np.array([[1] * 6, [1] * 4 + [0] * 2], "int32"),
    }
    expected = ops.convert_to_numpy(backbone(data))
    count = len(backbone.weights)
    replaced = interop.replace_moe_blocks(backbone)
    assert len(replaced) == 2
    for layer in backbone.transformer_layers:
        assert isinstance(layer._sparse_moe_block, interop.KerasHubMoEBlock)
    # The old blocks' weights left the model; the routing statistics came.
    assert len(backbone.weights) == count + 2 * 4
    # predict: compiled (TF, JAX) from the model's new list of variables.
    predicted = backbone.predict(data, verbose=0)
    assert max_diff(expected, predicted) <= 1e-4, max_diff(expected, predicted)


def test_keras_hub_moe_block_config_round_trip():
    # The shapes of the parity tests (on JAX each new shape compiles anew).
    moe = SparseMoE(EXPERTS, HIDDEN, capacity_factor=None)
    block = interop.KerasHubMoEBlock(moe, second_output="scores")
    outputs, scores = block(inputs("mixtral"))
    assert tuple(outputs.shape) == (BATCH, SEQ, DIM)
    assert tuple(scores.shape) == (BATCH * SEQ, EXPERTS)
    np.testing.assert_allclose(ops.convert_to_numpy(ops.sum(scores, -1)), 1, atol=1e-6)
    config = block.get_config()
    again = interop.KerasHubMoEBlock.from_config(config)
    assert again.get_config() == config
    with pytest.raises(ValueError, match="second_output='x'"):
        interop.KerasHubMoEBlock(moe, second_output="x")
