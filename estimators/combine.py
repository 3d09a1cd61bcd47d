"""Combination rules of `minimize([f1, f2, ...], wrt=[...], by=RULE)`, one frozen dataclass each
(its fields are its options, `gradlang.options`); `RULES` maps each name to its class.

- `mgda(solver=auto, iters=100)`: the min-norm element of the convex hull of the gradients
  (MGDA, Desideri 2012; Sener & Koltun 2018), a common descent direction; `exact` (closed form
  for two objectives, every face of the simplex up to `EXACT_MAX`) or `iters` steps of
  `frank_wolfe`; `auto` is exact up to `EXACT_MAX` objectives;
- `pcgrad(shuffle=true)`: gradient surgery (Yu et al. 2020), each gradient projected onto the
  normal plane of the others it conflicts with, in a random order from the key;
- `weights(w1, w2, ...)`: the gradient of the weighted sum, one non-negative weight per objective;
- `dynamic(temperature=2)`: Dynamic Weight Average (Liu, Johns & Davison 2019), weights from the
  ratio of each objective's last two values, threaded through calls as the state `history`.

Every rule returns its direction as a linear combination d = sum_i c_i g_i of the objectives'
gradients g_i (all `wrt` parameters flattened together). A `GramRule` takes the coefficients c
from the k x k Gram matrix G_ij = <g_i, g_j>, one backward pass per objective; a `WeightedRule`
knows c before differentiating (from the source or the state), so the export takes one backward
pass of sum_i c_i f_i and never holds the k gradients. The multiobjective pass, the runtime
(`runtime.multiobjective`), `explain` and `verify` read these classes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import product
from typing import ClassVar

import jax
import jax.numpy as jnp

from gradlang.ir import Combination
from gradlang.options import OptionError, chosen, number_problem, option

SOLVERS = ("auto", "exact", "frank_wolfe")
EXACT_MAX = 8
"""MGDA's `exact` solver enumerates the 2^k - 1 faces of the simplex (closed form for k = 2):
at most this many objectives; `auto` picks it up to there and Frank-Wolfe above."""
_FEASIBLE = 1e-4
"""A face's minimizer is in the simplex when no coefficient is below -this (float32 solves)."""


class CombinationRule:
    """A combination rule; `weights` in the methods are the rule's positional weights as
    written (`Combination.weights`, only `weights(...)` takes any)."""

    name: ClassVar[str]
    linear: ClassVar[bool]
    """Its coefficients are known before differentiating (a `WeightedRule`); otherwise they
    come from the gradients' Gram matrix and the rule is nonlinear in the gradients."""
    stateful: ClassVar[bool] = False
    """It threads the objectives' last two values through calls, as the export's state
    `history` (f32[2, k])."""

    @property
    def stochastic(self) -> bool:
        """Its combination draws: the export takes a key for it."""
        return False

    @property
    def approximate(self) -> bool:
        """Its coefficients are an iterative solver's approximation of the rule's (`verify`
        calls a mismatch biased by design)."""
        return False

    @property
    def bias(self) -> str | None:
        """Why, applied to estimates of random objectives, its mean is not the rule applied to
        their expectations (for `verify`), None if it is."""
        return None

    def fit(self, weights: tuple[float, ...], k: int) -> CombinationRule:
        """The options for k objectives, resolved (`mgda`'s `auto`); raises OptionError when the
        rule or its positional weights do not fit."""
        if weights:
            raise OptionError(f"'{self.name}' takes options by name, e.g. "
                              f"{self.name}(option=value)")
        return self

    def describe(self, weights: tuple[float, ...], k: int) -> list[str]:
        """What it computes and what it guarantees, for k objectives (`explain`)."""
        raise NotImplementedError

    def reference(self, weights: tuple[float, ...]) -> str:
        """What `verify` checks the direction against, in words."""
        raise NotImplementedError


class GramRule(CombinationRule):
    """A rule whose coefficients come from the Gram matrix of the k gradients."""

    linear = False

    @property
    def bias(self) -> str | None:
        return (f"{self.name} is nonlinear in the gradients: applied to unbiased estimates, its "
                f"mean is not the rule applied to their expectations")

    def combine(self, gram: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """The coefficients c [k] from the Gram matrix [k, k] (`key`: when `stochastic`)."""
        raise NotImplementedError


class WeightedRule(CombinationRule):
    """A rule whose coefficients are known before differentiating."""

    linear = True

    def weighting(self, weights: tuple[float, ...],
                  history: jax.Array | None) -> jax.Array | tuple[float, ...]:
        """The coefficients c [k] (`history` [2, k]: when `stateful`)."""
        raise NotImplementedError


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


@dataclass(frozen=True)
class Mgda(GramRule):
    """The min-norm element of the gradients' convex hull."""

    name = "mgda"
    solver: str = option("auto", choices=SOLVERS)
    iters: int = option(100)
    """Frank-Wolfe's steps."""

    @property
    def approximate(self) -> bool:
        return self.solver == "frank_wolfe"

    def fit(self, weights: tuple[float, ...], k: int) -> Mgda:
        super().fit(weights, k)
        if self.solver == "exact" and k > EXACT_MAX:
            raise OptionError(f"exact MGDA enumerates the 2^k - 1 faces of the simplex: at most "
                              f"{EXACT_MAX} objectives, got {k}; use solver=frank_wolfe")
        if self.solver == "auto":
            return replace(self, solver="exact" if k <= EXACT_MAX else "frank_wolfe")
        return self

    def combine(self, gram: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """The convex combination of least norm, by the solver: `exact` (closed form for two)
        or `frank_wolfe`."""
        if self.solver == "frank_wolfe":
            return min_norm_frank_wolfe(gram, self.iters)
        return min_norm_two(gram) if gram.shape[0] == 2 else min_norm_faces(gram)

    def describe(self, weights: tuple[float, ...], k: int) -> list[str]:
        if self.solver == "frank_wolfe":
            how = f"by {self.iters} Frank-Wolfe iterations with exact line search"
        elif k == 2:
            how = "in closed form (2 objectives)"
        else:
            how = f"exactly, from the minimizers on the {2 ** k - 1} faces of the simplex"
        return [f"rule: MGDA (Desideri 2012; Sener & Koltun 2018): the min-norm element of the "
                f"convex hull of the objectives' gradients, {how}",
                "guarantees: a common descent direction when one exists: <direction, grad f_i> "
                ">= |direction|^2 for every objective, so no objective increases to first order; "
                "the direction is zero exactly at Pareto-stationary points (a convex combination "
                "of the gradients is zero)"]

    def reference(self, weights: tuple[float, ...]) -> str:
        how = "the min-norm point of the gradients' convex hull (every support solved in float64)"
        if self.approximate:
            how += f" (the export stops Frank-Wolfe after {self.iters} steps)"
        return how


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


@dataclass(frozen=True)
class Pcgrad(GramRule):
    """Gradient surgery."""

    name = "pcgrad"
    shuffle: bool = option(True)

    @property
    def stochastic(self) -> bool:
        return self.shuffle

    def combine(self, gram: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """The projections in a random order per gradient from `key` (with `shuffle`), else
        in the objectives' order."""
        return pcgrad(gram, pcgrad_orders(key if self.shuffle else None, gram.shape[0]))

    def describe(self, weights: tuple[float, ...], k: int) -> list[str]:
        order = ("in a random order per gradient, from the key" if self.shuffle
                 else "in the objectives' order")
        return [f"rule: PCGrad (Yu et al. 2020): each gradient, projected onto the normal plane "
                f"of every other gradient it conflicts with (negative inner product), {order}; "
                f"the direction is their sum",
                "guarantees: the projections remove the pairwise conflicts; with two objectives "
                "<direction, grad f_i> >= 0 for both, and the direction is zero at "
                "Pareto-stationary points; with more, no common descent in general"]

    def reference(self, weights: tuple[float, ...]) -> str:
        return "PCGrad's projections" + (" in each call's orders" if self.shuffle
                                         else " in source order")


@dataclass(frozen=True)
class Weights(WeightedRule):
    """Its weights are positional (`Combination.weights`), one per objective."""

    name = "weights"

    def fit(self, weights: tuple[float, ...], k: int) -> Weights:
        if len(weights) != k:
            raise OptionError(f"weights(...) needs one weight per objective: {k} values, got "
                              f"{len(weights)}")
        if min(weights) < 0 or max(weights) == 0:
            raise OptionError("the weights must be non-negative and not all zero")
        for w in weights:
            want = number_problem(w, "non-negative")
            if want is not None:
                raise OptionError(f"each weight must be {want}, got {w}")
        return self

    def weighting(self, weights: tuple[float, ...],
                  history: jax.Array | None) -> jax.Array | tuple[float, ...]:
        return weights

    def describe(self, weights: tuple[float, ...], k: int) -> list[str]:
        terms = " + ".join(f"{w:g} f{i + 1}" for i, w in enumerate(weights))
        return [f"rule: fixed weights: the gradient of the weighted sum {terms}",
                "guarantees: exactly that gradient; its minima are Pareto optimal, but fixed "
                "weights reach only the convex part of the Pareto front"]

    def reference(self, weights: tuple[float, ...]) -> str:
        return f"the weights {', '.join(f'{w:g}' for w in weights)}"


def dwa(history: jax.Array, temperature: float) -> jax.Array:
    """Dynamic Weight Average (Liu, Johns & Davison 2019, eq. 5): lambda = k softmax(r / T),
    r_i = L_i(t-1) / L_i(t-2), the ratio of objective i's last two values (history rows 0 and
    1; 1 while a row is still zeros, i.e. on the first two calls)."""
    known = history[1] != 0
    r = jnp.where(known, history[0] / jnp.where(known, history[1], 1), 1)
    return history.shape[1] * jax.nn.softmax(r / temperature)


@dataclass(frozen=True)
class Dynamic(WeightedRule):
    """Dynamic Weight Average."""

    name = "dynamic"
    stateful = True
    temperature: float = option(2.0)

    def weighting(self, weights: tuple[float, ...],
                  history: jax.Array | None) -> jax.Array | tuple[float, ...]:
        return dwa(history, self.temperature)

    def describe(self, weights: tuple[float, ...], k: int) -> list[str]:
        return [f"rule: Dynamic Weight Average (Liu, Johns & Davison 2019): weights k softmax(r / "
                f"T), T = {self.temperature:g}, r_i = f_i(t-1) / f_i(t-2), the ratio of "
                f"objective i's values at the previous two calls (the history, f32[2, {k}]: the "
                f"export's argument 'history', or the last entry of its 'state' when objectives "
                f"carry state too; r = 1 on the first two calls); the gradient of the weighted "
                f"sum",
                "guarantees: the gradient of the weighted sum at this call's weights; objectives "
                "whose values fall more slowly get more weight; the ratios assume positive "
                "objectives"]

    def reference(self, weights: tuple[float, ...]) -> str:
        return "DWA's weights from the history given"


RULES: dict[str, type[CombinationRule]] = {r.name: r for r in (Mgda, Pcgrad, Weights, Dynamic)}
"""Combination rules by name."""


def combination_rule(rule: Combination) -> CombinationRule:
    """The rule `by=` names, with its options (unknown names and bad options raise
    OptionError, with a did-you-mean)."""
    return chosen(RULES, rule.name, rule.options, "combination rule", f"rule '{rule.name}'",
                  "rules")
