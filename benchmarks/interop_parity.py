#!/usr/bin/env python
"""Measures how far keras_moe's ports of keras-hub's MoE blocks are from the
blocks: the numbers in docs/porting.md.

    KERAS_BACKEND=jax PYTHONPATH=. python benchmarks/interop_parity.py

For each block of tests/test_interop.py (same tiny dims, weights and inputs:
the setup is imported from there), prints one Markdown table row with the
largest absolute difference of the outputs in inference and in training, of
the gradient of `sum(outputs)` (plus the aux loss) with respect to the
inputs, and of the weighted load-balancing loss, for the current backend.
Also the largest difference of a 2-layer Mixtral backbone's outputs before
(an eager call) and after `replace_moe_blocks` (an eager call, `predict`).
"""

import keras
import numpy as np
from keras import ops

from keras_moe import interop
from tests import test_interop as setup
from tests.conftest import input_gradients


def largest(a, b):
    a, b = (np.asarray(ops.convert_to_numpy(v), "float64") for v in (a, b))
    return float(np.max(np.abs(a - b)))


def main():
    print(f"backend: {keras.backend.backend()}\n")
    print("| block | outputs (inference) | outputs (training) | input gradients | aux loss |")
    print("|---|---|---|---|---|")
    for name in setup.BLOCKS:
        keras.utils.set_random_seed(1234)
        hub, ported, _ = setup.make_pair(name)
        moe = getattr(ported, "moe", ported)
        x = setup.inputs(name)
        inference = largest(hub(x), ported(x))
        training = largest(hub(x, training=True), ported(x, training=True))
        if setup.BLOCKS[name][1] is None:
            aux = "none in keras-hub"
        else:
            aux = f"{largest(sum(hub.losses), sum(moe.losses)):.1e}"
        rows = list(range(setup.BATCH))
        x = setup.inputs(name, seed=3)
        grads = largest(input_gradients(hub, x, rows), input_gradients(ported, x, rows))
        print(f"| {name} | {inference:.1e} | {training:.1e} | {grads:.1e} | {aux} |")

    keras.utils.set_random_seed(1234)
    backbone = setup.mixtral_backbone()
    rng = np.random.default_rng(0)
    for variable in backbone.weights:
        if len(variable.shape) >= 2:
            value = rng.normal(size=variable.shape) * variable.shape[-2] ** -0.5
            variable.assign(value.astype("float32"))
    data = {
        "token_ids": rng.integers(0, 40, size=(2, 6)).astype("int32"),
        "padding_mask": np.array([[1] * 6, [1] * 4 + [0] * 2], "int32"),
    }
    before = backbone(data)
    interop.replace_moe_blocks(backbone)
    eager = largest(before, backbone(data))
    predicted = largest(before, backbone.predict(data, verbose=0))
    print(
        f"\nMixtral backbone, replace_moe_blocks: {eager:.1e} (eager call), "
        f"{predicted:.1e} (predict)"
    )


if __name__ == "__main__":
    main()
