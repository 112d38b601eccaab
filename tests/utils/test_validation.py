"""The argument checks of `keras_moe.utils.validation` added by issue 32:
real booleans, seeds, initializers and regularizers named in their errors,
size ceilings and the weight-size bound."""

import keras
import numpy as np
import pytest

from keras_moe.utils import validation as check


@pytest.mark.parametrize("value", [True, False, np.bool_(True), np.bool_(False)])
def test_boolean_accepts_real_booleans(value):
    assert check.boolean("flag", value) is bool(value)


@pytest.mark.parametrize("value", ["False", "True", "no", "", 0, 1, 2, None, 1.0, [True]])
def test_boolean_refuses_everything_else(value):
    with pytest.raises(ValueError, match=r"flag must be True or False\. Received: flag="):
        check.boolean("flag", value)


@pytest.mark.parametrize("value", [None, 0, 7, 2**32 - 1, np.int64(3)])
def test_seed_accepts_none_and_unsigned_32_bit_ints(value):
    assert check.seed("seed", value) == (None if value is None else int(value))


@pytest.mark.parametrize("value", ["abc", -5, 2.5, True, 2**32, "1"])
def test_seed_refuses_the_rest(value):
    with pytest.raises(ValueError, match="seed must be None or an integer"):
        check.seed("seed", value)


def test_initializer_and_regularizer_errors_name_the_argument():
    assert isinstance(check.initializer("a", "zeros"), keras.initializers.Zeros)
    assert check.regularizer("b", None) is None
    with pytest.raises(ValueError, match="a must be a Keras initializer.*'glorot_unifrm'"):
        check.initializer("a", "glorot_unifrm")
    with pytest.raises(ValueError, match="b must be a Keras regularizer.*'l3'"):
        check.regularizer("b", "l3")


def test_ceilings_name_the_argument_and_the_value():
    assert check.positive_int("n", 5, maximum=5) == 5
    with pytest.raises(ValueError, match="n must be at most 5 .*Received: n=6"):
        check.positive_int("n", 6, maximum=5)
    with pytest.raises(ValueError, match="m must be at most 1,024"):
        check.non_negative_int("m", 1025, maximum=1024)
    assert check.block_size("block_size", check.MAX_BLOCK_SIZE) == 4096
    with pytest.raises(ValueError, match="block_size must be at most"):
        check.block_size("block_size", check.MAX_BLOCK_SIZE + 1)


def test_weight_elements_bound():
    check.weight_elements("layer", "w", (2**15, 2**16 - 1))  # < 2**31
    with pytest.raises(ValueError, match=r"layer: the weight 'w' would have shape "
                                         r"\(65536, 32768\).*Received: a=1, b=2"):
        check.weight_elements("layer", "w", (2**16, 2**15), a=1, b=2)
