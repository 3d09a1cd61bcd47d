"""Statistical helpers shared by the estimator tests: independent fixed-seed estimates and the
5-standard-error unbiasedness check."""

from __future__ import annotations

import math

import jax
import numpy as np

N = 10_000
"""Estimates per statistical test."""


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def softmax(x):
    e = np.exp(np.asarray(x, np.float64) - np.max(x))
    return e / e.sum()


def estimates(fn, args: tuple, n: int = N, seed: int = 0):
    """n independent evaluations of a compiled export that draws (one key each)."""
    keys = jax.random.split(jax.random.key(seed), n)
    return jax.jit(jax.vmap(lambda k: fn(*args, k)))(keys)


def assert_unbiased(samples, truth, k: float = 5.0) -> None:
    """Every coordinate of the mean within k standard errors (computed from the samples) of
    the truth; coordinates whose samples all coincide get a float32 rounding tolerance."""
    samples = np.asarray(samples, np.float64)
    truth = np.asarray(truth, np.float64)
    mean = samples.mean(0)
    se = samples.std(0, ddof=1) / math.sqrt(samples.shape[0])
    bound = k * se + 1e-5 * (1 + np.abs(truth))
    assert np.all(np.abs(mean - truth) <= bound), (
        f"mean {mean} vs truth {truth}: |diff| {np.abs(mean - truth)} > bound {bound} "
        f"(standard error {se})")


def total_variance(samples) -> float:
    """The sum over coordinates of the per-coordinate variance of the estimates."""
    return float(np.var(np.asarray(samples, np.float64), axis=0).sum())
