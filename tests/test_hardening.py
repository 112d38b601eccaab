"""Issue 32: arguments mean what they say.

- Defect 2: a boolean flag takes `True` or `False` only. `bool("False")` is
  True, so `SparseMoE(gated="False")` built gated experts; 2 and None were
  converted silently.
- Defect 4: impossible weight sizes are refused before anything is
  allocated (`SoftMoE(slots_per_expert=10**12)` aborted the process on JAX).
- Defect 5: `block_size` has a ceiling, named in the error (10**7 failed
  deep in the backend, or allocated gigabytes per call).
- Defect 6: a bad initializer or regularizer names its argument (Keras says
  only "Could not interpret initializer identifier: X"), and a bad seed
  (`"abc"`, -5, 2.5) is refused.

Only constructors and `build` run here: no weights are created for the
refused values, so the tests take milliseconds.
"""

import keras
import numpy as np
import pytest

from keras_moe.callbacks import RoutingMetrics, RoutingMonitor
from keras_moe.layers import (
    CGC,
    PLE,
    BalancedAssignmentRouter,
    BoxHead,
    ClassificationHead,
    DSelectKRouter,
    ExpertChoiceRouter,
    Experts,
    HashRouter,
    MultiGateMoE,
    SoftMoE,
    SparseMoE,
    TaskRouter,
    TopKRouter,
)
from keras_moe.weighting import GradNorm

# class -> (required arguments, its boolean arguments)
BOOLEAN_ARGUMENTS = {
    SparseMoE: ((4, 8), ("gated", "use_bias", "output_scale", "noisy_gating")),
    Experts: ((4, 8), ("gated", "use_bias", "output_scale")),
    TopKRouter: ((4,), ("noisy_gating", "batch_prioritized", "use_bias",
                        "learned_input_scale", "renormalize")),
    ExpertChoiceRouter: ((4,), ("use_bias",)),
    DSelectKRouter: ((4,), ("use_bias",)),
    SoftMoE: ((4, 8), ("normalize", "gated", "use_bias")),
    MultiGateMoE: ((2, 4, 8), ("gated", "use_bias")),
    CGC: ((2, 1, 1, 8), ("shared_output", "gated", "use_bias")),
    PLE: ((2,), ("gated", "use_bias")),
    RoutingMonitor: ((), ("log_scalars", "plot_every_epoch")),
    RoutingMetrics: ((), ("per_expert",)),
    GradNorm: ((), ("log_weights",)),
}
BOOLEAN_CASES = [
    (cls, name) for cls, (_, names) in BOOLEAN_ARGUMENTS.items() for name in names
]


def _id(case):
    return f"{case[0].__name__}-{case[1]}"


@pytest.mark.parametrize("value", ["False", "no", 2, 0, 1.0])
@pytest.mark.parametrize("case", BOOLEAN_CASES, ids=_id)
def test_boolean_flags_refuse_non_booleans(case, value):
    cls, name = case
    required = BOOLEAN_ARGUMENTS[cls][0]
    with pytest.raises(ValueError, match=f"{name} must be True"):
        cls(*required, **{name: value})


@pytest.mark.parametrize(
    "case",
    # None means "the default" for SparseMoE's router options; a real flag
    # has no third state.
    [c for c in BOOLEAN_CASES if c != (SparseMoE, "noisy_gating")],
    ids=_id,
)
def test_boolean_flags_refuse_none(case):
    cls, name = case
    with pytest.raises(ValueError, match=name):
        cls(*BOOLEAN_ARGUMENTS[cls][0], **{name: None})


def test_boolean_flags_take_real_and_numpy_booleans():
    assert SparseMoE(4, 8, gated=np.bool_(True)).experts.gated is True
    assert TopKRouter(4, renormalize="always").renormalize == "always"
    assert CGC(2, 1, 1, 8, shared_output=True).shared_output is True


# -- defect 6: initializers, regularizers and seeds -------------------------

# class -> (required arguments, its initializer and regularizer arguments)
INITIALIZER_ARGUMENTS = {
    SparseMoE: ((4, 8), ("kernel_initializer", "bias_initializer",
                         "kernel_regularizer", "bias_regularizer",
                         "router_kernel_initializer")),
    Experts: ((4, 8), ("kernel_initializer", "bias_initializer",
                       "kernel_regularizer", "bias_regularizer")),
    TopKRouter: ((4,), ("kernel_initializer", "kernel_regularizer")),
    ExpertChoiceRouter: ((4,), ("kernel_initializer", "kernel_regularizer")),
    BalancedAssignmentRouter: ((4,), ("kernel_initializer",)),
    DSelectKRouter: ((4,), ("kernel_initializer",)),
    TaskRouter: ((4, 3), ("kernel_initializer",)),
    SoftMoE: ((4, 8), ("kernel_initializer", "bias_initializer",
                       "kernel_regularizer", "bias_regularizer", "slot_initializer")),
    MultiGateMoE: ((2, 4, 8), ("kernel_initializer", "kernel_regularizer",
                               "gate_kernel_initializer")),
    CGC: ((2, 1, 1, 8), ("bias_initializer", "bias_regularizer",
                         "gate_kernel_initializer")),
    PLE: ((2,), ("kernel_initializer", "gate_kernel_initializer")),
    ClassificationHead: ((3,), ("kernel_initializer", "bias_initializer",
                                "kernel_regularizer", "bias_regularizer")),
    BoxHead: ((), ("output_kernel_initializer",)),
}
INITIALIZER_CASES = [
    (cls, name) for cls, (_, names) in INITIALIZER_ARGUMENTS.items() for name in names
]


@pytest.mark.parametrize("value", ["not_an_initializer", 3, {"class_name": "Nope"}])
@pytest.mark.parametrize("case", INITIALIZER_CASES, ids=_id)
def test_bad_initializers_and_regularizers_name_the_argument(case, value):
    cls, name = case
    kind = name.split("_")[-1]
    with pytest.raises(ValueError, match=f"{name} must be a Keras {kind}"):
        cls(*INITIALIZER_ARGUMENTS[cls][0], **{name: value})


SEEDED = {
    SparseMoE: (4, 8),
    TopKRouter: (4,),
    DSelectKRouter: (4,),
    HashRouter: (4,),
}


@pytest.mark.parametrize("value", ["abc", -5, 2.5, True, 2**32, [1]])
@pytest.mark.parametrize("cls", list(SEEDED), ids=lambda c: c.__name__)
def test_bad_seeds_are_refused(cls, value):
    with pytest.raises(ValueError, match="seed"):
        cls(*SEEDED[cls], seed=value)


@pytest.mark.parametrize("cls", list(SEEDED), ids=lambda c: c.__name__)
def test_good_seeds_are_kept(cls):
    assert cls(*SEEDED[cls], seed=7).seed == 7


# -- defect 4: impossible weight sizes ---------------------------------------


def test_impossible_soft_moe_slots_are_refused_before_allocation():
    """Issue 32: JAX aborted the process (SIGABRT) reading a slot kernel of
    10**12 columns; now the constructor refuses it, and `build` refuses a
    slot kernel of more than 2**31 - 1 elements from allowed parts."""
    with pytest.raises(ValueError, match="slots_per_expert"):
        SoftMoE(4, 8, slots_per_expert=10**12)
    layer = SoftMoE(2**16, 8, slots_per_expert=2**16)
    with pytest.raises(ValueError, match="slot_kernel.*slots_per_expert=65536"):
        layer.build((None, 4, 8))
    assert not layer.weights


def test_impossible_expert_banks_are_refused_before_allocation():
    with pytest.raises(ValueError, match="hidden_dim"):
        Experts(4, 10**12)
    bank = Experts(2**16, 2**18)
    with pytest.raises(ValueError, match="hidden_dim=262144"):
        bank.build((2**16, None, 1024))
    assert not bank.weights


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (SparseMoE, dict(num_experts=10**6, hidden_dim=8)),
        (MultiGateMoE, dict(num_tasks=10**6, num_experts=4, hidden_dim=8)),
        (PLE, dict(num_tasks=2, num_levels=10**5)),
        (CGC, dict(num_tasks=2, num_task_experts=2**16, num_shared_experts=1,
                   hidden_dim=8)),
        (HashRouter, dict(num_experts=4, vocab_size=10**8)),
        (TaskRouter, dict(num_experts=4, num_tasks=10**9)),
        (ClassificationHead, dict(num_classes=10**9)),
        (ClassificationHead, dict(num_classes=3, hidden_units=[8] * 1000)),
        (BalancedAssignmentRouter, dict(num_experts=4, num_iterations=10**6)),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else "-".join(v),
)
def test_sizes_have_ceilings_that_the_error_names(cls, kwargs):
    with pytest.raises(ValueError, match="must be at most"):
        cls(**kwargs)


# -- defect 5: block_size ----------------------------------------------------


@pytest.mark.parametrize("value", [10**7, 4097])
def test_block_size_has_a_ceiling(value):
    with pytest.raises(ValueError, match=f"block_size must be at most 4,096.*{value}"):
        SparseMoE(4, 8, capacity_factor=None, block_size=value)


def test_the_largest_block_size_still_runs():
    moe = SparseMoE(4, 8, capacity_factor=None, block_size=4096)
    y = moe(np.ones((2, 3), "float32"), training=True)
    assert np.all(np.isfinite(keras.ops.convert_to_numpy(y)))
