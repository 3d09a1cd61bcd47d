"""Perturbed matrices kept factored, for black-box estimators' forward evaluations.

A black-box estimator evaluates the objective at theta + s E. For a matrix parameter W, E is
never added to W where it can be avoided: the lowering passes a `Factored` value through the
program (`runtime.lower._FACTORED` ops take it as it is), a matmul computes x @ W + s x @ E from
the factors, and any other op gets it `dense()`:

- `LowRank` (eggroll): E = a b^T, so x @ E = (x @ a) b^T costs r (m + n) per row of x;
- `Seeded` (spsa): E = z, Gaussian noise that is a pure function of (seed, index)
  (`normal_at`); a matmul forms w + s z one block of columns (or rows) at a time,
  regenerating that block's noise, and writes the block's product into the result, so
  neither the perturbed matrix nor z is ever stored: a step's memory stays that of the
  forward pass.

A `jax fn` called on factored matrices (`call`) is traced to a jaxpr and evaluated with them
kept factored through its matmuls (`dot_general`); any other use materializes the matrix
there, where XLA fuses w + s E into the consumer when it can (a lookup of a few rows of an
embedding regenerates the noise of those rows only).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import ClosedJaxpr, JaxprEqn, Literal

TILE = 1 << 9
"""The fewest entries of s z a `Seeded` matmul forms at once (a block of columns or rows)."""
MAX_TILES = 32
"""A block's temporaries (its entries, their indices and its product) hold about 1 /
MAX_TILES of what the matmul holds anyway (w, the other operand and the result): a few
percent of its memory, in at most about MAX_TILES iterations."""


def take(x: jax.Array, ids: jax.Array, axis: int = 0) -> jax.Array:
    """The entries of x at the integer `ids` along `axis` (a lookup, `table[ids]`): ids out of
    range read NaN (float x) and get no gradient, negative ids count from the end, as
    jnp.take's fill mode."""
    return jnp.take(x, ids, axis=axis, mode="fill")


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

    def through(self, fn: Callable[[jax.Array], jax.Array]) -> Any:
        """fn of the matrix, for an op whose backward is the identity (`quantize(w, 4) with
        ste`): materialized here; a ghost-tapped weight stays tapped (`runtime.ghost`)."""
        return fn(self.dense())

    def rmatmul(self, x: jax.Array) -> jax.Array:
        """x @ (w + s E) = x @ w + s (x @ E)."""
        raise NotImplementedError

    def matmul(self, x: jax.Array) -> jax.Array:
        """(w + s E) @ x = w @ x + s (E @ x)."""
        raise NotImplementedError

    def noise(self) -> jax.Array:
        """E, materialized."""
        raise NotImplementedError

    def take(self, ids: jax.Array) -> jax.Array:
        """The rows at `ids` (a lookup, `table[ids]`), as `take` reads them."""
        return take(self.dense(), ids)

    def flattened(self, k: int) -> Factored | None:
        """This matrix reshaped to [its first k dims' size, the rest's] (row-major), still
        factored; None where the factors cannot follow."""
        return None

    def convolve(self, patches: Callable[[], jax.Array], k: int) -> jax.Array | None:
        """A convolution by this kernel as its patches (im2col, `patches()`) times the kernel
        flattened after its first k dims; None to materialize the kernel instead, as a
        perturbed one is (a kernel is small next to its input's patches)."""
        return None


@jax.tree_util.register_pytree_node_class
@dataclass(frozen=True)
class LowRank(Factored):
    """The matrix w + scale * a @ b.T (a: [m, r], b: [n, r]); a kernel of higher rank
    [..., n] is perturbed as the matrix of its leading dims by its last (m their size)."""

    w: jax.Array
    a: jax.Array
    b: jax.Array
    scale: float

    def noise(self) -> jax.Array:
        return (self.a @ self.b.T).reshape(self.w.shape)

    def rmatmul(self, x: jax.Array) -> jax.Array:
        if self.w.ndim != 2:
            return x @ self.dense()
        return x @ self.w + self.scale * (x @ self.a) @ self.b.T

    def matmul(self, x: jax.Array) -> jax.Array:
        if self.w.ndim != 2:
            return self.dense() @ x
        return self.w @ x + self.scale * self.a @ (self.b.T @ x)

    def take(self, ids: jax.Array) -> jax.Array:
        """The rows at `ids` of w + s a b^T: w's rows plus s (a's rows) b^T, the table's noise
        never formed (an embedding perturbed by eggroll)."""
        if self.w.ndim != 2:
            return take(self.dense(), ids)
        return take(self.w, ids) + self.scale * take(self.a, ids) @ self.b.T

    def flattened(self, k: int) -> LowRank | None:
        """Flattened after all dims but the last, the factors are the matrix's own."""
        if k != self.w.ndim - 1:
            return None
        return LowRank(self.w.reshape(-1, self.w.shape[-1]), self.a, self.b, self.scale)

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
        """Rows (axis 0) or columns (axis 1) [start, start + size) of w + s z."""
        m, n = self.w.shape
        shape = (size, n) if axis == 0 else (m, size)
        r, c = (lax.broadcasted_iota(jnp.uint32, shape, d) for d in (0, 1))
        first = jnp.asarray(start, jnp.uint32)
        index = (r + first) * jnp.uint32(n) + c if axis == 0 else r * jnp.uint32(n) + c + first
        w = lax.dynamic_slice_in_dim(self.w, start, size, axis)
        return w + self.scale * normal_at(self.seed, index, self.w.dtype)

    def _tiled(self, axis: int, product, out_axis: int, operand) -> jax.Array:
        """product(w + s z), one block of w + s z along `axis` at a time (sized by TILE and
        MAX_TILES against w and the other operand's shape), each block's product written to
        its slice of the result along `out_axis` in a loop: one matmul's work, no copy of w."""
        size, other = self.w.shape[axis], self.w.shape[1 - axis]
        if not (isinstance(size, int) and isinstance(other, int)):  # symbolic (artifacts)
            return product(self.dense())
        entries = math.prod(operand)
        entries = entries if isinstance(entries, int) else other  # a symbolic batch
        rows = entries // other  # the result's rows: a block's product is rows x t
        held = size * other + entries + rows * size  # w, the operand and the result
        t = min(size, max(-(-TILE // other), held // MAX_TILES // (2 * other + rows)))
        full, rest = divmod(size, t)
        if full == 1 and not rest:
            return product(self.dense())

        def put(out, start, n):
            return lax.dynamic_update_slice_in_dim(out, product(self.block(axis, start, n)),
                                                   start, out_axis)

        # The result starts as the first block's product padded: made from the operand, it
        # is not scheduled (and held) before the operand exists, as a buffer of zeros would be.
        first = product(self.block(axis, 0, t))
        pad = [(0, 0, 0)] * first.ndim
        pad[out_axis] = (0, size - t, 0)
        out = lax.pad(first, jnp.zeros((), first.dtype), pad)
        out = lax.fori_loop(1, full, lambda i, out: put(out, i * t, t), out)
        return put(out, full * t, rest) if rest else out

    def rmatmul(self, x: jax.Array) -> jax.Array:
        return self._tiled(1, lambda b: x @ b, x.ndim - 1, x.shape)

    def flattened(self, k: int) -> Seeded:
        """The noise is indexed row-major, so a row-major reshape keeps every entry's."""
        return Seeded(self.w.reshape(math.prod(self.shape[:k]), -1), self.seed, self.scale)

    def matmul(self, x: jax.Array) -> jax.Array:
        if x.ndim > 2:
            return self.dense() @ x
        return self._tiled(0, lambda b: b @ x, 0, x.shape)

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


def call(fn, args: tuple):
    """fn(*args), the factored matrices among args kept factored inside fn (module doc)."""
    leaves, tree = jax.tree.flatten(args, is_leaf=lambda v: isinstance(v, Factored))
    if not any(isinstance(v, Factored) for v in leaves):
        return fn(*args)
    avals = [jax.ShapeDtypeStruct(jnp.shape(v), jnp.result_type(v)) for v in leaves]
    closed, shape = jax.make_jaxpr(lambda *xs: fn(*tree.unflatten(xs)), return_shape=True)(*avals)
    out = _evaluate(closed, leaves)
    return jax.tree.unflatten(jax.tree.structure(shape), [dense(v) for v in out])


_CALLS = frozenset({"pjit", "jit", "closed_call"})
"""Primitives that call a jaxpr inline (`jnp` functions are jitted): evaluated through."""


def _evaluate(closed: ClosedJaxpr, args: list) -> list:
    env: dict = dict(zip(closed.jaxpr.constvars, closed.consts))
    env.update(zip(closed.jaxpr.invars, args))

    def read(v):
        return v.val if isinstance(v, Literal) else env[v]

    for eqn in closed.jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        with eqn.ctx.manager:
            outs = _factored(eqn, ins) if any(isinstance(x, Factored) for x in ins) else None
            if outs is None:
                ins = [dense(x) for x in ins]
                outs = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
                outs = outs if eqn.primitive.multiple_results else [outs]
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in closed.jaxpr.outvars]


def _factored(eqn: JaxprEqn, ins: list) -> list | None:
    """The outputs of `eqn` on arguments some of which are factored, where a rule keeps them
    so (None: the arguments are to be materialized)."""
    name, first = eqn.primitive.name, ins[0]
    if name in _CALLS and isinstance(eqn.params.get("jaxpr"), ClosedJaxpr):
        return _evaluate(eqn.params["jaxpr"], ins)
    if name == "dot_general" and len(ins) == 2:
        out = _dot(eqn, *ins)
        return None if out is None else [out]
    if name == "convert_element_type" and eqn.params["new_dtype"] == first.dtype:
        return [first]
    return None


def _dot(eqn: JaxprEqn, lhs, rhs) -> jax.Array | None:
    """A `dot_general` with one factored operand and no batch dims, as the factored matmul in
    the operand's place, the result in dot_general's layout (the lhs's free dims, then the
    rhs's): a 2-D matrix with one contracting dim on either side, or an operand of any rank
    whose leading dims are the contracted ones (einsum's "btd,dnk->btnk"), flattened to a
    matrix."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    want = eqn.params.get("preferred_element_type")
    f, x = (lhs, rhs) if isinstance(lhs, Factored) else (rhs, lhs)
    if (isinstance(x, Factored) or lb or rb or jnp.result_type(x) != f.dtype
            or want not in (None, f.dtype)):
        return None
    fc, xc = (tuple(lc), tuple(rc)) if f is lhs else (tuple(rc), tuple(lc))
    if sorted(fc) == list(range(len(fc))) and (len(fc) > 1 or f.w.ndim > 2):
        pairs = sorted(zip(fc, xc))  # x's contracted dims in the order of f's
        out = _flat_rmatmul(f, x, tuple(i for _, i in pairs), len(fc))
        if out is None or f is rhs:
            return out
        n = f.w.ndim - len(fc)  # as the left operand: f's free dims first
        return jnp.moveaxis(out, tuple(range(out.ndim - n, out.ndim)), tuple(range(n)))
    if len(fc) != 1 or f.w.ndim != 2:
        return None
    (fc,), (xc,) = fc, xc
    free = tuple(n for i, n in enumerate(x.shape) if i != xc)
    if fc == 0:  # x @ f (x's free dims first), or f^T @ x = (x^T @ f)^T
        out = f.rmatmul(jnp.moveaxis(x, xc, -1))
        return out if f is rhs else jnp.moveaxis(out, -1, 0)
    y = jnp.moveaxis(x, xc, 0).reshape(f.shape[1], -1)  # f @ y, or x @ f^T = (f @ x^T)^T
    out = f.matmul(y).reshape((f.shape[0],) + free)
    return out if f is lhs else jnp.moveaxis(out, 0, -1)


def _flat_rmatmul(f: Factored, x, xc: tuple[int, ...], k: int) -> jax.Array | None:
    """x contracted with f's first k dims (x's dims `xc`, in that order): x's contracted dims
    moved last and flattened, times f flattened to [C, F], reshaped to x's free dims then f's."""
    flat = f.flattened(k)
    if flat is None:
        return None
    free = tuple(n for i, n in enumerate(x.shape) if i not in xc)
    x2 = jnp.moveaxis(x, xc, tuple(range(x.ndim - k, x.ndim))).reshape(free + (-1,))
    return flat.rmatmul(x2).reshape(free + tuple(f.shape[k:]))
