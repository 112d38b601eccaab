"""keras_moe.upcycling.upcycle: an MoE whose experts start as copies of a
trained FFN computes what the FFN computes (Komatsuzaki et al. 2022)."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_moe.layers import SparseMoE, TopKRouter
from keras_moe.upcycling import upcycle

D, H = 6, 10


def ffn(out=D, use_bias=(True, True), activation="gelu"):
    first = keras.layers.Dense(H, activation=activation, use_bias=use_bias[0])
    second = keras.layers.Dense(out, use_bias=use_bias[1])
    first.build((None, D))
    second.build((None, H))
    rng = np.random.default_rng(0)
    for variable in first.weights + second.weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    return first, second


def tokens(seed=1):
    return np.random.default_rng(seed).normal(size=(3, 4, D)).astype("float32")


def test_upcycled_layer_equals_the_ffn():
    # k > 1, another output width, and a missing bias (a zero one); one
    # case, since on JAX each new shape costs seconds of compilation.
    k, out = 3, 5
    first, second = ffn(out, use_bias=(True, False))
    moe = upcycle((first, second), num_experts=4, k=k)
    assert isinstance(moe, SparseMoE) and moe.k == k
    assert moe.capacity_factor is None and moe.eval_capacity_factor is None
    x = tokens()
    expected = ops.convert_to_numpy(second(first(x)))
    for training in (False, True):
        got = ops.convert_to_numpy(moe(x, training=training))
        np.testing.assert_allclose(got, expected, atol=1e-6 * max(1, np.abs(expected).max()), rtol=0)
    # The experts are copies, and the router really spreads the tokens.
    kernel = ops.convert_to_numpy(moe.experts.kernel_in)
    assert all(np.array_equal(kernel[e], kernel[0]) for e in range(4))
    assert (moe.routing_stats()["expert_load"] > 0).sum() > 1


def test_upcycle_a_keras_hub_transformer_encoder():
    keras_hub = pytest.importorskip("keras_hub", reason="keras-hub is a test-only extra")
    encoder = keras_hub.layers.TransformerEncoder(intermediate_dim=H, num_heads=2)
    encoder.build((None, 4, D))
    moe = upcycle(encoder, num_experts=3, k=2)
    x = tokens(2)
    expected = encoder._feedforward_output_dense(encoder._feedforward_intermediate_dense(x))
    np.testing.assert_allclose(
        ops.convert_to_numpy(moe(x)), ops.convert_to_numpy(expected), atol=1e-6
    )
    assert moe.get_config()["activation"] == "relu"  # the encoder's default


def test_bad_arguments():
    first, second = ffn()
    with pytest.raises(ValueError, match="two Dense layers"):
        upcycle(first, 4)
    with pytest.raises(ValueError, match="k=5, num_experts=4"):
        upcycle((first, second), 4, k=5)
    nonlinear = keras.layers.Dense(D, activation="relu")
    nonlinear.build((None, H))
    with pytest.raises(ValueError, match="must be linear"):
        upcycle((first, nonlinear), 4)
    with pytest.raises(ValueError, match="not built"):
        upcycle((keras.layers.Dense(H), second), 4)
    # Another router is taken as given.
    moe = upcycle((first, second), 4, k=1, router=TopKRouter(4, k=1, renormalize="always"))
    assert moe.k == 1


def test_activations_docstring_examples():
    # (upcycle's own example is the first test above at other shapes: on
    # JAX each new shape costs seconds of compilation.)
    import doctest

    from keras_moe import activations

    result = doctest.testmod(activations, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


# ------------------------------------------------------------- add_experts

X = np.random.default_rng(5).normal(size=(3, 4, D)).astype("float32")


def trained_moe(**router_options):
    moe = SparseMoE(4, H, capacity_factor=None, block_size=4,
                    router=TopKRouter(4, **router_options))
    moe.build((None, D))
    rng = np.random.default_rng(0)
    for variable in moe.trainable_weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32") * 0.5)
    return moe


def test_added_experts_leave_the_outputs_unchanged():
    # Sigmoid scores: the selection biases may differ (softmax: below).
    from keras_moe.upcycling import add_experts

    moe = trained_moe(k=2, bias_update_rate=0.05, score_function="sigmoid")
    moe(X, training=True)  # selection biases that differ, carried over
    assert np.ptp(ops.convert_to_numpy(moe.router.selection_bias)) > 0
    expected = ops.convert_to_numpy(moe(X))
    bigger = add_experts(moe, 2)
    assert bigger.num_experts == 6 and moe.num_experts == 4
    for training in (False, True):
        got, routing = bigger(X, training=training, return_routing=True)
        np.testing.assert_allclose(ops.convert_to_numpy(got), expected, atol=1e-6, rtol=0)
        assert ops.convert_to_numpy(routing["expert_index"]).max() < 4
    kernel = ops.convert_to_numpy(bigger.experts.kernel_in)
    old = ops.convert_to_numpy(moe.experts.kernel_in)
    np.testing.assert_array_equal(kernel[:4], old)
    np.testing.assert_array_equal(kernel[4:], old[:2])  # copies
    # The training call raised the unused new experts' bias by the rate.
    bias = ops.convert_to_numpy(bigger.router.selection_bias)
    before = ops.convert_to_numpy(moe.router.selection_bias).min() - 2.0
    np.testing.assert_allclose(bias[4:], before + 0.05, atol=1e-6)


def test_add_experts_needs_a_moving_bias_and_renormalised_weights():
    from keras_moe.upcycling import add_experts

    with pytest.raises(ValueError, match="bias_update_rate=0.0"):
        add_experts(trained_moe(k=2), 1)
    # A softmax router whose bias has not moved; fresh new experts.
    moe = trained_moe(k=2)
    bigger = add_experts(moe, 1, bias_update_rate=0.01, init="random")
    assert bigger.num_experts == 5 and bigger.router.bias_update_rate == 0.01
    kernel = ops.convert_to_numpy(bigger.experts.kernel_in)
    np.testing.assert_array_equal(kernel[:4], ops.convert_to_numpy(moe.experts.kernel_in))
    assert not np.array_equal(kernel[4], kernel[0])
    np.testing.assert_allclose(  # softmax scores shrink, weights do not
        ops.convert_to_numpy(bigger(X)), ops.convert_to_numpy(moe(X)), atol=1e-6
    )
    with pytest.raises(ValueError, match="k=1, renormalize=True"):
        add_experts(trained_moe(k=1, bias_update_rate=0.01), 1)
    with pytest.raises(ValueError, match="num_new=0"):
        add_experts(trained_moe(k=2, bias_update_rate=0.01), 0)
    moved = trained_moe(k=2, bias_update_rate=0.01)
    moved(X, training=True)
    with pytest.raises(ValueError, match="selection_bias="):
        add_experts(moved, 1)


# ----------------------------------------------------------- merge_experts


def merge_source(k, num_experts=4, **options):
    """A `SparseMoE` (dropless) with NumPy-drawn weights (zeros initializers:
    on JAX each random initializer compiles)."""
    router = TopKRouter(num_experts, k=k, kernel_initializer="zeros", **options)
    moe = SparseMoE(num_experts, H, router=router, capacity_factor=None,
                    kernel_initializer="zeros", name="moe")
    moe.build((None, D))
    rng = np.random.default_rng(3)
    for variable in moe.trainable_weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32") * 0.5)
    return moe


def test_merging_identical_experts_keeps_a_dense_mixture():
    from keras_moe.upcycling import merge_experts

    # Experts [A, A, B, B], router columns [a, a, b, b], every expert
    # picked (k = E, renormalised): the mixture sum_e p_e FFN_e. Merging
    # with the logsumexp rule gives [A, B] the groups' probabilities.
    moe = merge_source(k=4)
    for variable in moe.experts.weights + [moe.router.kernel]:
        value = ops.convert_to_numpy(variable)
        axis = 0 if variable.path.startswith(moe.experts.path) else 1
        value = np.take(value, [0, 0, 2, 2], axis=axis)
        variable.assign(value)
    expected = ops.convert_to_numpy(moe(X))
    merged = merge_experts(moe, groups=[[2, 3], [0, 1]], usage=[0.1, 0.4, 0.3, 0.2])
    assert (merged.num_experts, merged.k, merged.router.use_bias) == (2, 2, True)
    np.testing.assert_allclose(ops.convert_to_numpy(merged.router.bias), np.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(ops.convert_to_numpy(merged(X)), expected, atol=1e-5, rtol=1e-5)
    # All experts equal (upcycled; weights sum to 1): any grouping.
    first, second = ffn()
    upcycled = upcycle((first, second), num_experts=4, k=2)
    merged = merge_experts(upcycled, groups=[[0], [1, 2, 3]])
    np.testing.assert_allclose(
        ops.convert_to_numpy(merged(X)), ops.convert_to_numpy(second(first(X))),
        atol=1e-5, rtol=1e-5,
    )


def test_merging_into_one_expert_gives_the_averaged_ffn():
    from keras_moe.upcycling import merge_experts

    moe = merge_source(k=2, num_experts=3)
    usage = np.array([0.5, 0.25, 0.25])
    merged = merge_experts(moe, num_experts=1, usage=usage)
    assert (merged.num_experts, merged.k) == (1, 1)
    params = {}
    for variable in moe.experts.weights:
        value = ops.convert_to_numpy(variable)
        params[variable.path.split("/")[-1]] = np.tensordot(usage, value, axes=1)
    for variable in merged.experts.weights:
        np.testing.assert_allclose(
            ops.convert_to_numpy(variable)[0], params[variable.path.split("/")[-1]],
            rtol=1e-5, atol=1e-6,
        )
    # One expert, weight 1: a dense FFN with the averaged weights.
    tokens = X.reshape(-1, D)
    hidden = ops.convert_to_numpy(
        keras.activations.gelu(tokens @ params["kernel_in"] + params["bias_in"])
    )
    expected = hidden @ params["kernel_out"] + params["bias_out"]
    got = ops.convert_to_numpy(merged(X)).reshape(-1, D)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_merged_layer_groups_by_usage_and_router_and_saves(tmp_path):
    from keras_moe.upcycling import merge_experts

    moe = merge_source(k=2)
    kernel = np.zeros((D, 4), "float32")
    kernel[0, [0, 3]] = [1.0, 0.9]  # expert 3 routes like expert 0
    kernel[1, [1, 2]] = [0.8, 1.0]  # expert 1 routes like expert 2
    moe.router.kernel.assign(kernel)
    moe(X)  # statistics: the default usage
    usage = np.array([0.4, 0.1, 0.3, 0.2])  # leaders: experts 0 and 2
    merged = merge_experts(moe, num_experts=2, usage=usage, router="max")
    old = ops.convert_to_numpy(moe.experts.kernel_in)
    new = ops.convert_to_numpy(merged.experts.kernel_in)
    np.testing.assert_allclose(new[0], (0.4 * old[0] + 0.2 * old[3]) / 0.6, rtol=1e-5)
    np.testing.assert_allclose(new[1], (0.1 * old[1] + 0.3 * old[2]) / 0.4, rtol=1e-5)
    load = ops.convert_to_numpy(moe.expert_load)
    np.testing.assert_allclose(
        ops.convert_to_numpy(merged.expert_load), [load[0] + load[3], load[1] + load[2]]
    )
    assert merged.router.bias is None  # "max" of no bias: still none
    # Config round trip and .keras save/load of a model around it.
    config = merged.get_config()
    assert SparseMoE.from_config(config).get_config() == config
    inputs = keras.Input((4, D))
    model = keras.Model(inputs, merged(inputs))
    expected = model.predict(X, verbose=0)
    model.save(tmp_path / "merged.keras")
    reloaded = keras.saving.load_model(tmp_path / "merged.keras")
    np.testing.assert_array_equal(reloaded.predict(X, verbose=0), expected)
    # The automatic grouping equals the explicit one.
    explicit = merge_experts(moe, groups=[[1, 2], [0, 3]], usage=usage, router="max")
    np.testing.assert_array_equal(
        ops.convert_to_numpy(explicit.experts.kernel_in), new
    )


def test_merge_experts_bad_arguments():
    from keras_moe.layers import ExpertChoiceRouter
    from keras_moe.upcycling import merge_experts

    moe = merge_source(k=2)
    with pytest.raises(ValueError, match="either groups or num_experts"):
        merge_experts(moe)
    with pytest.raises(ValueError, match=r"exactly one non-empty group.*\[\[0, 1\], \[1, 2, 3\]\]"):
        merge_experts(moe, groups=[[0, 1], [1, 2, 3]])
    with pytest.raises(ValueError, match="num_experts=5, moe.num_experts=4"):
        merge_experts(moe, num_experts=5)
    with pytest.raises(ValueError, match="shape \\(4,\\)"):
        merge_experts(moe, num_experts=2, usage=[1.0, 2.0])
    with pytest.raises(ValueError, match="router"):
        merge_experts(moe, num_experts=2, router="mean")
    other = SparseMoE(4, H, router=ExpertChoiceRouter(4, kernel_initializer="zeros"),
                      kernel_initializer="zeros")
    other.build((None, D))
    with pytest.raises(ValueError, match="ExpertChoiceRouter"):
        merge_experts(other, num_experts=2)
