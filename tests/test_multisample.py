"""Multi-sample objectives: `logmeanexp(f, samples=K)` (importance-weighted bounds), VIMCO for
score-function draws and DReG for pathwise ones.

Statistical tests average N = 10^4 fixed-seed estimates: against the exact bound and its
gradient where the latent is binary (the expectation over all 2^K draws, in float64, the
gradient by central differences of it), within 5 standard errors; DReG against the plain
reparameterized IWAE gradient (both unbiased for the same gradient) within 5 standard errors
of the difference of the means.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

import gradlang
from gradlang.explain import explain
from stats import EPS32, N, assert_close, assert_unbiased, estimates, total_variance

BINARY = """
fn log_weight(t: f32, x: f32) -> f32 {
  z ~ Bernoulli(logits=t) WITH
  return log_prob(Bernoulli(logits=0.0), z) + log_prob(Normal(2.0 * z - 1.0, 1.0), x)
         - log_prob(Bernoulli(logits=t), z)
}
"""


def exact_bound(t: float, x: float, k: int) -> float:
    """E[log mean_k w_k] for the model above, summed over the 2^k values of the draws."""
    p = 1 / (1 + math.exp(-t))

    def log_w(z):
        q = p if z else 1 - p
        return math.log(0.5) - 0.5 * (x - (2 * z - 1)) ** 2 - 0.5 * math.log(2 * math.pi) - math.log(q)

    return sum(math.prod(p if z else 1 - p for z in zs)
               * math.log(sum(math.exp(log_w(z)) for z in zs) / k)
               for zs in itertools.product([0, 1], repeat=k))


def binary(estimator: str, k: int = 3):
    return gradlang.compile_source(BINARY.replace("WITH", f"with {estimator}") +
                                   f"export g = value_and_grad(logmeanexp(log_weight, samples={k}), wrt=[t])")


@pytest.mark.parametrize("estimator", ["score", "score(baseline=vimco)", "score(baseline=none)"])
def test_logmeanexp_and_its_score_function_gradients_are_unbiased(estimator):
    t, x, h = 0.3, 0.8, 1e-5
    m = binary(estimator)
    values, grads = estimates(m.g, (t, x))
    assert_unbiased(values, exact_bound(t, x, 3))
    assert_unbiased(grads["t"], (exact_bound(t + h, x, 3) - exact_bound(t - h, x, 3)) / (2 * h))


def test_vimco_is_the_default_baseline_and_cuts_the_variance():
    """Measured: total variance 2.85 (no baseline) against 0.092 (VIMCO), K = 3."""
    auto, none = binary("score"), binary("score(baseline=none)")
    assert "VIMCO (auto) [samples=3]" in explain(auto.ir)
    var = [total_variance(estimates(m.g, (0.3, 0.8))[1]["t"]) for m in (none, auto)]
    print(f"VIMCO variance reduction: {var[0] / var[1]:.1f}x")
    assert var[0] > 10 * var[1]


GAUSSIAN = """
fn log_weight(mu: f32, s: f32, x: f32) -> f32 {
  z ~ Normal(mu, s) with EST
  return log_prob(Normal(0.0, 1.0), z) + log_prob(Normal(z, 1.0), x) - log_prob(Normal(mu, s), z)
}
export g = value_and_grad(logmeanexp(log_weight, samples=4), wrt=[mu, s])
"""


def gaussian(estimator: str):
    m = gradlang.compile_source(GAUSSIAN.replace("EST", estimator))
    return lambda mu, s: np.stack([np.asarray(g) for g in
                                   (estimates(m.g, (mu, s, 0.8))[1][n] for n in ("mu", "s"))], -1)


def test_dreg_agrees_with_the_reparameterized_iwae_gradient_with_less_variance():
    """Measured at (0.1, 1.3): total variance 1.18 (reparam) against 0.099 (DReG)."""
    a, b = gaussian("reparam")(0.1, 1.3), gaussian("dreg")(0.1, 1.3)
    se = np.sqrt(a.var(0, ddof=1) / N + b.var(0, ddof=1) / N)
    assert np.all(np.abs(a.mean(0) - b.mean(0)) <= 5 * se), (a.mean(0), b.mean(0), se)
    print(f"DReG variance reduction: {total_variance(a) / total_variance(b):.1f}x")
    assert total_variance(a) > 5 * total_variance(b)


def test_dreg_is_exactly_zero_at_the_posterior():
    """With q the exact posterior N(x/2, 1/2), every log-weight is the same constant: DReG's
    estimate is 0 up to rounding, the plain reparameterized one keeps the score's noise."""
    dreg = gaussian("dreg")(0.4, math.sqrt(0.5))
    plain = gaussian("reparam")(0.4, math.sqrt(0.5))
    # d log w / dz = -z + (x - z) + (z - mu) / s^2 cancels to 0 from ~8 roundings of terms of
    # size |z| <= 0.4 + 5 s = 4 (10^4 x 4 draws stay within 5 standard deviations), times
    # dz/ds = eps (|eps| <= 5), weighted by w^2 (summing to at most 1)
    assert np.abs(dreg).max() <= 8 * 4 * 5 * EPS32
    assert total_variance(plain) > 0.1


def test_logmeanexp_in_a_body_nests_in_an_expectation():
    """The inner bound as a value: the same numbers as the export-level scope."""
    src = BINARY.replace("WITH", "with score") + """
fn outer(t: f32, x: f32) -> f32 {
  return logmeanexp(log_weight(t, x), samples=3)
}
export g = value_and_grad(expect(outer, samples=2), wrt=[t])
"""
    m = gradlang.compile_source(src)
    t, x, h = 0.3, 0.8, 1e-5
    values, grads = estimates(m.g, (t, x))
    assert_unbiased(values, exact_bound(t, x, 3))
    assert_unbiased(grads["t"], (exact_bound(t + h, x, 3) - exact_bound(t - h, x, 3)) / (2 * h))


def test_a_logmeanexp_of_a_deterministic_value_is_the_value():
    m = gradlang.compile_source("""
fn f(a: f32) -> f32 {
  z ~ Normal(a, 1.0)
  return 2.0 * a + 0.0 * z
}
export v = logmeanexp(f, samples=5)
""")
    import jax
    # log(5 e^1.4) - log 5: exp, a 5-term sum, log (4 + 5 + 4), then the cancellation of
    # 1.4 + log 5 down to 1.4
    assert_close(m.v(0.7, jax.random.key(0)), 1.4, ops=16, scale=1.4 + math.log(5))
