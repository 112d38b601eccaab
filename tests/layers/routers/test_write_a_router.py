"""The example of docs/write_a_router.md, run as written: the router block,
then the usage block (build, one fit step inside SparseMoE, .keras save and
load), then the checks the page promises."""

import pathlib
import re

import keras
import numpy as np
import pytest

from keras_moe.compression import prune_experts
from keras_moe.layers import Router, RoutingResult, SparseMoE
from keras_moe.testing import run_layer_test

PAGE = pathlib.Path(__file__).parents[3] / "docs" / "write_a_router.md"


def code_blocks():
    return re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), re.S)


@pytest.fixture(scope="module")
def router_namespace():
    """The page's router block, executed once per process (it registers
    `my_routers>CosineRouter`)."""
    namespace = {}
    exec(compile(code_blocks()[0], str(PAGE), "exec"), namespace)
    return namespace


def test_the_page_has_the_router_and_its_use():
    blocks = code_blocks()
    assert len(blocks) == 2
    assert "class CosineRouter(Router)" in blocks[0]
    router_lines = blocks[0].split("class CosineRouter")[1].strip().splitlines()
    assert len(router_lines) <= 35, len(router_lines)  # "about 30 lines"


def test_usage_block_fits_saves_and_loads(router_namespace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = dict(router_namespace)
    exec(compile(code_blocks()[1], str(PAGE), "exec"), namespace)
    model, restored, x = namespace["model"], namespace["restored"], namespace["x"]
    np.testing.assert_allclose(
        restored.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )
    moe = next(layer for layer in model.layers if isinstance(layer, SparseMoE))
    router = restored.get_layer(moe.name).router
    assert type(router) is router_namespace["CosineRouter"]
    assert router.get_config() == moe.router.get_config()

    # Any Router prunes: the kernel's expert columns are kept.
    small = prune_experts(model, {moe.name: [0, 2]})
    pruned = small.get_layer(moe.name).router
    assert pruned.num_experts == 2 and pruned.k == 2
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(pruned.kernel),
        keras.ops.convert_to_numpy(moe.router.kernel)[:, [0, 2]],
    )
    assert np.isfinite(small.predict(x, verbose=0)).all()


def test_the_example_router_passes_the_layer_contract(router_namespace):
    cosine = router_namespace["CosineRouter"]
    x = np.random.default_rng(0).normal(size=(6, 8)).astype("float32")
    run_layer_test(
        cosine,
        dict(num_experts=5, k=3, temperature=0.5, load_balance_weight=0.1),
        x,
        expected_output_shape=(6, 3),
        expected_num_trainable_weights=1,
        output_selector=lambda routing: routing["combine_weights"],
    )
    router = cosine(4, k=2, load_balance_weight=0.5)
    routing = router(x, training=True)
    assert isinstance(routing, RoutingResult) and isinstance(router, Router)
    assert sorted(routing) == [
        "combine_weights", "expert_index", "load_balance_loss", "logits", "probs",
        "z_loss",
    ]
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(router.losses[0]),
        0.5 * keras.ops.convert_to_numpy(routing.load_balance_loss),
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match="temperature must be > 0"):
        cosine(4, temperature=0.0)


def test_the_example_router_drives_sparse_moe_with_a_mask(router_namespace):
    cosine = router_namespace["CosineRouter"]
    moe = SparseMoE(4, 8, router=cosine(4, k=2))
    x = np.random.default_rng(1).normal(size=(2, 5, 6)).astype("float32")
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    y = keras.ops.convert_to_numpy(moe(x, mask=mask))
    np.testing.assert_array_equal(y[0, 3:], 0.0)
