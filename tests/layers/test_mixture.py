import keras
import numpy as np
import pytest

from keras_moe.callbacks import RoutingMetrics
from keras_moe.layers import MixtureOfExperts
from keras_moe.testing import run_layer_test
from tests.conftest import input_gradients


def data(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def dense_experts(num, units=3):
    return [keras.layers.Dense(units, activation="tanh") for _ in range(num)]


def conv_expert(units=3):
    return keras.Sequential(
        [
            keras.layers.Conv2D(2, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(units),
        ]
    )


class CountingDense(keras.layers.Dense):
    """A Dense expert that records the batch size of every eager call."""

    def __init__(self, units, **kwargs):
        super().__init__(units, **kwargs)
        self.batch_sizes = []

    def call(self, inputs):
        if not isinstance(inputs, keras.KerasTensor):
            self.batch_sizes.append(int(inputs.shape[0]))
        return super().call(inputs)


# ------------------------------------------------------------ layer contract


# Each strategy dense and top-1; each kind of expert in both modes.
@pytest.mark.parametrize(
    "integration,k",
    [("weighted_sum", 1), ("max", None), ("attention", 1)],
)
def test_layer_contract_dense_experts(integration, k):
    run_layer_test(
        MixtureOfExperts,
        dict(
            experts=dense_experts(3),
            integration=integration,
            k=k,
            capacity_factor=2.0,
            eval_capacity_factor=1.5,
            load_balance_weight=0.05,
            attention_dim=4,
        ),
        data((8, 5)),
        expected_output_shape=(8, 3),
        # 3 experts (kernel, bias), the gate (kernel, bias); attention with
        # k=1 has no query and key (attention over one output is 1).
        expected_num_trainable_weights=8,
        expected_num_non_trainable_weights=4,  # routing statistics
    )


@pytest.mark.parametrize(
    "integration,k",
    [("weighted_sum", None), ("max", 1), ("attention", None)],
)
def test_layer_contract_conv_experts_custom_gate(integration, k):
    gate = keras.Sequential(
        [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2)], name="my_gate"
    )
    run_layer_test(
        MixtureOfExperts,
        dict(
            experts=[conv_expert(), conv_expert()],
            integration=integration,
            k=k,
            gate=gate,
            capacity_factor=None,
            eval_capacity_factor=0.75,
            load_balance_weight=0.0,
            attention_dim=8,
        ),
        data((4, 6, 6, 1)),
        expected_output_shape=(4, 3),
        # 2 experts (conv and dense kernels and biases), the gate's Dense,
        # attention query (kernel, bias) and key (kernel).
        expected_num_trainable_weights=8 + 2 + (3 if integration == "attention" else 0),
        expected_num_non_trainable_weights=4,
    )


def test_multidimensional_outputs_and_dynamic_batch():
    experts = [
        keras.Sequential([keras.layers.Conv2D(3, 1)]) for _ in range(3)
    ]  # (B, 4, 4, 2) -> (B, 4, 4, 3)
    moe = MixtureOfExperts(experts, integration="max", k=2)
    inputs = keras.Input((4, 4, 2))  # batch size unknown
    model = keras.Model(inputs, moe(inputs))
    assert tuple(model.output.shape) == (None, 4, 4, 3)
    y = model.predict(data((5, 4, 4, 2)), batch_size=5, verbose=0)
    assert y.shape == (5, 4, 4, 3) and np.all(np.isfinite(y))
    spec, routing = moe.compute_output_spec(
        keras.KerasTensor((None, 4, 4, 2)), return_routing=True
    )
    assert tuple(spec.shape) == (None, 4, 4, 3)
    assert tuple(routing["expert_index"].shape) == (None, 2)


# ------------------------------------------------------- numeric reference


def softmax(z, axis=-1):
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def numpy_weights(layer):
    return [keras.ops.convert_to_numpy(w) for w in layer.weights]


def reference(moe, x, capacity=None):
    """The layer's function, from every expert called on the whole batch and
    NumPy: gate, top-k selection, capacity cut, integration."""
    n = len(x)
    flat = x.reshape(n, -1)
    outputs = np.stack(
        [keras.ops.convert_to_numpy(e(x)).reshape(n, -1) for e in moe.experts], 1
    )  # (B, E, O)
    kernel, bias = numpy_weights(moe.gate)
    probs = softmax(flat @ kernel + bias)
    num_experts = len(moe.experts)
    if moe.k is None:
        index = np.tile(np.arange(num_experts), (n, 1))
        weights = probs
    else:
        index = np.argsort(-probs, axis=1, kind="stable")[:, : moe.k]
        weights = np.take_along_axis(probs, index, axis=1)
        if moe.k > 1:
            weights = weights / weights.sum(1, keepdims=True)
    keep = np.ones(index.shape, bool)
    if capacity is not None:  # first choices first, earlier examples first
        fill = np.zeros(num_experts, int)
        for j in range(index.shape[1]):
            for t in range(n):
                keep[t, j] = fill[index[t, j]] < capacity
                fill[index[t, j]] += 1
    selected = np.take_along_axis(outputs, index[..., None], axis=1)  # (B, S, O)
    w = np.where(keep, weights, 0.0)
    if moe.integration == "weighted_sum":
        y = np.einsum("ns,nso->no", w, selected)
    elif moe.integration == "max":
        values = np.where(keep[..., None], w[..., None] * selected, -np.inf)
        y = np.where(keep.any(1)[:, None], values.max(1), 0.0)
    elif moe.k == 1:  # attention over one output: alpha = 1
        assert moe.attention_query is None
        y = np.einsum("ns,nso->no", w, selected)
    else:
        q_kernel, q_bias = numpy_weights(moe.attention_query)
        (k_kernel,) = numpy_weights(moe.attention_key)
        q = flat @ q_kernel + q_bias
        keys = selected @ k_kernel
        scores = np.einsum("na,nsa->ns", q, keys) / np.sqrt(moe.attention_dim)
        # Dropped pairs: a large negative score (an example with every pair
        # dropped gets a uniform alpha, times a mass of 0).
        scores = np.where(keep, scores + np.log(np.maximum(weights, 1e-9)), -1e9)
        alpha = softmax(scores)
        y = np.einsum("ns,nso->no", alpha * w.sum(1, keepdims=True), selected)
    return y.reshape((n,) + tuple(moe.compute_output_shape(x.shape)[1:])), index, keep


def random_gate(moe, scale=1.0, seed=5):
    """Gate weights large enough to route examples differently."""
    kernel, bias = moe.gate.weights
    rng = np.random.default_rng(seed)
    kernel.assign(scale * rng.normal(size=kernel.shape).astype("float32"))
    bias.assign(0.1 * rng.normal(size=bias.shape).astype("float32"))


@pytest.mark.parametrize("integration", ["weighted_sum", "max", "attention"])
@pytest.mark.parametrize("k", [None, 1, 2, 4])
def test_matches_numpy_reference(integration, k):
    x = data((12, 6), seed=1)
    moe = MixtureOfExperts(dense_experts(4, units=5), integration=integration, k=k)
    moe.build(x.shape)
    random_gate(moe)
    y, routing = moe(x, return_routing=True)
    expected, index, _ = reference(moe, x)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(y), expected, atol=1e-5)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(routing["expert_index"]), index
    )
    stats = moe.routing_stats()
    assert stats["dropped_fraction"] == 0.0  # dropless inference by default
    np.testing.assert_allclose(stats["expert_load"].sum(), 1.0, atol=1e-6)


@pytest.mark.parametrize("integration", ["weighted_sum", "max", "attention"])
def test_sparse_equals_dense_mixture_restricted_to_top_k(integration):
    """With dropless capacity, top-k sparse compute gives the dense mixture's
    function restricted to the top-k (renormalised) gate weights."""
    x = data((16, 4, 4, 1), seed=2)
    experts = [conv_expert(units=4) for _ in range(4)]
    dense = MixtureOfExperts(experts, integration=integration)
    sparse = MixtureOfExperts(experts, integration=integration, k=2)  # shared experts
    dense.build(x.shape)
    sparse.build(x.shape)
    for a, b in zip(dense.gate.weights, sparse.gate.weights):
        b.assign(keras.ops.convert_to_numpy(a))
    if integration == "attention":
        for layer in ("attention_query", "attention_key"):
            for a, b in zip(getattr(dense, layer).weights, getattr(sparse, layer).weights):
                b.assign(keras.ops.convert_to_numpy(a))
    _, dense_routing = dense(x, return_routing=True)
    probs = keras.ops.convert_to_numpy(dense_routing["probs"])
    # Zero the gate probabilities outside the top 2 and renormalise: the
    # dense formula with those weights is the sparse layer's function.
    top = np.argsort(-probs, axis=1)[:, :2]
    mask = np.zeros_like(probs, bool)
    np.put_along_axis(mask, top, True, axis=1)
    restricted = np.where(mask, probs, 0.0)
    restricted /= restricted.sum(1, keepdims=True)
    outputs = np.stack(
        [keras.ops.convert_to_numpy(e(x)) for e in experts], 1
    )  # (B, E, O)
    if integration == "weighted_sum":
        expected = np.einsum("ne,neo->no", restricted, outputs)
    elif integration == "max":
        expected = np.where(mask[..., None], restricted[..., None] * outputs, -np.inf).max(1)
    else:
        # Dense attention over all experts, with the restricted gate as the
        # prior: experts outside the top 2 get log(0) = -inf.
        q_kernel, q_bias = numpy_weights(dense.attention_query)
        (k_kernel,) = numpy_weights(dense.attention_key)
        q = x.reshape(len(x), -1) @ q_kernel + q_bias
        scores = np.einsum("na,nea->ne", q, outputs @ k_kernel) / np.sqrt(32)
        with np.errstate(divide="ignore"):
            alpha = softmax(scores + np.log(restricted))
        expected = np.einsum("ne,neo->no", alpha, outputs)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(sparse(x)), expected, atol=1e-5
    )


def test_top1_strategies_are_one_function():
    """With k=1 there is one output per example: every strategy gives
    p_e * y_e (Switch scaling)."""
    x = data((10, 5), seed=9)
    experts = dense_experts(3)
    layers = [MixtureOfExperts(experts, integration=i, k=1) for i in ("weighted_sum", "max", "attention")]
    for layer in layers:
        layer.build(x.shape)
        random_gate(layer)  # the same seed: the same gate
    ys = [keras.ops.convert_to_numpy(layer(x)) for layer in layers]
    np.testing.assert_allclose(ys[1], ys[0], atol=1e-6)
    np.testing.assert_allclose(ys[2], ys[0], atol=1e-6)
    assert layers[2].attention_query is None  # no unused weights


@pytest.mark.parametrize("integration", ["weighted_sum", "max", "attention"])
def test_capacity_drops_match_reference(integration):
    x = data((16, 6), seed=3)
    moe = MixtureOfExperts(
        dense_experts(4), integration=integration, k=2, eval_capacity_factor=0.5
    )
    moe.build(x.shape)
    random_gate(moe, scale=2.0)
    y, routing = moe(x, return_routing=True)
    capacity = int(keras.ops.convert_to_numpy(routing["capacity"]))
    assert capacity == 4  # ceil(2 * 16 / 4 * 0.5)
    expected, _, keep = reference(moe, x, capacity=capacity)
    assert not keep.all()  # the case really drops pairs
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(routing["keep"]), keep)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(y), expected, atol=1e-5)
    np.testing.assert_allclose(
        moe.routing_stats()["dropped_fraction"], 1 - keep.mean(), atol=1e-6
    )


def test_each_expert_runs_on_its_capacity_only():
    experts = [CountingDense(3) for _ in range(4)]
    x = data((32, 5), seed=4)
    sparse = MixtureOfExperts(experts, k=1, capacity_factor=1.0)
    sparse.build(x.shape)
    for e in experts:
        e.batch_sizes.clear()
    sparse(x, training=True)  # C = ceil(1 * 32 / 4 * 1.0) = 8
    assert [e.batch_sizes for e in experts] == [[8]] * 4
    sparse(x)  # inference: dropless, C = 32
    assert [e.batch_sizes[-1] for e in experts] == [32] * 4
    dense = MixtureOfExperts(experts)
    dense(x)
    assert [e.batch_sizes[-1] for e in experts] == [32] * 4


# ------------------------------------------------------------------ training


@pytest.mark.parametrize("integration", ["weighted_sum", "max", "attention"])
@pytest.mark.parametrize("k", [None, 1, 2])
def test_task_loss_trains_the_gate_and_every_expert(integration, k):
    x = data((32, 6), seed=6)
    target = data((32, 3), seed=7)
    inputs = keras.Input((6,))
    moe = MixtureOfExperts(
        dense_experts(3), integration=integration, k=k, load_balance_weight=0.0
    )
    model = keras.Model(inputs, moe(inputs))
    gate_before = keras.ops.convert_to_numpy(moe.gate.kernel)
    experts_before = [keras.ops.convert_to_numpy(e.kernel) for e in moe.experts]
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    model.train_on_batch(x, target)
    gate_after = keras.ops.convert_to_numpy(moe.gate.kernel)
    assert np.abs(gate_after - gate_before).max() > 0
    used = moe.routing_stats()["expert_load"] > 0
    for e, before in enumerate(experts_before):
        moved = np.abs(keras.ops.convert_to_numpy(moe.experts[e].kernel) - before).max()
        assert (moved > 0) == (bool(used[e]) or k is None), e


def test_balance_loss_in_training_only_and_routing_metrics():
    x = data((32, 6), seed=8)
    inputs = keras.Input((6,))
    moe = MixtureOfExperts(dense_experts(4), k=1, load_balance_weight=0.5, name="mix")
    model = keras.Model(inputs, moe(inputs))
    _, routing = moe(x, training=True, return_routing=True)
    assert len(moe.losses) == 1
    # Switch: E * sum_e f_e P_e, f the share of examples routed to e.
    probs = keras.ops.convert_to_numpy(routing["probs"])
    index = keras.ops.convert_to_numpy(routing["expert_index"])[:, 0]
    share = np.bincount(index, minlength=4) / len(index)
    balance = moe.routing_stats()["load_balance_loss"]
    np.testing.assert_allclose(balance, 4 * np.sum(share * probs.mean(0)), rtol=1e-5)
    np.testing.assert_allclose(moe.routing_stats()["expert_load"], share, atol=1e-6)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(moe.losses[0]), 0.5 * balance, rtol=1e-5
    )
    moe(x, training=False)
    assert not moe.losses
    model.compile(optimizer="adam", loss="mse")
    history = model.fit(
        x, data((32, 3)), batch_size=16, epochs=1, verbose=0,
        callbacks=[RoutingMetrics(per_expert=True)],
    )
    loads = [history.history[f"mix_load_{e}"][0] for e in range(4)]
    np.testing.assert_allclose(sum(loads), 1.0, atol=1e-5)
    assert "mix_dropped" in history.history


def test_mixed_precision_outputs_and_statistics():
    keras.config.set_dtype_policy("mixed_bfloat16")  # reset by conftest
    x = data((16, 5), seed=10)
    moe = MixtureOfExperts(
        dense_experts(3), integration="attention", k=2, capacity_factor=1.0
    )
    y = moe(x, training=True)
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    assert keras.backend.standardize_dtype(moe.gate.kernel.dtype) == "float32"
    assert np.all(np.isfinite(keras.ops.convert_to_numpy(keras.ops.cast(y, "float32"))))
    # The statistics are written (float32, not autocast) on every backend.
    stats = moe.routing_stats()
    np.testing.assert_allclose(stats["expert_load"].sum(), 1.0, atol=1e-6)
    assert stats["load_balance_loss"] > 0


# ------------------------------------------------------------------- errors


def test_errors():
    with pytest.raises(ValueError, match="at least 2"):
        MixtureOfExperts([keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="list of Keras layers"):
        MixtureOfExperts(keras.layers.Dense(3))
    with pytest.raises(ValueError, match="list of Keras layers"):
        MixtureOfExperts([keras.layers.Dense(3), "dense"])
    with pytest.raises(ValueError, match=r"integration must be one of .*'attention'.*Received: integration='mean'"):
        MixtureOfExperts(dense_experts(2), integration="mean")
    with pytest.raises(ValueError, match="Received: k=3, num_experts=2"):
        MixtureOfExperts(dense_experts(2), k=3)
    with pytest.raises(ValueError, match="k=0"):
        MixtureOfExperts(dense_experts(2), k=0)
    with pytest.raises(ValueError, match="capacity_factor=0"):
        MixtureOfExperts(dense_experts(2), capacity_factor=0)
    with pytest.raises(ValueError, match="load_balance_weight=-1"):
        MixtureOfExperts(dense_experts(2), load_balance_weight=-1)
    with pytest.raises(ValueError, match="attention_dim=0"):
        MixtureOfExperts(dense_experts(2), integration="attention", attention_dim=0)
    with pytest.raises(ValueError, match="gate must be None or a Keras layer"):
        MixtureOfExperts(dense_experts(2), gate="dense")


def test_build_errors():
    mismatched = MixtureOfExperts([keras.layers.Dense(3), keras.layers.Dense(4)])
    with pytest.raises(ValueError, match=r"\(None, 3\).*\(None, 4\)"):
        mismatched.build((2, 5))
    wrong_gate = MixtureOfExperts(dense_experts(3), gate=keras.layers.Dense(2))
    with pytest.raises(ValueError, match="Received: gate output shape"):
        wrong_gate.build((2, 5))
    unknown = MixtureOfExperts(dense_experts(2))
    with pytest.raises(ValueError, match="non-batch dimension known"):
        unknown.build((2, None))
    moe = MixtureOfExperts(dense_experts(2))
    moe(data((2, 5)))
    with pytest.raises(ValueError, match="as when the layer was built"):
        moe(data((2, 6)))


# ------------------------------------------------- issue 22: robustness


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("integration", ["weighted_sum", "max", "attention"])
def test_a_nan_example_reaches_no_other_example(integration, training):
    """Issue 22: with a zero gate every example picks experts 0 and 1; with
    C = 2 examples 0, 1 are kept and 2, 3 dropped, expert 2's rows empty.
    Empty rows were filled from the NaN example and multiplied by 0, and a
    dropped pair's output was read from a clamped row times 0."""
    moe = MixtureOfExperts(
        dense_experts(3), integration=integration, k=2,
        gate=keras.layers.Dense(3, kernel_initializer="zeros"),
        capacity_factor=0.75, eval_capacity_factor=0.75, load_balance_weight=0.0,
    )
    x, clean = np.ones((4, 5), "float32"), np.ones((4, 5), "float32")
    x[3] = np.nan
    y = keras.ops.convert_to_numpy(moe(x, training=training))
    expected = keras.ops.convert_to_numpy(moe(clean, training=training))
    np.testing.assert_array_equal(y[:3], expected[:3])
    assert np.all(np.isfinite(y[:3])) and np.all(y[2] == 0)  # 2 is dropped
    grads = input_gradients(moe, x, rows=[0, 1, 2], training=training)
    clean_grads = input_gradients(moe, clean, rows=[0, 1, 2], training=training)
    np.testing.assert_allclose(grads[:3], clean_grads[:3], rtol=1e-6, atol=1e-7)
    assert np.abs(grads[:2]).max() > 0


def test_sparse_mixture_empty_batch_gives_an_empty_output():
    moe = MixtureOfExperts(dense_experts(3), integration="attention", k=2,
                           eval_capacity_factor=1.0)
    assert tuple(moe(np.zeros((0, 5), "float32")).shape) == (0, 3)
    assert tuple(moe(data((4, 5))).shape) == (4, 3)


def test_output_spec_has_the_experts_dtype():
    """Issue 22: the symbolic output had the layer's compute dtype, the real
    one the experts' dtype (here float32 experts in a bfloat16 layer)."""
    experts = [keras.layers.Dense(3, dtype="float32") for _ in range(2)]
    moe = MixtureOfExperts(experts, k=1, dtype="mixed_bfloat16")
    symbolic = moe(keras.Input((5,)))
    eager = moe(data((4, 5)))
    dtypes = {keras.backend.standardize_dtype(y.dtype) for y in (symbolic, eager)}
    assert dtypes == {"float32"}
