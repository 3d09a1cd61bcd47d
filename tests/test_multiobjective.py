"""`minimize([f1, f2, ...], wrt=[...], by=RULE)`: the combination rules against NumPy formulas
(MGDA's min-norm point against a brute-force QP, PCGrad against the paper's algorithm, weights
against the gradient of the weighted sum, Dynamic Weight Average against its formula), MGDA's
guarantees, stochastic objectives, artifacts and explain."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize as scipy_minimize

import gradlang
from gradlang.explain import explain
from gradlang.estimators import combine as mo
from gradlang.runtime.multiobjective import gram_matrix
from stats import EPS32, assert_close, assert_unbiased, estimates, sigmoid

RNG = np.random.default_rng(11)
GRAM_ROUNDING = 16 * EPS32
"""The min-norm problem's float32 rounding, relative to max |g|^2: the Gram's entries sum at most
7 products (8 roundings), and the computed weights c, optimal for the rounded Gram, are within
2 max |dG| = 16 eps32 max |g|^2 of the optimal value min c^T G c (|c^T dG c| <= max |dG| on the
simplex). Since |d - d*|^2 <= f(d) - f(d*) for the min-norm point d* of a convex set, the
direction is within sqrt(16 eps32) max |g| of it."""


def min_norm_brute_force(g: np.ndarray) -> np.ndarray:
    """The min-norm point of the convex hull of the rows of g (float64), by brute force: the
    best of a grid on the simplex (k <= 3) or of its vertices, centre and random points, each
    refined by SLSQP."""
    k = g.shape[0]
    gram = g @ g.T
    if k <= 3:
        steps = 1_000_000 if k == 2 else 400
        grid = np.array([c for c in itertools.product(range(steps + 1), repeat=k - 1)
                         if sum(c) <= steps], np.float64) / steps
        starts = np.concatenate([grid, 1 - grid.sum(1, keepdims=True)], 1)
    else:
        starts = np.concatenate([np.eye(k), np.full((1, k), 1 / k),
                                 np.random.default_rng(0).dirichlet(np.ones(k), 20)])
    value = np.einsum("ni,ij,nj->n", starts, gram, starts)
    candidates = [starts[np.argmin(value)]] if k <= 3 else list(starts)
    best = min(candidates, key=lambda c: c @ gram @ c)
    for start in candidates:
        res = scipy_minimize(lambda c: c @ gram @ c, start, jac=lambda c: 2 * gram @ c,
                             bounds=[(0, 1)] * k, method="SLSQP", tol=1e-15,
                             constraints=[{"type": "eq", "fun": lambda c: c.sum() - 1}],
                             options={"maxiter": 1000})
        c = np.clip(res.x, 0, None) / np.clip(res.x, 0, None).sum()
        if c @ gram @ c < best @ gram @ best:
            best = c
    return best @ g


def combined(c, g) -> np.ndarray:
    return np.asarray(c, np.float64) @ g


def gram32(g: np.ndarray) -> jax.Array:
    return gram_matrix(jnp.asarray(g, jnp.float32))


MGDA = mo.Mgda(solver="exact", iters=100)

CASES = {
    "conflicting": np.array([[1.0, 0.2, -0.3, 0.5], [-0.8, 0.4, 0.1, -0.2]]),
    "aligned": np.array([[1.0, 1.0, 0.0, 0.5], [2.0, 1.5, 0.3, 0.4]]),
    "dominated": np.array([[0.1, 0.0, 0.0, 0.0], [1.0, 3.0, 0.0, 0.0]]),
    "equal": np.array([[0.5, -1.0, 2.0, 0.0], [0.5, -1.0, 2.0, 0.0]]),
    "three": RNG.normal(size=(3, 4)),
    "three_dependent": np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]) * [[1.0], [2.0], [-0.3]],
    "three_opposed": np.array([[1.0, 0.0], [-0.5, 0.9], [-0.5, -0.9]]),
    "five": RNG.normal(size=(5, 7)) + [1.0, 0, 0, 0, 0, 0, 0],
}


@pytest.mark.parametrize("name", CASES)
def test_mgda_matches_brute_force_min_norm(name):
    g = CASES[name]
    c = np.asarray(MGDA.combine(gram32(g)), np.float64)
    assert np.all(c >= 0) and abs(c.sum() - 1) <= 2 * len(c) * EPS32  # normalized: k roundings
    assert_close(combined(c, g), min_norm_brute_force(g), ops=1,
                 scale=np.sqrt(GRAM_ROUNDING) * np.abs(g).max() / EPS32)


@pytest.mark.parametrize("name", CASES)
def test_mgda_direction_is_a_common_descent_direction(name):
    """KKT of the min-norm point: <d, g_i> >= |d|^2 for every gradient."""
    g = CASES[name]
    d = combined(MGDA.combine(gram32(g)), g)
    # exact for the rounded Gram: (G c)_i >= c^T G c there; the rounding moves each side by
    # max |dG| = 8 eps32 max |g|^2, plus the k-term products
    tol = (GRAM_ROUNDING + len(g) * EPS32) * np.abs(g).max() ** 2
    assert np.all(g @ d >= d @ d - tol), (g @ d, d @ d)


def test_mgda_is_zero_at_pareto_stationary_points():
    g1, g2 = RNG.normal(size=(2, 6))
    for g in (np.stack([g1, -2.5 * g1]),                           # two opposed gradients
              np.stack([g1, g2, -(0.3 * g1 + 0.2 * g2) / 0.5])):   # a zero convex combination
        d = combined(MGDA.combine(gram32(g)), g)
        assert np.linalg.norm(d) <= np.sqrt(GRAM_ROUNDING) * np.abs(g).max()  # d* = 0
    g = np.stack([g1, g2])
    d = combined(MGDA.combine(gram32(g)), g)
    # two random gradients in 6 dims have a common descent direction, far above that bound
    assert np.linalg.norm(d) > 0.5 * np.linalg.norm(min_norm_brute_force(g)) > 0.1


def test_frank_wolfe_converges_to_the_min_norm_point():
    """Frank-Wolfe with exact line search: f(c_t) - f* <= 2 C / (t + 2), C = max |g_i - g_j|^2
    (Jaggi 2013, the curvature constant of |J^T c|^2 on the simplex)."""
    g = RNG.normal(size=(12, 20)) * 0.5 + 0.3
    best = min_norm_brute_force(g)
    curvature = max(np.sum((a - b) ** 2) for a in g for b in g)
    # below f*, only by rounding: the weights sum to 1 within 12 roundings
    floor = (GRAM_ROUNDING + 2 * 12 * EPS32) * np.abs(g).max() ** 2
    for iters in (10, 100, 1000):
        d = combined(mo.min_norm_frank_wolfe(gram32(g), iters), g)
        gap = d @ d - best @ best
        assert -floor <= gap <= 2 * curvature / (iters + 2), (iters, gap)
        # |d - d*|^2 <= f(d) - f(d*) for the min-norm point d* of a convex set
        assert np.sum((d - best) ** 2) <= gap + 2 * floor


def pcgrad_ops(g: np.ndarray) -> float:
    """PCGrad's float32 rounding relative to max |g|: each of the k - 1 projections of a
    gradient rounds ~16 times (two 7-term products, a ratio, an update), the ratio amplifying
    by up to |g_i| / |g_j|."""
    norms = np.linalg.norm(g, axis=1)
    return 16 * len(g) * norms.max() / norms.min()


def pcgrad_paper(g: np.ndarray, orders) -> np.ndarray:
    """Yu et al. 2020, Algorithm 1 (float64): each g_i projected, in its order, onto the normal
    plane of every g_j it conflicts with; the sum of the projected gradients."""
    out = np.zeros(g.shape[1])
    for i, order in enumerate(orders):
        gi = g[i].copy()
        for j in order:
            if j != i and gi @ g[j] < 0:
                gi -= (gi @ g[j]) / (g[j] @ g[j]) * g[j]
        out += gi
    return out


@pytest.mark.parametrize("k", [2, 3, 4])
def test_pcgrad_matches_the_paper_in_source_order(k):
    for seed in range(5):
        g = np.random.default_rng(seed).normal(size=(k, 6))
        c = mo.pcgrad(gram32(g), mo.pcgrad_orders(None, k))
        want = pcgrad_paper(g, [range(k)] * k)
        assert_close(combined(c, g), want, ops=pcgrad_ops(g), scale=np.abs(g).max())


def test_pcgrad_random_orders_follow_the_paper():
    """With the key, each gradient's order is a random permutation: every result is the paper's
    algorithm for some choice of orders, and several choices occur."""
    g = np.array([[1.0, 0.3, 0.0], [-0.9, 0.5, 0.2], [0.1, -1.0, 0.4]])
    k = len(g)
    choices = list(itertools.product(*[list(itertools.permutations([j for j in range(k) if j != i]))
                                       for i in range(k)]))
    results = np.stack([pcgrad_paper(g, orders) for orders in choices])
    gram = gram32(g)
    coefficients = jax.jit(jax.vmap(lambda key: mo.pcgrad(gram, mo.pcgrad_orders(key, k))))(
        jax.random.split(jax.random.key(0), 40))
    seen = set()
    for c in coefficients:
        d = combined(c, g)
        errors = np.abs(results - d).max(1)
        assert errors.min() <= pcgrad_ops(g) * EPS32 * np.abs(g).max()
        seen.add(tuple(np.round(results[errors.argmin()], 5)))
    assert len(seen) >= 3


def test_dwa_matches_the_formula():
    history = jnp.asarray([[0.5, 2.0, 1.0], [1.0, 1.0, 4.0]])
    r = np.array([0.5, 2.0, 0.25])
    want = 3 * np.exp(r / 2) / np.exp(r / 2).sum()
    assert_close(mo.dwa(history, 2.0), want, ops=16)  # ratios, exp (4), a 3-term sum, a division
    assert_close(mo.dwa(jnp.zeros((2, 3)), 2.0), np.ones(3), ops=16)


# ---- compiled exports

SOURCE = """
struct P { w: f32[D], b: f32 }

fn f1(p: P, v: f32[2], x: f32[N, D]) -> f32 {
  return mean((x @ p.w + p.b - 1.0) ^ 2) + sum((v - 1.0) ^ 2)
}
fn f2(p: P, v: f32[2], x: f32[N, D]) -> f32 {
  return mean(tanh(x @ p.w - p.b) ^ 2) + sum(v * v) * 0.5
}
fn f3(p: P, v: f32[2], x: f32[N, D]) -> f32 {
  return sum(p.w * p.w) + exp(p.b) + sum(v)
}
fn weighted(p: P, v: f32[2], x: f32[N, D]) -> f32 {
  return 0.3 * f1(p, v, x) + 0.7 * f2(p, v, x)
}

export v1 = f1
export v2 = f2
export g1 = grad(f1, wrt=[p, v])
export g2 = grad(f2, wrt=[p, v])
export g3 = grad(f3, wrt=[p, v])
export weighted = value_and_grad(weighted, wrt=[p, v])
export mgda = minimize([f1, f2], wrt=[p, v], by=mgda)
export mgda3 = minimize([f1, f2, f3], wrt=[p, v], by=mgda)
export frank_wolfe = minimize([f1, f2, f3], wrt=[p, v], by=mgda(solver=frank_wolfe, iters=2000))
export pcgrad = minimize([f1, f2, f3], wrt=[p, v], by=pcgrad(shuffle=false))
export shuffled = minimize([f1, f2, f3], wrt=[p, v], by=pcgrad)
export weights = minimize([f1, f2], wrt=[p, v], by=weights(0.3, 0.7))
export dwa = minimize([f1, f2, f3], wrt=[p, v], by=dynamic(temperature=2))
export only_v = minimize([f1, f2], wrt=[v], by=mgda)
export step = descend(minimize([f1, f2], wrt=[p, v], by=mgda), lr=0.1)
export step_lr = descend(minimize([f1, f2, f3], wrt=[v], by=dynamic(temperature=2)))
"""


@pytest.fixture(scope="module")
def m():
    return gradlang.compile_source(SOURCE)


ARGS = ({"w": RNG.normal(size=3).astype(np.float32), "b": np.float32(0.2)},
        np.array([0.3, -0.4], np.float32), RNG.normal(size=(8, 3)).astype(np.float32))
GRAD_OPS = 40
"""Two float32 computations of an objective of SOURCE or its gradient (8-term means, 3-term
products, tanh and exp at 4 roundings each, forward and backward): ~20 roundings a side."""


def flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def jacobian(m, names=("g1", "g2", "g3")) -> np.ndarray:
    return np.stack([flat(m[n](*ARGS)) for n in names])


def test_minimize_returns_values_direction_and_weights(m):
    values, direction, weights = m.mgda(*ARGS)
    assert values.shape == (2,) and weights.shape == (2,) and set(direction) == {"p", "v"}
    assert set(direction["p"]) == {"w", "b"}
    assert_close(values, np.array([m.v1(*ARGS), m.v2(*ARGS)]), ops=GRAD_OPS)
    assert m.mgda.signature.kind == "minimize"
    assert [n for n, _ in m.mgda.signature.params] == ["p", "v", "x"]


def test_descend_over_minimize_steps_by_the_direction(m):
    """descend(minimize(...), lr=...) returns the parameters after p - lr * direction in the
    direction's place (its arguments donated, as descend's), the values and weights as they
    are; without lr=, the step size is the argument after the parameters, before the state."""
    def fresh():  # the export consumes the arrays passed for its wrt parameters
        return jax.tree.map(jnp.array, ARGS)

    values, direction, weights = m.mgda(*fresh())
    got_values, new, got_weights = m.step(*fresh())
    p, v, _ = ARGS
    want = {"p": jax.tree.map(lambda a, d: a - 0.1 * d, p, direction["p"]),
            "v": v - 0.1 * direction["v"]}
    assert_close(new, want, ops=GRAD_OPS)
    assert_close(got_values, values, ops=GRAD_OPS)
    assert_close(got_weights, weights, ops=GRAD_OPS)
    assert m.step.signature.kind == "descend"
    assert [n for n, _ in m.step_lr.signature.params] == ["p", "v", "x", "lr", "history"]
    history = jnp.ones((2, 3))
    _, direction, _, _ = m.dwa(*fresh(), history)
    _, new, _, after = m.step_lr(*fresh(), jnp.float32(0.5), history)
    assert_close(new["v"], ARGS[1] - 0.5 * direction["v"], ops=GRAD_OPS)
    with pytest.raises(gradlang.ArgumentError, match="updates its parameters itself"):
        gradlang.Trainer(m.step, None)
    assert m.verify("step", dict(zip(("p", "v", "x"), ARGS))).verdict == "consistent"


@pytest.mark.parametrize("name,k", [("mgda", 2), ("mgda3", 3), ("frank_wolfe", 3)])
def test_compiled_mgda_is_the_min_norm_point_of_the_gradients(m, name, k):
    g = jacobian(m)[:k]
    _, direction, weights = m[name](*ARGS)
    best = min_norm_brute_force(g)
    # the exact solver: GRAM_ROUNDING's bound; Frank-Wolfe after 2,000 steps: within
    # sqrt(2 C / 2002) of the min-norm point (Jaggi's bound on f - f*, and |d - d*|^2 <= f - f*)
    curvature = max(np.sum((a - b) ** 2) for a in g for b in g)
    bound = np.sqrt(GRAM_ROUNDING) * np.abs(g).max() + np.sqrt(
        2 * curvature / 2002 if name == "frank_wolfe" else 0.0)
    assert np.linalg.norm(flat(direction) - best) <= bound
    # the direction is its weights' combination of the gradients, as the g exports compute them
    assert_close(flat(direction), combined(weights, g), ops=GRAD_OPS + k, scale=np.abs(g).max())


def test_compiled_pcgrad_matches_the_paper(m):
    g = jacobian(m)
    _, direction, weights = m.pcgrad(*ARGS)
    want = pcgrad_paper(g, [range(3)] * 3)
    assert_close(flat(direction), want, ops=pcgrad_ops(g) + GRAD_OPS, scale=np.abs(g).max())
    assert_close(flat(direction), combined(weights, g), ops=GRAD_OPS + 3, scale=np.abs(g).max())
    a = m.shuffled(*ARGS, jax.random.key(0))
    b = m.shuffled(*ARGS, jax.random.key(0))
    np.testing.assert_array_equal(flat(a[1]), flat(b[1]))


def test_weights_is_the_gradient_of_the_weighted_sum(m):
    values, direction, weights = m.weights(*ARGS)
    value, grads = m.weighted(*ARGS)
    assert_close(flat(direction), flat(grads), ops=GRAD_OPS + 3)
    assert_close(0.3 * values[0] + 0.7 * values[1], value, ops=GRAD_OPS + 3)
    assert_close(weights, np.array([0.3, 0.7]), ops=1)  # the literals in float32


def test_dynamic_weight_average_threads_its_history(m):
    params, v, x = ARGS
    history = jnp.zeros((2, 3))
    seen = []
    for step in range(4):
        values, direction, weights, history = m.dwa(params, v, x, history)
        g = np.stack([flat(m[n](params, v, x)) for n in ("g1", "g2", "g3")])
        if step < 2:
            want = np.ones(3)
        else:
            r = np.asarray(seen[-1], np.float64) / np.asarray(seen[-2], np.float64)
            want = 3 * np.exp(r / 2) / np.exp(r / 2).sum()
        assert_close(weights, want, ops=16)  # as test_dwa_matches_the_formula
        assert_close(flat(direction), want @ g, ops=GRAD_OPS + 16 + 3, scale=3 * np.abs(g).max())
        np.testing.assert_array_equal(history[0], values)
        seen.append(values)
        params = jax.tree.map(lambda p, d: p - 0.1 * d, params, direction["p"])
        v = v - 0.1 * direction["v"]


def test_minimize_composes_with_jit_and_vmap(m):
    params, v, x = ARGS
    vs = jnp.stack([v, -v, 2 * v])
    _, direction, _ = jax.jit(jax.vmap(m.mgda, in_axes=(None, 0, None)))(params, vs, x)
    for i in range(3):
        assert_close(direction["v"][i], m.mgda(params, vs[i], x)[1]["v"], ops=GRAD_OPS)
    _, only, _ = m.only_v(*ARGS)
    assert set(only) == {"v"}


def test_mgda_picks_frank_wolfe_above_eight_objectives():
    names = ", ".join(["f"] * 9)
    m = gradlang.compile_source(f"""
fn f(x: f32[2]) -> f32 {{ return sum(x * x) }}
export a = minimize([{names}], wrt=[x], by=mgda)
export b = minimize([f, f], wrt=[x], by=mgda)
""")
    rules = {e.name: str(e.transform.rule) for e in m.ir.exports}
    assert rules == {"a": "mgda(solver=frank_wolfe, iters=100)", "b": "mgda(solver=exact, iters=100)"}
    values, direction, weights = m.a(np.array([1.0, 2.0], np.float32))
    # 9 equal gradients: any weights summing to 1 (9 roundings) give the gradient itself
    assert_close(direction["x"], np.array([2.0, 4.0]), ops=16)
    assert "Frank-Wolfe" in explain(m.ir)


# ---- objectives with random choices

RANDOM = """
fn score(x: f32[3]) -> f32 {
  let b ~ Bernoulli(logits = x)
  return sum((b - 0.3) ^ 2)
}
fn path(x: f32[3]) -> f32 {
  z ~ Normal(x, 1.0)
  return sum(z * z)
}
export weights = minimize([expect(score, samples=4), path], wrt=[x], by=weights(0.3, 0.7))
export mgda = minimize([expect(score, samples=4), path], wrt=[x], by=mgda)
export same = minimize([expect(score, samples=4), expect(score, samples=4)], wrt=[x], by=pcgrad(shuffle=false))
"""


def test_random_objectives_take_a_key_and_independent_draws():
    m = gradlang.compile_source(RANDOM)
    x = np.array([0.2, -0.5, 1.0], np.float32)
    assert [n for n, _ in m.mgda.signature.params] == ["x", "key"]
    a = m.same(x, jax.random.key(0))
    b = m.same(x, jax.random.key(1))
    assert a[0][0] != a[0][1]  # each objective draws with its own key
    assert not np.array_equal(a[0], b[0])


def test_weights_of_random_objectives_is_unbiased():
    """E direction = 0.3 d/dx E f1 + 0.7 d/dx E f2, closed forms: per coordinate,
    E (b - 0.3)^2 = 0.09 + 0.4 p (p = sigmoid(x)), E z^2 = x^2 + 1."""
    m = gradlang.compile_source(RANDOM)
    x = np.array([0.2, -0.5, 1.0], np.float32)
    p = np.array([sigmoid(v) for v in x])
    truth = 0.3 * 0.4 * p * (1 - p) + 0.7 * 2 * x
    _, direction, _ = estimates(m.weights, (x,))
    assert_unbiased(direction["x"], truth)


# ---- objectives with their own parameters and estimators

OWN = """
extern fn reward(w: f32[D]) -> f32

fn fit(w: f32[D], x: f32[N, D], y: f32[N]) -> f32 {
  let r = x @ w - y
  return mean(r * r)
}

fn penalty(w: f32[D], b: f32) -> f32 { return sum(w * w) + b * b }

fn black(w: f32[D]) -> f32 { return -reward(w) }

export union = minimize([fit, penalty], wrt=[w, b], by=weights(1, 2))
export mixed = minimize([fit, black with spsa(eps=0.01)], wrt=[w], by=weights(0.5, 1))
export mixed_mgda = minimize([fit, penalty, black with es(sigma=0.01, pop=8)], wrt=[w, b],
                             by=mgda)
"""
TARGET = np.array([1.0, -2.0, 0.5], np.float32)


def _reward(w):
    return -jnp.sum((w - TARGET) ** 2)


@pytest.fixture(scope="module")
def own():
    return gradlang.compile_source(OWN, externs={"reward": _reward})


def _fit_data():
    x = RNG.normal(size=(6, 3)).astype(np.float32)
    return x, (x @ np.array([0.3, 0.1, -0.2])).astype(np.float32)


def test_objectives_take_the_union_of_their_parameters(own):
    """The export takes (w, x, y, b); penalty alone reaches b, fit contributes 0 to it."""
    assert [n for n, _ in own.union.signature.params] == ["w", "x", "y", "b"]
    x, y = _fit_data()
    w, b = np.array([0.2, -0.1, 0.4], np.float32), np.float32(0.7)
    values, direction, c = own.union(w, x, y, b)
    fit_w = jax.grad(lambda w: jnp.mean((x @ w - y) ** 2))(w)
    assert_close(direction["w"], fit_w + 2 * 2 * w, 64, 1 + np.abs(fit_w).max())
    assert_close(direction["b"], 2 * 2 * b, 16, 1 + abs(b))
    assert_close(values, np.array([np.mean((x @ w - y) ** 2), np.sum(w * w) + b * b]), 64, 10.0)


def test_a_black_box_objective_beside_a_differentiable_one_is_unbiased(own):
    """SPSA's estimate of the extern's gradient is unbiased for a quadratic (the smoothed
    objective differs by a constant): E direction = 0.5 grad fit + 2 (w - target)."""
    x, y = _fit_data()
    w = np.array([0.2, -0.1, 0.4], np.float32)
    fit_w = np.asarray(jax.grad(lambda w: jnp.mean((x @ w - y) ** 2))(w))
    _, direction, _ = estimates(own.mixed, (w, x, y))
    assert_unbiased(direction["w"], 0.5 * fit_w + 2 * (w - TARGET))
    values, _, _ = own.mixed(w, x, y, jax.random.key(0))
    assert_close(values[1], np.sum((w - TARGET) ** 2), 16, 10.0)


def test_mgda_combines_a_black_box_estimate(own):
    """The Gram matrix takes the estimated gradient as it takes the exact ones: the direction
    is the min-norm point of the three (zero b-gradient from fit and black)."""
    x, y = _fit_data()
    w, b = np.array([0.2, -0.1, 0.4], np.float32), np.float32(0.7)
    values, direction, c = own.mixed_mgda(w, x, y, b, jax.random.key(1))
    assert np.all(np.asarray(c) >= -1e-6) and abs(float(np.sum(c)) - 1) < 1e-5
    assert_close(direction["b"], c[1] * 2 * b, 16, 1 + abs(b))
    text = explain(own.ir)
    assert "minimize([fit, penalty, black with es(sigma=0.01, pop=8, antithetic=true)]" in text
    assert "black-box estimate by" in text


def test_verify_pads_the_objectives_gradients_and_matches_black_box_keys(own):
    """verify's exact check recomputes each objective's gradient at the key the export gives
    it (a black-box objective's perturbations too) and pads the wrt names it does not take."""
    x, y = _fit_data()
    w = np.array([0.2, -0.1, 0.4], np.float32)
    union = own.verify("union", {"w": w, "x": x, "y": y, "b": np.float32(0.7)}, samples=20,
                       reference_samples=256)
    mixed = own.verify("mixed", {"w": w, "x": x, "y": y}, samples=50, reference_samples=256)
    for report in (union, mixed):
        assert report.combination.verdict == "consistent", report
        assert report.verdict == "consistent", report


# ---- objectives that carry state

STATEFUL = """
fn path(x: f32[3]) -> f32 { return sum(x * x) }
fn coins(x: f32[3]) -> f32 {
  let b ~ Bernoulli(logits = x) with score(baseline = ma, decay = 0.5)
  return sum((b - 0.3) ^ 2)
}
export weighted = minimize([expect(coins, samples=4), path], wrt=[x], by=weights(0.3, 0.7))
export dwa = minimize([path, expect(coins, samples=4)], wrt=[x], by=dynamic)
export own = grad(expect(coins, samples=4), wrt=[x])
"""
BASELINE = np.array([0.3, 0.6, 0.1], np.float32)


@pytest.fixture(scope="module")
def stateful():
    return gradlang.compile_source(STATEFUL)


def test_an_objective_with_a_moving_average_threads_it_as_its_own_export_would(stateful):
    """The export takes and returns `state`, a tuple of the objectives' states (here the one
    moving average, per entry of the batched draw); objective 0 draws with fold_in(key, 0),
    so its gradient and its baseline after the call are bit for bit those of its own export
    `grad(expect(coins, samples=4), wrt=[x])` at that key, and the direction is 0.3 times its
    gradient plus 0.7 times path's, 2x (float32: one multiply-add per entry)."""
    assert [(n, str(t)) for n, t in stateful.weighted.signature.params] == [
        ("x", "f32[3]"), ("state", "(f32[3])"), ("key", "key")]
    x, key = np.array([0.2, -0.5, 1.0], np.float32), jax.random.key(4)
    values, direction, _, (after,) = stateful.weighted(x, (BASELINE,), key)
    grads, own_after = stateful.own(x, BASELINE, jax.random.fold_in(key, 0))
    np.testing.assert_array_equal(after, own_after)
    assert_close(direction["x"], 0.3 * grads["x"] + 0.7 * 2 * x, 4)
    # b <- 0.5 b + 0.5 (each entry's mean over the samples), whose sum is the value
    assert_close(np.sum(after - 0.5 * BASELINE) / 0.5, values[0], 16)
    text = explain(stateful.ir)
    assert "weights f32[2], state (objectives' states))" in text
    assert "weights f32[2], state (objectives' states, history))" in text


def test_a_moving_average_keeps_the_combined_gradient_unbiased(stateful):
    """Over keys at a baseline from earlier calls, E direction = 0.3 d/dx E coins + 0.7 2x,
    with E (b - 0.3)^2 = 0.09 + 0.4 p per coordinate (p = sigmoid(x))."""
    x = np.array([0.2, -0.5, 1.0], np.float32)
    p = np.array([sigmoid(v) for v in x])
    _, direction, _, _ = estimates(stateful.weighted, (x, (BASELINE,)))
    assert_unbiased(direction["x"], 0.3 * 0.4 * p * (1 - p) + 0.7 * 2 * x)


@pytest.mark.slow  # the fast twins: the two tests above (verify's runs take 10 s)
def test_verify_gives_each_objective_its_state_from_the_exports(stateful):
    """verify hands each objective its entry of `state` (and `dynamic` the history, last), so
    its exact check recomputes the objectives' gradients at the same baselines and keys."""
    x = np.array([0.2, -0.5, 1.0], np.float32)
    for name, state in [("weighted", (BASELINE,)), ("dwa", (BASELINE, np.ones((2, 2))))]:
        report = stateful.verify(name, {"x": x, "state": state}, samples=50)
        assert report.combination.verdict == "consistent", report
        assert report.verdict == "consistent", report


def test_the_trainer_threads_the_baselines_and_the_history(stateful):
    """With `dynamic`, the state is (coins' baseline, history): zeros at init, and after one
    step the baseline holds half of each entry's mean (decay 0.5 from zeros), summing to half
    the objective's value, and the history the values over zeros."""
    class Plain:  # gradient descent, optax's interface
        def init(self, params):
            return ()

        def update(self, grads, state, params=None):
            return jax.tree.map(lambda g: -0.1 * g, grads), state

    trainer = gradlang.Trainer(stateful.dwa, Plain())
    state = trainer.init(np.array([0.2, -0.5, 1.0], np.float32), key=jax.random.key(0))
    np.testing.assert_array_equal(state.export_state[0], np.zeros(3))
    np.testing.assert_array_equal(state.export_state[1], np.zeros((2, 2)))
    state, out = trainer.update(state)
    baseline, history = state.export_state
    assert_close(2 * np.sum(baseline), out.value[1], 16)
    np.testing.assert_array_equal(history, np.stack([out.value, np.zeros(2)]))


# ---- artifacts, explain


def test_artifact_round_trip(m, tmp_path):
    path = m.save(tmp_path / "mo.gx", dims={"D": 3, "N": 8})
    loaded = gradlang.load(path)
    key = jax.random.key(3)
    history = jnp.asarray([[1.0, 2.0, 3.0], [2.0, 2.0, 2.0]])
    for name, extra in [("mgda", ()), ("mgda3", ()), ("pcgrad", ()), ("shuffled", (key,)),
                        ("weights", ()), ("dwa", (history,))]:
        want, got = m[name](*ARGS, *extra), loaded[name](*ARGS, *extra)
        assert_close(got, want, ops=GRAD_OPS + 16)  # recompiled: the rules' rounding too
    assert loaded.dwa.signature.stateful and loaded.dwa.signature.kind == "minimize"
    assert [n for n, _ in loaded.dwa.signature.params] == ["p", "v", "x", "history"]


def test_explain_shows_rule_guarantee_objectives_and_cost():
    m = gradlang.compile_source(RANDOM + """
fn plain(x: f32[3]) -> f32 { return sum(x * x) }
export dwa = minimize([plain, path], wrt=[x], by=dynamic)
""")
    text = explain(m.ir)
    assert "export mgda = minimize([expect(score, samples=4), path], wrt=[x], by=mgda(solver=exact, iters=100))" in text
    assert "MGDA (Desideri 2012; Sener & Koltun 2018)" in text and "closed form" in text
    assert "Pareto-stationary" in text
    assert "objective 1: expect(score, samples=4)" in text and "objective 2: path" in text
    assert "score function" in text and "pathwise (reparam)" in text
    assert "one backward pass per objective" in text
    assert "gradient of the weighted sum 0.3 f1 + 0.7 f2" in text
    assert "PCGrad (Yu et al. 2020)" in text and "in the objectives' order" in text
    assert "Dynamic Weight Average (Liu, Johns & Davison 2019)" in text
    assert "returns: (values f32[2], direction {x}, weights f32[2], history)" in text


def test_pareto_example(run_example):
    """A short run of examples/pareto.py: MGDA and PCGrad reach the front from every start, at
    several points of it, MGDA without raising either objective; fixed weights reach only its
    ends (the front is concave): at most two points, in the outer eighths of the set."""
    summary, _ = run_example("pareto", ["--steps", "150", "--starts", "6"],
                             {"rules", "front_hypervolume", "steps"}, plot="pareto_front.png")
    rules = summary["rules"]
    for name in ("mgda", "pcgrad"):
        assert rules[name]["on_front"] == 6 and rules[name]["distinct_front_points"] >= 3
    assert rules["mgda"]["monotone_steps"] == 1.0
    for name in ("w10", "w30", "w50", "w70", "w90"):  # Pareto set: |t| <= 0.577
        assert rules[name]["distinct_front_points"] <= 2
        assert all(abs(t) > 0.45 for t in rules[name]["final_t"])
    assert rules["mgda"]["hypervolume_share"] > 2 * rules["w50"]["hypervolume_share"]
