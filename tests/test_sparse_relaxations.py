"""The Gumbel-sparsemax and Gumbel-entmax relaxations (estimators/sparse.py): the maps onto the
simplex against closed forms, each other and finite differences; the estimators end to end
(compile, explain, diagnostics); and their bias, which vanishes as tau -> 0."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradlang
from gradlang.estimators.sparse import _entmax_bisect, entmax, sparsemax
from gradlang.explain import explain
from stats import assert_close, assert_unbiased, estimates, sigmoid, softmax

ALPHAS = [2.0, 1.5, 1.25]
"""Sparsemax and 1.5-entmax (exact by sorting) and an alpha computed by bisection."""
EPS32, EPS64 = (float(np.finfo(t).eps) for t in (np.float32, np.float64))


def roundings(d: int) -> int:
    """Float roundings in one entry of entmax over d categories, relative to 1: its threshold
    comes from cumulative sums over up to d sorted entries, each within 1 of the maximum on
    the support (p_i <= 1), so <= d^2 for the sums, doubled for the mean square and its
    cancellation against the squared mean (1.5-entmax), plus d for the normalizing sum and 8
    for the last divisions, square root, log1p and exp (the bisection brackets its threshold
    to 2^-(mantissa + 2) log d, below one rounding)."""
    return 2 * (d * d + d) + 8


def spread(shape, scale: float = 3.0, seed: int = 0) -> jax.Array:
    """Inputs several units apart: entmax sets most of them to exactly 0."""
    return scale * jax.random.normal(jax.random.key(seed), shape)


# ---- the maps


@pytest.mark.parametrize("alpha", ALPHAS)
def test_entmax_is_a_distribution_zero_below_its_threshold(alpha):
    """p >= 0 sums to 1; p_i = [(alpha - 1) z_i - t]_+^(1 / (alpha - 1)) with t >= (alpha - 1)
    max z - 1 (as p_max <= 1), so an entry at least 1 / (alpha - 1) below the maximum is
    exactly 0, and the maximum's is positive."""
    z = spread((256, 6))
    p = np.asarray(entmax(z, alpha))
    assert np.all(p >= 0)
    assert_close(p.sum(-1), np.ones(256), ops=roundings(6), scale=1.0)
    below = np.asarray(z) <= np.max(z, -1, keepdims=True) - 1 / (alpha - 1)
    assert below.any() and np.all(p[below] == 0)
    assert np.all(np.take_along_axis(p, np.argmax(z, -1)[:, None], -1) > 0)
    # entries far below (a tiny temperature's) do not overflow the cumulative sums
    far = jnp.array([0.0, -3e38, -3e38, -jnp.inf, 0.0])
    assert_close(entmax(far, alpha), np.array([0.5, 0, 0, 0, 0.5]), ops=roundings(5), scale=1.0)


def test_sparsemax_and_entmax_of_two_categories_and_a_worked_example():
    """Of [0, x]: sparsemax's second coordinate is clip((x + 1) / 2, 0, 1); 1.5-entmax's is
    ((x/2 + sqrt(2 - x^2/4)) / 2)^2 for |x| < 2 (the root of (-t)^2 + (x/2 - t)^2 = 1), 1 beyond 2
    (0 below -2). sparsemax([1, 0.5, -0.3]): the two largest have threshold (1.5 - 1) / 2."""
    x = np.linspace(-3.0, 3.0, 61, dtype=np.float32)
    z = jnp.stack([jnp.zeros_like(x), x], -1)
    y = np.clip(x.astype(np.float64), -2, 2) / 2
    entmax15 = ((y + np.sqrt(2 - y * y)) / 2) ** 2
    assert_close(sparsemax(z)[:, 1], np.clip((x + 1.0) / 2, 0, 1), ops=roundings(2), scale=1.0)
    assert_close(entmax(z, 1.5)[:, 1], entmax15, ops=roundings(2), scale=1.0)
    assert_close(sparsemax(jnp.array([1.0, 0.5, -0.3])), np.array([0.75, 0.25, 0.0]),
                 ops=roundings(3))


@pytest.mark.parametrize("alpha", [2.0, 1.5])
def test_the_sorting_algorithms_agree_with_bisection(alpha):
    z = spread((256, 6), seed=1)
    exact = entmax(z, alpha)
    bisected = _entmax_bisect(z - jnp.max(z, -1, keepdims=True), alpha)
    assert_close(exact, bisected, ops=2 * roundings(6), scale=1.0)  # both sides' roundings


def test_the_limits_softmax_as_alpha_goes_to_1_and_one_hot_as_tau_goes_to_0():
    """As alpha -> 1, entmax -> softmax: with d = alpha - 1, log p_i is z_i - theta minus
    between 0 and d u^2 (log1p(d u) / d = u - d u^2 / 2 + ..., |u| = |z_i - theta| <= U = range
    of z + log n), so |p - softmax| <= (exp(d U^2) - 1) softmax. As tau -> 0, entmax(z / tau) is
    the one-hot argmax exactly once tau < (alpha - 1) gap (the others are then at least 1 /
    (alpha - 1) below the maximum); softmax(z / tau) at that tau is not one-hot."""
    z = spread((64, 5), seed=2)
    d = 1e-4
    q = np.asarray(jax.nn.softmax(z, -1), np.float64)
    u = float(jnp.max(jnp.ptp(z, -1))) + math.log(5)
    error = np.abs(np.asarray(entmax(z, 1 + d), np.float64) - q)
    assert np.all(error <= math.expm1(d * u * u) * q + roundings(5) * EPS32)

    z = jnp.array([0.3, -0.2, 0.9, 0.1])  # gap 0.6 between the largest two
    hard = np.eye(4)[2]
    for alpha in ALPHAS:
        tau = (alpha - 1) * 0.6  # the bound, where rounding decides: half of it, and twice
        assert np.all(np.asarray(entmax(z / (tau / 2), alpha)) == hard)
        assert np.all(np.asarray(jax.nn.softmax(z / (tau / 2))) > 0)
        assert np.asarray(entmax(z / (2 * tau), alpha))[0] > 0


@pytest.mark.parametrize("alpha", ALPHAS)
def test_jacobians_match_central_differences_in_float64(alpha):
    """Forward and reverse mode (the closed-form Jacobian diag(s) - s s^T / sum(s), s_i =
    p_i^(2 - alpha) on the support) against central differences D(h), in float64 at a point
    whose support does not change within 2h. D(h) errs by c h^2 + O(h^4) (Richardson: about
    |D(2h) - D(h)| / 3) plus the rounding of two evaluations divided by 2h."""
    with jax.enable_x64(True):
        z = jnp.array([0.3, -0.2, 1.1, -4.5, 0.8], jnp.float64)
        f = lambda x: entmax(x, alpha)  # noqa: E731
        h = 1e-4

        def differences(step):
            return np.stack([(f(z + step * e) - f(z - step * e)) / (2 * step)
                             for e in np.eye(5)], -1)

        d1, d2 = differences(h), differences(2 * h)
        bound = np.abs(d2 - d1) + roundings(5) * EPS64 / h
        assert np.all(bound < math.sqrt(EPS64)), "the point is smooth: differences are accurate"
        for jacobian in (jax.jacfwd(f)(z), jax.jacrev(f)(z)):
            assert np.all(np.abs(np.asarray(jacobian) - d1) <= bound), (jacobian, d1)
        p = np.asarray(f(z))
        assert 0 < np.count_nonzero(p) < 5  # sparse here: the Jacobian's zero rows are tested too


# ---- the estimators end to end

PROGRAM = """
fn f(t: f32[3], c: f32[3], u: f32) -> f32 {
  z ~ OneHotCategorical(logits=t) with ONEHOT
  b ~ Bernoulli(logits=u) with BERNOULLI
  return sum(z * c) ^ 2 + (b - 0.3) ^ 2
}
export g = value_and_grad(expect(f, samples=8), wrt=[t, c, u])
"""
ARGS = (np.array([0.2, -0.4, 0.9], np.float32), np.array([1.0, -2.0, 0.5], np.float32),
        np.float32(0.3))


def compiled(onehot: str, bernoulli: str):
    """PROGRAM with these annotations on its one-hot and its Bernoulli draw."""
    source = PROGRAM.replace("ONEHOT", onehot).replace("BERNOULLI", bernoulli)
    return gradlang.compile_source(source)


def test_compiles_gives_finite_gradients_and_explain_names_the_estimators():
    m = compiled("gumbel_sparsemax(tau=0.5)", "gumbel_entmax(tau=0.5, alpha=1.25)")
    value, grads = m.g(*ARGS, key=jax.random.key(0))
    assert np.isfinite(value)
    assert all(np.all(np.isfinite(g)) for g in grads.values())
    text = explain(m.ir)
    assert "z (f, line 3)  OneHotCategorical  Gumbel-sparsemax tau=0.5" in text
    assert "b (f, line 4)  Bernoulli          Gumbel-entmax tau=0.5, alpha=1.25" in text
    assert text.count("1 relaxed draw") == 2


@pytest.mark.parametrize("tau", ["1.2e-38", "0.01"])
def test_the_smallest_temperatures_give_finite_gradients(tau):
    """The perturbed logits are shifted to a maximum of 0 before the division by tau: the
    others become -inf (weight 0), never inf - inf."""
    m = compiled(f"gumbel_sparsemax(tau={tau})", f"gumbel_entmax(tau={tau}, alpha=1.25)")
    value, grads = m.g(*ARGS, key=jax.random.key(0))
    assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads.values())


@pytest.mark.parametrize("annotation, message", [
    ("gumbel_sparsemax", "'gumbel_sparsemax' relaxes Bernoulli and OneHotCategorical draws, not "
                         "Normal"),
    ("gumbel_entmax(alpah=1.2)", "estimator 'gumbel_entmax' has no option 'alpah'; did you mean "
                                 "'alpha'?"),
    ("gumbel_entmax(alpha=1)", "option 'alpha' of 'gumbel_entmax' must be above 1 (alpha = 1 is "
                               "softmax: use gumbel), got 1"),
    ("gumbel_entmax(alpha=2.5)", "option 'alpha' of 'gumbel_entmax' must be at most 2, got 2.5"),
    ("gumbel_sparsemax(tau=0)", "option 'tau' of 'gumbel_sparsemax' must be a positive number"),
    ("gumbel_sparsmax", "unknown estimator 'gumbel_sparsmax'; did you mean 'gumbel_sparsemax'?"),
])
def test_misuse_is_a_located_diagnostic(annotation, message):
    """Every message at the annotation, line 2, column 27 (after `  x ~ Normal(m, 1.0) with `),
    with the source line (indented by 2 more) and a caret under the annotation."""
    with pytest.raises(gradlang.CompileError) as err:
        gradlang.compile_source(f"""fn f(m: f32) -> f32 {{
  x ~ Normal(m, 1.0) with {annotation}
  return x * x
}}
export g = grad(expect(f, samples=4), wrt=[m])
""")
    first, _, caret = str(err.value).splitlines()[:3]
    assert first.startswith(f"<source>:2:27: error: {message}"), first
    assert caret == " " * 28 + "^" * len(annotation)


# ---- biased by design; the bias vanishes as tau -> 0


@pytest.mark.parametrize("estimator", ["gumbel_sparsemax", "gumbel_entmax"])
def test_the_bias_vanishes_as_tau_goes_to_0(estimator):
    """E[(z . c)^2] over a one-hot draw is p . c^2, its gradient p * (c^2 - p . c^2); E[(b +
    2)^2] over a Bernoulli draw is 4 + 5 s. At tau = 1 the relaxed draw's means are more than 5
    standard errors (of the 10,000 estimates, fixed seed) away: a real bias. At tau = 0.02
    (values) and 0.1 (gradients) they are within 5 standard errors of the truth: the bias,
    O(tau), is below the noise, whose variance grows as tau shrinks (the gradient's is
    O(1 / tau): it is nonzero only on the O(tau) draws that are not one-hot)."""
    def means(tau: float):
        m = gradlang.compile_source(f"""
fn f(t: f32[3], c: f32[3], u: f32) -> f32 {{
  z ~ OneHotCategorical(logits=t) with {estimator}(tau={tau})
  b ~ Bernoulli(logits=u) with {estimator}(tau={tau})
  return sum(z * c) ^ 2 + (b + 2.0) ^ 2
}}
export g = value_and_grad(expect(f, samples=1), wrt=[t])
""")
        value, grads = estimates(m.g, ARGS)
        return np.asarray(value, np.float64), np.asarray(grads["t"], np.float64)

    t, c, u = ARGS
    p = softmax(t)
    truth = p @ c ** 2 + 4 + 5 * sigmoid(float(u))
    gradient = p * (c ** 2 - p @ c ** 2)
    value, _ = means(1.0)
    se = value.std(ddof=1) / math.sqrt(len(value))
    assert abs(value.mean() - truth) > 5 * se
    assert_unbiased(means(0.02)[0], truth)
    assert_unbiased(means(0.1)[1], gradient)


@pytest.mark.parametrize("estimator, alpha", [("gumbel_sparsemax", 2.0), ("gumbel_entmax", 1.5)])
def test_draws_are_exactly_one_hot_as_often_as_the_gumbel_gap_says(estimator, alpha):
    """The relaxed draw is one-hot exactly when the largest perturbed logit leads the others
    by at least tau / (alpha - 1) (the threshold is then -1: the next one gets [1 - gap (alpha
    - 1) / tau]_+ = 0). The lead of category i over the maximum of the others is logistic
    (a difference of Gumbels located at log p_i and log(1 - p_i)), so the probability is
    sum_i p_i / (p_i + e^(tau / (alpha - 1)) (1 - p_i)); the fraction of 10,000 draws is
    within 5 binomial standard errors of it."""
    tau = 1.0
    m = gradlang.compile_source(f"""
fn draw(t: f32[3]) -> f32[3] {{
  z ~ OneHotCategorical(logits=t) with {estimator}(tau={tau})
  return z
}}
export d = draw
""")
    p = softmax(ARGS[0])
    want = np.sum(p / (p + math.exp(tau / (alpha - 1)) * (1 - p)))
    one_hot = np.asarray(estimates(m.d, ARGS[:1])).max(-1) == 1
    assert abs(one_hot.mean() - want) <= 5 * math.sqrt(want * (1 - want) / one_hot.size), \
        (one_hot.mean(), want)
