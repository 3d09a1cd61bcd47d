"""Exports composed with JAX's transformations: `jax.jit`, `jax.vmap`, `jax.grad` (of the sum of
an export's float outputs), `jax.jvp`, `jax.hessian` and `jax.lax.scan`, for each kind of export:
a plain `fn` export, `grad`, `value_and_grad`, `descend`, an `expect` (reparameterized and
score-function), a black-box `by=es`, a `by=dp`, an `argmin` with `implicit`, an `argmin`
nested in another (implicit in implicit) and a stateful export (a `baseline=ma` average).

Deterministic kinds are checked against closed forms (float64 NumPy). The kinds that draw take
one fixed key, so each call is a deterministic function of the parameters: their derivatives
are checked against closed forms where the draws drop out (a reparameterized quadratic's
Hessian, DP-SGD's unclipped Jacobian, an antithetic ES estimate of a quadratic's gradient,
linear in the parameters), else forward mode against reverse mode on the same draws, and their
means over many keys against the closed-form expectation (5 standard errors).

A hypergradient method without forward mode (`value_function`) makes `jax.jvp` raise
`gradlang.ForwardModeError`, which names the problem and the methods to write instead.

Transformations are wrapped in `jax.jit`, as a training loop would: eagerly, JAX runs the
derivative of a jitted export as several jitted pieces (the nested problem's Hessian takes
8 s eagerly, 4 s jitted, mostly tracing).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradlang
from stats import assert_close, assert_unbiased

SOURCE = """
fn quad(w: f32[3], a: f32[3]) -> f32 { return 0.5 * sum(a * w * w) + sum(sin(w)) }
export plain = quad
export g = grad(quad, wrt=[w])
export vg = value_and_grad(quad, wrt=[w])
export step = descend(quad, wrt=[w], lr=0.1)

fn noisy(w: f32[3], a: f32[3]) -> f32 {
  eps ~ Normal(zeros([3]), 1.0)
  return 0.5 * sum(a * (w + eps) * (w + eps))
}
export reparam = expect(noisy, samples=4)

fn coin(w: f32[3], a: f32[3]) -> f32 {
  z ~ Bernoulli(logits=w)
  return sum(a * z)
}
export score = expect(coin, samples=4)

fn bowl(w: f32[3], a: f32[3]) -> f32 { return 0.5 * sum(a * w * w) }
export es = grad(bowl, wrt=[w], by=es(sigma=0.1, pop=8))

fn lsq(w: f32[3], x: f32[B, 3], y: f32[B]) -> f32 { return 0.5 * mean((x @ w - y) ^ 2) }
export dp = grad(lsq, wrt=[w], by=dp(clip=10.0, noise=0.5))

fn ridge(theta: f32[3], a: f32[N, 3], b: f32[N], c: f32[3]) -> f32 {
  let x = argmin v: f32[3] = zeros([3]) {
            0.5 * sum((a @ v - b) ^ 2) + 0.5 * sum(theta * v * v)
          } via gd(steps=80, lr=0.4) with implicit(cg, iters=3)
  return 0.5 * sum((x - c) ^ 2)
}
export ridge = ridge
export ridge_grad = grad(ridge, wrt=[theta])

fn nest(w: f32[3], a: f32[3], c: f32[3]) -> f32 {
  let u = argmin m: f32[3] = zeros([3]) {
            let x = argmin v: f32[3] = zeros([3]) { 0.5 * sum((v - m) ^ 2) + 0.5 * sum(c * v * v) }
                      via gd(steps=40, lr=0.5) with implicit
            0.5 * sum((m - w) ^ 2) + 0.5 * sum(a * x * x)
          } via gd(steps=40, lr=0.6) with implicit
  return sum(u * u)
}
export nested = nest

fn scored(w: f32[3], a: f32[3]) -> f32 {
  z ~ Bernoulli(logits=w) with score(baseline=ma)
  return sum(a * z)
}
export ma = grad(expect(scored, samples=4), wrt=[w])
"""

W = np.array([0.3, -0.2, 0.5], np.float32)
T = np.array([1.0, -0.5, 2.0], np.float32)
"""The point and the tangent of every check (the ridge's theta is THETA)."""
A = np.array([1.0, 2.0, 3.0], np.float32)
KEY = jax.random.key(0)

_rng = np.random.default_rng(1)
X = (0.3 * _rng.normal(size=(4, 3))).astype(np.float32)
Y = (0.3 * _rng.normal(size=4)).astype(np.float32)
"""dp's data: per-example gradients x_i (x_i . w - y_i) of norm below 0.5, far from the clip
(10) at every point checked, so the clipping is the identity there."""
_q = np.linalg.qr(_rng.normal(size=(5, 3)))[0]
RIDGE_A = ((_q * np.array([1.0, 1.2, 1.4])) @ np.linalg.qr(_rng.normal(size=(3, 3)))[0]
           ).astype(np.float32)
RIDGE_B = _rng.normal(size=5).astype(np.float32)
RIDGE_C = np.array([0.5, -1.0, 0.25], np.float32)
THETA = np.array([0.5, 0.75, 1.0], np.float32)
"""The ridge's Hessian in v, A^T A + diag(theta), has eigenvalues 1.70-2.70 at THETA (at most
3.9 at 2 THETA, vmap's second point): gd(lr=0.4) contracts by 0.32 a step at THETA, so 80
steps solve it to float32's rounding."""
NEST_C = np.array([0.5, 1.0, 1.5], np.float32)
"""The nested problem's inner Hessian 1 + c is 1.5-2.5 (gd(lr=0.5) contracts by 0.25 a step)
and its outer one 1 + a / (1 + c)^2 is 1.44-1.5 (gd(lr=0.6) contracts by 0.14)."""


@pytest.fixture(scope="module")
def m():
    return gradlang.compile_source(SOURCE, "composability.grad")


def total(out) -> jax.Array:
    """The scalar that jax.grad and jax.hessian differentiate: the sum of an export's float
    outputs."""
    return sum(jnp.sum(x) for x in jax.tree.leaves(out) if jnp.issubdtype(x.dtype, jnp.floating))


# ---- closed forms, float64


def _f64(*xs):
    return [np.asarray(x, np.float64) for x in xs]


def ridge_closed_form(theta):
    """x = K^-1 A^T b, K = A^T A + diag(theta), and L = |x - c|^2 / 2: its value, gradient
    J^T (x - c) with J = dx/dtheta = -K^-1 diag(x), and Hessian J^T J + diag(x) K^-1 diag(s) +
    diag(s) K^-1 diag(x) with s = K^-1 (x - c) (from dK^-1/dtheta_k = -K^-1 e_k e_k^T K^-1)."""
    a, b, c, theta = _f64(RIDGE_A, RIDGE_B, RIDGE_C, theta)
    kinv = np.linalg.inv(a.T @ a + np.diag(theta))
    x = kinv @ a.T @ b
    r = x - c
    jac = -kinv * x
    s = kinv @ r
    hess = jac.T @ jac + np.diag(x) @ kinv @ np.diag(s) + np.diag(s) @ kinv @ np.diag(x)
    return 0.5 * r @ r, jac.T @ r, hess


def nested_gain():
    """The nested problem: x*(m) = m / (1 + c), so u*(w) = k w with k = 1 / (1 + a / (1 + c)^2)
    and the export is sum(k^2 w^2)."""
    a, c = _f64(A, NEST_C)
    return 1 / (1 + a / (1 + c) ** 2)


def sigmoid(x):
    return 1 / (1 + np.exp(-np.asarray(x, np.float64)))


# ---- the kinds


@dataclass(frozen=True)
class Kind:
    """An export as a function of w and a key (its other arguments fixed; the key is used by
    the kinds that draw, KEY in all checks but the scan, which takes a fresh key a step) and
    what is known of it in closed form at a point (None: not closed, checked otherwise), each
    for `total` of the output but `value` and `jvp` (the output's tree). The checks run at `at`
    (W, or THETA for the ridge)."""

    call: Callable
    value: Callable | None = None
    jvp: Callable | None = None
    grad: Callable | None = None
    hessian: Callable | None = None
    ops: float = 16
    """The float32 roundings of a result, relative to its largest entry: a handful per
    arithmetic step on the longest chain (4 per sin / cos, XLA's approximations), with sums of
    3 terms and a reduction in `total`; the argmin kinds say their own."""
    scale: float = 1e-3
    """The least scale of the rounding (for results that are 0 in closed form)."""
    at: np.ndarray = field(default_factory=lambda: W)
    advance: Callable | None = None
    """One step of the scan, (m, carry, key) -> carry; by default w -> w - 0.1 * the
    reverse-mode gradient of `total` of the output."""
    start: Callable | None = None
    """The scan's first carry (w by default)."""
    stepped: Callable | None = None
    """`advance` in closed form, w -> w (by default from `grad` when it is given)."""

    def reference_step(self) -> Callable | None:
        if self.stepped is not None or self.advance is not None:
            return self.stepped
        return None if self.grad is None else (lambda w: w - 0.1 * self.grad(w))


def _quad(w):
    w, a = _f64(w, A)
    return 0.5 * np.sum(a * w * w) + np.sum(np.sin(w)), a * w + np.cos(w), a - np.sin(w)


BASELINE = np.array([0.5, 1.0, 1.5], np.float32)
"""The `ma` export's moving average (about E[a z] = a sigmoid(w))."""


def _descend_ma(m, w, baseline, key):
    grads, baseline = m.ma(w, A, baseline, key)
    return w - 0.1 * grads["w"], baseline


def _lsq_hessian():
    x, = _f64(X)
    return x.T @ x / len(x)


KINDS = {
    "plain": Kind(
        lambda m, w, key: m.plain(w, A),
        value=lambda w: _quad(w)[0],
        jvp=lambda w, t: _quad(w)[1] @ t,
        grad=lambda w: _quad(w)[1],
        hessian=lambda w: np.diag(_quad(w)[2])),
    "grad": Kind(
        lambda m, w, key: m.g(w, A),
        value=lambda w: {"w": _quad(w)[1]},
        jvp=lambda w, t: {"w": _quad(w)[2] * t},
        grad=lambda w: _quad(w)[2],
        hessian=lambda w: np.diag(-np.cos(w.astype(np.float64)))),
    "value_and_grad": Kind(
        lambda m, w, key: m.vg(w, A),
        value=lambda w: (_quad(w)[0], {"w": _quad(w)[1]}),
        jvp=lambda w, t: (_quad(w)[1] @ t, {"w": _quad(w)[2] * t}),
        grad=lambda w: _quad(w)[1] + _quad(w)[2],
        hessian=lambda w: np.diag(_quad(w)[2] - np.cos(w.astype(np.float64)))),
    "descend": Kind(
        lambda m, w, key: m.step(w, A),
        value=lambda w: {"w": w - 0.1 * _quad(w)[1]},
        jvp=lambda w, t: {"w": t - 0.1 * _quad(w)[2] * t},
        grad=lambda w: 1 - 0.1 * _quad(w)[2],
        hessian=lambda w: np.diag(0.1 * np.cos(w.astype(np.float64))),
        advance=lambda m, w, key: m.step(w, A)["w"],
        stepped=lambda w: w - 0.1 * _quad(w)[1]),
    # E[grad] = a w; the Hessian a (diagonal) whatever the draws
    "expect_reparam": Kind(
        lambda m, w, key: m.reparam(w, A, key),
        hessian=lambda w: np.diag(A.astype(np.float64))),
    "expect_score": Kind(lambda m, w, key: m.score(w, A, key)),
    # a quadratic's antithetic ES estimate is linear in w (below), so its Hessian is 0 up to the
    # rounding of the differences f(w + sigma z) - f(w - sigma z) divided by 2 sigma: of values
    # of the size of a z z^T (3 |z|^2) times 1 / sigma = 10 (hence the scale)
    "es": Kind(lambda m, w, key: m.es(w, A, key), hessian=lambda w: np.zeros((3, 3)),
               scale=30.0),
    # unclipped, dp's gradient is (X^T X w - X^T y + noise) / n: its Jacobian X^T X / n
    "dp": Kind(
        lambda m, w, key: m.dp(w, X, Y, key),
        jvp=lambda w, t: {"w": _lsq_hessian() @ t},
        grad=lambda w: _lsq_hessian().sum(0),
        hessian=lambda w: np.zeros((3, 3))),
    # one gd solve's rounding (~70 roundings of values of scale 1, contracted by 0.32 a step:
    # ~100) for the solution and each linear solve, amplified by cond(K) = 1.6: 4 * 100 * 1.6
    "argmin": Kind(
        lambda m, w, key: m.ridge(w, RIDGE_A, RIDGE_B, RIDGE_C),
        value=lambda w: ridge_closed_form(w)[0],
        jvp=lambda w, t: ridge_closed_form(w)[1] @ t,
        grad=lambda w: ridge_closed_form(w)[1],
        hessian=lambda w: ridge_closed_form(w)[2],
        ops=640, at=THETA),
    "argmin_grad": Kind(
        lambda m, w, key: m.ridge_grad(w, RIDGE_A, RIDGE_B, RIDGE_C),
        value=lambda w: {"theta": ridge_closed_form(w)[1]},
        jvp=lambda w, t: {"theta": ridge_closed_form(w)[2] @ t},
        grad=lambda w: ridge_closed_form(w)[2].sum(0),
        ops=640, at=THETA),
    # two nested solves, each contracting by 0.25 and 0.14 a step: a few dozen roundings each,
    # times the linear solves': 4 * 50
    "nested_argmin": Kind(
        lambda m, w, key: m.nested(w, A, NEST_C),
        value=lambda w: np.sum(nested_gain() ** 2 * np.asarray(w, np.float64) ** 2),
        jvp=lambda w, t: np.sum(2 * nested_gain() ** 2 * w * t),
        grad=lambda w: 2 * nested_gain() ** 2 * w,
        hessian=lambda w: np.diag(2 * nested_gain() ** 2),
        ops=200),
    # the baseline is state: the export returns its update after the gradient estimate; the
    # scan threads it, as a training loop does
    "stateful": Kind(
        lambda m, w, key: m.ma(w, A, BASELINE, key),
        advance=lambda m, carry, key: _descend_ma(m, *carry, key),
        start=lambda: (W, BASELINE)),
}

def scale_of(expected) -> float:
    return max(float(np.max(np.abs(x), initial=0.0)) for x in jax.tree.leaves(expected))


def close(actual, expected, kind: Kind, where: str) -> None:
    """Each leaf within kind.ops roundings of the largest expected entry (entries that cancel
    to 0, such as an off-diagonal Hessian entry, carry the rounding of the terms they came
    from)."""
    expected = jax.tree.map(lambda x: np.asarray(x, np.float64), expected)
    assert_close(actual, expected, ops=kind.ops, scale=max(scale_of(expected), kind.scale),
                 where=where)


def reference(m, kind: Kind, w):
    """The export's output at w in closed form, else its eager call (KEY)."""
    return kind.call(m, w, KEY) if kind.value is None else kind.value(w)


@pytest.mark.parametrize("name", KINDS)
def test_jit(m, name):
    kind = KINDS[name]
    got = jax.jit(lambda w: kind.call(m, w, KEY))(kind.at)
    close(got, reference(m, kind, kind.at), kind, f"{name}: jit")


@pytest.mark.parametrize("name", KINDS)
def test_vmap(m, name):
    kind = KINDS[name]
    points = np.stack([kind.at, 2 * kind.at])
    got = jax.vmap(lambda w: kind.call(m, w, KEY))(points)
    want = jax.tree.map(lambda *xs: np.stack(xs), *(reference(m, kind, p) for p in points))
    close(got, want, kind, f"{name}: vmap against each point")


@pytest.mark.parametrize("name", KINDS)
def test_grad(m, name):
    kind = KINDS[name]
    got = jax.jit(jax.grad(lambda w: total(kind.call(m, w, KEY))))(kind.at)
    if kind.grad is not None:
        close(got, kind.grad(kind.at), kind, f"{name}: grad")
    else:
        # forward mode on the same draws: the same function differentiated the other way
        forward = jax.jit(jax.jacfwd(lambda w: total(kind.call(m, w, KEY))))(kind.at)
        close(got, forward, kind, f"{name}: grad against jacfwd")


@pytest.mark.parametrize("name", KINDS)
def test_jvp(m, name):
    kind = KINDS[name]
    value, tangent = jax.jit(lambda w, t: jax.jvp(lambda v: kind.call(m, v, KEY), (w,), (t,)))(
        kind.at, T)
    close(value, kind.call(m, kind.at, KEY), kind, f"{name}: jvp's value")
    if kind.jvp is not None:
        close(tangent, kind.jvp(kind.at, T), kind, f"{name}: jvp")
    else:
        # reverse mode on the same draws: the Jacobian's rows against the tangent
        jac = jax.jit(jax.jacrev(lambda w: kind.call(m, w, KEY)))(kind.at)
        close(tangent, jax.tree.map(lambda j: np.asarray(j) @ T, jac), kind, f"{name}: jvp")


@pytest.mark.parametrize("name", [pytest.param(k, marks=pytest.mark.slow) if k == "nested_argmin"
                                  else k for k in KINDS if k != "argmin_grad"])
def test_hessian(m, name):  # the nested problem's Hessian is slow (~20 s); its jvp and grad run
    """(argmin_grad's would be a third derivative with no closed form written here: the
    grad, value_and_grad and descend kinds check third derivatives.)"""
    kind = KINDS[name]
    got = jax.jit(jax.hessian(lambda w: total(kind.call(m, w, KEY))))(kind.at)
    if kind.hessian is not None:
        close(got, kind.hessian(kind.at), kind, f"{name}: hessian")
    else:
        # reverse over reverse, the same draws
        twice = jax.jit(jax.jacrev(jax.jacrev(lambda w: total(kind.call(m, w, KEY)))))(kind.at)
        close(got, twice, kind, f"{name}: hessian against jacrev(jacrev)")


@pytest.mark.parametrize("name", KINDS)
def test_scan(m, name):
    """Three descent steps in a lax.scan, a fresh key each, against the same steps in closed
    form or, for the kinds that draw, in Python."""
    kind = KINDS[name]

    def advance(w, key):
        if kind.advance is not None:
            return kind.advance(m, w, key)
        return w - 0.1 * jax.grad(lambda v: total(kind.call(m, v, key)))(w)

    keys = jax.random.split(jax.random.key(1), 3)
    start = kind.at if kind.start is None else kind.start()
    got, _ = jax.jit(lambda c: jax.lax.scan(lambda c, k: (advance(c, k), None), c, keys))(start)
    want, stepped = start, kind.reference_step()
    for k in keys:
        want = jax.jit(advance)(want, k) if stepped is None else stepped(want)
    close(got, want, kind, f"{name}: scan against a loop")


def test_an_antithetic_es_estimate_of_a_quadratic_is_linear_in_w(m):
    """For f = sum(a w^2) / 2, (f(w + s z) - f(w - s z)) / (2 s) = (a w) . z exactly, so the
    estimate is M diag(a) w with M = the mean of z z^T over the population: w's Jacobian
    times w, with M symmetric. Rounding: the differences of values of scale 1, divided by
    2 sigma = 0.2, a few each (the 30 of the Kind's scale)."""
    kind = KINDS["es"]
    jac = np.asarray(jax.jit(jax.jacfwd(lambda w: m.es(w, A, KEY)["w"]))(W), np.float64)
    assert_close(m.es(W, A, KEY)["w"], jac @ W, ops=16, scale=kind.scale)
    moment = jac / A
    assert_close(moment, moment.T, ops=16, scale=kind.scale)


def _sigmoid_derivatives(w):
    s = sigmoid(w)
    return s * (1 - s), s * (1 - s) * (1 - 2 * s)


@pytest.mark.parametrize("name, truth", [
    ("expect_score", lambda: {"grad": A * _sigmoid_derivatives(W)[0],
                              "hessian": np.diag(A * _sigmoid_derivatives(W)[1])}),
    ("stateful", lambda: {"grad": A * _sigmoid_derivatives(W)[0]}),
])
def test_estimates_are_unbiased_under_vmap_of_the_transformations(m, name, truth):
    """Over 2000 keys (vmap), the mean of jax.grad of a score-function `expect` export (reverse
    mode through DiCE's magic box) is the gradient of E[f], and the mean of its Hessian
    (jax.jacfwd of it) the Hessian; the stateful export's gradient estimate itself is unbiased
    (its average comes from earlier calls). E[sum(a z)] = sum(a sigmoid(w)) for
    z ~ Bernoulli(logits=w). (The reparameterized kind's Hessian is closed whatever the draws.)"""
    kind = KINDS[name]
    keys = jax.random.split(jax.random.key(2), 2000)
    if name == "stateful":
        def grad(w, key):
            return kind.call(m, w, key)[0]["w"]
    else:
        def grad(w, key):
            return jax.grad(lambda v: kind.call(m, v, key))(w)
    want = truth()
    assert_unbiased(jax.jit(jax.vmap(grad, (None, 0)))(W, keys), want["grad"])
    if "hessian" in want:
        hessians = jax.jit(jax.vmap(jax.jacfwd(grad), (None, 0)))(W, keys)
        assert_unbiased(np.asarray(hessians).reshape(len(keys), -1), want["hessian"].ravel())


def test_the_stateful_exports_baseline_has_no_derivative(m):
    """b <- decay b + (1 - decay) mean(v) with v = sum(a z): no path from w (z is discrete)."""
    _, (_, tangent) = jax.jit(lambda w, t: jax.jvp(lambda v: m.ma(v, A, BASELINE, KEY), (w,),
                                                   (t,)))(W, T)
    np.testing.assert_array_equal(tangent, np.zeros(3))


# ---- a method without forward mode

REVERSE_ONLY = """
fn ridge(theta: f32[3], a: f32[N, 3], b: f32[N], c: f32[3]) -> f32 {
  let x = argmin v: f32[3] = zeros([3]) {
            0.5 * sum((a @ v - b) ^ 2) + 0.5 * sum(theta * v * v)
          } via gd(steps=80, lr=0.4) with value_function
  return 0.5 * sum((x - c) ^ 2)
}
fn boxed(theta: f32[3], a: f32[N, 3], b: f32[N], c: f32[3]) -> f32 {
  let x = argmin v: f32[3] = zeros([3]) {
            0.5 * sum((a @ v - b) ^ 2) + 0.5 * sum(theta * v * v)
          } via gd(steps=80, lr=0.4) subject to v <= 2.0
  return 0.5 * sum((x - c) ^ 2)
}
export ridge = ridge
export boxed = boxed
"""


@pytest.fixture(scope="module")
def reverse_only():
    return gradlang.compile_source(REVERSE_ONLY, "reverse_only.grad")


RIDGE_ARGS = (RIDGE_A, RIDGE_B, RIDGE_C)


@pytest.mark.parametrize("transform", [
    lambda f: jax.jvp(f, (THETA,), (T,)),
    lambda f: jax.jit(lambda t: jax.jvp(f, (t,), (T,)))(THETA),
    lambda f: jax.jacfwd(f)(THETA),
    lambda f: jax.vmap(lambda t: jax.jvp(f, (t,), (T,)))(np.stack([THETA, THETA])),
], ids=["jvp", "jit-jvp", "jacfwd", "vmap-jvp"])
def test_forward_mode_through_value_function_is_an_error_saying_what_to_write(reverse_only,
                                                                             transform):
    with pytest.raises(gradlang.ForwardModeError) as info:
        transform(lambda t: reverse_only.ridge(t, *RIDGE_ARGS))
    message = str(info.value)
    assert message.startswith("jax.jvp (forward mode, as in jax.jacfwd) goes through the inner "
                              "problem at reverse_only.grad:3:11, whose hypergradient method "
                              "'value_function'")
    assert message.endswith("Write 'with implicit', 'with unrolled' or 'with truncated' after "
                            "the solver for a forward-mode derivative, or differentiate in "
                            "reverse mode (jax.grad, jax.vjp, an exported grad)")
    assert isinstance(info.value, TypeError)  # as JAX's own error for a custom_vjp


def test_with_constraints_the_error_offers_the_methods_that_take_them(reverse_only):
    with pytest.raises(gradlang.ForwardModeError) as info:
        jax.jvp(lambda t: reverse_only.boxed(t, *RIDGE_ARGS), (THETA,), (T,))
    assert "reverse_only.grad:9:11" in str(info.value)
    assert str(info.value).endswith(
        "Write 'with unrolled' or 'with truncated' after the last constraint for a forward-mode "
        "derivative, or differentiate in reverse mode (jax.grad, jax.vjp, an exported grad)")


def test_reverse_mode_and_forward_over_reverse_go_through_value_function(reverse_only):
    """jax.grad is the method's own backward, and jax.hessian (forward over reverse)
    differentiates that backward and the solver's loop. value_function is exact on a
    quadratic (its bias is O(sigma^2) times the third derivative, 0): the rounding of ARGMIN's
    solves, ~100 roundings of values of scale 1 each, over 2 sigma = 0.02 (50), times cond(K)
    = 1.6."""
    f = lambda t: reverse_only.ridge(t, *RIDGE_ARGS)  # noqa: E731
    _, grad, hessian = ridge_closed_form(THETA)
    assert_close(jax.jit(jax.grad(f))(THETA), grad, ops=100 * 50 * 1.6)
    assert_close(jax.jit(jax.hessian(f))(THETA), hessian, ops=100 * 50 * 1.6)


# ---- the other black boxes: an extern and a sampled matmul


def test_differentiating_an_export_that_calls_an_extern_says_what_to_export_instead(tmp_path):
    """The refusal is the compiled export's: the artifact writer still cuts the export at the
    callback, and the saved module runs with the binding."""
    reward = {"r": lambda w: jnp.sum(w ** 2)}
    m = gradlang.compile_source("""
extern fn r(w: f32[D]) -> f32
fn f(w: f32[D]) -> f32 { return r(w) * 2.0 }
export v = f
""", externs=reward)
    w = jnp.ones(3)
    assert float(jax.jit(m.v)(w)) == 6.0  # calls, jit and vmap are unchanged
    for transform in (jax.grad, lambda f: lambda w: jax.jvp(f, (w,), (w,))):
        with pytest.raises(gradlang.ExternError, match=r"calls extern 'r', a black box.*by=spsa"):
            transform(m.v)(w)
    m.save(tmp_path / "extern.gx", dims={"D": 3})
    assert float(gradlang.load(tmp_path / "extern.gx", externs=reward).v(w)) == 6.0



def test_forward_mode_through_a_sampled_matmul_is_an_error_and_reverse_mode_works():
    m = gradlang.compile_source("""
fn f(x: f32[N, D], w: f32[D, O]) -> f32 { return sum((x @ w) with wta_crs(keep=4)) }
export v = f
""")
    x, w, key = jnp.ones((8, 3)), jnp.ones((3, 2)), jax.random.key(0)
    assert jax.grad(m.v, argnums=1)(x, w, key).shape == (3, 2)
    with pytest.raises(gradlang.ForwardModeError, match=r"wta_crs\(keep=4\).*remove the"):
        jax.jvp(lambda w: m.v(x, w, key), (w,), (w,))
