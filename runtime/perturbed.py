"""Perturbed matrices kept factored, for black-box estimators' forward evaluations.

A black-box estimator evaluates the objective at theta + s E. For a matrix parameter W, E is
never added to W where it can be avoided: the lowering passes a `Factored` value through the
program (`runtime.lower._FACTORED` ops take it as it is), a matmul computes x @ W + s x @ E from
the factors, and any other op gets it `dense()`:

- `LowRank` (eggroll): E = a b^T, so x @ E = (x @ a) b^T costs r (m + n) per row of x;
- `Seeded` (spsa): E = z, Gaussian noise that is a pure function of (seed, index)
  (`normal_at`), regenerated in row tiles of at most `TILE` entries inside the matmul, so the
  perturbed matrix is never stored: a step's memory stays that of the forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax

TILE = 1 << 14
"""Noise entries generated at once by a `Seeded` matmul (a tile of rows; more when 32 tiles
of this size do not cover the matrix)."""
MAX_TILES = 128


class Factored:
    """w + scale * E with E kept factored; subclasses say how to multiply by E."""

    w: jax.Array
    scale: float

    @property
    def shape(self) -> tuple[int, ...]:
        return self.w.shape

    @property
    def dtype(self):
        return self.w.dtype

    def dense(self) -> jax.Array:
        return self.w + self.scale * self.noise()

    def rmatmul(self, x: jax.Array) -> jax.Array:
        """x @ (w + s E) = x @ w + s (x @ E)."""
        raise NotImplementedError

    def matmul(self, x: jax.Array) -> jax.Array:
        """(w + s E) @ x = w @ x + s (E @ x)."""
        raise NotImplementedError

    def noise(self) -> jax.Array:
        """E, materialized."""
        raise NotImplementedError


@jax.tree_util.register_pytree_node_class
@dataclass(frozen=True)
class LowRank(Factored):
    """The matrix w + scale * a @ b.T (a: [m, r], b: [n, r])."""

    w: jax.Array
    a: jax.Array
    b: jax.Array
    scale: float

    def noise(self) -> jax.Array:
        return self.a @ self.b.T

    def rmatmul(self, x: jax.Array) -> jax.Array:
        return x @ self.w + self.scale * (x @ self.a) @ self.b.T

    def matmul(self, x: jax.Array) -> jax.Array:
        return self.w @ x + self.scale * self.a @ (self.b.T @ x)

    def tree_flatten(self):
        return (self.w, self.a, self.b), self.scale

    @classmethod
    def tree_unflatten(cls, scale, children):
        return cls(*children, scale)


def _mix(x: jax.Array) -> jax.Array:
    """lowbias32 (C. Wellons): a 32-bit integer hash with full avalanche."""
    x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
    x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def seed_of(key) -> jax.Array:
    """The uint32[2] seed of `normal_at` drawn from a JAX key."""
    return jax.random.bits(key, (2,), jnp.uint32)


def normal_at(seed: jax.Array, index: jax.Array, dtype) -> jax.Array:
    """N(0, 1) noise as a pure elementwise function of (seed, index): two hashed 24-bit
    uniforms per entry through Box-Muller. XLA fuses it into its consumer (t + eps * z is one
    loop writing one array), where `jax.random.normal` on CPU materializes random-bit
    intermediates of about 4x the array; estimators regenerate it at each use."""
    a = _mix(_mix(index ^ seed[0]) + seed[1])
    b = _mix(a ^ jnp.uint32(0x9E3779B9))
    u1 = ((a >> 8).astype(dtype) + 0.5) / 16777216.0
    u2 = (b >> 8).astype(dtype) / 16777216.0
    return jnp.sqrt(-2.0 * jnp.log(u1)) * jnp.cos(2.0 * jnp.pi * u2)


def seeded_normal(seed: jax.Array, shape: tuple, dtype) -> jax.Array:
    """`normal_at` over every index of `shape` (row-major)."""
    return normal_at(seed, lax.iota(jnp.uint32, math.prod(shape)).reshape(shape), dtype)


def hashed_normal(key, shape: tuple, dtype) -> jax.Array:
    return seeded_normal(seed_of(key), shape, dtype)


@jax.tree_util.register_pytree_node_class
@dataclass(frozen=True)
class Seeded(Factored):
    """The matrix w + scale * z, z = seeded_normal(seed, w.shape), never stored whole by a
    matmul: rows [i t, (i + 1) t) of z are regenerated tile by tile where they are used."""

    w: jax.Array
    seed: jax.Array
    scale: float

    def _tiles(self) -> tuple[int, int]:
        """(rows per tile, tiles): a divisor of the row count near the target where there is
        one (no padding); one tile for symbolic shapes (artifacts for any size)."""
        m, n = self.w.shape
        if not (isinstance(m, int) and isinstance(n, int)):
            return m, 1
        t = min(m, max(-(-TILE // n), -(-m // MAX_TILES)))
        t = next((d for d in range(t, (t - 1) // 2, -1) if m % d == 0), t)
        return t, -(-m // t)

    def rows(self, start, count: int) -> jax.Array:
        """Rows [start, start + count) of z (rows past the end are noise too, never used
        unmasked)."""
        n = self.w.shape[1]
        first = jnp.asarray(start, jnp.uint32) * jnp.uint32(n)
        index = first + lax.iota(jnp.uint32, count * n).reshape(count, n)
        return normal_at(self.seed, index, self.w.dtype)

    def noise(self) -> jax.Array:
        return self.rows(0, self.w.shape[0])

    def rmatmul(self, x: jax.Array) -> jax.Array:
        t, tiles = self._tiles()
        if tiles == 1:
            return x @ self.w + self.scale * (x @ self.noise())
        extra = t * tiles - self.w.shape[0]
        xp = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)]) if extra else x

        def tile(i, acc):
            xi = lax.dynamic_slice_in_dim(xp, i * t, t, axis=-1)
            return acc + self.scale * (xi @ self.rows(i * t, t))

        return lax.fori_loop(0, tiles, tile, x @ self.w)

    def matmul(self, x: jax.Array) -> jax.Array:
        t, tiles = self._tiles()
        if tiles == 1 or x.ndim > 2:
            return self.w @ x + self.scale * (self.noise() @ x)
        zx = lax.map(lambda i: self.rows(i * t, t) @ x, jnp.arange(tiles))
        return self.w @ x + self.scale * zx.reshape((tiles * t,) + zx.shape[2:])[: self.w.shape[0]]

    def tree_flatten(self):
        return (self.w, self.seed), self.scale

    @classmethod
    def tree_unflatten(cls, scale, children):
        return cls(*children, scale)


def dense(x):
    """x with every factored matrix inside it materialized."""
    if isinstance(x, Factored):
        return x.dense()
    if isinstance(x, dict):
        return {k: dense(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(dense(v) for v in x)
    return x
