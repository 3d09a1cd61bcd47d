"""Black-box gradient estimators (`grad(f, wrt=[...], by=...)`), from forward evaluations only.

Each estimator gets `objective(theta) -> scalar` (the export's function with every argument
but the `wrt` ones fixed; a function that draws sees the same key in every evaluation: common
random numbers) and estimates grad E_z f(theta + s z), the gradient of the Gaussian-smoothed
objective, without bias:

- `spsa`: per sample, z ~ N(0, I) from fold_in(key, sample), (f(theta + eps z) - f(theta -
  eps z)) / (2 eps) z; the samples run in a loop, so memory stays that of one sample, and z is
  generated in blocks each time it is used (`add_noise`), never stored whole;
- `es`: a population of pop perturbations (pop / 2 antithetic pairs, or pop one-sided ones
  against the centre value), evaluated with `vmap`;
- `eggroll`: as `es`, but each matrix parameter W [m, n] is perturbed by E = A B^T / sqrt(r)
  with A [m, r], B [n, r] Gaussian (E has identity covariance, like a full Gaussian): the
  forward pass sees W as a `LowRank` value and a matmul computes x @ W + s (x @ A) B^T without
  the perturbed matrix; the estimate is assembled as sum_i w_i A_i B_i^T / sqrt(r).

With a `mesh`, the population axis of the perturbations is sharded over the mesh's first axis.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax

from gradlang.ops import Estimator


@jax.tree_util.register_pytree_node_class
@dataclass(frozen=True)
class LowRank:
    """The matrix w + scale * a @ b.T, kept factored (a: [m, r], b: [n, r])."""

    w: jax.Array
    a: jax.Array
    b: jax.Array
    scale: float

    @property
    def shape(self) -> tuple[int, ...]:
        return self.w.shape

    @property
    def dtype(self):
        return self.w.dtype

    def dense(self) -> jax.Array:
        return self.w + self.scale * self.a @ self.b.T

    def rmatmul(self, x: jax.Array) -> jax.Array:
        """x @ (w + s a b^T) = x @ w + s (x @ a) b^T."""
        return x @ self.w + self.scale * (x @ self.a) @ self.b.T

    def matmul(self, x: jax.Array) -> jax.Array:
        """(w + s a b^T) @ x = w @ x + s a (b^T @ x)."""
        return self.w @ x + self.scale * self.a @ (self.b.T @ x)

    def tree_flatten(self):
        return (self.w, self.a, self.b), self.scale

    @classmethod
    def tree_unflatten(cls, scale, children):
        return cls(*children, scale)


def dense(x):
    """x with every LowRank inside it materialized."""
    if isinstance(x, LowRank):
        return x.dense()
    if isinstance(x, dict):
        return {k: dense(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(dense(v) for v in x)
    return x


def _normals(key, leaves: list, lead: tuple[int, ...] = ()) -> list:
    keys = jax.random.split(key, len(leaves))
    return [jax.random.normal(k, lead + l.shape, l.dtype) for k, l in zip(keys, leaves)]


def _shard(x, mesh):
    if mesh is None:
        return x
    from jax.sharding import NamedSharding, PartitionSpec

    spec = PartitionSpec(mesh.axis_names[0], *([None] * (x.ndim - 1)))
    return lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


BLOCK = 1 << 14
"""Entries of SPSA noise generated at a time: XLA on CPU materializes the random-bit
intermediates of `jax.random.normal`, about 4x the array, so noise for a whole parameter
would cost several copies of it."""


def add_noise(t: jax.Array, key, scale) -> jax.Array:
    """t + scale * z, z ~ N(0, I) a function of key alone, generated BLOCK entries at a time
    in a loop that updates its carry in place (the last block is shifted back to end at the
    array's end, its entries already done masked out). Sizes that are symbolic (an artifact's
    dims) get the noise in one piece."""
    n = t.size
    if not isinstance(n, int) or n <= BLOCK:
        return t + scale * jax.random.normal(key, t.shape, t.dtype)

    def block(i, f):
        start = jnp.minimum(i * BLOCK, n - BLOCK)
        fresh = start + jnp.arange(BLOCK) >= i * BLOCK
        z = jax.random.normal(jax.random.fold_in(key, i), (BLOCK,), t.dtype)
        part = lax.dynamic_slice(f, (start,), (BLOCK,)) + jnp.where(fresh, scale * z, 0)
        return lax.dynamic_update_slice(f, part, (start,))

    return lax.fori_loop(0, -(-n // BLOCK), block, t.reshape(-1)).reshape(t.shape)


def spsa(objective: Callable, theta, key, o: dict, mesh=None):
    leaves, tree = jax.tree.flatten(theta)
    eps, samples = o["eps"], int(o["samples"])

    def sample(s, acc):
        keys = jax.random.split(jax.random.fold_in(key, s), len(leaves))
        plus = objective(tree.unflatten([add_noise(t, k, eps) for t, k in zip(leaves, keys)]))
        minus = objective(tree.unflatten([add_noise(t, k, -eps) for t, k in zip(leaves, keys)]))
        proj = (plus - minus) / (2 * eps)
        return [add_noise(a, k, proj) for a, k in zip(acc, keys)]  # z regenerated, never stored

    zeros = [jnp.zeros_like(t) for t in leaves]
    # one sample needs no loop (and leaves extern calls at the top level, where an artifact
    # can cut them out)
    acc = sample(0, zeros) if samples == 1 else lax.fori_loop(0, samples, sample, zeros)
    return tree.unflatten([a / samples for a in acc])


def _population_weights(objective, perturbed, noise, o: dict, theta, mesh):
    """Per member i, w_i with grad = sum_i w_i E_i: (f(+) - f(-)) / (2 sigma n) for antithetic
    pairs, (f(+) - f(theta)) / (sigma n) otherwise."""
    sigma = o["sigma"]
    noise = jax.tree.map(lambda x: _shard(x, mesh), noise)
    plus = jax.vmap(lambda e: objective(perturbed(e, sigma)))(noise)
    n = plus.shape[0]
    if o["antithetic"]:
        minus = jax.vmap(lambda e: objective(perturbed(e, -sigma)))(noise)
        return (plus - minus) / (2 * sigma * n)
    return (plus - objective(theta)) / (sigma * n)


def es(objective: Callable, theta, key, o: dict, mesh=None):
    leaves, tree = jax.tree.flatten(theta)
    n = int(o["pop"]) // 2 if o["antithetic"] else int(o["pop"])
    noise = _normals(key, leaves, (n,))

    def perturbed(e, s):
        return tree.unflatten([t + s * ei for t, ei in zip(leaves, e)])

    w = _population_weights(objective, perturbed, noise, o, theta, mesh)
    return tree.unflatten([jnp.tensordot(w, e, axes=1) for e in noise])


def eggroll(objective: Callable, theta, key, o: dict, mesh=None):
    leaves, tree = jax.tree.flatten(theta)
    n = int(o["pop"]) // 2 if o["antithetic"] else int(o["pop"])
    r = int(o["rank"])
    keys = jax.random.split(key, len(leaves))
    noise = []
    for k, t in zip(keys, leaves):
        if t.ndim == 2:
            ka, kb = jax.random.split(k)
            noise.append((jax.random.normal(ka, (n, t.shape[0], r), t.dtype),
                          jax.random.normal(kb, (n, t.shape[1], r), t.dtype)))
        else:
            noise.append(jax.random.normal(k, (n,) + t.shape, t.dtype))

    def perturbed(e, s):
        return tree.unflatten([LowRank(t, ei[0], ei[1], s / r ** 0.5) if t.ndim == 2 else t + s * ei
                               for t, ei in zip(leaves, e)])

    w = _population_weights(objective, perturbed, noise, o, theta, mesh)
    grads = [jnp.einsum("i,imr,inr->mn", w, *ei) / r ** 0.5 if t.ndim == 2
             else jnp.tensordot(w, ei, axes=1) for t, ei in zip(leaves, noise)]
    return tree.unflatten(grads)


ESTIMATORS = {"spsa": spsa, "es": es, "eggroll": eggroll}


def black_box(f: Callable, names: list[str], wrt: tuple[str, ...], by: Estimator, draws: bool,
              value: bool, mesh=None) -> Callable:
    """The export's function of positional arguments (its key last) returning the estimated
    gradient as a dict keyed by the wrt names, after the value when `value`."""
    index = [names.index(w) for w in wrt]
    estimate = ESTIMATORS[by.name]
    options = dict(by.options)

    def gradient(*args):
        *args, key = args
        f_key, key = jax.random.split(key) if draws else (None, key)

        def objective(theta):
            full = list(args)
            for i, t in zip(index, theta):
                full[i] = t
            return f(*full, f_key) if draws else f(*full)

        theta = [args[i] for i in index]
        grads = dict(zip(wrt, estimate(objective, theta, key, options, mesh)))
        return (objective(theta), grads) if value else grads

    return gradient
