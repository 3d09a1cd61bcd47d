"""Per-example clipping: each example's gradient scaled to norm at most C, summed.

Two ways, chosen per `wrt` leaf by the `privacy` pass (`passes.ghost`):

- per-example gradients: `vmap` of the gradient over the examples, one [n, ...] array per leaf;
- ghost clipping, for a linear layer y = x @ w (or a lookup y = table[ids], below): example
  i's gradient of w is x_i^T g_i, with x_i [T, D] the rows the layer multiplies (every use of
  w stacked; T = 1 for an MLP on one example, the positions of a sequence, or of a
  convolution's output with x_i its input's patches, im2col) and g_i [T, H] their output
  cotangents. Its squared norm is <x_i x_i^T, g_i g_i^T>
  (||x_i||^2 ||g_i||^2 when T = 1), T^2 (D + H) work instead of T D H (Li et al. 2022, "Large
  Language Models Can Be Strong Differentially Private Learners"); when T^2 > D H, x_i^T g_i
  itself is cheaper and is formed, one layer at a time (mixed ghost norms, Bu et al. 2022).
  The clipped sum is sum_i c_i x_i^T g_i = X^T (c G), one product over every example's rows
  from the same x and g (book-keeping, Bu et al. 2023): one forward and one backward pass in
  all, and no [n, D, H] array.

A lookup's per-example gradient scatters the rows' cotangents into the table; its squared
norm sums <g_t, g_s> over the pairs of positions reading the same row (the token counts, Li et
al. 2022), and the clipped sum scatters every example's scaled rows at once.

The cotangents come from probes: the objective sees the weight of a linear layer as a
`Tapped` matrix whose product x @ w is x @ w + probe, the probe a zero array; the gradient
with respect to the probe is g, and the product records x.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp

from .lower import LoweringError
from .perturbed import Factored, take


class Taps:
    """The products and lookups of the linear layers in one evaluation of the objective:
    which leaf each read, its input (x of x @ w, the ids of table[ids]), and its probe (None
    while only discovering the shapes)."""

    def __init__(self, probes: list | None):
        self.probes = probes
        self.leaves: list[int] = []
        self.lookups: list[bool] = []
        self.inputs: list[jax.Array] = []
        self.shapes: list[jax.ShapeDtypeStruct] = []

    def product(self, leaf: int, x: jax.Array, w: jax.Array) -> jax.Array:
        return self._tap(leaf, False, x, x @ w)

    def lookup(self, leaf: int, ids: jax.Array, table: jax.Array) -> jax.Array:
        return self._tap(leaf, True, ids, take(table, ids))

    def _tap(self, leaf: int, lookup: bool, given: jax.Array, y: jax.Array) -> jax.Array:
        k = len(self.leaves)
        self.leaves.append(leaf)
        self.lookups.append(lookup)
        if self.probes is None:
            self.shapes.append(jax.ShapeDtypeStruct(y.shape, y.dtype))
            return y
        self.inputs.append(given)
        return y + self.probes[k]


@dataclass(frozen=True)
class Tapped(Factored):
    """A linear layer's weight as the objective sees it: its products x @ w go through `taps`.
    The `privacy` pass taps only leaves used nowhere else, so any other use is a compiler bug."""

    w: jax.Array
    taps: Taps
    leaf: int
    scale: float = 0.0

    def rmatmul(self, x: jax.Array) -> jax.Array:
        return self.taps.product(self.leaf, x, self.w)

    def take(self, ids: jax.Array) -> jax.Array:
        return self.taps.lookup(self.leaf, ids, self.w)

    def matmul(self, x: jax.Array) -> jax.Array:
        raise LoweringError("a ghost-clipped weight was used as the left operand of a matmul")

    def dense(self) -> jax.Array:
        raise LoweringError("a ghost-clipped weight was used outside a matmul x @ w")

    def through(self, fn) -> Tapped:
        """The weight after an op whose backward is the identity, still tapped: its gradient
        is the result's (`passes.ghost` taps only through such ops)."""
        return replace(self, w=fn(self.w))

    def convolve(self, patches: Callable[[], jax.Array], k: int) -> jax.Array:
        """A convolution by a ghost-clipped kernel is tapped as the product of its input's
        patches (the rows x_i of its per-example gradient x_i^T g_i) and the flattened
        kernel."""
        return self.flattened(k).rmatmul(patches())

    def flattened(self, k: int) -> Tapped:
        """An einsum's weight with its k leading dims contracted ("btd,dnk->btnk"), as the
        matrix [C, F] its products are tapped against (its gradient reshaped back)."""
        return Tapped(self.w.reshape(math.prod(self.w.shape[:k]), -1), self.taps, self.leaf)


def _clip_factors(sq_norms: jax.Array, clip: float) -> jax.Array:
    """min(1, C / ||g_i||) per example, from the squared norms (1 for a zero gradient)."""
    return clip / jnp.maximum(jnp.sqrt(sq_norms), clip)


def _sq_norms(grads) -> jax.Array:
    """Per example, the squared norm of per-example gradients stacked on axis 0."""
    return sum(jnp.sum(jnp.square(g.reshape(g.shape[0], -1)), axis=1)
               for g in jax.tree.leaves(grads))


def _weighted_sum(c: jax.Array, grads):
    return jax.tree.map(lambda g: jnp.tensordot(c, g, axes=1), grads)


def per_example(loss: Callable, theta, examples: tuple, in_axes: tuple, clip: float):
    """(per-example losses, the clipped sum) from vmapped per-example gradients of
    `loss(theta, *example)`."""
    losses, grads = jax.vmap(jax.value_and_grad(loss), in_axes=(None, *in_axes))(theta, *examples)
    return losses, _weighted_sum(_clip_factors(_sq_norms(grads), clip), grads)


def _layer_sq_norm(x: jax.Array, g: jax.Array) -> jax.Array:
    """Per example, ||x_i^T g_i||^2 for x [n, T, D], g [n, T, H]."""
    t, d, h = x.shape[1], x.shape[2], g.shape[2]
    static = all(isinstance(s, int) for s in (t, d, h))  # else symbolic (an artifact's dims)
    if static and t == 1:
        return jnp.sum(jnp.square(x), axis=(1, 2)) * jnp.sum(jnp.square(g), axis=(1, 2))
    if static and t * t > d * h:
        return jnp.sum(jnp.square(jnp.einsum("ntd,nth->ndh", x, g)), axis=(1, 2))
    return jnp.sum(jnp.einsum("ntd,nsd->nts", x, x) * jnp.einsum("nth,nsh->nts", g, g), axis=(1, 2))


def _valid_ids(ids: jax.Array, rows: int) -> tuple[jax.Array, jax.Array]:
    """(ids with negative ones counted from the end, whether each reads a row), as jnp.take's
    fill mode reads them (an id out of range reads the fill and gets no gradient)."""
    ids = jnp.where(ids < 0, ids + rows, ids)
    return ids, (ids >= 0) & (ids < rows)


def _lookup_sq_norm(ids: jax.Array, g: jax.Array, rows: int) -> jax.Array:
    """Per example, ||sum_t e_{ids_t} g_t^T||^2 = sum_{t, s: ids_t = ids_s} <g_t, g_s> for
    ids [n, T], g [n, T, E]: the embedding's ghost norm, from the token counts (Li et al.
    2022), T^2 E work instead of a [V, E] gradient per example."""
    ids, valid = _valid_ids(ids, rows)
    same = (ids[:, :, None] == ids[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    return jnp.sum(same * jnp.einsum("nte,nse->nts", g, g), axis=(1, 2))


def ghost(loss: Callable, theta, tapped: frozenset[int], examples: tuple, in_axes: tuple,
          clip: float):
    """As `per_example`, with the leaves (by flattening index) in `tapped` clipped by ghost
    norms: the objective multiplies by them only in linear layers."""
    leaves, tree = jax.tree.flatten(theta)
    plain_at = [j for j in range(len(leaves)) if j not in tapped]

    def evaluate(taps: Taps, plain: list, example: tuple):
        full = list(leaves)
        for j, p in zip(plain_at, plain):
            full[j] = p
        for j in tapped:
            full[j] = Tapped(leaves[j], taps, j)
        return loss(tree.unflatten(full), *example)

    plain = [leaves[j] for j in plain_at]
    found = Taps(None)
    jax.eval_shape(jax.vmap(lambda p, *e: evaluate(found, p, e), in_axes=(None, *in_axes)),
                   plain, *examples)
    n = jax.tree.leaves(examples)[0].shape[in_axes[0]]
    probes = [jnp.zeros((n, *s.shape), s.dtype) for s in found.shapes]

    def tapped_loss(probes, plain, *example):
        taps = Taps(probes)
        return evaluate(taps, plain, example), taps.inputs

    run = jax.vmap(jax.value_and_grad(tapped_loss, argnums=(0, 1), has_aux=True),
                   in_axes=(0, None, *in_axes))
    (losses, xs), (gs, plain_grads) = run(probes, plain, *examples)
    layers, lookups = {}, {}
    for j, lookup, x, g in zip(found.leaves, found.lookups, xs, gs):
        x = x.reshape(n, -1) if lookup else x.reshape(n, -1, x.shape[-1])
        g = g.reshape(n, -1, g.shape[-1])
        old = layers.get(j)
        layers[j] = (x, g) if old is None else (jnp.concatenate([old[0], x], 1),
                                                jnp.concatenate([old[1], g], 1))
        if lookups.setdefault(j, lookup) != lookup:
            raise LoweringError("a ghost-clipped weight was both looked up and multiplied")
    if set(layers) != tapped:
        raise LoweringError("a ghost-clipped weight was not multiplied by any x @ w")
    sq = _sq_norms(plain_grads) + sum(
        _lookup_sq_norm(x, g, leaves[j].shape[0]) if lookups[j] else _layer_sq_norm(x, g)
        for j, (x, g) in layers.items())
    c = _clip_factors(sq, clip)
    summed = list(leaves)
    for j, s in zip(plain_at, _weighted_sum(c, plain_grads)):
        summed[j] = s
    for j, (x, g) in layers.items():
        cg = g * c[:, None, None]
        if lookups[j]:  # the clipped rows scattered into the table: sum_i c_i e_{ids} g^T
            ids, _ = _valid_ids(x.reshape(-1), leaves[j].shape[0])
            out = jax.ops.segment_sum(cg.reshape(-1, g.shape[-1]), ids, leaves[j].shape[0])
        else:
            out = jnp.einsum("ntd,nth->dh", x, cg)
        summed[j] = out.reshape(leaves[j].shape).astype(leaves[j].dtype)
    return losses, tree.unflatten(summed)
