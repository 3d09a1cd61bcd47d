"""Black-box gradient estimators (`grad(f, wrt=[...], by=ESTIMATOR)`), one frozen dataclass
each: its options, how it estimates the gradient from forward evaluations only, and what
`explain` and `verify` say of it; `BLACK_BOX` maps each name to its class.

Each estimator gets `objective(theta) -> scalar` (the export's function with every argument
but the `wrt` ones fixed; a function that draws sees the same key in every evaluation: common
random numbers) and estimates grad E_z f(theta + s z), the gradient of the Gaussian-smoothed
objective, without bias, so f may call extern functions and non-smooth ops without backward
rules:

- `spsa(eps=0.001, samples=1)`: MeZO-style two-point SPSA; per sample, z ~ N(0, I) from
  fold_in(key, sample), (f(theta + eps z) - f(theta - eps z)) / (2 eps) z; the samples run in
  a loop, so memory stays that of one sample, and z (`runtime.perturbed.normal_at`, a hash of
  (seed, index)) is regenerated at each use, never stored: a matrix stays `Seeded` (its
  matmuls add x @ (eps z) block by block to x @ w), and a `descend` step writes theta - lr *
  proj * z over theta;
- `es(sigma=0.1, pop=64, antithetic=true)`: evolution strategies, a population of pop
  perturbations (pop / 2 antithetic pairs, or pop one-sided ones against the centre value)
  over the flattened parameters, evaluated with one `vmap`;
- `eggroll(sigma=0.1, pop=64, rank=1, antithetic=true)`: as `es`, but each matrix parameter W
  [m, n] is perturbed by E = A B^T / sqrt(r) with A [m, r], B [n, r] Gaussian (E has identity
  covariance, like a full Gaussian): the forward pass sees W as a `LowRank` value and a matmul
  computes x @ W + s (x @ A) B^T without the perturbed matrix; the estimate is assembled as
  sum_i w_i A_i B_i^T / sqrt(r). A kernel of higher rank (a convolution's [KH, KW, C, O]) is
  perturbed as the matrix [KH KW C, O], formed where the convolution reads it (a kernel is
  small next to its input).

With a `mesh`, the population axis of the perturbations is sharded over the mesh's first axis
(or the axis `shard={"pop": AXIS}` names, `runtime.sharding`).
The zeroth-order pass (`passes.zeroth_order`) checks and completes `by=`; the runtime
(`runtime.zeroth_order`) calls `gradient` or `descend` of the estimator it selects.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax import lax

from gradlang.ops import Annotation
from gradlang.options import chosen, option
from gradlang.runtime.perturbed import LowRank, Seeded, seed_of, seeded_normal
from gradlang.types import StructType, TensorType, TreeType, TupleType, Type


class BlackBox:
    """A black-box gradient estimator; subclasses are frozen dataclasses whose fields are its
    options. `theta` is the list of the `wrt` parameters (pytrees of arrays)."""

    name: ClassVar[str]
    description: ClassVar[str]
    """How `explain` describes the estimate."""
    descent: ClassVar[str] = ""
    """How a `descend` step is fused into the estimate, for `explain` ('' when it is not: the
    step subtracts lr times the estimate)."""
    note: ClassVar[str | None] = None
    """What `verify` notes about its estimates (None: nothing)."""
    at_jax_fn: ClassVar[str | None] = None
    """What becomes of a perturbed parameter passed to a `jax fn`, for `explain` (None: it
    enters as it is)."""

    @property
    def scale(self) -> float:
        """s, the smoothing scale of the objective E f(w + s z) it estimates the gradient of."""
        raise NotImplementedError

    @property
    def evaluations(self) -> int:
        """Forward evaluations of the objective per estimate."""
        raise NotImplementedError

    def target(self) -> str:
        """What it estimates, for `explain`."""
        return f"unbiased for the gradient of the Gaussian-smoothed objective E f(w + {self.scale} z)"

    def perturbation(self, name: str, t: Type) -> str | None:
        """How the leaves of the `wrt` parameter `name` of type `t` are perturbed, for
        `explain` (None: all alike, as the description says)."""
        return None

    @classmethod
    def at(cls, scale: float, pop: int) -> Annotation:
        """The estimator at smoothing scale `scale` (and population `pop` where it has one),
        as a user would write it."""
        raise NotImplementedError

    def gradient(self, objective: Callable, theta: list, key, mesh=None) -> list:
        """The estimated gradient, one pytree per parameter."""
        raise NotImplementedError

    def descend(self, objective: Callable, theta: list, key, lr, mesh=None) -> list:
        """The SGD step theta - lr * gradient."""
        grads = self.gradient(objective, theta, key, mesh)
        return [jax.tree.map(lambda t, g: t - lr * g, t, g) for t, g in zip(theta, grads)]


# ---- spsa: seed-regenerated two-point differences


def _seeds(key, sample, n: int, after=None) -> list:
    """The noise seeds of one SPSA sample, one per parameter leaf, computed from `after`, the
    value this use must follow: each seed is xor-ed with whether `after` has a NaN (when it
    has, the estimate is NaN whatever the noise). XLA can then neither merge the generations
    of the same noise into one stored array nor run two evaluations (holding both
    activations) at once, which an optimization barrier does not prevent on CPU."""
    keys = jax.random.split(jax.random.fold_in(key, sample), n)
    taint = jnp.uint32(0) if after is None else jnp.isnan(after).any().astype(jnp.uint32)
    return [seed_of(k) ^ taint for k in keys]


def _perturb(t: jax.Array, seed, scale: float):
    """t + scale z: a matrix stays `Seeded` (its matmuls regenerate z in tiles)."""
    if t.ndim == 2:
        return Seeded(t, seed, scale)
    return t + scale * seeded_normal(seed, t.shape, t.dtype)


def _projections(objective: Callable, leaves: list, tree, key, eps: float, samples: int):
    """Per sample s, (f(theta + eps z_s) - f(theta - eps z_s)) / (2 eps); theta is only read."""

    def projection(s, after):
        seeds = _seeds(key, s, len(leaves), after)
        plus = objective(tree.unflatten([_perturb(t, k, eps) for t, k in zip(leaves, seeds)]))
        seeds = _seeds(key, s, len(leaves), plus)
        minus = objective(tree.unflatten([_perturb(t, k, -eps) for t, k in zip(leaves, seeds)]))
        return (plus - minus) / (2 * eps)

    if samples == 1:  # no loop: extern calls stay at the top level, where artifacts cut them out
        return projection(0, None)[None]
    return lax.fori_loop(0, samples, lambda s, p: p.at[s].set(projection(s, p)),
                         jnp.zeros((samples,), leaves[0].dtype))


def _add_noise(base: list, key, coefs: jax.Array) -> list:
    """base + sum_s coefs[s] z_s, each z_s regenerated from its seed: one fused loop per leaf,
    written in place over `base` when it is donated."""

    def add(s, acc):
        seeds = _seeds(key, s, len(acc), coefs)
        return [a + coefs[s] * seeded_normal(k, a.shape, a.dtype) for a, k in zip(acc, seeds)]

    if coefs.shape[0] == 1:
        return add(0, base)
    return lax.fori_loop(0, coefs.shape[0], add, base)


@dataclass(frozen=True)
class Spsa(BlackBox):
    """Two-point SPSA."""

    name: ClassVar[str] = "spsa"
    description: ClassVar[str] = ("two-point SPSA (MeZO): (f(w + eps z) - f(w - eps z)) / (2 eps) "
                                  "z, z ~ N(0, I)")
    descent: ClassVar[str] = "the update regenerates the SPSA noise, so no gradient is stored (MeZO)"
    at_jax_fn: ClassVar[str | None] = (
        "a perturbed matrix passed to a jax fn stays factored through its matmuls (z "
        "regenerated block by block, no perturbed copy); any other use of it inside the "
        "function forms w + eps z there")
    eps: float = option(1e-3)
    """The difference step."""
    samples: int = option(1)

    @property
    def scale(self) -> float:
        return self.eps

    @property
    def evaluations(self) -> int:
        return 2 * self.samples

    @classmethod
    def at(cls, scale: float, pop: int) -> Annotation:
        return Annotation(cls.name, (("eps", scale),))

    def gradient(self, objective: Callable, theta: list, key, mesh=None) -> list:
        return self._with_noise(objective, theta, key, None)

    def descend(self, objective: Callable, theta: list, key, lr, mesh=None) -> list:
        return self._with_noise(objective, theta, key, lr)

    def _with_noise(self, objective: Callable, theta: list, key, lr) -> list:
        """The gradient, or with `lr` the SGD step theta - lr * gradient (MeZO), from the
        projections and the regenerated noise: no copy of theta, perturbed or not, is made."""
        leaves, tree = jax.tree.flatten(theta)
        proj = _projections(objective, leaves, tree, key, self.eps, self.samples) / self.samples
        if lr is None:
            return tree.unflatten(_add_noise([jnp.zeros_like(t) for t in leaves], key, proj))
        return tree.unflatten(_add_noise(leaves, key, -lr * proj))


# ---- es and eggroll: a Gaussian population


def _shard(x, mesh):
    """x with its leading (population) axis split over `mesh`: a `jax.sharding.Mesh` (its
    first axis), or a pair (mesh, axis names) from `shard={"pop": ...}` (runtime.sharding)."""
    if mesh is None:
        return x
    from jax.sharding import NamedSharding, PartitionSpec

    mesh, axes = mesh if isinstance(mesh, tuple) else (mesh, (mesh.axis_names[0],))
    spec = PartitionSpec(axes[0] if len(axes) == 1 else axes, *([None] * (x.ndim - 1)))
    return lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


class Population(BlackBox):
    """An estimator from a population of pop perturbations; antithetic pairs (z and -z) split
    it in two halves."""

    sigma: float
    pop: int
    antithetic: bool

    def check(self) -> str | None:
        if self.antithetic and self.pop % 2:
            return (f"'{self.name}' with antithetic pairs needs an even pop, got {self.pop}; "
                    f"write antithetic=false for an odd one")
        return None

    @property
    def scale(self) -> float:
        return self.sigma

    @property
    def evaluations(self) -> int:
        return self.pop + (not self.antithetic)

    @property
    def draws(self) -> int:
        """The noise draws: pop / 2 antithetic pairs, or pop one-sided members."""
        return self.pop // 2 if self.antithetic else self.pop

    @classmethod
    def at(cls, scale: float, pop: int) -> Annotation:
        return Annotation(cls.name, (("sigma", scale), ("pop", pop)))


@dataclass(frozen=True)
class Es(Population):
    """Evolution strategies."""

    name: ClassVar[str] = "es"
    description: ClassVar[str] = ("evolution strategies: the population's values against its "
                                  "Gaussian noise")
    sigma: float = option(0.1)
    pop: int = option(64)
    antithetic: bool = option(True)

    def gradient(self, objective: Callable, theta: list, key, mesh=None) -> list:
        """As evosax's OpenES: the parameters flattened into one vector, one noise draw z [n,
        D], the population theta + sigma [z; -z] one [pop, D] array whose rows are cut back
        into the parameters inside one vmap, and the estimate the flat contraction w @ z. XLA
        regenerates z inside its consumers rather than storing it (measured faster than
        reading the applied perturbations back from the population: 1.09-1.23x evosax's
        throughput against 0.99-1.09x)."""
        leaves, tree = jax.tree.flatten(theta)
        sigma, n = self.sigma, self.draws
        cuts = list(itertools.accumulate(t.size for t in leaves))[:-1]

        def unflatten(flat):
            return tree.unflatten([p.reshape(t.shape) for p, t in zip(jnp.split(flat, cuts), leaves)])

        center = jnp.concatenate([t.ravel() for t in leaves])
        z = jax.random.normal(key, (n, center.size), center.dtype)
        members = _shard(center + sigma * (jnp.concatenate([z, -z]) if self.antithetic else z), mesh)
        values = jax.vmap(lambda m: objective(unflatten(m)))(members)
        if self.antithetic:
            w = (values[:n] - values[n:]) / (2 * sigma * n)
        else:
            w = (values - objective(theta)) / (sigma * n)
        return unflatten(w @ z)


@dataclass(frozen=True)
class Eggroll(Population):
    """Evolution strategies with low-rank perturbations of matrices."""

    name: ClassVar[str] = "eggroll"
    description: ClassVar[str] = ("low-rank evolution strategies (EGGROLL): matrices perturbed by "
                                  "A B^T / sqrt(rank), never materialized in the forward pass")
    note: ClassVar[str | None] = (
        "eggroll's low-rank noise matches a Gaussian's covariance, not its higher moments: "
        "unbiased on quadratics, O(sigma^2) from the smoothed gradient elsewhere (a smaller "
        "sigma shrinks it)")
    at_jax_fn: ClassVar[str | None] = (
        "a perturbed matrix passed to a jax fn stays low-rank through its matmuls (x W + "
        "sigma (x A) B^T / sqrt(rank)); any other use of it inside the function forms W + "
        "sigma A B^T / sqrt(rank) there, once per member")
    sigma: float = option(0.1)
    pop: int = option(64)
    rank: int = option(1)
    antithetic: bool = option(True)

    def target(self) -> str:
        return ("identity-covariance noise: unbiased on quadratics, otherwise O(sigma^2) from "
                f"the gradient of the Gaussian-smoothed objective E f(w + {self.scale} z)")

    def perturbation(self, name: str, t: Type) -> str | None:
        """Matrices and kernels (leaves of rank >= 2, a kernel [..., n] as the matrix of its
        leading dims by its last) get the low-rank noise, every other leaf a full-rank
        Gaussian (as `es`): by field for a struct, by rank for a tree (its leaves are known
        only at run time)."""
        low = f"low-rank A B^T / sqrt({self.rank}), A [m, {self.rank}], B [n, {self.rank}]"
        if isinstance(t, TreeType):
            return (f"every leaf of rank >= 2 (a matrix [m, n], or a kernel [..., n] as the "
                    f"matrix of its leading dims by its last): {low}; every other leaf: a "
                    f"full-rank Gaussian, as es (the tree's leaves are known at run time)")
        paths = _leaf_paths(t, name)
        matrices = [p for p, leaf in paths if leaf.rank == 2]
        kernels = [p for p, leaf in paths if leaf.rank > 2]
        others = [p for p, leaf in paths if leaf.rank < 2]
        if not others and not kernels:
            return None
        if not matrices and not kernels:
            return "a full-rank Gaussian, as es (no leaf is a matrix)"
        parts = [f"{', '.join(matrices)} (matrices)"] if matrices else []
        if kernels:
            parts.append(f"{', '.join(kernels)} (kernels, as the matrix of the leading dims by "
                         f"the last)")
        return f"{'; '.join(parts)}: {low}" + (
            f"; {', '.join(others)}: a full-rank Gaussian, as es" if others else "")

    def gradient(self, objective: Callable, theta: list, key, mesh=None) -> list:
        leaves, tree = jax.tree.flatten(theta)
        n, r = self.draws, self.rank
        keys = jax.random.split(key, len(leaves))
        noise = []
        for k, t in zip(keys, leaves):
            if t.ndim >= 2:  # a kernel [..., n] as the matrix [m, n] of its leading dims
                ka, kb = jax.random.split(k)
                rows = math.prod(t.shape[:-1])
                noise.append((jax.random.normal(ka, (n, rows, r), t.dtype),
                              jax.random.normal(kb, (n, t.shape[-1], r), t.dtype)))
            else:
                noise.append(jax.random.normal(k, (n,) + t.shape, t.dtype))

        def perturbed(e, s):
            return tree.unflatten([LowRank(t, ei[0], ei[1], s / r ** 0.5) if t.ndim >= 2
                                   else t + s * ei for t, ei in zip(leaves, e)])

        w = self._weights(objective, perturbed, noise, theta, mesh)
        grads = [(jnp.einsum("i,imr,inr->mn", w, *ei) / r ** 0.5).reshape(t.shape)
                 if t.ndim >= 2 else jnp.tensordot(w, ei, axes=1)
                 for t, ei in zip(leaves, noise)]
        return tree.unflatten(grads)

    def _weights(self, objective: Callable, perturbed: Callable, noise: list, theta: list,
                 mesh) -> jax.Array:
        """Per member i, w_i with grad = sum_i w_i E_i: (f(+) - f(-)) / (2 sigma n) for
        antithetic pairs, (f(+) - f(theta)) / (sigma n) otherwise."""
        sigma = self.sigma
        noise = jax.tree.map(lambda x: _shard(x, mesh), noise)
        plus = jax.vmap(lambda e: objective(perturbed(e, sigma)))(noise)
        n = plus.shape[0]
        if self.antithetic:
            minus = jax.vmap(lambda e: objective(perturbed(e, -sigma)))(noise)
            return (plus - minus) / (2 * sigma * n)
        return (plus - objective(theta)) / (sigma * n)


def _leaf_paths(t: Type, path: str) -> list[tuple[str, TensorType]]:
    """The tensors of a tensor, struct or tuple type with their paths (`w`, `enc.w1`, `t[0]`)."""
    if isinstance(t, StructType):
        return [leaf for n, f in t.fields for leaf in _leaf_paths(f, f"{path}.{n}")]
    if isinstance(t, TupleType):
        return [leaf for i, e in enumerate(t.elems) for leaf in _leaf_paths(e, f"{path}[{i}]")]
    assert isinstance(t, TensorType)
    return [(path, t)]


BLACK_BOX: dict[str, type[BlackBox]] = {c.name: c for c in (Spsa, Es, Eggroll)}
"""Every black-box estimator, by name (in the order `explain`, messages and `verify --compare`
list them)."""


def estimator(by: Annotation) -> BlackBox:
    """The estimator `by=` names, with its options checked and defaults filled in (raises
    OptionError)."""
    return chosen(BLACK_BOX, by.name, by.options, "gradient estimator", f"estimator '{by.name}'")


def compared(by: Annotation) -> list[Annotation]:
    """Every black-box estimator at the smoothing scale of `by` and its population (made even
    for antithetic pairs; es's default when it has none), as a user would write it (`verify
    --compare`)."""
    given = estimator(by)
    pop = given.pop if isinstance(given, Population) else Es.pop
    return [c.at(given.scale, pop + pop % 2) for c in BLACK_BOX.values()]
