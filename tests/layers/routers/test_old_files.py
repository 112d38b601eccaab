"""A `.keras` file saved before the routers became a package (one SparseMoE
per router family, trained two steps; saved on torch with the code of
commit e5c3a1f, where the routers were keras_moe/layers/routers.py,
expert_choice.py, ...) loads by the registered names and predicts the
same."""

import pathlib

import keras
import numpy as np

from keras_moe.layers import Router, SparseMoE

DATA = pathlib.Path(__file__).parent / "data"


def test_a_file_saved_before_the_package_loads_and_predicts_the_same():
    model = keras.saving.load_model(DATA / "routers_before_package.keras")
    saved = np.load(DATA / "routers_before_package.npz")
    moes = [layer for layer in model.layers if isinstance(layer, SparseMoE)]
    assert len(moes) == 6
    assert all(isinstance(moe.router, Router) for moe in moes)
    got = model.predict([saved["x"], saved["ids"]], batch_size=8, verbose=0)
    np.testing.assert_allclose(got, saved["expected"], atol=1e-5)
