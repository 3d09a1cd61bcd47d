"""Inner problems that draw: a sample-average approximation (SAA), its draws taken once per
solve from one key, so the solver and the hypergradient see a deterministic objective; or,
with `via sgd(...)`, fresh draws at every step, which solves the expected problem.

Closed form: ridge regression with Gaussian input noise. Averaged over the noise, the inner
objective E mean(((x + e) v - y)^2) + lam |v|^2 is ridge with sigma^2 added to its diagonal,
v* = (x^T x / N + (sigma^2 + lam) I)^-1 x^T y / N; on S sampled copies it is ridge on the
stacked data, solved exactly by the normal equations with the same samples.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import gradlang
from gradlang.explain import explain
from stats import EPS32

SOURCE = """
fn outer(lam: f32, x: f32[N, D], y: f32[N], xv: f32[M, D], yv: f32[M]) -> f32 {
  let w = argmin v: f32[D] = zeros([D]) {
    e ~ Normal(zeros([64, N, D]), 0.3)
    let r = (x + e) @ v - y
    mean(r * r) + lam * sum(v * v)
  } via lbfgs(steps=100)
  let rv = xv @ w - yv
  return mean(rv * rv)
}

fn noise(x: f32[N, D]) -> f32[64, N, D] {
  e ~ Normal(zeros([64, N, D]), 0.3)
  return e + 0.0 * x
}

fn noisy(v: f32[D], x: f32[N, D], y: f32[N]) -> f32 {
  e ~ Normal(zeros([N, D]), 0.3)
  let r = (x + e) @ v - y
  return mean(r * r)
}

fn outer_expect(lam: f32, x: f32[N, D], y: f32[N], xv: f32[M, D], yv: f32[M]) -> f32 {
  let w = argmin v: f32[D] = zeros([D]) {
    expect(noisy(v, x, y), samples=64) + lam * sum(v * v)
  } via lbfgs(steps=100)
  let rv = xv @ w - yv
  return mean(rv * rv)
}

export g = value_and_grad(outer, wrt=[lam])
export draws = noise
export g_expect = grad(outer_expect, wrt=[lam])
"""
S, N, SIGMA, LAM = 64, 32, 0.3, 0.1


@pytest.fixture(scope="module")
def m():
    return gradlang.compile_source(SOURCE, name="stochastic_inner")


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 3))
    y = x @ np.array([1.0, -1.0, 0.5]) + 0.1 * rng.normal(size=N)
    xv = rng.normal(size=(16, 3))
    return [a.astype(np.float32) for a in (x, y, xv, xv @ np.array([1.0, -1.0, 0.5]))]


def _hypergradient(a: np.ndarray, b: np.ndarray, xv, yv) -> tuple[float, float]:
    """The outer loss at w = a^-1 b (a holding lam I) and its derivative in lam, float64."""
    w = np.linalg.solve(a, b)
    dw = -np.linalg.solve(a, w)
    r = xv @ w - yv
    return float(np.mean(r * r)), float(2 * np.mean(r * (xv @ dw)))


def test_the_hypergradient_is_exact_for_the_sampled_problem(m):
    """With the key's own samples, the ridge on the S stacked noisy copies in float64 gives the
    value and hypergradient. The value_and_grad export evaluates its objective as a scope of
    one sample, drawn with split(key, 1)[0] (`runtime.rules_random._samples`), whose one random
    op (the problem) takes that key, and so does the problem's one draw; the plain export
    `draws` hands its key to its one draw as it is.
    Float32: sums of S N = 2048 products (5 sqrt(n) eps relative, Higham and Mary), a 3 x 3
    solve of condition ~3, twice (the solution, then its derivative): 4e-4 relative."""
    x, y, xv, yv = _data()
    key = jax.random.key(7)
    e = np.asarray(m.draws(x, jax.random.split(key, 1)[0]), np.float64)
    stacked = (x + e).reshape(-1, 3)
    ys = np.tile(y, S)
    a = stacked.T @ stacked / (S * N) + LAM * np.eye(3)
    value, grad = _hypergradient(a, stacked.T @ ys / (S * N), xv, yv)
    got_value, got = m.g(np.float32(LAM), x, y, xv, yv, key)
    tol = 2 * 3 * 5 * np.sqrt(S * N) * EPS32
    assert abs(float(got_value) - value) <= tol * value
    assert abs(float(got["lam"]) - grad) <= tol * abs(grad)


@pytest.mark.slow  # the fast twin: the exactness test above
@pytest.mark.parametrize("export", ["g", "g_expect"])
def test_over_keys_it_estimates_ridge_with_the_noise_on_its_diagonal(m, export):
    """Averaged over 200 keys, within 5 standard errors (from the keys' spread) plus twice the
    sample average's bias, -5.4e-4 at these settings (20,000 float64 solves offline; it
    shrinks as 1 / (S N)), of the expected problem's closed form."""
    x, y, xv, yv = _data()
    a = x.T @ x / N + (SIGMA ** 2 + LAM) * np.eye(3)
    _, truth = _hypergradient(a.astype(np.float64), (x.T @ y / N).astype(np.float64), xv, yv)
    keys = jax.random.split(jax.random.key(1), 200)
    out = jax.jit(jax.vmap(lambda k: m[export](np.float32(LAM), x, y, xv, yv, k)))(keys)
    grads = np.asarray((out[1] if export == "g" else out)["lam"], np.float64)
    se = grads.std(ddof=1) / np.sqrt(len(grads))
    assert abs(grads.mean() - truth) <= 5 * se + 2 * 5.4e-4, (grads.mean(), truth, se)


def test_explain_states_the_sample_average_and_its_bias(m):
    text = explain(m.ir)
    assert "outer, line 3 draws: a sample-average approximation" in text
    assert "biased by O(1 / the samples)" in text


@pytest.mark.slow
def test_verify_finds_the_sampled_hypergradient_consistent(m):
    """Slow (minutes: every reference evaluation solves the problem, under vmap); the fast
    twin is test_the_hypergradient_is_exact_for_the_sampled_problem. The estimate is the exact gradient of outer(v*_key(lam)) for each key, so its mean is
    the gradient of the expected outer loss under the sample average: verify's reference
    (central differences over common keys) agrees."""
    x, y, xv, yv = _data()
    report = m.verify("g", {"lam": np.float32(LAM), "x": x, "y": y, "xv": xv, "yv": yv},
                      samples=50, reference_samples=64)
    assert report.verdict == "consistent", report


SGD_SOURCE = """
fn fit(lam: f32, x: f32[N, D], y: f32[N]) -> f32[D] {
  return argmin v: f32[D] = zeros([D]) {
    e ~ Normal(zeros([4, N, D]), 0.3)
    let r = (x + e) @ v - y
    mean(r * r) + lam * sum(v * v)
  } via sgd(steps=1000, lr=0.05)
}

fn outer(lam: f32, x: f32[N, D], y: f32[N], xv: f32[M, D], yv: f32[M]) -> f32 {
  let rv = xv @ fit(lam, x, y) - yv
  return mean(rv * rv)
}

fn noise(x: f32[N, D]) -> f32[4, N, D] {
  e ~ Normal(zeros([4, N, D]), 0.3)
  return e + 0.0 * x
}

export solve = fit
export draws = noise
export g = value_and_grad(outer, wrt=[lam])
"""
S_SGD, STEPS = 4, 1000


@pytest.fixture(scope="module")
def sgd():
    return gradlang.compile_source(SGD_SOURCE, name="sgd_inner")


def _population() -> tuple[np.ndarray, np.ndarray]:
    """The expected problem's matrix A = x^T x / N + (sigma^2 + lam) I and solution v*."""
    x, y, _, _ = [a.astype(np.float64) for a in _data()]
    a = x.T @ x / N + (SIGMA ** 2 + LAM) * np.eye(3)
    return a, np.linalg.solve(a, x.T @ y / N)


def _sgd_spread(a: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The standard deviation of each coordinate of sgd's averaged solution. A step's gradient
    is 2 (A_k v - b_k), A_k and b_k from S noisy copies, whose mean is 2 (A v - b); at v* its
    noise 2 xi has, per (copy, example) with e ~ N(0, sigma^2 I) and r_n = x_n . v - y_n,
    Cov((x_n + e)((x_n + e) . v - y_n)) = sigma^2 (|v|^2 x_n x_n^T + r_n^2 I + r_n (x_n v^T +
    v x_n^T)) + sigma^4 (|v|^2 I + v v^T) (Isserlis), so Cov(xi) = sum_n of it / (S N^2). The
    mean of the last n iterates then has covariance A^-1 Cov(xi) A^-1 / n (Polyak and Juditsky
    1992: the 2s cancel), its burn-in (STEPS / 2 steps contracting by 1 - 2 lr lambda_min(A) ~
    0.95) forgotten. Offline, over 256 keys: 1.12, 1.33, 1.41 e-3 against 1.13, 1.38, 1.43 e-3
    predicted."""
    x, y, _, _ = [b.astype(np.float64) for b in _data()]
    r = x @ v - y
    vv = v @ v
    cov = sum(SIGMA ** 2 * (vv * np.outer(xn, xn) + rn ** 2 * np.eye(3)
                            + rn * (np.outer(xn, v) + np.outer(v, xn)))
              + SIGMA ** 4 * (vv * np.eye(3) + np.outer(v, v)) for xn, rn in zip(x, r))
    cov /= S_SGD * N ** 2
    ainv = np.linalg.inv(a)
    return np.sqrt(np.diag(ainv @ cov @ ainv) / (STEPS // 2))


def test_sgd_solves_the_expected_problem_within_its_noise(sgd):
    """One solve lands within 5 of its derived standard deviations (about 1.4e-3) of the
    expected problem's solution v*, per coordinate (chance of failure 2e-6); the sample problem
    of one step's 4 copies, which an SAA solve with those draws would return, is further off:
    the same noise, averaged over one step's copies rather than 500 steps', has sqrt(500) = 22
    times the spread."""
    x, y, _, _ = _data()
    a, v = _population()
    w = np.asarray(sgd.solve(np.float32(LAM), x, y, jax.random.key(3)), np.float64)
    spread = _sgd_spread(a, v)
    assert np.all(np.abs(w - v) <= 5 * spread), (w, v, spread)


def test_sgd_hypergradient_is_implicit_at_its_solution_with_a_fresh_draw(sgd):
    """The value_and_grad export's problem takes the key of its one sample scope,
    split(key, 1)[0] (as in the SAA exactness test); the fn export `solve` given that key
    returns the same solution w, and `draws` the problem's own sample set, which none of sgd's
    steps used (they fold the key with the step). The hypergradient is implicit
    differentiation at w with that sample's Hessian: d w / d lam = -A_s^-1 w, A_s = X_s^T X_s
    / (S N) + lam I on the stacked copies X_s. Float32 bound as in the SAA test (S N = 128
    products)."""
    x, y, xv, yv = _data()
    key = jax.random.key(5)
    inner = jax.random.split(key, 1)[0]
    w = np.asarray(sgd.solve(np.float32(LAM), x, y, inner), np.float64)
    e = np.asarray(sgd.draws(x, inner), np.float64)
    stacked = (x + e).reshape(-1, 3)
    a = stacked.T @ stacked / (S_SGD * N) + LAM * np.eye(3)
    r = xv @ w - yv
    grad = float(2 * np.mean(r * (xv @ -np.linalg.solve(a, w))))
    got_value, got = sgd.g(np.float32(LAM), x, y, xv, yv, key)
    tol = 2 * 3 * 5 * np.sqrt(S_SGD * N) * EPS32
    assert abs(float(got_value) - float(np.mean(r * r))) <= tol * float(np.mean(r * r))
    assert abs(float(got["lam"]) - grad) <= tol * abs(grad), (float(got["lam"]), grad)


@pytest.mark.slow  # the fast twins: the two sgd tests above
def test_over_keys_the_sgd_hypergradient_estimates_the_expected_problems(sgd):
    """Averaged over 128 keys, the hypergradient is the expected problem's, d/dlam of the
    outer loss at v*(lam) with A's inverse, plus the bias the brief states: implicit
    differentiation inverts one draw's Hessian, E[A_s^-1] != A^-1, computed here in float64
    over 20,000 draws of the 4 copies at v* (the solution's own spread, ~1e-3, adds a bias of
    O(1e-6), below the keys' standard error). Within 5 standard errors of the two means."""
    x, y, xv, yv = _data()
    a, v = _population()
    _, truth = _hypergradient(a, a @ v, xv, yv)
    rng = np.random.default_rng(0)
    stacked = (x + rng.normal(0, SIGMA, (20_000, S_SGD, N, 3))).reshape(20_000, -1, 3)
    a_s = np.einsum("kni,knj->kij", stacked, stacked) / (S_SGD * N) + LAM * np.eye(3)
    r = xv @ v - yv
    drawn = 2 * np.mean(r * (xv @ -np.linalg.solve(a_s, v).T).T, axis=1)
    keys = jax.random.split(jax.random.key(2), 128)
    out = jax.jit(jax.vmap(lambda k: sgd.g(np.float32(LAM), x, y, xv, yv, k)))(keys)
    grads = np.asarray(out[1]["lam"], np.float64)
    se = np.hypot(grads.std(ddof=1) / np.sqrt(len(grads)), drawn.std(ddof=1) / np.sqrt(len(drawn)))
    assert abs(grads.mean() - drawn.mean()) <= 5 * se, (grads.mean(), drawn.mean(), truth, se)


def test_explain_states_sgds_draws_and_bias(sgd):
    text = explain(sgd.ir)
    assert "sgd(steps=1000, lr=0.05, decay=0.0, average=0.5)" in text
    assert "fit, line 3 draws: sgd, fresh draws at every step" in text
    assert "biased by O(1 / the samples of one draw)" in text
    unrolled = gradlang.compile_source(SGD_SOURCE.replace(
        "via sgd(steps=1000, lr=0.05)", "via sgd(steps=1000, lr=0.05) with unrolled"))
    assert ("unrolled differentiation differentiates this run's sampled steps: biased, as for a "
            "deterministic solver, by the steps short of convergence") in explain(unrolled.ir)


def test_sgd_on_a_deterministic_problem_is_gradient_descent():
    """Without draws (a warning, in tests/diagnostics/argmin_sgd.grad) sgd is gradient descent:
    on (v - a)^2 at lr 0.1 each step contracts the error by 0.8, so the last 50 of 100
    iterates, which it averages, are within 0.8^51 = 1.1e-5 relative of a; implicit
    differentiation there gives d v / d a = -(2)^-1 (-2) = 1 up to float32 rounding."""
    m = gradlang.compile_source("""
fn fit(a: f32) -> f32 { return argmin v: f32 = 0.0 { (v - a) ^ 2 } via sgd(steps=100, lr=0.1) }
export g = value_and_grad(fit, wrt=[a])
""", name="sgd_deterministic")
    value, grads = m.g(np.float32(3.0))
    assert abs(float(value) - 3.0) <= 1.2e-5 * 3.0
    assert abs(float(grads["a"]) - 1.0) <= 4 * EPS32


NESTED = """
fn lower(a: f32, u: f32) -> f32 {
  return argmin w: f32 = 0.0 {
    e ~ Normal(0.0, 0.1);
    (w - a * u + e) ^ 2
  } via sgd(steps=200, lr=0.1)
}
fn upper(a: f32) -> f32 {
  return argmin u: f32 = 0.0 { (u - 1.0) ^ 2 + lower(a, u) ^ 2 } via gd(steps=40, lr=0.2)
}
fn loss(a: f32) -> f32 { return (upper(a) - 0.5) ^ 2 }
export g = value_and_grad(loss, wrt=[a])
"""


def test_a_stochastic_problem_nested_in_another_takes_its_key_through_the_call():
    """The outer problem's body calls a function whose problem draws, so the outer problem
    takes a key and hands the call one (the same at each of its evaluations). The inner noise
    is additive: sgd's averaged solution is a u + delta, delta from the key alone (its
    transient, 0.8^100, long gone), and its implicit derivatives (d/da = u, d/du = a) are
    exact, so upper = (1 - a delta) / (1 + a^2). delta is the mean of 100 iterates of an AR(1)
    with coefficient 1 - 2 lr = 0.8 and innovations 2 lr e: standard deviation
    0.1 / sqrt(100) = 0.01. The value and gradient are within 5 of those of their
    closed forms at delta = 0 (the derivative in delta by central differences, float64)."""
    m = gradlang.compile_source(NESTED, name="nested_sgd")
    a = 0.7

    def closed(delta: float) -> tuple[float, float]:
        u = (1 - a * delta) / (1 + a * a)
        du = (-delta * (1 + a * a) - (1 - a * delta) * 2 * a) / (1 + a * a) ** 2
        return (u - 0.5) ** 2, 2 * (u - 0.5) * du

    spread, h = 0.1 / np.sqrt(100), 1e-4
    slopes = (np.array(closed(h)) - np.array(closed(-h))) / (2 * h)
    value, grads = m.g(np.float32(a), jax.random.key(0))
    for got, want, slope in zip((value, grads["a"]), closed(0.0), slopes):
        assert abs(float(got) - want) <= 5 * spread * abs(slope) + 64 * EPS32, (got, want)
