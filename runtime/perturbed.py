"""Perturbed matrices kept factored, for black-box estimators' forward evaluations.

A black-box estimator evaluates the objective at theta + s E. For a matrix parameter W, E is
never added to W where it can be avoided: the lowering passes a `Factored` value through the
program (`runtime.lower._FACTORED` ops take it as it is), a matmul computes x @ W + s x @ E from
the factors, and any other op gets it `dense()`:

- `LowRank` (eggroll): E = a b^T, so x @ E = (x @ a) b^T costs r (m + n) per row of x;
- `Seeded` (spsa): E = z, Gaussian noise that is a pure function of (seed, index)
  (`normal_at`); a matmul computes x @ w, then adds x @ (s z) one block of columns (or rows)
  of z at a time, regenerating that block's noise, so neither the perturbed matrix nor z is
  ever stored: a step's memory stays that of the forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax

TILE = 1 << 12
"""Entries of s z formed at once by a `Seeded` matmul (a block of columns or rows; more
when MAX_TILES blocks of this size do not cover the matrix)."""
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
    matmul: x @ (w + s z) is x @ w plus x @ (s z) a block of columns of z at a time (and
    (w + s z) @ x is w @ x plus (s z) @ x a block of rows at a time), each block of z formed
    where it is used and written nowhere."""

    w: jax.Array
    seed: jax.Array
    scale: float

    def noise(self) -> jax.Array:
        return seeded_normal(self.seed, self.w.shape, self.w.dtype)

    def block(self, axis: int, start, size: int) -> jax.Array:
        """Rows (axis 0) or columns (axis 1) [start, start + size) of scale z."""
        m, n = self.w.shape
        shape = (size, n) if axis == 0 else (m, size)
        r, c = (lax.broadcasted_iota(jnp.uint32, shape, d) for d in (0, 1))
        first = jnp.asarray(start, jnp.uint32)
        index = (r + first) * jnp.uint32(n) + c if axis == 0 else r * jnp.uint32(n) + c + first
        return self.scale * normal_at(self.seed, index, self.w.dtype)

    def _tiled(self, axis: int, product, out_axis: int) -> jax.Array:
        """product(w + s z): product(w), then product(block) added to its slices along
        `out_axis` for the blocks of s z along `axis` (at most 1 / MAX_TILES of w, or TILE
        entries, each), in a loop that updates product(w) in place."""
        size, other = self.w.shape[axis], self.w.shape[1 - axis]
        if not (isinstance(size, int) and isinstance(other, int)):  # symbolic (artifacts)
            return product(self.dense())
        t = min(size, max(-(-TILE // other), -(-size // MAX_TILES)))
        full, rest = divmod(size, t)
        if full == 1 and not rest:
            return product(self.dense())

        def add(out, start, n):
            part = product(self.block(axis, start, n))
            old = lax.dynamic_slice_in_dim(out, start, n, out_axis)
            return lax.dynamic_update_slice_in_dim(out, old + part.astype(out.dtype), start, out_axis)

        out = lax.fori_loop(0, full, lambda i, out: add(out, i * t, t), product(self.w))
        return add(out, full * t, rest) if rest else out

    def rmatmul(self, x: jax.Array) -> jax.Array:
        return self._tiled(1, lambda b: x @ b, x.ndim - 1)

    def matmul(self, x: jax.Array) -> jax.Array:
        if x.ndim > 2:
            return self.dense() @ x
        return self._tiled(0, lambda b: b @ x, 0)

    def tree_flatten(self):
        return (self.w, self.seed), self.scale

    @classmethod
    def tree_unflatten(cls, scale, children):
        return cls(*children, scale)


def dense(x):
    """x with every factored matrix inside it materialized, in any pytree (structs' dicts,
    tuples, a parameter tree's own nodes, kept as they are)."""
    if isinstance(x, Factored):
        return x.dense()
    if isinstance(x, jax.Array):
        return x
    if type(x) is dict:  # in its own key order (a pytree map would sort the keys)
        return {k: dense(v) for k, v in x.items()}
    if type(x) in (tuple, list):
        return type(x)(dense(v) for v in x)
    return jax.tree.map(lambda v: v.dense() if isinstance(v, Factored) else v, x,
                        is_leaf=lambda v: isinstance(v, Factored))
