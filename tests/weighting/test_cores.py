"""The pure cores of the gradient methods against NumPy implementations
written from the papers, and the property each paper proves.

Every reference below works on the `(T, P)` gradient vectors themselves
(not on the Gram matrix, as the cores do), in float64, and solves the
small optimisation problems by exhaustive means (active sets, grids), so
that it shares nothing with the code under test but the formulas.
"""

import itertools

import keras
import numpy as np
import pytest

from keras_moe import weighting as W


def np_(x):
    return np.asarray(keras.ops.convert_to_numpy(x), "float64")


def gradients(seed, t=2, p=7, conflict=False):
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(t, p))
    if conflict:  # make task 1 conflict with task 0
        g[1] = -0.8 * g[0] + 0.3 * rng.normal(size=p)
    return g.astype("float32")


CASES = [(0, 2, False), (1, 2, True), (2, 3, False), (3, 3, True), (4, 4, True)]


# MGDA --------------------------------------------------------------------


def np_min_norm(g):
    """The min-norm point of the convex hull of the rows of `g`, by
    enumerating the supports and solving each one's KKT system."""
    g = np.asarray(g, "float64")
    m = g @ g.T
    t = len(g)
    best, best_w = np.inf, None
    for size in range(1, t + 1):
        for support in itertools.combinations(range(t), size):
            s = list(support)
            kkt = np.zeros((size + 1, size + 1))
            kkt[:size, :size] = m[np.ix_(s, s)]
            kkt[:size, size] = 1.0
            kkt[size, :size] = 1.0
            rhs = np.zeros(size + 1)
            rhs[size] = 1.0
            solution = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
            w = np.zeros(t)
            w[s] = solution[:size]
            if np.all(w >= -1e-12):
                value = w @ m @ w
                if value < best:
                    best, best_w = value, w
    return best_w @ g


@pytest.mark.parametrize("seed,t,conflict", CASES)
def test_mgda_is_the_min_norm_point_of_the_hull(seed, t, conflict):
    g = gradients(seed, t, conflict=conflict)
    got = np_(W.mgda_direction(g, iterations=400))
    expected = np_min_norm(g)
    if t == 2:  # exact, in closed form
        np.testing.assert_allclose(got, expected, atol=1e-5)
    else:  # Frank-Wolfe: the objective converges as O(1/k)
        scale = np.max(np.sum(g.astype("float64") ** 2, axis=1))
        assert got @ got <= expected @ expected + 1e-3 * scale
        np.testing.assert_allclose(got, expected, atol=1e-2 * np.sqrt(scale))
    # A common descent direction: d . g_t >= ||d||^2 for every task.
    if t == 2:
        assert np.all(g @ got >= got @ got - 1e-4)


def test_mgda_is_zero_at_a_pareto_stationary_point():
    g = gradients(0, 2)
    g[1] = -2.0 * g[0]  # 0 = (2 g_0 + g_1) / 3 is in the hull
    np.testing.assert_allclose(np_(W.mgda_direction(g)), 0.0, atol=1e-5)
    three = np.array([[1.0, 0.0], [-1.0, 1.0], [-1.0, -1.0]], "float32")
    np.testing.assert_allclose(np_(W.mgda_direction(three, iterations=400)), 0.0, atol=2e-2)


def test_mgda_normalisations_weight_the_original_gradients():
    g = np.array([[3.0, 0.0], [0.0, 1.0]], "float32")
    losses = np.array([2.0, 0.5], "float32")
    for normalization, scale in [
        ("l2", np.array([3.0, 1.0])),
        ("loss", np.array([2.0, 0.5])),
        ("loss+", np.array([6.0, 0.5])),
    ]:
        weights = np_(W.mgda_weights(g @ g.T, losses, normalization))
        scaled = g / scale[:, None]
        expected_point = np_min_norm(scaled)
        np.testing.assert_allclose(weights @ scaled, expected_point, atol=1e-5)


# PCGrad ------------------------------------------------------------------


def np_pcgrad(g, orders):
    """Yu et al.'s Algorithm 1: project each task gradient off every
    conflicting other task gradient (in the given order), then sum."""
    g = np.asarray(g, "float64")
    projected = []
    for i in range(len(g)):
        gi = g[i].copy()
        for j in orders[i]:
            if j == i:
                continue
            dot = gi @ g[j]
            if dot < 0:
                gi = gi - dot / (g[j] @ g[j]) * g[j]
        projected.append(gi)
    return np.array(projected)


@pytest.mark.parametrize("seed,t,conflict", CASES)
def test_pcgrad_matches_numpy(seed, t, conflict):
    g = gradients(seed, t, conflict=conflict)
    orders = np.array([np.random.default_rng(seed + i).permutation(t) for i in range(t)])
    got = np_(W.pcgrad_direction(g, orders.astype("int32")))
    np.testing.assert_allclose(got, np_pcgrad(g, orders).sum(0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seed", [1, 5, 6])
def test_pcgrad_leaves_no_conflict_for_two_tasks(seed):
    g = gradients(seed, 2, conflict=True)
    assert g[0] @ g[1] < 0
    orders = np.array([[0, 1], [1, 0]], "int32")
    coefficients = np_(W.pcgrad_projections(g @ g.T, orders))
    projected = coefficients @ g
    assert projected[0] @ g[1] >= -1e-5 and projected[1] @ g[0] >= -1e-5
    np.testing.assert_allclose(projected, np_pcgrad(g, orders), atol=1e-5)


# GradDrop ----------------------------------------------------------------


def np_graddrop(g, u, leak):
    """Chen et al.'s sign-purity mask, coordinate by coordinate."""
    g = np.asarray(g, "float64")
    out = np.zeros(g.shape[1])
    for p in range(g.shape[1]):
        purity = 0.5 * (1 + g[:, p].sum() / (np.abs(g[:, p]).sum() + 1e-7))
        for t in range(len(g)):
            keep = (purity > u[p] and g[t, p] > 0) or (purity < u[p] and g[t, p] < 0)
            out[p] += (leak + (1 - leak) * keep) * g[t, p]
    return out


@pytest.mark.parametrize("leak", [0.0, 0.3])
def test_graddrop_matches_numpy(leak):
    g = gradients(3, 3, p=40, conflict=True)
    u = np.random.default_rng(0).uniform(size=40).astype("float32")
    got = np_(W.graddrop_direction(g, u, leak))
    np.testing.assert_allclose(got, np_graddrop(g, u, leak), rtol=1e-5, atol=1e-6)
    # Where every task agrees in sign, the sum passes unchanged.
    agree = np.all(g > 0, axis=0) | np.all(g < 0, axis=0)
    np.testing.assert_allclose(got[agree], g.sum(0)[agree], rtol=1e-5)


# GradVac -----------------------------------------------------------------


def np_gradvac(g, targets, orders, beta):
    """Wang et al.'s Algorithm 1 with one model-wide target per pair."""
    g = np.asarray(g, "float64")
    targets = np.array(targets, "float64")
    total = np.zeros(g.shape[1])
    for i in range(len(g)):
        gi = g[i].copy()
        for j in orders[i]:
            if j == i:
                continue
            phi = gi @ g[j] / (np.linalg.norm(gi) * np.linalg.norm(g[j]) + 1e-8)
            target = targets[i, j]
            if phi < target:
                gi = gi + g[j] * np.linalg.norm(gi) * (
                    target * np.sqrt(1 - phi**2) - phi * np.sqrt(1 - target**2)
                ) / (np.linalg.norm(g[j]) * np.sqrt(1 - target**2) + 1e-8)
            targets[i, j] = (1 - beta) * target + beta * phi
        total += gi
    return total, targets


@pytest.mark.parametrize("seed,t,conflict", CASES[:4])
def test_gradvac_matches_numpy(seed, t, conflict):
    g = gradients(seed, t, conflict=conflict)
    rng = np.random.default_rng(seed)
    targets = rng.uniform(-0.2, 0.6, size=(t, t)).astype("float32")
    orders = np.array([rng.permutation(t) for _ in range(t)])
    weights, new_targets = W.gradvac_weights(g @ g.T, targets, orders.astype("int32"), 0.1)
    expected, expected_targets = np_gradvac(g, targets, orders, 0.1)
    np.testing.assert_allclose(np_(weights) @ g, expected, rtol=1e-4, atol=1e-4)
    off = ~np.eye(t, dtype=bool)
    np.testing.assert_allclose(np_(new_targets)[off], expected_targets[off], atol=1e-5)


def test_gradvac_with_zero_targets_is_pcgrad():
    g = gradients(1, 2, conflict=True)
    orders = np.array([[0, 1], [1, 0]], "int32")
    weights, _ = W.gradvac_weights(g @ g.T, np.zeros((2, 2), "float32"), orders, 0.0)
    np.testing.assert_allclose(np_(weights) @ g, np_pcgrad(g, orders).sum(0), atol=1e-4)


# CAGrad ------------------------------------------------------------------


def np_cagrad(g, c_alpha, rescale):
    """Liu et al.'s CAGrad: the dual `min_w g_w . g_0 + c ||g_0|| ||g_w||`
    solved on a fine grid of the simplex, then `d = g_0 + c ||g_0|| /
    ||g_w|| g_w`, rescaled."""
    g = np.asarray(g, "float64")
    t = len(g)
    g0 = g.mean(0)
    c = c_alpha * np.linalg.norm(g0)
    steps = 20000 if t == 2 else 300
    grid = [
        np.array(w + (steps - sum(w),)) / steps
        for w in itertools.product(range(steps + 1), repeat=t - 1)
        if sum(w) <= steps
    ]
    grid = np.array(grid)
    gw = grid @ g
    objective = gw @ g0 + c * np.linalg.norm(gw, axis=1)
    w = grid[np.argmin(objective)]
    gw = w @ g
    d = g0 + c / (np.linalg.norm(gw) + 1e-8) * gw
    return d / {0: 1.0, 1: 1 + c_alpha**2, 2: 1 + c_alpha}[rescale], objective.min()


@pytest.mark.parametrize(
    "seed,t,conflict,rescale", [(0, 2, False, 0), (1, 2, True, 1), (3, 3, True, 1)]
)
def test_cagrad_matches_numpy(seed, t, conflict, rescale):
    g = gradients(seed, t, conflict=conflict)
    got = np_(W.cagrad_direction(g, c_alpha=0.4, rescale=rescale, iterations=40))
    expected, best = np_cagrad(g, 0.4, rescale)
    scale = np.linalg.norm(expected)
    np.testing.assert_allclose(got, expected, atol=(1e-3 if t == 2 else 3e-2) * scale)


@pytest.mark.parametrize("seed,t,conflict", CASES[:3])
def test_cagrad_with_c_zero_is_the_mean_gradient(seed, t, conflict):
    g = gradients(seed, t, conflict=conflict)
    np.testing.assert_allclose(
        np_(W.cagrad_direction(g, c_alpha=0.0, iterations=10)), g.mean(0), rtol=1e-5, atol=1e-6
    )


# IMTL-G ------------------------------------------------------------------


def np_imtl_g(g):
    """Liu et al.'s closed form, on the vectors."""
    g = np.asarray(g, "float64")
    u = g / np.linalg.norm(g, axis=1, keepdims=True)
    d_matrix = g[0] - g[1:]
    u_matrix = u[0] - u[1:]
    alpha = g[0] @ u_matrix.T @ np.linalg.inv(d_matrix @ u_matrix.T)
    alpha = np.concatenate([[1 - alpha.sum()], alpha])
    return alpha @ g


@pytest.mark.parametrize("seed,t,conflict", CASES)
def test_imtl_g_matches_numpy_and_projects_equally(seed, t, conflict):
    g = gradients(seed, t, conflict=conflict)
    got = np_(W.imtl_g_weights(g @ g.T)) @ g
    np.testing.assert_allclose(got, np_imtl_g(g), rtol=1e-3, atol=1e-4)
    unit = g / np.linalg.norm(g, axis=1, keepdims=True)
    projections = unit @ got
    np.testing.assert_allclose(projections, projections[0], rtol=1e-3, atol=1e-4)


# Nash-MTL ----------------------------------------------------------------


def np_nash(g, iterations=200):
    """Navon et al.'s bargaining weights: `alpha > 0` with
    `M alpha = 1 / alpha`, `M = G G^T / ||G G^T||_F`, by Newton's method
    with backtracking on `||M a - 1/a||` (float64)."""
    g = np.asarray(g, "float64")
    m = g @ g.T
    m = m / np.linalg.norm(m)
    a = np.ones(len(g))
    for _ in range(iterations):
        residual = m @ a - 1 / a
        step = -np.linalg.solve(m + np.diag(1 / a**2), residual)
        s = 1.0
        while np.any(a + s * step <= 0) or np.linalg.norm(
            m @ (a + s * step) - 1 / (a + s * step)
        ) > np.linalg.norm(residual):
            s /= 2
            if s < 1e-12:
                break
        a = a + s * step
    return a, m


@pytest.mark.parametrize("seed,t,conflict", CASES)
def test_nash_weights_solve_the_bargaining_equations(seed, t, conflict):
    g = gradients(seed, t, conflict=conflict)
    got = np_(W.nash_weights(g @ g.T))
    expected, m = np_nash(g)
    np.testing.assert_allclose(got, expected, rtol=2e-3)
    # Every task gets the same bargaining share: alpha_t (M alpha)_t = 1.
    np.testing.assert_allclose(got * (m @ got), 1.0, rtol=3e-3)
    # The update is invariant to the scale of all the gradients, up to the
    # scale itself (the Gram matrix is normalised).
    np.testing.assert_allclose(np_(W.nash_weights(25.0 * (g @ g.T))), got, rtol=1e-4)


def test_nash_update_is_clipped():
    g = 10.0 * gradients(0, 2)
    clipped = np_(W.nash_direction(g, max_norm=1.0))
    assert abs(np.linalg.norm(clipped) - 1.0) < 1e-5
    free = np_(W.nash_direction(g, max_norm=0.0))
    np.testing.assert_allclose(clipped, free / np.linalg.norm(free), rtol=1e-5)


# Aligned-MTL -------------------------------------------------------------


def np_aligned(g):
    """Senushkin et al.: `B = sqrt(lambda_min) V Lambda^-1/2 V^T` over the
    eigenvalues of `G G^T` above the numerical rank's tolerance."""
    g = np.asarray(g, "float64")
    values, vectors = np.linalg.eigh(g @ g.T)
    kept = values > values.max() * len(g) * np.finfo("float32").eps
    values, vectors = values[kept], vectors[:, kept]
    balance = np.sqrt(values.min()) * vectors @ np.diag(values**-0.5) @ vectors.T
    return balance


@pytest.mark.parametrize("seed,t,conflict", CASES)
def test_aligned_mtl_matches_numpy_and_is_well_conditioned(seed, t, conflict):
    g = gradients(seed, t, conflict=conflict)
    g = g * np.array([1.0, 5.0, 0.3, 2.0][:t], "float32")[:, None]  # dominance
    balance = np_(W.aligned_mtl_balance(g @ g.T))
    np.testing.assert_allclose(balance, np_aligned(g), rtol=2e-3, atol=1e-4)
    aligned = balance @ g
    singular = np.linalg.svd(aligned, compute_uv=False)
    assert singular.max() / singular.min() < 1.01
    assert np.linalg.cond(g) > 3  # it was not well conditioned before
    np.testing.assert_allclose(
        np_(W.aligned_mtl_direction(g)), aligned.sum(0), rtol=1e-3, atol=1e-4
    )


def test_aligned_mtl_ignores_a_null_direction():
    g = np.array([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]], "float32")  # rank 1
    assert np.all(np.isfinite(np_(W.aligned_mtl_direction(g))))


# UPGrad ------------------------------------------------------------------


def np_dual_cone_weights(m, u):
    """`argmin_{v >= u} v^T M v` by enumerating the free coordinates."""
    t = len(u)
    best, best_v = np.inf, None
    for size in range(t + 1):
        for free in itertools.combinations(range(t), size):
            free = list(free)
            fixed = [k for k in range(t) if k not in free]
            v = u.copy()
            if free:
                v[free] = np.linalg.solve(
                    m[np.ix_(free, free)], -m[np.ix_(free, fixed)] @ u[fixed]
                )
            if np.all(v >= u - 1e-12) and v @ m @ v < best:
                best, best_v = v @ m @ v, v
    return best_v


def np_upgrad(g, reg_eps=1e-4):
    g = np.asarray(g, "float64")
    m = g @ g.T
    m = m / np.trace(m) + reg_eps * np.eye(len(g))
    weights = sum(np_dual_cone_weights(m, np.eye(len(g))[i] / len(g)) for i in range(len(g)))
    return weights @ g


@pytest.mark.parametrize("seed,t,conflict", CASES)
def test_upgrad_matches_numpy_and_conflicts_with_no_task(seed, t, conflict):
    g = gradients(seed, t, conflict=conflict)
    got = np_(W.upgrad_direction(g, iterations=200))
    expected = np_upgrad(g)
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * np.linalg.norm(expected))
    # A non-negative inner product with every task gradient (up to the ridge).
    assert np.all(g @ got >= -1e-3 * np.linalg.norm(got) * np.linalg.norm(g, axis=1))


def test_upgrad_is_the_mean_without_conflict():
    g = np.abs(gradients(0, 3))  # all inner products > 0
    np.testing.assert_allclose(np_(W.upgrad_direction(g, reg_eps=0.0)), g.mean(0), rtol=1e-5)


# DB-MTL ------------------------------------------------------------------


def test_db_mtl_matches_numpy():
    g = gradients(2, 3)
    buffer = gradients(7, 3)
    update, new_buffer, alpha = W.db_mtl_direction(g, buffer, 4.0, beta=0.9, beta_sigma=0.5)
    rate = 0.9 / 4.0**0.5
    expected_buffer = g + rate * (buffer - g)
    norms = np.linalg.norm(expected_buffer, axis=1)
    expected_alpha = norms.max() / (norms + 1e-8)
    np.testing.assert_allclose(np_(new_buffer), expected_buffer, rtol=1e-5)
    np.testing.assert_allclose(np_(alpha), expected_alpha, rtol=1e-5)
    np.testing.assert_allclose(np_(update), expected_alpha @ expected_buffer, rtol=1e-5)
    # Every task's part of the update has the norm of the largest.
    parts = np_(alpha)[:, None] * expected_buffer
    np.testing.assert_allclose(np.linalg.norm(parts, axis=1), norms.max(), rtol=1e-5)
