"""A `.keras` file saved before the routed pipeline (issue 31: the expert
options and the default router's options became keyword arguments read
through one table each) loads and predicts the same. Saved on torch with
the code of commit c190b34: two SparseMoE (every expert and router option
set, shared experts; a custom router), SoftMoE, MultiGateMoE, PLE, CGC and
MixtureOfExperts with non-default options, trained one epoch."""

import pathlib

import keras
import numpy as np

from keras_moe.layers import SparseMoE

DATA = pathlib.Path(__file__).parent / "data"


def test_a_file_saved_before_the_pipeline_loads_and_predicts_the_same():
    model = keras.saving.load_model(DATA / "layers_before_pipeline.keras")
    saved = np.load(DATA / "layers_before_pipeline.npz")
    got = model.predict(saved["x"], batch_size=8, verbose=0)
    np.testing.assert_allclose(got, saved["expected"], atol=1e-5)
    moe = model.get_layer("sparse_options")
    assert isinstance(moe, SparseMoE) and moe.k == 2
    config = moe.get_config()
    for name, value in dict(
        activation="silu", gated=True, use_bias=False, glu_limit=7.0,
        glu_linear_offset=1.0, output_scale=True, noisy_gating=True,
        load_balance_weight=0.02, z_loss_weight=1e-3, seed=5,
    ).items():
        assert config[name] == value, name
    assert model.get_layer("mmoe").get_config()["gated"] is True
    assert model.get_layer("ple").get_config()["activation"] == "silu"
