"""Every layer family on random arguments and input shapes: it works with
finite outputs, or it raises a `ValueError` (whose message names the bad
value). Never another exception, never a NaN from finite inputs."""

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from tests.conftest import RANDOM_SHAPES, SESSION_SEED, layer_cases


@pytest.mark.parametrize("case", layer_cases(RANDOM_SHAPES, one_per_family=True))
@settings(
    max_examples=6,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: seconds each
    suppress_health_check=[HealthCheck.too_slow],
)
@hypothesis_seed(SESSION_SEED)  # the families draw the same shapes (conftest)
@given(data=st.data())
def test_works_or_raises_value_error(case, data):
    """Each family of LAYER_FAMILIES (tests/conftest.py), its arguments
    drawn by its first row's `draw`."""
    rank = data.draw(st.integers(1, 4), label="rank")
    shape = tuple(data.draw(st.integers(0, 4), label=f"dim{i}") for i in range(rank))
    x = np.random.default_rng(0).normal(size=shape).astype("float32")
    training = data.draw(st.booleans(), label="training")
    try:
        layer = case.draw(data.draw)
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
        assert np.all(np.isfinite(y)), f"{case.id} on {shape}: non-finite output"
