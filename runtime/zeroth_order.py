"""Black-box gradient estimators (`grad(f, wrt=[...], by=...)`), from forward evaluations only.

Each estimator gets `objective(theta) -> scalar` (the export's function with every argument
but the `wrt` ones fixed; a function that draws sees the same key in every evaluation: common
random numbers) and estimates grad E_z f(theta + s z), the gradient of the Gaussian-smoothed
objective, without bias:

- `spsa`: per sample, z ~ N(0, I) from fold_in(key, sample), (f(theta + eps z) - f(theta -
  eps z)) / (2 eps) z; the samples run in a loop, so memory stays that of one sample, and z
  (`hashed_normal`, fused into its consumers) is regenerated at each use, never stored;
- `es`: a population of pop perturbations (pop / 2 antithetic pairs, or pop one-sided ones
  against the centre value), evaluated with `vmap`;
- `eggroll`: as `es`, but each matrix parameter W [m, n] is perturbed by E = A B^T / sqrt(r)
  with A [m, r], B [n, r] Gaussian (E has identity covariance, like a full Gaussian): the
  forward pass sees W as a `LowRank` value and a matmul computes x @ W + s (x @ A) B^T without
  the perturbed matrix; the estimate is assembled as sum_i w_i A_i B_i^T / sqrt(r).

With a `mesh`, the population axis of the perturbations is sharded over the mesh's first axis.
"""

from __future__ import annotations

import math
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


def _mix(x: jax.Array) -> jax.Array:
    """lowbias32 (C. Wellons): a 32-bit integer hash with full avalanche."""
    x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
    x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def hashed_normal(key, shape: tuple, dtype) -> jax.Array:
    """N(0, I) noise as a pure elementwise function of (key, index): two hashed 24-bit
    uniforms per entry through Box-Muller. XLA fuses it into its consumer (t + eps * z is one
    loop writing one array), where `jax.random.normal` on CPU materializes random-bit
    intermediates of about 4x the array; SPSA regenerates it at each use instead of storing it."""
    seed = jax.random.bits(key, (2,), jnp.uint32)
    index = lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    a = _mix(_mix(index ^ seed[0]) + seed[1])
    b = _mix(a ^ jnp.uint32(0x9E3779B9))
    u1 = ((a >> 8).astype(dtype) + 0.5) / 16777216.0
    u2 = (b >> 8).astype(dtype) / 16777216.0
    return jnp.sqrt(-2.0 * jnp.log(u1)) * jnp.cos(2.0 * jnp.pi * u2)


def spsa(objective: Callable, theta, key, o: dict, mesh=None):
    leaves, tree = jax.tree.flatten(theta)
    eps, samples = o["eps"], int(o["samples"])

    def sample(s, acc):
        keys = jax.random.split(jax.random.fold_in(key, s), len(leaves))

        def z(t, k, after):
            """z regenerated at each use, never stored: the barrier ties the key to the value
            computed before this use, so XLA can neither merge the three generations into one
            stored array nor run both evaluations (and hold both activations) at once."""
            return hashed_normal(lax.optimization_barrier((k, after))[0], t.shape, t.dtype)

        shifted = [t + eps * z(t, k, s) for t, k in zip(leaves, keys)]
        plus = objective(tree.unflatten(shifted))
        # theta - eps z from theta + eps z, as MeZO does in place: it can take its buffer
        minus = objective(tree.unflatten([t - 2 * eps * z(t, k, plus)
                                          for t, k in zip(shifted, keys)]))
        proj = (plus - minus) / (2 * eps)
        return [a + proj * z(a, k, minus) for a, k in zip(acc, keys)]

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
    """The population is built as one array per parameter, theta + sigma [z; -z], evaluated by
    one vmap, and the estimate uses the perturbations as applied, (member - theta) / sigma:
    the noise is drawn once and read back instead of being regenerated at each use."""
    leaves, tree = jax.tree.flatten(theta)
    sigma, antithetic = o["sigma"], o["antithetic"]
    n = int(o["pop"]) // 2 if antithetic else int(o["pop"])
    members = [_shard(t + sigma * (jnp.concatenate([z, -z]) if antithetic else z), mesh)
               for t, z in zip(leaves, _normals(key, leaves, (n,)))]
    values = jax.vmap(lambda *m: objective(tree.unflatten(list(m))))(*members)
    if antithetic:
        w = (values[:n] - values[n:]) / (2 * sigma * n)
    else:
        w = (values - objective(theta)) / (sigma * n)
    return tree.unflatten([jnp.tensordot(w, (m[:n] - t) / sigma, axes=1)
                           for m, t in zip(members, leaves)])


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
