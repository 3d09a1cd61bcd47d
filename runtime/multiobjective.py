"""Multi-objective gradients: a `minimize` export's objectives, their gradients and the rule
that combines them (`estimators.combine`) into d = sum_i c_i g_i. A rule that knows c before
differentiating (`linear`) takes one backward pass of sum_i c_i f_i and never holds the k
gradients; the others take one backward pass per objective and c from the Gram matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from gradlang.estimators.combine import combination_rule
from gradlang.ir import Combination


def gram_matrix(grads) -> jax.Array:
    """G_ij = <g_i, g_j> over every leaf of a tree of stacked gradients [k, ...]."""
    leaves = [g.reshape(g.shape[0], -1) for g in jax.tree.leaves(grads)]
    return sum(g @ g.T for g in leaves)


def takes_key(rule: Combination, draws: Sequence[bool]) -> bool:
    """Whether a `minimize` export takes a key: an objective draws, or the rule does."""
    return any(draws) or combination_rule(rule).stochastic


def minimize(objectives: Sequence[Callable], draws: Sequence[bool], names: Sequence[str],
             wrt: Sequence[str], rule: Combination) -> Callable:
    """The JAX function of a `minimize` export. Arguments: the objectives' common parameters
    (`names`), then `history` (f32[2, k], a `stateful` rule only), then the key (`takes_key`);
    objective i draws with `fold_in(key, i)`, a stochastic rule with `fold_in(key, k)`. Returns
    (values f32[k], direction {wrt name: d}, weights f32[k]) and, for a stateful rule, the
    history after this call, last."""
    k = len(objectives)
    argnums = [names.index(w) for w in wrt]
    keyed = takes_key(rule, draws)
    how = combination_rule(rule)

    def step(*args):
        params, key = list(args[:len(names)]), args[-1] if keyed else None
        history = args[len(names)] if how.stateful else None

        def objective(i: int) -> Callable:
            def f(*theta):
                full = list(params)
                for a, t in zip(argnums, theta):
                    full[a] = t
                return objectives[i](*full, *((jax.random.fold_in(key, i),) if draws[i] else ()))
            return f

        theta = [params[a] for a in argnums]
        if how.linear:
            values, pullback = jax.vjp(lambda *t: jnp.stack([objective(i)(*t) for i in range(k)]),
                                       *theta)
            c = jnp.asarray(how.weighting(rule.weights, history), values.dtype)
            direction = pullback(c)
        else:
            pairs = [jax.value_and_grad(objective(i), argnums=tuple(range(len(theta))))(*theta)
                     for i in range(k)]
            values = jnp.stack([v for v, _ in pairs])
            grads = jax.tree.map(lambda *g: jnp.stack(g), *[g for _, g in pairs])
            c = how.combine(gram_matrix(grads), jax.random.fold_in(key, k) if how.stochastic
                            else None)
            direction = jax.tree.map(lambda g: jnp.tensordot(c.astype(g.dtype), g, axes=1), grads)
        out = (values, dict(zip(wrt, direction)), c)
        if how.stateful:
            return out + (jnp.stack([values, history[0]]),)
        return out

    return step
