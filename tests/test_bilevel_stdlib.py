"""The bilevel standard library (`std.bilevel`) and the examples built on it.

- std.bilevel compiles strictly (no warnings), every function reachable from a user file;
- ridge: the fits (per-feature, shared, weighted) equal the closed form, their hypergradients
  equal jax.grad through jnp.linalg.solve, also with badly scaled features and penalties
  spanning twelve orders of magnitude (the solver's Jacobi rescaling), within the float32
  rounding that `_rounding` derives;
- logistic: the fit is a stationary point of `logistic_objective`; the hypergradients (per-
  feature penalties; per-example weights through softmax_weights and sigmoid) match central
  finite differences of a float64 Newton solve;
- the examples (hyper_ridge, reweight) run end to end with small settings and learn something
  measurable; with their default settings (marked slow) they reach the results stated below.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradlang
from stats import EPS32, assert_close

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
BILEVEL = ROOT / "stdlib" / "bilevel.grad"

# Exports can only name functions of the exporting file, so each stdlib function is wrapped.
SOURCE = """
use std.bilevel

fn f_ridge(log_lam: f32[D], x: f32[N, D], y: f32[N]) -> f32[D] { return ridge_fit(log_lam, x, y) }
fn f_ridge_shared(log_lam: f32, x: f32[N, D], y: f32[N]) -> f32[D] { return ridge_fit_shared(log_lam, x, y) }
fn f_ridge_full(c: f32[N], log_lam: f32[D], x: f32[N, D], y: f32[N]) -> f32[D] {
  return ridge_fit_full(c, log_lam, x, y)
}
fn f_ridge_cf(log_lam: f32[D], x: f32[N, D], y: f32[N]) -> f32[D] { return ridge_closed_form(log_lam, x, y) }
fn f_ridge_val(log_lam: f32[D], x: f32[N, D], y: f32[N], xv: f32[M, D], yv: f32[M]) -> f32 {
  return sq_loss(ridge_fit(log_lam, x, y), xv, yv)
}
fn f_ridge_shared_val(log_lam: f32, x: f32[N, D], y: f32[N], xv: f32[M, D], yv: f32[M]) -> f32 {
  return sq_loss(ridge_fit_shared(log_lam, x, y), xv, yv)
}
fn f_wridge_val(l: f32[N], log_lam: f32, x: f32[N, D], y: f32[N], xv: f32[M, D], yv: f32[M]) -> f32 {
  return sq_loss(weighted_ridge_fit(softmax_weights(l), log_lam, x, y), xv, yv)
}
fn f_ridge_obj(w: f32[D], c: f32[N], log_lam: f32[D], x: f32[N, D], y: f32[N]) -> f32 {
  return ridge_objective(w, c, log_lam, x, y)
}
fn f_logistic(log_lam: f32[D], x: f32[N, D], t: f32[N]) -> Linear { return logistic_fit(log_lam, x, t) }
fn f_logistic_shared(log_lam: f32, x: f32[N, D], t: f32[N]) -> Linear { return logistic_fit_shared(log_lam, x, t) }
fn f_wlogistic(c: f32[N], log_lam: f32, x: f32[N, D], t: f32[N]) -> Linear {
  return weighted_logistic_fit(c, log_lam, x, t)
}
fn f_logistic_full(c: f32[N], log_lam: f32[D], x: f32[N, D], t: f32[N]) -> Linear {
  return logistic_fit_full(c, log_lam, x, t)
}
fn f_logistic_obj(p: Linear, c: f32[N], log_lam: f32[D], x: f32[N, D], t: f32[N]) -> f32 {
  return logistic_objective(p, c, log_lam, x, t)
}
fn f_logistic_val(log_lam: f32[D], x: f32[N, D], t: f32[N], xv: f32[M, D], tv: f32[M]) -> f32 {
  return logistic_loss(logistic_fit(log_lam, x, t), xv, tv)
}
fn f_wlogistic_val(l: f32[N], log_lam: f32, x: f32[N, D], t: f32[N], xv: f32[M, D], tv: f32[M]) -> f32 {
  return logistic_loss(weighted_logistic_fit(softmax_weights(l), log_lam, x, t), xv, tv)
}
fn f_slogistic_val(l: f32[N], log_lam: f32, x: f32[N, D], t: f32[N], xv: f32[M, D], tv: f32[M]) -> f32 {
  return logistic_loss(weighted_logistic_fit(sigmoid(l), log_lam, x, t), xv, tv)
}
fn f_accuracy(p: Linear, x: f32[M, D], t: f32[M]) -> f32 { return binary_accuracy(p, x, t) }
fn f_logits(p: Linear, x: f32[M, D]) -> f32[M] { return linear_logits(p, x) }
fn f_top(x: f32[N, D], c: f32[N]) -> f32 { return top_eigenvalue(x, c) }
fn f_top_affine(x: f32[N, D], c: f32[N], e: f32) -> f32 { return top_eigenvalue_affine(x, c, e) }

export ridge = f_ridge
export ridge_shared = f_ridge_shared
export ridge_full = f_ridge_full
export ridge_closed_form = f_ridge_cf
export ridge_val = f_ridge_val
export ridge_hypergrad = value_and_grad(f_ridge_val, wrt=[log_lam])
export ridge_shared_hypergrad = value_and_grad(f_ridge_shared_val, wrt=[log_lam])
export wridge_hypergrad = value_and_grad(f_wridge_val, wrt=[l])
export ridge_obj_grad = grad(f_ridge_obj, wrt=[w])
export logistic = f_logistic
export logistic_shared = f_logistic_shared
export wlogistic = f_wlogistic
export logistic_full = f_logistic_full
export logistic_obj_grad = grad(f_logistic_obj, wrt=[p])
export logistic_val = f_logistic_val
export logistic_hypergrad = grad(f_logistic_val, wrt=[log_lam])
export wlogistic_val = f_wlogistic_val
export wlogistic_hypergrad = grad(f_wlogistic_val, wrt=[l])
export slogistic_val = f_slogistic_val
export slogistic_hypergrad = grad(f_slogistic_val, wrt=[l])
export accuracy = f_accuracy
export logits = f_logits
export top_eigenvalue = f_top
export top_eigenvalue_affine = f_top_affine
"""


@pytest.fixture(scope="module")
def bl():
    return gradlang.compile_source(SOURCE, name="bilevel_test.grad", strict=True)


def _regression(n=80, m=60, d=12, seed=0, scales=None):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=d) * (rng.random(d) < 0.5)
    x, xv = rng.normal(size=(n, d)), rng.normal(size=(m, d))
    y, yv = x @ w + 0.5 * rng.normal(size=n), xv @ w + 0.5 * rng.normal(size=m)
    if scales is not None:
        x, xv = x * scales, xv * scales
    return [a.astype(np.float32) for a in (x, y, xv, yv)]


def _classification(n=120, m=80, d=8, seed=1):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=d)
    x, xv = rng.normal(size=(n, d)), rng.normal(size=(m, d))
    t = (x @ w + 0.3 + rng.normal(size=n) > 0).astype(np.float32)
    tv = (xv @ w + 0.3 + rng.normal(size=m) > 0).astype(np.float32)
    return x.astype(np.float32), t, xv.astype(np.float32), tv


def _ridge_val_closed_form(log_lam, x, y, xv, yv, c=None):
    n, d = x.shape
    c = jnp.ones(n) if c is None else c
    a = (x.T * c) @ x / n + jnp.diag(jnp.exp(log_lam) * jnp.ones(d))
    w = jnp.linalg.solve(a, (x.T * c) @ y / n)
    return jnp.mean((xv @ w - yv) ** 2)


def _rounding(hessian: np.ndarray, n: int) -> float:
    """A fit's relative float32 error in eps32: the solver stalls where the gradient's rounding,
    (n + d + 4) eps32 of its terms (n-term products), balances the curvature: (n + d + 4) times
    the condition number of the Jacobi-rescaled Hessian (the one the solver runs on); plus the
    update's rounding over the ~40 steps the iteration remembers (it contracts by 0.975 a step)
    and the convergence error 0.975^500 = 3e-6 = 25 eps32 (stdlib/bilevel.grad)."""
    d = np.sqrt(np.diag(hessian))
    return (n + len(d) + 4) * np.linalg.cond(hessian / d[:, None] / d[None]) + 40 + 25


def _ridge_rounding(x, log_lam, c=None) -> float:
    x = np.asarray(x, np.float64)
    c = np.ones(len(x)) if c is None else np.asarray(c, np.float64)
    lam = np.exp(np.asarray(log_lam, np.float64)) * np.ones(x.shape[1])
    return _rounding((x.T * c) @ x / len(x) + np.diag(lam), len(x))


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def _logistic64(c, log_lam, x, t) -> tuple[np.ndarray, np.ndarray]:
    """The weighted logistic fit [w, b] in float64 by Newton's method (to machine precision),
    and the Hessian of its objective there."""
    x = np.c_[np.asarray(x, np.float64), np.ones(len(x))]
    c = np.asarray(c, np.float64)
    pen = np.r_[np.exp(np.asarray(log_lam, np.float64)) * np.ones(x.shape[1] - 1), 0.0]
    q = np.zeros(x.shape[1])
    for _ in range(40):
        s = _sigmoid(x @ q)
        h = (x.T * (c * s * (1 - s))) @ x / len(x) + np.diag(pen)
        q = q - np.linalg.solve(h, x.T @ (c * (s - t)) / len(x) + pen * q)
    return q, h


def _logistic_val64(c, log_lam, x, t, xv, tv) -> float:
    q, _ = _logistic64(c, log_lam, x, t)
    z = np.asarray(xv, np.float64) @ q[:-1] + q[-1]
    return float(np.mean(np.logaddexp(0, z) - tv * z))


def _central64(f, theta, h: float = 1e-2) -> np.ndarray:
    """Central differences of a float64 function in every coordinate: on these validation
    losses |f^(3)| <= 0.01 (measured at h = 0.05), so the truncation h^2 |f^(3)| / 6 <= 2e-7."""
    theta = np.asarray(theta, np.float64)
    return np.array([(f(theta + h * e) - f(theta - h * e)) / (2 * h) for e in np.eye(len(theta))])


FD_TRUNCATION = 2e-7


def _relerr(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_std_bilevel_compiles_strictly_and_every_function_is_wrapped(bl):
    functions = set(re.findall(r"^fn (\w+)\(", BILEVEL.read_text(), re.M))
    called = set(re.findall(r"(\w+)\(", SOURCE))
    assert len(functions) >= 18
    assert functions <= called, functions - called  # every library function is exercised
    assert len(bl.exports) == len(re.findall(r"^export ", SOURCE, re.M))


# ---- ridge


def test_ridge_fits_equal_the_closed_form(bl):
    x, y, _, _ = _regression()
    log_lam = np.linspace(-4, 2, x.shape[1]).astype(np.float32)
    ops = _ridge_rounding(x, log_lam)
    # the float32 closed form sums the same n-term products and solves (its error: the same order)
    assert_close(bl.ridge(log_lam, x, y), bl.ridge_closed_form(log_lam, x, y), ops=2 * ops)
    want = np.linalg.solve(x.T.astype(np.float64) @ x / len(x) + np.diag(np.exp(log_lam)),
                           x.T.astype(np.float64) @ y / len(x))
    assert _relerr(bl.ridge(log_lam, x, y), want) < ops * EPS32
    shared = bl.ridge_shared(np.float32(-1.5), x, y)
    assert _relerr(shared, bl.ridge_closed_form(np.full(x.shape[1], -1.5, np.float32), x, y)) < (
        2 * _ridge_rounding(x, -1.5) * EPS32)
    # The fit is a stationary point of the library's objective: its gradient cancels terms of
    # the size of the gradient at 0, x^T y / n, to the fit's relative error.
    g = bl.ridge_obj_grad(bl.ridge(log_lam, x, y), np.ones(len(x), np.float32), log_lam, x, y)["w"]
    assert_close(g, np.zeros_like(g), ops=ops, scale=np.abs(x.T @ y).max() / len(x))


def test_ridge_hypergradient_matches_the_closed_form_per_feature(bl):
    x, y, xv, yv = _regression()
    log_lam = np.linspace(-4, 2, x.shape[1]).astype(np.float32)
    value, grads = bl.ridge_hypergrad(log_lam, x, y, xv, yv)
    want_value, want = jax.value_and_grad(_ridge_val_closed_form)(jnp.asarray(log_lam), x, y, xv, yv)
    # the fit, the adjoint (CG on the same Hessian) and the float32 closed-form reference
    ops = 3 * _ridge_rounding(x, log_lam)
    assert_close(value, want_value, ops=ops)
    assert _relerr(grads["log_lam"], want) < ops * EPS32


def test_shared_and_weighted_ridge_hypergradients_match_the_closed_form(bl):
    x, y, xv, yv = _regression(seed=3)
    _, g = bl.ridge_shared_hypergrad(np.float32(-2.0), x, y, xv, yv)
    want = jax.grad(_ridge_val_closed_form)(jnp.float32(-2.0), x, y, xv, yv)
    assert _relerr(g["log_lam"], want) < 3 * _ridge_rounding(x, -2.0) * EPS32  # as above
    l = np.random.default_rng(4).normal(size=len(x)).astype(np.float32)

    def weighted(l):
        return _ridge_val_closed_form(jnp.float32(-2.0), x, y, xv, yv, c=len(l) * jax.nn.softmax(l))

    _, g = bl.wridge_hypergrad(l, np.float32(-2.0), x, y, xv, yv)
    c = len(l) * np.exp(l) / np.exp(l).sum()
    assert _relerr(g["l"], jax.grad(weighted)(jnp.asarray(l))) < 3 * _ridge_rounding(x, -2.0, c) * EPS32


def test_ridge_is_accurate_with_badly_scaled_features_and_extreme_penalties(bl):
    """Feature scales from 1e-2 to 1e2 and penalties from e^-8 to e^12: the Jacobi rescaling
    and the curvature normalization keep the momentum solver and CG accurate."""
    d = 12
    scales = np.logspace(-2, 2, d)
    x, y, xv, yv = _regression(d=d, seed=5, scales=scales)
    log_lam = np.linspace(-8, 12, d).astype(np.float32)[np.random.default_rng(6).permutation(d)]
    _, grads = bl.ridge_hypergrad(log_lam, x, y, xv, yv)
    want = jax.grad(_ridge_val_closed_form)(jnp.asarray(log_lam), x, y, xv, yv)
    ops = _ridge_rounding(x, log_lam)  # the Jacobi-rescaled condition number is 2.8
    assert _relerr(grads["log_lam"], want) < 3 * ops * EPS32
    x64 = x.astype(np.float64)
    w = np.linalg.solve(x64.T @ x64 / len(x) + np.diag(np.exp(log_lam.astype(np.float64))),
                        x64.T @ y / len(x))
    assert _relerr(bl.ridge(log_lam, x, y), w) < ops * EPS32


def test_curvature_bounds_match_numpy(bl):
    x, _, _, _ = _regression(seed=7)
    c = np.random.default_rng(7).random(len(x)).astype(np.float32)
    xa = np.concatenate([x, np.full((len(x), 1), 0.5)], axis=1)
    for got, z in ((bl.top_eigenvalue(x, c), x), (bl.top_eigenvalue_affine(x, c, np.float32(0.5)), xa)):
        lam, v = np.linalg.eigh((z.T.astype(np.float64) * c) @ z / len(x))
        # |A u| after 20 power steps from u0 = ones falls short of lam_1 by at most
        # 1/2 (lam_2 / lam_1)^40 (1 - c1^2) / c1^2 relative, c1 = u0 . v_1 / |u0|
        c1 = v[:, -1].sum() / np.sqrt(len(v))
        assert_close(got, lam[-1], ops=1, scale=lam[-1] * (0.5 * (lam[-2] / lam[-1]) ** 40
                                                            * (1 - c1 ** 2) / c1 ** 2) / EPS32)


# ---- logistic regression


def test_logistic_fit_is_stationary_and_shared_equals_per_feature(bl):
    x, t, _, _ = _classification()
    log_lam = np.linspace(-5, 0, x.shape[1]).astype(np.float32)
    ones = np.ones(len(x), np.float32)
    p = bl.logistic(log_lam, x, t)
    g = bl.logistic_obj_grad(p, ones, log_lam, x, t)["p"]
    # its gradient cancels terms of the size of the gradient at 0, x^T (1/2 - t) / n, to the
    # fit's relative error
    ops = _rounding(_logistic64(ones, log_lam, x, t)[1], len(x))
    scale = np.abs(np.c_[x, ones].T @ (0.5 - t)).max() / len(x)
    assert_close(g, jax.tree.map(np.zeros_like, g), ops=ops, scale=scale)
    # Weights 1 are the unweighted fit; weights of 2 equal halving the penalty: each pair is
    # two float32 solves of one problem
    ops = 2 * _rounding(_logistic64(ones, -2.0, x, t)[1], len(x))
    shared = bl.logistic_shared(np.float32(-2.0), x, t)
    assert_close(shared, bl.logistic(np.full(x.shape[1], -2.0, np.float32), x, t), ops=ops)
    assert_close(bl.wlogistic(ones, np.float32(-2.0), x, t), shared, ops=ops)
    twos = bl.wlogistic(np.full(len(x), 2.0, np.float32), np.float32(-2.0), x, t)
    assert_close(twos, bl.logistic_shared(np.float32(-2.0 - np.log(2.0)), x, t), ops=ops)
    # a mean of n zeros and ones: an exact count, rounded once by the division
    want = np.mean((bl.logits(p, x) > 0) == (t > 0.5))
    assert_close(bl.accuracy(p, x, t), want, ops=1)


def test_logistic_hypergradient_matches_finite_differences(bl):
    x, t, xv, tv = _classification()
    log_lam = np.linspace(-5, 0, x.shape[1]).astype(np.float32)
    ones = np.ones(len(x))
    # the fit's error, the adjoint solve's (the same Hessian) and the validation loss's
    ops = 3 * _rounding(_logistic64(ones, log_lam, x, t)[1], len(x))
    assert_close(bl.logistic_val(log_lam, x, t, xv, tv), _logistic_val64(ones, log_lam, x, t, xv, tv), ops=ops)
    fd = _central64(lambda th: _logistic_val64(ones, th, x, t, xv, tv), log_lam)
    g = bl.logistic_hypergrad(log_lam, x, t, xv, tv)["log_lam"]
    np.testing.assert_allclose(g, fd, rtol=0, atol=ops * EPS32 * np.abs(fd).max() + FD_TRUNCATION)


@pytest.mark.parametrize("weights", ["softmax", "sigmoid"])
def test_weighted_logistic_hypergradient_matches_finite_differences(bl, weights):
    x, t, xv, tv = _classification(seed=2)
    l = (0.5 * np.random.default_rng(3).normal(size=len(x))).astype(np.float32)
    grad_fn, val_fn = ((bl.wlogistic_hypergrad, bl.wlogistic_val) if weights == "softmax"
                       else (bl.slogistic_hypergrad, bl.slogistic_val))

    def c(l):
        return len(l) * np.exp(l - l.max()) / np.exp(l - l.max()).sum() if weights == "softmax" else _sigmoid(l)

    log_lam = np.float32(-3.0)
    ops = 3 * _rounding(_logistic64(c(l), log_lam, x, t)[1], len(x))  # as above
    assert_close(val_fn(l, log_lam, x, t, xv, tv), _logistic_val64(c(l), log_lam, x, t, xv, tv), ops=ops)
    fd = _central64(lambda l: _logistic_val64(c(l), log_lam, x, t, xv, tv), l)
    g = grad_fn(l, log_lam, x, t, xv, tv)["l"]
    np.testing.assert_allclose(g, fd, rtol=0, atol=ops * EPS32 * np.abs(fd).max() + FD_TRUNCATION)


# ---- the examples


KEYS = {
    "hyper_ridge": {"shared_penalty", "initial", "per_feature", "oracle_test_mse", "learned_log_lam",
                    "hypergradient_relative_error_vs_closed_form", "steps", "plot"},
    "reweight": {"unweighted", "reweighted", "validation_only", "oracle_clean_only", "separation",
                 "test_accuracy_unweighted", "test_accuracy_reweighted", "steps", "plot"},
}


def _run(name, args, run_example) -> dict:
    summary, written = run_example(name, args, KEYS[name])
    return summary


@pytest.mark.slow  # the default suite's time (12 min on 2 cores); run with -m slow
def test_hyper_ridge_runs_with_a_few_steps(run_example):
    s = _run("hyper_ridge", ["--steps", "40", "--d", "20", "--informative", "4", "--n-test", "500",
                             "--grid", "11"], run_example)
    # _rounding's bound for n = 80, d = 20: the condition number of features correlated by
    # 0.5^|i-j| is at most ((1 + 0.5) / (1 - 0.5))^2 = 9, a sample covariance's about
    # ((1 + sqrt(d / n)) / (1 - sqrt(d / n)))^2 = 9 times that (penalties only lower it)
    bound = 3 * (80 + 20 + 4) * 81 * EPS32
    assert s["hypergradient_relative_error_vs_closed_form"] < bound
    assert s["per_feature"]["solver_relative_error"] < bound
    # The learned penalties beat the initial ones on the validation loss, and noise features
    # end up with larger penalties than informative ones.
    assert s["per_feature"]["val_mse"] < 0.7 * s["initial"]["val_mse"]
    assert s["median_log_lam_noise"] > s["median_log_lam_informative"]


@pytest.mark.slow  # the default suite's time (12 min on 2 cores); run with -m slow
def test_reweight_runs_with_a_few_steps(run_example):
    s = _run("reweight", ["--steps", "15", "--n-train", "300", "--n-val", "60"], run_example)
    sep = s["separation"]
    # The learned weights put less weight on the flipped examples than on the clean ones.
    assert sep["mean_weight_flipped"] < sep["mean_weight_clean"]
    assert sep["auc_clean_vs_flipped"] > 0.7
    assert s["reweighted"]["val_loss"] < s["unweighted"]["val_loss"]


@pytest.mark.slow
def test_hyper_ridge_with_default_settings(run_example):
    s = _run("hyper_ridge", [], run_example)
    # Measured (seed 0): test MSE shared penalty 2.184, per-feature 1.390, oracle 1.123.
    assert s["per_feature"]["test_mse"] < s["shared_penalty"]["test_mse"] - 0.4
    assert s["per_feature"]["val_mse"] < s["shared_penalty"]["val_mse"]


@pytest.mark.slow
def test_reweight_with_default_settings(run_example):
    s = _run("reweight", [], run_example)
    # Measured (seed 0): test accuracy unweighted 0.753, reweighted 0.855; AUC 0.816.
    assert s["test_accuracy_reweighted"] > s["test_accuracy_unweighted"] + 0.05
    assert s["separation"]["auc_clean_vs_flipped"] > 0.75
    assert s["separation"]["mean_weight_flipped"] < 0.5 * s["separation"]["mean_weight_clean"]
