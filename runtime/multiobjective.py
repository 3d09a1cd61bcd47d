"""Multi-objective gradients: a `minimize` export's objectives, their gradients and the rule
that combines them.

Every rule returns its direction as a linear combination d = sum_i c_i g_i of the objectives'
gradients g_i (all `wrt` parameters flattened together); the coefficients c ("weights") come
from the k x k Gram matrix G_ij = <g_i, g_j>, the previous values (`dynamic`) or the source
(`weights`). `weights` and `dynamic` know c before differentiating, so they take one backward
pass of sum_i c_i f_i and never hold the k gradients; `mgda` and `pcgrad` take one backward
pass per objective.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import product

import jax
import jax.numpy as jnp

from gradlang.ir import Combination

_FEASIBLE = 1e-4
"""A face's minimizer is in the simplex when no coefficient is below -this (float32 solves)."""


def min_norm_two(gram: jax.Array) -> jax.Array:
    """MGDA for two gradients in closed form: argmin over a in [0, 1] of |a g1 + (1 - a) g2|^2,
    a = <g2 - g1, g2> / |g1 - g2|^2 clipped (1/2 when g1 = g2)."""
    g11, g22, g12 = gram[0, 0], gram[1, 1], gram[0, 1]
    den = g11 + g22 - 2 * g12
    safe = den > jnp.finfo(gram.dtype).eps * (g11 + g22)
    a = jnp.where(safe, jnp.clip((g22 - g12) / jnp.where(safe, den, 1), 0, 1), 0.5)
    return jnp.stack([a, 1 - a])


def min_norm_faces(gram: jax.Array) -> jax.Array:
    """MGDA's min-norm point exactly, for a few gradients: on every face of the simplex (a
    support S) the minimizer of c^T G c subject to sum(c) = 1 solves the KKT system
    [G_SS 1; 1^T 0] [c; -mu] = [0; 1] (least squares: G may be singular); the best of those in
    the simplex is the minimum over the simplex."""
    k = gram.shape[0]
    g = gram / jnp.maximum(jnp.max(jnp.diagonal(gram)), jnp.finfo(gram.dtype).tiny)
    masks = jnp.asarray([m for m in product((0.0, 1.0), repeat=k) if any(m)], gram.dtype)

    def face(m: jax.Array) -> tuple[jax.Array, jax.Array]:
        a = jnp.zeros((k + 1, k + 1), g.dtype)
        a = a.at[:k, :k].set(g * jnp.outer(m, m) + jnp.diag(1 - m))
        a = a.at[:k, k].set(m).at[k, :k].set(m)
        rhs = jnp.zeros(k + 1, g.dtype).at[k].set(1)
        c = jnp.linalg.lstsq(a, rhs)[0][:k] * m
        value = jnp.where(jnp.all(c >= -_FEASIBLE), c @ g @ c, jnp.inf)
        return c, value

    cs, values = jax.vmap(face)(masks)
    c = jnp.clip(cs[jnp.argmin(values)], 0)
    return c / jnp.sum(c)


def min_norm_frank_wolfe(gram: jax.Array, iters: int) -> jax.Array:
    """MGDA's min-norm point by Frank-Wolfe with exact line search (Jaggi 2013; as in Sener &
    Koltun 2018, who start from the best pair), from the gradient of least norm: each step
    moves towards the vertex e_t, t = argmin (G c)_t, by the step minimizing the norm on the
    segment."""
    k = gram.shape[0]

    def step(_, c):
        gc = gram @ c
        t = jnp.argmin(gc)
        a, b, e = c @ gc, gc[t], gram[t, t]
        den = a - 2 * b + e
        gamma = jnp.where(den > 0, jnp.clip((a - b) / jnp.where(den > 0, den, 1), 0, 1), 0)
        return (1 - gamma) * c + gamma * jax.nn.one_hot(t, k, dtype=c.dtype)

    start = jax.nn.one_hot(jnp.argmin(jnp.diagonal(gram)), k, dtype=gram.dtype)
    return jax.lax.fori_loop(0, iters, step, start)


def mgda(gram: jax.Array, rule: Combination) -> jax.Array:
    """The convex combination c of the gradients whose norm is least (MGDA), by the rule's
    solver: `exact` (closed form for two) or `frank_wolfe`."""
    if rule.option("solver") == "frank_wolfe":
        return min_norm_frank_wolfe(gram, rule.option("iters"))
    return min_norm_two(gram) if gram.shape[0] == 2 else min_norm_faces(gram)


def pcgrad_orders(key: jax.Array | None, k: int) -> jax.Array:
    """The order in which PCGrad projects each gradient on the others, [k, k]: a random
    permutation per gradient from the key, or the source order (key None)."""
    if key is None:
        return jnp.tile(jnp.arange(k), (k, 1))
    return jax.vmap(lambda i: jax.random.permutation(jax.random.fold_in(key, i), k))(jnp.arange(k))


def pcgrad(gram: jax.Array, orders: jax.Array) -> jax.Array:
    """PCGrad (Yu et al. 2020, Algorithm 1) on the coefficients: g_i' starts at g_i and, for
    each other j in its order, loses its component along g_j when <g_i', g_j> < 0; the
    direction is sum_i g_i'. Returns its coefficients on the original gradients."""
    k = gram.shape[0]
    diag = jnp.diagonal(gram)

    def one(i: jax.Array, order: jax.Array) -> jax.Array:
        def project(pos, c):
            j = order[pos]
            dot = c @ gram[:, j]
            conflict = (dot < 0) & (j != i)
            return c.at[j].add(-jnp.where(conflict, dot / jnp.where(conflict, diag[j], 1), 0))

        return jax.lax.fori_loop(0, k, project, jax.nn.one_hot(i, k, dtype=gram.dtype))

    return jnp.sum(jax.vmap(one)(jnp.arange(k), orders), axis=0)


def dwa(history: jax.Array, temperature: float) -> jax.Array:
    """Dynamic Weight Average (Liu, Johns & Davison 2019, eq. 5): lambda = k softmax(r / T),
    r_i = L_i(t-1) / L_i(t-2), the ratio of objective i's last two values (history rows 0 and
    1; 1 while a row is still zeros, i.e. on the first two calls)."""
    known = history[1] != 0
    r = jnp.where(known, history[0] / jnp.where(known, history[1], 1), 1)
    return history.shape[1] * jax.nn.softmax(r / temperature)


def gram_matrix(grads) -> jax.Array:
    """G_ij = <g_i, g_j> over every leaf of a tree of stacked gradients [k, ...]."""
    leaves = [g.reshape(g.shape[0], -1) for g in jax.tree.leaves(grads)]
    return sum(g @ g.T for g in leaves)


def takes_key(rule: Combination, draws: Sequence[bool]) -> bool:
    """Whether a `minimize` export takes a key: an objective draws, or PCGrad shuffles."""
    return any(draws) or (rule.name == "pcgrad" and bool(rule.option("shuffle")))


def minimize(objectives: Sequence[Callable], draws: Sequence[bool], names: Sequence[str],
             wrt: Sequence[str], rule: Combination) -> Callable:
    """The JAX function of a `minimize` export. Arguments: the objectives' common parameters
    (`names`), then `history` (f32[2, k], `dynamic` only), then the key (`takes_key`); objective
    i draws with `fold_in(key, i)`, PCGrad's orders come from `fold_in(key, k)`. Returns
    (values f32[k], direction {wrt name: d}, weights f32[k]) and, for `dynamic`, the history
    after this call, last."""
    k = len(objectives)
    argnums = [names.index(w) for w in wrt]
    keyed = takes_key(rule, draws)
    stateful = rule.name == "dynamic"

    def step(*args):
        params, key = list(args[:len(names)]), args[-1] if keyed else None

        def objective(i: int) -> Callable:
            def f(*theta):
                full = list(params)
                for a, t in zip(argnums, theta):
                    full[a] = t
                return objectives[i](*full, *((jax.random.fold_in(key, i),) if draws[i] else ()))
            return f

        theta = [params[a] for a in argnums]
        if rule.name in ("weights", "dynamic"):
            values, pullback = jax.vjp(lambda *t: jnp.stack([objective(i)(*t) for i in range(k)]),
                                       *theta)
            c = (jnp.asarray(rule.weights, values.dtype) if rule.name == "weights"
                 else dwa(args[len(names)], rule.option("temperature")).astype(values.dtype))
            direction = pullback(c)
        else:
            pairs = [jax.value_and_grad(objective(i), argnums=tuple(range(len(theta))))(*theta)
                     for i in range(k)]
            values = jnp.stack([v for v, _ in pairs])
            grads = jax.tree.map(lambda *g: jnp.stack(g), *[g for _, g in pairs])
            gram = gram_matrix(grads)
            if rule.name == "mgda":
                c = mgda(gram, rule)
            else:
                shuffled = jax.random.fold_in(key, k) if rule.option("shuffle") else None
                c = pcgrad(gram, pcgrad_orders(shuffled, k))
            direction = jax.tree.map(lambda g: jnp.tensordot(c.astype(g.dtype), g, axes=1), grads)
        out = (values, dict(zip(wrt, direction)), c)
        if stateful:
            return out + (jnp.stack([values, args[len(names)][0]]),)
        return out

    return step
