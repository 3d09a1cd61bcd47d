"""Multi-objective gradients: a `minimize` export's objectives, their gradients and the rule
that combines them (`estimators.combine`) into d = sum_i c_i g_i. A rule that knows c before
differentiating (`linear`) takes one backward pass of sum_i c_i f_i and never holds the k
gradients; the others take one backward pass per objective and c from the Gram matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from gradlang.estimators.combine import combination_rule
from gradlang.ir import Combination
from gradlang.ops import Annotation

from .zeroth_order import black_box


def gram_matrix(grads) -> jax.Array:
    """G_ij = <g_i, g_j> over every leaf of a tree of stacked gradients [k, ...]."""
    leaves = [g.reshape(g.shape[0], -1) for g in jax.tree.leaves(grads)]
    return sum(g @ g.T for g in leaves)


def takes_key(rule: Combination, draws: Sequence[bool]) -> bool:
    """Whether a `minimize` export takes a key: an objective draws, or the rule does."""
    return any(draws) or combination_rule(rule).stochastic


@dataclass(frozen=True)
class Objective:
    """One objective of a `minimize` export as the runtime calls it."""

    fn: Callable
    """Its lowered function: its parameters, then its key when it draws."""
    params: tuple[str, ...]
    draws: bool
    by: Annotation | None = None
    """A black-box estimator of its gradient (None: reverse mode)."""


def minimize(objectives: Sequence[Objective], names: Sequence[str], wrt: Sequence[str],
             rule: Combination) -> Callable:
    """The JAX function of a `minimize` export. Arguments: the objectives' parameters
    (`names`, their union), then `history` (f32[2, k], a `stateful` rule only), then the key
    (`takes_key`); objective i draws (or, with a black-box estimator, perturbs) with
    `fold_in(key, i)`, a stochastic rule with `fold_in(key, k)`. An objective's
    gradient with respect to a `wrt` parameter it does not take is zero. Returns (values f32[k],
    direction {wrt name: d}, weights f32[k]) and, for a stateful rule, the history after this
    call, last."""
    k = len(objectives)
    draws = [o.draws or o.by is not None for o in objectives]
    keyed = takes_key(rule, draws)
    how = combination_rule(rule)
    estimated = any(o.by is not None for o in objectives)

    def step(*args):
        named, key = dict(zip(names, args)), args[-1] if keyed else None
        history = args[len(names)] if how.stateful else None
        theta = [named[w] for w in wrt]

        def objective(i: int) -> Callable:
            """Objective i as a function of every wrt parameter (those it does not take are
            unused)."""
            o = objectives[i]

            def f(*theta):
                full = {**named, **dict(zip(wrt, theta))}
                return o.fn(*(full[n] for n in o.params),
                            *((jax.random.fold_in(key, i),) if o.draws else ()))
            return f

        def value_and_grad(i: int):
            o = objectives[i]
            if o.by is None:
                return jax.value_and_grad(objective(i), argnums=tuple(range(len(theta))))(*theta)
            # as the export `grad(f, wrt=[...], by=...)` of this objective alone would, at its key
            own = tuple(w for w in wrt if w in o.params)
            value, grads = black_box(o.fn, list(o.params), own, o.by, o.draws, True)(
                *(named[n] for n in o.params), jax.random.fold_in(key, i))
            return value, tuple(grads.get(w, jnp.zeros_like(t)) for w, t in zip(wrt, theta))

        if how.linear and not estimated:
            values, pullback = jax.vjp(lambda *t: jnp.stack([objective(i)(*t) for i in range(k)]),
                                       *theta)
            c = jnp.asarray(how.weighting(rule.weights, history), values.dtype)
            direction = pullback(c)
        else:
            pairs = [value_and_grad(i) for i in range(k)]
            values = jnp.stack([v for v, _ in pairs])
            grads = jax.tree.map(lambda *g: jnp.stack(g), *[g for _, g in pairs])
            if how.linear:
                c = jnp.asarray(how.weighting(rule.weights, history), values.dtype)
            else:
                c = how.combine(gram_matrix(grads), jax.random.fold_in(key, k) if how.stochastic
                                else None)
            direction = jax.tree.map(lambda g: jnp.tensordot(c.astype(g.dtype), g, axes=1), grads)
        out = (values, dict(zip(wrt, direction)), c)
        if how.stateful:
            return out + (jnp.stack([values, history[0]]),)
        return out

    return step
