"""Real-model parity: keras-hub's Mixtral and Qwen3-MoE MoE blocks against a
dropless `SparseMoE` holding the same weights (issue 21's acceptance test),
made by `keras_moe.interop.from_keras_hub` (issue 23; tests/test_interop.py
covers the other blocks).

keras-hub is a test-only dependency. Its metadata requires tensorflow-text,
which pulls the full `tensorflow` next to our `tensorflow-cpu` (and also
kagglehub, kagglesdk, sentencepiece), none of which `import keras_hub` or
these blocks need. Beyond Keras' own dependencies it imports `regex` and
`tokenizers` at import time, so it is installed with

    pip install --no-deps keras-hub==0.32.0 && pip install tokenizers regex

(a pip extra cannot say `--no-deps`), and this module is skipped when
keras-hub is missing.

The math being matched (keras-hub 0.32, `mixtral_decoder.py` and
`qwen3_moe_decoder.py`), for every token `x` of a `(B, T, d)` input:

- Router: bias-free `Dense(E)` logits, softmax, top-k of the probabilities;
  Mixtral always renormalises the top-k weights to sum to 1, Qwen3-MoE only
  with `norm_top_k_prob=True`.
- Experts: SwiGLU without biases, `(silu(x Wg) * (x Wi)) Wo`. Mixtral keeps
  `Wg` and `Wi` as two `(E, d, h)` kernels; Qwen3-MoE fuses them into one
  `(E, d, 2h)` kernel whose first half is the gate (through the activation)
  and second half the linear "up" branch.
- Auxiliary loss (training only): `coef * E * sum_e f_e P_e`, `f_e` the
  fraction of the `N k` (token, choice) pairs sent to expert `e`, `P_e` the
  mean router probability: keras-hub's `compute_load_balancing_loss` averages
  its one-hot `(N, k, E)` over tokens and then choices, which is
  `keras_moe.ops.load_balancing_loss` exactly (its `f` is a one-hot, so it
  has no gradient in either). So the loss values, and the gradients that
  include them, must match too.

keras-hub runs every expert on every token and masks; `SparseMoE` with
`capacity_factor=None` and `eval_capacity_factor=None` runs only the chosen
(token, expert) pairs (expert-sorted blocks), so equality here checks the
dropless dispatch, combine and their custom gradients against a real model.
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

from keras_hub.src.models.mixtral import mixtral_decoder  # noqa: E402
from keras_hub.src.models.qwen3_moe import qwen3_moe_decoder  # noqa: E402

from keras_moe import interop  # noqa: E402

BATCH, SEQ, DIM, HIDDEN, EXPERTS = 2, 5, 16, 32, 8
ATOL = 1e-5


# Each case: (keras-hub block factory, renormalise top-k?, keras-hub's
# default aux-loss coefficient, weight mapping, keras-hub's unweighted
# load-balancing loss). A mapping takes the built block and returns the
# variables (or slices) that become SparseMoE's router kernel and its
# experts' kernel_in / kernel_gate / kernel_out.
def mixtral_block(top_k, aux_coef):
    return mixtral_decoder.MixtralSparseMoeBlock(
        hidden_dim=DIM,
        intermediate_dim=HIDDEN,
        num_experts=EXPERTS,
        top_k=top_k,
        router_jitter_noise=0.0,
        router_aux_loss_coef=aux_coef,
    )


def mixtral_weights(block):
    bank = block.expert_bank
    return {
        "router": block._sparse_feedforward_gate_dense.kernel,
        "kernel_in": bank._expert_feedforward_intermediate_dense,
        "kernel_gate": bank._expert_feedforward_gate_dense,
        "kernel_out": bank._expert_feedforward_output_dense,
    }


def qwen3_block(norm_top_k_prob):
    def make(top_k, aux_coef):
        return qwen3_moe_decoder.Qwen3SparseMoeBlock(
            hidden_dim=DIM,
            moe_intermediate_dim=HIDDEN,
            num_experts=EXPERTS,
            top_k=top_k,
            norm_top_k_prob=norm_top_k_prob,
            router_aux_loss_coefficient=aux_coef,
        )

    return make


def qwen3_weights(block):
    bank = block.expert_bank
    gate_up = bank._expert_feedforward_gate_dense  # (E, d, 2h): [gate | up]
    return {
        "router": block._sparse_feedforward_gate_dense.kernel,
        "kernel_in": gate_up[..., HIDDEN:],
        "kernel_gate": gate_up[..., :HIDDEN],
        "kernel_out": bank._expert_feedforward_output_dense,
    }


MIXTRAL_LOSS = mixtral_decoder.compute_load_balancing_loss
QWEN3_LOSS = qwen3_moe_decoder.compute_load_balancing_loss
# keras-hub renormalises the top-k weights even at k = 1 (weight 1: Mixtral
# always, Qwen3-MoE with norm_top_k_prob=True): TopKRouter's "always".
CASES = {
    "mixtral": (mixtral_block, "always", 0.02, mixtral_weights, MIXTRAL_LOSS),
    "qwen3_moe_norm_top_k": (
        qwen3_block(True), "always", 0.01, qwen3_weights, QWEN3_LOSS
    ),
    "qwen3_moe_raw_top_k": (qwen3_block(False), False, 0.01, qwen3_weights, QWEN3_LOSS),
}

PARAMS = [
    pytest.param("mixtral", 2, id="mixtral-k2"),
    pytest.param("mixtral", 3, id="mixtral-k3"),
    pytest.param("qwen3_moe_norm_top_k", 2, id="qwen3_moe_norm-k2"),
    pytest.param("qwen3_moe_raw_top_k", 2, id="qwen3_moe_raw-k2"),
    pytest.param("qwen3_moe_raw_top_k", 1, id="qwen3_moe_raw-k1"),
    pytest.param("mixtral", 1, id="mixtral-k1"),
    pytest.param("qwen3_moe_norm_top_k", 1, id="qwen3_moe_norm-k1"),
]


class OutputOnly(keras.layers.Layer):
    """A keras-hub MoE block without its `router_logits` output."""

    def __init__(self, block, **kwargs):
        super().__init__(**kwargs)
        self.block = block

    def call(self, inputs, training=None):
        return self.block(inputs, training=training)[0]


class InputProbe(keras.layers.Layer):
    """`inputs + offset`, a trainable zero offset of the input's full shape
    (batch included): one SGD(1) step moves it by minus the gradient of the
    loss with respect to the input, on every backend."""

    def build(self, input_shape):
        self.offset = self.add_weight(
            name="offset", shape=input_shape, initializer="zeros"
        )

    def call(self, inputs):
        return inputs + self.offset


def numpy_of(value):
    return np.array(ops.convert_to_numpy(value))


def make_pair(case, top_k, aux=True):
    """The keras-hub block (wrapped) and the dropless SparseMoE that
    `keras_moe.interop.from_keras_hub` ports it to; both without auxiliary
    loss if not `aux`."""
    factory, renormalize, aux_coef, mapping, _ = CASES[case]
    aux_coef = aux_coef if aux else 0.0
    block = factory(top_k, aux_coef)
    block.build((BATCH, SEQ, DIM))
    # Gaussian weights with 1 / fan-in variance: O(1) router logits (not the
    # near-uniform routing of a small initialiser) and O(1) outputs.
    rng = np.random.default_rng(7)
    for variable in block.weights:
        scale = variable.shape[-2] ** -0.5
        variable.assign(rng.normal(size=variable.shape).astype("float32") * scale)
    moe = interop.from_keras_hub(block)
    assert moe.dispatch == "sparse" and moe.capacity_factor is None
    assert moe.k == top_k and moe.router.renormalize == renormalize
    assert moe.router.load_balance_weight == aux_coef
    # The port holds the block's weights, as the mapping reads them.
    weights = {name: numpy_of(value) for name, value in mapping(block).items()}
    np.testing.assert_array_equal(numpy_of(moe.router.kernel), weights["router"])
    for name in ("kernel_in", "kernel_gate", "kernel_out"):
        np.testing.assert_array_equal(
            numpy_of(getattr(moe.experts, name)), weights[name]
        )
    return OutputOnly(block), moe, mapping


def inputs(seed=0):
    return np.random.default_rng(seed).normal(size=(BATCH, SEQ, DIM)).astype("float32")


def max_diff(a, b):
    return float(np.max(np.abs(numpy_of(a) - numpy_of(b))))


@pytest.mark.parametrize("case, top_k", PARAMS)
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_outputs_and_aux_loss_match(case, top_k, training):
    hub, moe, _ = make_pair(case, top_k)
    x = inputs()
    expected = hub(x, training=training)
    got = moe(x, training=training)
    assert max_diff(expected, got) <= ATOL, max_diff(expected, got)

    # Training adds the same weighted load-balancing loss in both (keras-hub
    # adds nothing in inference; our router adds its loss only in training).
    hub_loss = sum(float(numpy_of(v)) for v in hub.losses)
    moe_loss = sum(float(numpy_of(v)) for v in moe.losses)
    assert len(hub.losses) == len(moe.losses) == (1 if training else 0)
    assert abs(hub_loss - moe_loss) <= ATOL, (hub_loss, moe_loss)

    # The unweighted loss of the call, both ways.
    logits = hub.block(x)[1]
    expected_lb = numpy_of(CASES[case][4](logits, EXPERTS, top_k))
    got_lb = moe.routing_stats()["load_balance_loss"]
    assert abs(float(expected_lb) - got_lb) <= ATOL, (expected_lb, got_lb)


def gradients(layer, x, weight, weight_variables):
    """One SGD(1) train step on `sum(layer(x) * weight)` plus the layer's
    auxiliary losses: returns the gradient with respect to `x`
    and to `weight_variables` (a dict of variables or slices of them)."""
    probe = InputProbe()
    model = keras.Sequential([keras.Input((SEQ, DIM), batch_size=BATCH), probe, layer])
    # Eagerly. A TensorFlow graph train step (Keras 3.15.1, TF 2.21, no
    # XLA) sometimes computed this step from partly updated variables: with
    # this loss, whose gradient does not need the output's value, the
    # reported loss came out wrong in most fresh models (even two plain
    # Dense layers, even with one inter-op thread), and the gradients in
    # about 1 step of 40, for keras-hub's block and SparseMoE alike; mse
    # was not affected. Eager steps gave 0 wrong gradients in 60.
    model.compile(
        optimizer=keras.optimizers.SGD(1.0),
        loss=lambda target, y: ops.sum(target * y),
        run_eagerly=True,
    )
    before = {name: numpy_of(v) for name, v in weight_variables().items()}
    model.train_on_batch(x, weight)
    after = {name: numpy_of(v) for name, v in weight_variables().items()}
    grads = {name: before[name] - after[name] for name in before}
    return -numpy_of(probe.offset), grads


@pytest.mark.parametrize("case, top_k", PARAMS)
@pytest.mark.parametrize("aux", [True, False], ids=["with_aux_loss", "output_only"])
def test_gradients_match(case, top_k, aux):
    # with_aux_loss: keras-hub's training objective; output_only: the
    # gradient of sum(output * weight) alone.
    hub, moe, mapping = make_pair(case, top_k, aux=aux)
    x = inputs()
    weight = np.random.default_rng(1).normal(size=x.shape).astype("float32")

    hub_dx, hub_dw = gradients(hub, x, weight, lambda: mapping(hub.block))
    moe_dx, moe_dw = gradients(
        moe,
        x,
        weight,
        lambda: {
            "router": moe.router.kernel,
            "kernel_in": moe.experts.kernel_in,
            "kernel_gate": moe.experts.kernel_gate,
            "kernel_out": moe.experts.kernel_out,
        },
    )
    assert np.abs(hub_dx).max() > 1e-2  # a real signal, not two zeros
    assert max_diff(hub_dx, moe_dx) <= ATOL, max_diff(hub_dx, moe_dx)
    for name in hub_dw:
        assert max_diff(hub_dw[name], moe_dw[name]) <= ATOL, (
            name,
            max_diff(hub_dw[name], moe_dw[name]),
        )
