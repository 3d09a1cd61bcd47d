"""Inner problems that draw: a sample-average approximation (SAA), its draws taken once per
solve from one key, so the solver and the hypergradient see a deterministic objective.

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
