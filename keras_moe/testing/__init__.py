"""Test helpers for keras_moe layers (and for users' own MoE layers)."""

from keras_moe.testing.layer_test import (
    assert_all_finite,
    check_config_round_trip,
    run_layer_test,
)

__all__ = ["assert_all_finite", "check_config_round_trip", "run_layer_test"]
