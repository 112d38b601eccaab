"""Every layer family on random arguments and input shapes: it works with
finite outputs, or it raises a `ValueError` (whose message names the bad
value). Never another exception, never a NaN from finite inputs."""

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from keras_moe import layers


def _sparse_moe(d, draw):
    e = draw(st.integers(1, 5))
    return layers.SparseMoE(
        e,
        draw(st.integers(1, 6)),
        k=draw(st.integers(1, e + 1)),  # k = E + 1 is an error
        capacity_factor=draw(st.sampled_from([None, 0.5, 1.25, 0.0, -1.0])),
        eval_capacity_factor=draw(st.sampled_from([None, 0.25, 2.0])),
        dispatch=draw(st.sampled_from(["sparse", "dense"])),
        num_shared_experts=draw(st.integers(0, 1)),
    )


def _soft_moe(d, draw):
    return layers.SoftMoE(
        draw(st.integers(1, 4)),
        draw(st.integers(1, 6)),
        slots_per_expert=draw(st.integers(0, 2)),  # 0 is an error
    )


def _multi_gate(d, draw):
    e = draw(st.integers(1, 4))
    return layers.MultiGateMoE(
        draw(st.integers(1, 3)),
        e,
        draw(st.integers(1, 6)),
        k=draw(st.sampled_from([None, 1, e, e + 1])),
        eval_capacity_factor=draw(st.sampled_from([None, 0.5])),
    )


def _cgc(d, draw):
    return layers.CGC(
        draw(st.integers(1, 3)),
        num_task_experts=draw(st.integers(0, 2)),
        num_shared_experts=draw(st.integers(0, 2)),  # 0 and 0 is an error
        hidden_dim=draw(st.integers(1, 6)),
    )


def _ple(d, draw):
    return layers.PLE(
        draw(st.integers(1, 3)),
        num_levels=draw(st.integers(0, 2)),  # 0 is an error
        num_task_experts=1,
        num_shared_experts=1,
        hidden_dim=draw(st.integers(1, 6)),
    )


def _mixture(d, draw):
    n = draw(st.integers(1, 4))
    return layers.MixtureOfExperts(
        [keras.layers.Dense(3) for _ in range(n)],
        k=draw(st.sampled_from([None, 1, n, n + 1])),
        integration=draw(st.sampled_from(["weighted_sum", "max", "attention"])),
    )


def _experts(d, draw):
    return layers.Experts(draw(st.integers(1, 4)), draw(st.integers(1, 6)))


def _heads(d, draw):
    return draw(
        st.sampled_from(
            [
                lambda: layers.ClassificationHead(draw(st.integers(0, 4))),
                lambda: layers.RegressionHead(draw(st.integers(0, 3))),
                lambda: layers.BinaryHead(),
                lambda: layers.BoxHead(),
            ]
        )
    )()


FAMILIES = {
    "SparseMoE": _sparse_moe,
    "SoftMoE": _soft_moe,
    "MultiGateMoE": _multi_gate,
    "CGC": _cgc,
    "PLE": _ple,
    "MixtureOfExperts": _mixture,
    "Experts": _experts,
    "heads": _heads,
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@settings(
    max_examples=6,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: seconds each
    suppress_health_check=[HealthCheck.too_slow],
)
@given(data=st.data())
def test_works_or_raises_value_error(family, data):
    rank = data.draw(st.integers(1, 4), label="rank")
    shape = tuple(data.draw(st.integers(0, 4), label=f"dim{i}") for i in range(rank))
    d = shape[-1]
    x = np.random.default_rng(0).normal(size=shape).astype("float32")
    training = data.draw(st.booleans(), label="training")
    try:
        layer = FAMILIES[family](d, data.draw)
    except ValueError as error:  # a bad argument, named
        assert str(error), "an empty ValueError message"
        return
    try:
        outputs = layer(x, training=training)
    except ValueError as error:  # a bad input shape, named
        assert str(error), "an empty ValueError message"
        return
    for y in keras.tree.flatten(outputs):
        y = keras.ops.convert_to_numpy(y)
        assert np.all(np.isfinite(y)), f"{family} on {shape}: non-finite output"
