"""Dropless block dispatch: plan invariants against NumPy, exactness against
the dense dispatch (outputs and gradients), isolation, batch independence."""

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keras_moe import ops as moe_ops
from keras_moe.layers import MixtureOfExperts, MultiGateMoE, SparseMoE
from tests.conftest import copy_weights, xla_only


def to_numpy(plan):
    return {
        key: keras.ops.convert_to_numpy(value) if hasattr(value, "shape") else value
        for key, value in plan.items()
    }


@st.composite
def block_routings(draw):
    num_experts = draw(st.integers(1, 9))
    k = draw(st.integers(1, num_experts))
    rows = draw(st.integers(1, 50))
    block_size = draw(st.sampled_from([1, 2, 3, 8, 16]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    # Skewed logits: some experts get most pairs, some none.
    logits = rng.normal(size=(rows, num_experts)) + rng.normal(
        scale=3.0, size=num_experts
    )
    expert_index = np.argsort(-logits, axis=1)[:, :k].astype("int32")
    valid = rng.random((rows, k)) < 0.8 if draw(st.booleans()) else None
    return expert_index, num_experts, block_size, valid


@settings(max_examples=15, deadline=None)
@given(block_routings())
def test_block_plan_invariants(case):
    """Every valid pair has its own row, in a block of its expert, within the
    static budget; an expert's rows are consecutive and in pair order; the
    inverse map agrees; invalid pairs take no row."""
    expert_index, num_experts, block_size, valid = case
    rows, k = expert_index.shape
    plan = to_numpy(
        moe_ops.make_block_plan(expert_index, num_experts, block_size, valid=valid)
    )
    num_pairs = rows * k
    num_rows = plan["num_rows"]
    assert num_rows == moe_ops.row_budget(num_pairs, num_experts, block_size)
    assert num_rows % block_size == 0
    assert num_rows <= num_pairs + num_experts * (block_size - 1) + block_size - 1
    valid = np.ones((rows, k), bool) if valid is None else valid
    flat_expert = expert_index.reshape(-1)
    flat_valid = valid.reshape(-1)
    pair_row = plan["pair_row"].reshape(-1)
    np.testing.assert_array_equal(pair_row[~flat_valid], num_rows)
    placed = pair_row[flat_valid]
    assert len(set(placed.tolist())) == len(placed)  # one row per pair
    assert (placed < num_rows).all()
    np.testing.assert_array_equal(
        plan["block_expert"][placed // block_size], flat_expert[flat_valid]
    )
    for e in range(num_experts):
        own = pair_row[flat_valid & (flat_expert == e)]
        assert (np.diff(own) == 1).all()  # consecutive, in pair order
        if len(own):
            assert own[0] % block_size == 0  # a group starts a block
    np.testing.assert_array_equal(
        plan["counts"], np.bincount(flat_expert[flat_valid], minlength=num_experts)
    )
    row_pair = plan["row_pair"]
    held = row_pair < num_pairs
    assert held.sum() == flat_valid.sum()
    np.testing.assert_array_equal(pair_row[row_pair[held]], np.nonzero(held)[0])
    position = plan["position"].reshape(-1)[flat_valid]
    for e in range(num_experts):
        mine = flat_expert[flat_valid] == e
        np.testing.assert_array_equal(position[mine], np.arange(mine.sum()))


def test_default_block_size_follows_the_cost_model():
    """`B` near `sqrt(32 P / E)`, a power of two in [16, 256]."""
    for pairs, experts, block in [
        (10, 4, 16), (8192, 8, 128), (8192, 64, 64), (32768, 8, 256),
        (32768, 64, 128), (10**6, 8, 256),
    ]:
        assert moe_ops.default_block_size(pairs, experts) == block
    assert moe_ops.default_block_size(None, 8) == 64


def input_gradient_model(layer, n, d):
    """A trainable per-feature scale in front of the layer, so that one SGD
    step also reads off the gradient reaching the layer's input."""
    inputs = keras.Input((d,), batch_size=n)
    scaled = keras.layers.Dense(d, kernel_initializer="identity", name="front")(inputs)
    model = keras.Model(inputs, layer(scaled))
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    return model


def step_gradients(model, x, target):
    before = [keras.ops.convert_to_numpy(w) for w in model.trainable_weights]
    outputs = keras.ops.convert_to_numpy(model(x))
    model.train_on_batch(x, target)
    after = [keras.ops.convert_to_numpy(w) for w in model.trainable_weights]
    return outputs, [b - a for b, a in zip(before, after)]


@st.composite
def layer_cases(draw):
    num_experts = draw(st.sampled_from([1, 2, 5, 12, 64]))
    k = draw(st.integers(1, min(num_experts, 4)))
    n = draw(st.sampled_from([1, 2, 7, 33, 130, 1500]))
    block_size = draw(st.sampled_from([None, 1, 4, 16]))
    one_expert = draw(st.booleans())  # zero router kernel: all to the same k
    return num_experts, k, n, block_size, one_expert, draw(st.integers(0, 1000))


@settings(max_examples=6, deadline=None)
@given(layer_cases())
def test_dropless_equals_dense_dispatch(case):
    """Outputs and the gradients of every weight and of the input equal the
    dense reference (every expert on every token), for 1 to 1,500 tokens,
    1 to 64 experts, k up to 4, all tokens on the same experts or not. (Six
    examples a run: each new shape compiles anew.)"""
    num_experts, k, n, block_size, one_expert, seed = case
    d = 6
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    target = rng.normal(size=(n, d)).astype("float32")
    common = dict(
        num_experts=num_experts, hidden_dim=5, k=k, capacity_factor=None,
        gated=True, activation="silu",
        router_kernel_initializer="zeros" if one_expert else None,
    )
    sparse_layer = SparseMoE(block_size=block_size, **common)
    dense_layer = SparseMoE(dispatch="dense", **common)
    sparse = input_gradient_model(sparse_layer, n, d)
    dense = input_gradient_model(dense_layer, n, d)
    copy_weights(sparse, dense)
    y_sparse, g_sparse = step_gradients(sparse, x, target)
    y_dense, g_dense = step_gradients(dense, x, target)
    np.testing.assert_allclose(y_sparse, y_dense, atol=1e-5, rtol=0)
    for gs, gd in zip(g_sparse, g_dense):
        np.testing.assert_allclose(gs, gd, atol=1e-5, rtol=1e-5)


class _BlockRoundTrip(keras.layers.Layer):
    """x W -> block dispatch -> Experts.call_blocks -> block combine with
    trainable weights, with the custom gradient rules or plain autodiff."""

    def __init__(self, expert_index, num_experts, block_size, rows_per_token, custom):
        super().__init__()
        self.expert_index = expert_index
        self.num_experts, self.block_size = num_experts, block_size
        self.rows_per_token, self.custom = rows_per_token, custom
        self.experts = moe_ops_layer_experts(num_experts)

    def build(self, input_shape):
        n, d = input_shape
        k = self.expert_index.shape[1]
        self.w = self.add_weight(shape=(d, d), initializer="glorot_uniform")
        self.experts.build((self.num_experts, None, d))
        self.weights_ = self.add_weight(
            shape=(n * self.rows_per_token, k), initializer="random_uniform"
        )

    def call(self, x):
        n = keras.ops.shape(x)[0]
        plan = moe_ops.make_block_plan(
            self.expert_index, self.num_experts, self.block_size,
            rows_per_token=self.rows_per_token,
        )
        rows = moe_ops.block_dispatch(keras.ops.matmul(x, self.w), plan, self.custom)
        outputs = self.experts.call_blocks(rows, plan["block_expert"], plan["block_size"])
        y = moe_ops.block_combine(outputs, plan, self.weights_, self.custom)
        return keras.ops.reshape(y, (n, -1))


def moe_ops_layer_experts(num_experts):
    from keras_moe.layers import Experts

    return Experts(num_experts, 3, activation="tanh")


@pytest.mark.parametrize("rows_per_token,block_size", [(1, 4), (3, 2)])
def test_block_gradients_equal_autodiff(rows_per_token, block_size):
    """The gather-only gradient rules of the block dispatch and combine
    equal autodiff of the plain gathers."""
    n, d, e, k = 10, 4, 5, 2
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(n * rows_per_token, e)) + rng.normal(scale=2.0, size=e)
    expert_index = np.argsort(-logits, axis=1)[:, :k].astype("int32")
    x = rng.normal(size=(n, d)).astype("float32")
    target = rng.normal(size=(n, rows_per_token * d)).astype("float32")
    results = []
    for custom in (True, False):
        keras.utils.set_random_seed(3)
        layer = _BlockRoundTrip(expert_index, e, block_size, rows_per_token, custom)
        inputs = keras.Input((d,), batch_size=n)
        model = keras.Model(inputs, layer(inputs))
        model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
        results.append(step_gradients(model, x, target))
    (y_custom, g_custom), (y_plain, g_plain) = results
    np.testing.assert_allclose(y_custom, y_plain, rtol=0, atol=1e-6)
    assert len(g_custom) == 6
    for gc, gp in zip(g_custom, g_plain):
        assert np.abs(gp).max() > 0
        np.testing.assert_allclose(gc, gp, rtol=1e-5, atol=1e-6)


def test_nan_token_stays_in_its_rows():
    """A NaN token makes only its own output NaN, in the forward pass and in
    the gradient of the other tokens."""
    layer = SparseMoE(3, 8, k=2, capacity_factor=None)
    x = np.random.default_rng(0).normal(size=(12, 4)).astype("float32")
    x[5] = np.nan
    y = keras.ops.convert_to_numpy(layer(x))
    assert np.isnan(y[5]).all()
    assert np.isfinite(np.delete(y, 5, axis=0)).all()
    y = keras.ops.convert_to_numpy(layer(x, training=True))
    assert np.isfinite(np.delete(y, 5, axis=0)).all()


LAYERS = {
    "SparseMoE": lambda: SparseMoE(8, 16, k=2),
    "MultiGateMoE": lambda: MultiGateMoE(2, 8, 16, k=2),
    "MixtureOfExperts": lambda: MixtureOfExperts(
        [keras.layers.Dense(4) for _ in range(4)], k=2
    ),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_default_inference_does_not_depend_on_the_batch(name):
    """With the defaults, a sample predicted alone gives what it gives in a
    batch of 32 (no capacity: no token competes with another)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(32, 4, 8)).astype("float32")
    inputs = keras.Input((4, 8))
    model = keras.Model(inputs, LAYERS[name]()(inputs))
    batch = keras.tree.map_structure(keras.ops.convert_to_numpy, model(x))
    for i in (0, 13, 31):
        alone = keras.tree.map_structure(keras.ops.convert_to_numpy, model(x[i : i + 1]))
        keras.tree.map_structure(
            lambda a, b: np.testing.assert_allclose(a[0], b[i], atol=1e-5, rtol=1e-5),
            alone,
            batch,
        )


@xla_only
def test_dropless_training_compiles_with_xla():
    """The dropless path compiles under XLA (`jit_compile=True`) and its
    compiled predictions equal the eager ones."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(64, 8)).astype("float32")
    y = rng.normal(size=(64, 8)).astype("float32")
    inputs = keras.Input((8,))
    model = keras.Model(inputs, SparseMoE(4, 16, k=2, capacity_factor=None)(inputs))
    model.compile(optimizer="adam", loss="mse", jit_compile=True)
    losses = model.fit(x, y, batch_size=16, epochs=3, verbose=0).history["loss"]
    assert losses[-1] < losses[0]
    np.testing.assert_allclose(
        model.predict(x, batch_size=16, verbose=0),
        keras.ops.convert_to_numpy(model(x)),
        atol=1e-5,
    )


@pytest.mark.parametrize("name", ["SparseMoE", "MultiGateMoE"])
def test_dropless_empty_batch(name):
    """A batch of 0 gives an empty output (no rows, no blocks), in inference
    and in training."""
    layer = LAYERS[name]()
    x = np.zeros((0, 5, 8), "float32")
    for training in (False, True):
        for y in keras.tree.flatten(layer(x, training=training)):
            assert tuple(y.shape) == (0, 5, 8)
        # Statistics of no token are zeros, not NaN (means over nothing).
        for stat, value in layer.routing_stats().items():
            if stat != "task_names":
                np.testing.assert_array_equal(value, 0.0, err_msg=stat)
        for loss in layer.losses:
            assert float(keras.ops.convert_to_numpy(loss)) == 0.0
