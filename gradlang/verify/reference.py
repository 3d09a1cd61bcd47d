"""Reference gradients, each with its own error: a standard error (statistical, one sigma)
and a deterministic bound (finite-difference truncation and float32 roundoff) per coordinate.

- `finite_differences`: central differences of the objective in float32, step h = c max(|t|, 1)
  per coordinate (c = eps32^(1/3) ~ 4.9e-3 for a deterministic objective, where truncation
  h^2 f'''/6 and roundoff eps32 |f| / h balance; c = 0.05 for an expectation, whose Monte Carlo
  noise dominates: a discontinuous integrand, a discrete draw, has variance ~ 1/h), both +h and -h evaluated with the same keys (common random numbers). The
  bound is |D(h) - D(2h)| (the truncation error of D(h) is a third of it, and it also sees the
  roundoff noise) plus 8 eps32 max|f| / h;
- `smoothed`: the gradient of the Gaussian-smoothed objective E f(t + s z): antithetic
  pathwise samples (grad f(t + s z) + grad f(t - s z)) / 2 when f is differentiable, else
  antithetic evolution-strategies samples (f(t + s z) - f(t - s z)) z / (2 s);
- `mean_gradient`: many independent gradients of another compiled variant of the program
  (enumeration and pathwise draws), or one when that variant does not draw.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from .program import Program, batched, draw_estimates, flat_leaves
from .stats import EPS32

DETERMINISTIC_STEP = EPS32 ** (1 / 3)
STOCHASTIC_STEP = 0.05


@dataclass(frozen=True)
class Reference:
    method: str
    description: str
    values: list[np.ndarray]
    """Per leaf, flat, at `coords` (every coordinate where that is None)."""
    errors: list[np.ndarray]
    """Standard errors (one sigma) of the values; 0 for an exact reference."""
    bounds: list[np.ndarray]
    """Deterministic error bounds of the values (finite-difference truncation, roundoff)."""
    coords: list[np.ndarray | None]
    samples: int
    evaluations: int
    seconds: float


def _moments(samples: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    n = samples[0].shape[0]
    means = [s.mean(0) for s in samples]
    errors = [s.std(0, ddof=1) / np.sqrt(n) if n > 1 else np.zeros_like(s[0]) for s in samples]
    return means, errors


def pick_coordinates(sizes: list[int], limit: int, seed: int) -> list[np.ndarray | None]:
    """At most `limit` coordinates per leaf (all of a small leaf: None), seeded."""
    rng = np.random.default_rng(seed)
    return [None if size <= limit else np.sort(rng.choice(size, limit, replace=False))
            for size in sizes]


def finite_differences(f: Callable, theta: list, args: list, coords: list[np.ndarray | None],
                       keys, chunk: int, description: str) -> Reference:
    """Central differences of f(leaves, args, key) at the chosen coordinates, averaged over
    `keys` (common random numbers; None: f does not draw, or enumerates every draw). All
    leaves are perturbed through one flat vector, so one compilation serves every coordinate."""
    start = time.perf_counter()
    m = 1 if keys is None else keys.shape[0]
    step = DETERMINISTIC_STEP if keys is None else STOCHASTIC_STEP
    shapes = [np.shape(t) for t in theta]
    cuts = np.cumsum([0] + [int(np.prod(s, dtype=int)) for s in shapes])
    flat = np.concatenate([np.asarray(t, np.float32).ravel() for t in theta])
    idx = np.concatenate([cuts[l] + (np.arange(cuts[l + 1] - cuts[l]) if c is None else c)
                          for l, c in enumerate(coords)])
    base = flat[idx]
    h = (step * np.maximum(np.abs(base), 1)).astype(np.float32)
    points = np.stack([base + h, base - h, base + 2 * h, base - 2 * h], -1).astype(np.float32)

    def at(i, v, *rest):
        *key, center, args = rest

        def one(x):
            moved = center.at[i].set(x)
            leaves = [moved[a:b].reshape(s) for a, b, s in zip(cuts[:-1], cuts[1:], shapes)]
            return f(leaves, args, *key)
        return jax.vmap(one)(v)

    k = len(idx)
    xs = (np.repeat(idx, m), np.repeat(points, m, 0))
    if keys is not None:
        xs += (keys[np.tile(np.arange(m), k)],)
    out = batched(at, xs, k * m, chunk, (jnp.asarray(flat), args),
                  "reference (finite differences)")
    out = np.asarray(out, np.float64).reshape(k, m, 4)
    p = points.astype(np.float64)
    d1 = (out[..., 0] - out[..., 1]) / (p[:, None, 0] - p[:, None, 1])
    d2 = (out[..., 2] - out[..., 3]) / (p[:, None, 2] - p[:, None, 3])
    value = d1.mean(1)
    error = d1.std(1, ddof=1) / np.sqrt(m) if m > 1 else np.zeros(k)
    bound = np.abs(value - d2.mean(1)) + 8 * EPS32 * np.abs(out).max((1, 2)) / h
    split = np.cumsum([cuts[l + 1] - cuts[l] if c is None else len(c)
                       for l, c in enumerate(coords)])[:-1]
    return Reference("finite differences", description, np.split(value, split),
                     np.split(error, split), np.split(bound, split), coords, m, 4 * k * m,
                     time.perf_counter() - start)


def smoothed(f: Callable, theta: list, args: list, sigmas: list[float], n: int, key,
             draws: bool, differentiable: bool, chunk: int, description: str) -> Reference:
    """The gradient of E f(theta + sigma z) (z ~ N(0, I); sigma per leaf) from n antithetic
    pairs: pathwise when f is differentiable, evolution strategies otherwise; a function that
    draws gets a fresh key per pair (the same for both members)."""
    start = time.perf_counter()

    def pair(key, theta, args):
        kz, kf = jax.random.split(key)
        zs = [jax.random.normal(k, t.shape, t.dtype) for k, t in
              zip(jax.random.split(kz, len(theta)), theta)]

        def g(leaves):
            return f(leaves, args, kf) if draws else f(leaves, args)

        plus = [t + s * z for t, s, z in zip(theta, sigmas, zs)]
        minus = [t - s * z for t, s, z in zip(theta, sigmas, zs)]
        if differentiable:
            return [(a + b) / 2 for a, b in zip(jax.grad(g)(plus), jax.grad(g)(minus))]
        d = (g(plus) - g(minus)) / 2
        return [d * z / s for z, s in zip(zs, sigmas)]

    out = batched(pair, (jax.random.split(key, n),), n, chunk, (theta, args),
                  "reference (smoothed pairs)")
    samples = [np.asarray(x, np.float64).reshape(n, -1) for x in out]
    values, errors = _moments(samples)
    method = "smoothed (pathwise)" if differentiable else "smoothed (evolution strategies)"
    return Reference(method, description, values, errors, [np.zeros_like(v) for v in values],
                     [None] * len(theta), n, 2 * n, time.perf_counter() - start)


def mean_gradient(program: Program, args: list, n: int, key, chunk: int, method: str,
                  description: str) -> Reference:
    """The mean of n gradients of `program` (of one when n is 1)."""
    start = time.perf_counter()
    if n == 1:
        samples = flat_leaves(jax.jit(program.estimate)(args, key), 1)
    else:
        samples = draw_estimates(program, args, n, key, chunk, "reference (gradients)")
    values, errors = _moments(samples)
    m = samples[0].shape[0]
    return Reference(method, description, values, errors, [np.zeros_like(v) for v in values],
                     [None] * len(values), m, m, time.perf_counter() - start)
