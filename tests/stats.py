"""Numeric helpers shared by the tests: the float32 comparison of deterministic results
(`assert_close`), independent fixed-seed estimates and the 5-standard-error unbiasedness check."""

from __future__ import annotations

import math

import jax
import numpy as np

from gradlang.verify.stats import EPS32

N = 10_000
"""Estimates per statistical test."""


def assert_close(actual, expected, ops: float, scale=None, where: str = "") -> None:
    """Every leaf of `actual` equals `expected`'s up to float32 rounding:
    |actual - expected| <= ops * eps32 * scale elementwise (the pytrees' structures must match).

    `ops` is the rounding error's growth, derived at the call site: 1 per float32 arithmetic
    step on the longest dependency chain, 4 per transcendental (XLA's CPU approximations are
    within a few ulp), n for a sum of n terms (the worst case: reductions are reordered across
    CPUs and thread counts) or, for long sums, 5 sqrt(n) relative to the sum of the terms'
    magnitudes (Higham and Mary's probabilistic bound, 2019: rounding errors independent and of
    mean zero), the steps of both sides added when both are float32, times any amplification
    (a condition number, a loop's Lipschitz constant, 1 / h for a difference quotient). `scale`
    is the magnitude the error is relative to: by default max |expected| per leaf, since an
    entry produced by cancellation carries the rounding of the larger terms it came from; pass
    |expected| for elementwise results computed independently of each other."""
    leaves_a, tree_a = jax.tree.flatten(actual)
    leaves_e, tree_e = jax.tree.flatten(expected)
    assert tree_a == tree_e, f"{where} {tree_a} != {tree_e}"
    for a, e in zip(leaves_a, leaves_e):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        assert e.ndim == 0 or a.shape == e.shape, f"{where} shape {a.shape} != {e.shape}"
        s = np.abs(e).max(initial=0.0) if scale is None else np.asarray(scale, np.float64)
        bound = ops * EPS32 * s
        err = np.abs(a - e)
        worst = tuple(int(i) for i in np.unravel_index(np.argmax(err - bound), err.shape))
        assert np.all(err <= bound), (
            f"{where} |actual - expected| = {err[worst]:.3g} at {worst} > {ops:.4g} eps32 x scale "
            f"= {np.broadcast_to(bound, err.shape)[worst]:.3g}\nactual {a}\nexpected {e}")


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def softmax(x):
    e = np.exp(np.asarray(x, np.float64) - np.max(x))
    return e / e.sum()


def estimates(fn, args: tuple, n: int = N, seed: int = 0):
    """n independent evaluations of a compiled export that draws (one key each)."""
    keys = jax.random.split(jax.random.key(seed), n)
    return jax.jit(jax.vmap(lambda k: fn(*args, k)))(keys)


def assert_unbiased(samples, truth, k: float = 5.0, ops: float = 64) -> None:
    """Every coordinate of the mean within k standard errors (computed from the samples) of
    the truth, plus one estimate's float32 rounding, which is all a coordinate whose samples
    coincide has: `ops` roundings (a few dozen in these tests' programs) of terms of the size
    of 1 + |truth|."""
    samples = np.asarray(samples, np.float64)
    truth = np.asarray(truth, np.float64)
    mean = samples.mean(0)
    se = samples.std(0, ddof=1) / math.sqrt(samples.shape[0])
    bound = k * se + ops * EPS32 * (1 + np.abs(truth))
    assert np.all(np.abs(mean - truth) <= bound), (
        f"mean {mean} vs truth {truth}: |diff| {np.abs(mean - truth)} > bound {bound} "
        f"(standard error {se})")


def total_variance(samples) -> float:
    """The sum over coordinates of the per-coordinate variance of the estimates."""
    return float(np.var(np.asarray(samples, np.float64), axis=0).sum())
