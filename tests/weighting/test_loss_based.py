"""The loss-based weightings (DWA, RLW, GLS, IMTL-L, FAMO) against NumPy
implementations written from the papers."""

import keras
import numpy as np
import pytest

from keras_moe import weighting as W


def np_(x):
    return np.asarray(keras.ops.convert_to_numpy(x), "float64")


def test_dwa_weights_follow_the_epoch_loss_ratios():
    epochs = [
        [[1.0, 2.0], [1.2, 2.2]],  # two steps in epoch 1
        [[0.8, 2.0]],
        [[0.4, 1.9], [0.6, 2.1]],
        [[0.3, 2.0]],
    ]
    dwa = W.DWA(temperature=1.5)
    dwa.build((2,))
    means = []
    for steps in epochs:
        expected = np.ones(2)
        if len(means) >= 2:
            ratio = np.array(means[-1]) / np.array(means[-2])
            expected = 2 * np.exp(ratio / 1.5) / np.exp(ratio / 1.5).sum()
        for losses in steps:
            total = dwa(np.array(losses, "float32"), training=True)
            np.testing.assert_allclose(np_(total), expected @ losses, rtol=1e-5)
        np.testing.assert_allclose(np_(dwa.current_weights()), expected, rtol=1e-5)
        means.append(np.mean(steps, axis=0))
        dwa.end_epoch()
    # Outside training nothing accumulates.
    dwa(np.array([5.0, 5.0], "float32"), training=False)
    assert float(np_(dwa.steps)) == 0.0


@pytest.mark.parametrize("distribution", ["normal", "uniform", "dirichlet"])
def test_rlw_draws_weights_on_the_simplex(distribution):
    rlw = W.RLW(distribution=distribution, seed=3)
    rlw.build((3,))
    losses = np.array([1.0, 2.0, 4.0], "float32")
    draws = []
    for _ in range(200):
        total = np_(rlw(losses, training=True))
        w = np_(rlw.current_weights())
        np.testing.assert_allclose(total, w @ losses, rtol=1e-5)
        draws.append(w)
    draws = np.array(draws)
    np.testing.assert_allclose(draws.sum(1), 1.0, rtol=1e-5)
    assert np.all(draws > 0)
    np.testing.assert_allclose(draws.mean(0), 1 / 3, atol=0.05)  # symmetric
    assert draws.std(0).min() > 0.02  # really random
    np.testing.assert_allclose(np_(rlw(losses, training=False)), losses.mean(), rtol=1e-5)


def test_rlw_normal_is_a_softmax_of_standard_normals():
    # The logits' law: log(w_1 / w_2) = lambda_1 - lambda_2 ~ N(0, 2).
    rlw = W.RLW(seed=0)
    rlw.build((2,))
    logs = []
    for _ in range(400):
        rlw(np.ones(2, "float32"), training=True)
        w = np_(rlw.current_weights())
        logs.append(np.log(w[0] / w[1]))
    assert abs(np.std(logs) - np.sqrt(2)) < 0.2


def test_gls_is_the_geometric_mean():
    gls = W.GLS()
    losses = np.array([0.5, 2.0, 8.0], "float32")
    np.testing.assert_allclose(np_(gls(losses, training=True)), 2.0, rtol=1e-6)
    # Its gradient weights: GLS / (T L_t).
    np.testing.assert_allclose(np_(gls.current_weights()), 2.0 / (3 * losses), rtol=1e-6)


def test_imtl_l_scales_losses_to_equal_values():
    imtl = W.IMTLL()
    imtl.build((2,))
    imtl.log_scale.assign([0.5, -1.0])
    losses = np.array([2.0, 3.0], "float32")
    expected = np.exp(0.5) * 2 - 0.5 + np.exp(-1.0) * 3 + 1.0
    np.testing.assert_allclose(np_(imtl(losses)), expected, rtol=1e-6)
    np.testing.assert_allclose(np_(imtl.current_weights()), np.exp([0.5, -1.0]), rtol=1e-6)
    # d/ds (e^s L - s) = 0 at e^s L = 1: the optimum scales every loss to 1.


def np_famo(loss_sequence, lr, decay):
    """Liu et al.'s FAMO with the fall of the log-losses taken between
    consecutive steps: the logits' Adam step on `J_softmax^T delta +
    decay xi`, then the weights `z / (c D)`."""
    xi, m, v = np.zeros(2), np.zeros(2), np.zeros(2)
    previous, weights = None, []
    for k, losses in enumerate(loss_sequence):
        d = np.asarray(losses) + 1e-8
        if previous is not None:
            delta = np.log(previous) - np.log(d)
            z = np.exp(xi) / np.exp(xi).sum()
            grad = z * (delta - z @ delta) + decay * xi
            m = 0.9 * m + 0.1 * grad
            v = 0.999 * v + 0.001 * grad**2
            m_hat, v_hat = m / (1 - 0.9**k), v / (1 - 0.999**k)
            xi = xi - lr * m_hat / (np.sqrt(v_hat) + 1e-8)
        z = np.exp(xi) / np.exp(xi).sum()
        c = (z / d).sum()
        weights.append(z / (c * d))
        previous = d
    return xi, weights


def test_famo_matches_numpy():
    sequence = [[1.0, 2.0], [0.5, 1.9], [0.3, 1.8], [0.25, 1.2], [0.2, 1.1]]
    famo = W.FAMO(learning_rate=0.1, weight_decay=0.01)
    famo.build((2,))
    for losses in sequence:
        total = famo(np.array(losses, "float32"), training=True)
    xi, weights = np_famo(sequence, 0.1, 0.01)
    np.testing.assert_allclose(np_(famo.logits), xi, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np_(famo.current_weights()), weights[-1], rtol=1e-4)
    assert abs(np_(famo.current_weights()).sum() - 1.0) < 1e-5
    z = np.exp(xi) / np.exp(xi).sum()
    d = np.array(sequence[-1]) + 1e-8
    np.testing.assert_allclose(np_(total), (z * np.log(d)).sum() / (z / d).sum(), rtol=1e-4)
    # The task whose loss fell less (task 1) gained weight.
    assert xi[1] > xi[0]
