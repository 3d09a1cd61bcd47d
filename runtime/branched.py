"""The weak derivative of a branched estimator's draw (`estimators.base.Branched`): the
objective is evaluated at several values of one draw (its branches, on axis 1 of the `samples`
region's results), and the draw's gradient is a weighted difference of those evaluations,
added to the surrogate as sum (p - stop(p)) * coefficient for each parameter p of the draw's
distribution."""

from __future__ import annotations

from jax import lax

from gradlang.estimators.base import Branched, entries_sum


def weak_derivative(f, z, aux, params: list, est: Branched, opts: dict):
    """Per sample, the sum over the draw's parameters p (and their entries) of (p - stop(p))
    * coefficient, plus the estimator's pathwise term minus its value: its value is 0, its
    derivative the estimator (first order)."""
    coefs = est.coefficients(*lax.stop_gradient((f, z, aux)), opts,
                             *(lax.stop_gradient(p) for p in params))
    out = 0
    for p, c in zip(params, coefs):
        out = out + entries_sum((p - lax.stop_gradient(p)) * c)
    if est.pathwise is not None:
        term = est.pathwise(f, opts)
        out = out + term - lax.stop_gradient(term)
    return out
