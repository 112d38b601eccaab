"""Keras's own layer test (`keras.src.testing.TestCase.run_layer_test`) on
every public layer, next to our helper (`keras_moe.testing.run_layer_test`).

Keras's harness checks the config round trip, build, symbolic and eager
calls, the number of weights, masking support, a training step (compile and
`fit` on the layer's output) and a mixed-precision call (`mixed_float16`:
outputs in float16, variables in float32), on every row of the case tables
(tests/conftest.py). Where it cannot drive a layer, the row turns a check
off, and every check turned off has its reason below.
"""

import pytest
from keras.src.testing import TestCase

from tests.conftest import KERAS_HARNESS, X, layer_cases, router_cases

# Keras's training check fits a model on the layer's output. With a list or
# dict output (tasks, routings) it builds a `tf.data` pipeline whose
# output_signature cannot hold a list on TensorFlow, and a routing dict holds
# scalar losses that `fit` cannot batch: those layers are trained by our
# helper instead (tests/layers/test_*.py), not here.
NO_FIT = "list or dict output: Keras's training check cannot feed it to fit"
# A router's losses and statistics are float32 under any policy (a softmax
# over float16 logits routes badly; docs/guarantees.md), so the output dtype
# check of the mixed-precision run does not apply to the whole dict.
FLOAT32_ROUTING = "routing losses stay float32 under mixed precision by design"
REASONS = {
    "run_training_check": NO_FIT,
    "run_mixed_precision_check": FLOAT32_ROUTING,
}


def _run(layer_cls, init_kwargs, input_shape, options):
    for option in options:  # every turned-off check has its reason above
        assert option in REASONS or option == "supports_masking"
    case = TestCase(methodName="run_layer_test")
    case.run_layer_test(layer_cls, init_kwargs, input_shape=input_shape, **options)


@pytest.mark.parametrize("case", layer_cases(KERAS_HARNESS))
def test_keras_run_layer_test(case):
    """Every row of LAYER_FAMILIES (tests/conftest.py)."""
    _run(case.cls, case.init_kwargs(), case.input_shape, case.harness)


@pytest.mark.parametrize("case", router_cases(KERAS_HARNESS))
def test_keras_run_layer_test_router(case):
    """Every row of ROUTER_CASES: a routing dict has no training check."""
    options = dict(case.harness, run_training_check=False)
    _run(case.cls, case.init_kwargs(4), X, options)
