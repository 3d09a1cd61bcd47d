"""Differentially private gradients (`grad(f, wrt=[...], by=dp(...))`): DP-SGD's estimate.

With n examples (the batched arguments' slices along the per-example axis, `passes.privacy`),
the loss of example i is f evaluated on that example alone (a batch of one: the axis is kept
with size 1), and the estimate is

    g = (sum_i clip_C(grad l_i) + N(0, (sigma C)^2 I)) / n,   clip_C(v) = v min(1, C / ||v||),

the norm taken over every `wrt` leaf together. The noise is drawn from the export's key; an
objective that draws gets the other half of the key, folded with the example's index, so each
example draws independently. The clipped sum comes from `runtime.ghost` (ghost norms for the
linear layers the plan names, per-example gradients for the other leaves; or per-example
gradients everywhere with `clipping=per_example`). The value returned by `value_and_grad` is
the mean of the per-example losses.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from gradlang.facts import PrivatePlan

from .ghost import ghost, per_example


def _leaf_names(theta: dict) -> list[str]:
    """`p.l1.w`-style names of the leaves of {wrt name: value}, in flattening order (the
    `privacy` pass names a struct's leaves the same way; a tree's other nodes, never ghost
    clipped, are named by their keys, `p.layers[0]`)."""
    paths, _ = jax.tree_util.tree_flatten_with_path(theta)
    return [".".join(str(k.key) if isinstance(k, jax.tree_util.DictKey)
                     else jax.tree_util.keystr((k,)) for k in path) for path, _ in paths]


def _noise(key, tree, std: float):
    """N(0, std^2) noise shaped like `tree`, from one draw over all its leaves (one threefry
    kernel to compile instead of one per leaf)."""
    leaves, structure = jax.tree.flatten(tree)
    dtype = jnp.result_type(*leaves)
    z = std * jax.random.normal(key, (sum(t.size for t in leaves),), dtype)
    cuts = list(itertools.accumulate(t.size for t in leaves))[:-1]
    return structure.unflatten([part.reshape(t.shape).astype(t.dtype)
                                for part, t in zip(jnp.split(z, cuts), leaves)])


def clipped_sum(f: Callable, args: list, names: list[str], plan: PrivatePlan, wrt: tuple[str, ...],
                key=None):
    """(per-example losses, the sum of the clipped per-example gradients {wrt name: ...}) of f
    at `args` (positional, without the key); `key`: the objective's key when it draws."""
    index = {w: names.index(w) for w in wrt}
    batched = [names.index(b) for b in plan.batched]
    axis = plan.axis
    examples = tuple(args[i] for i in batched)
    in_axes = (axis,) * len(examples)
    if key is not None:
        n = examples[0].shape[axis]
        examples += (jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n)),)
        in_axes += (0,)

    def loss(theta: dict, *example):
        full = list(args)
        for w, t in theta.items():
            full[index[w]] = t
        for i, e in zip(batched, example):
            full[i] = jnp.expand_dims(e, axis)
        return f(*full, example[-1]) if key is not None else f(*full)

    theta = {w: args[i] for w, i in index.items()}
    names_of = _leaf_names(theta)
    tapped = frozenset(names_of.index(n.leaf) for n in plan.leaves if n.ghost)
    if not tapped:
        return per_example(loss, theta, examples, in_axes, plan.clip)
    return ghost(loss, theta, tapped, examples, in_axes, plan.clip)


def private_gradient(f: Callable, names: list[str], wrt: tuple[str, ...], plan: PrivatePlan,
                     draws: bool, value: bool) -> Callable:
    """The export's function of positional arguments (its key last) returning the private
    gradient as a dict keyed by the wrt names, after the mean loss when `value`; called with
    `lr=`, the parameters after one step theta - lr * gradient instead."""

    def gradient(*args, lr=None):
        *args, key = args
        noise_key, f_key = jax.random.split(key) if draws else (key, None)
        losses, summed = clipped_sum(f, args, names, plan, wrt, f_key)
        n = losses.shape[0]
        if plan.noise:
            noise = _noise(noise_key, summed, plan.noise * plan.clip)
            summed = jax.tree.map(jnp.add, summed, noise)
        noisy = jax.tree.map(lambda s: s / n, summed)
        if lr is not None:
            return {w: jax.tree.map(lambda t, g: t - lr * g, args[names.index(w)], noisy[w])
                    for w in wrt}
        return (jnp.mean(losses), noisy) if value else noisy

    return gradient
