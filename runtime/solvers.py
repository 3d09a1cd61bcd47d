"""Inner solvers for `argmin`, compiled as XLA loops on the flattened inner variable.

Every solver is an update `x, g, aux, k -> x', aux'` from the iterate x and its gradient g; one
runner (`run`) drives them: a `fori_loop` of `steps` iterations, or, when `tol > 0`, a
`while_loop` that stops once the residual is at most `tol` (at most `steps` iterations). With
`subject to` constraints c(x) <= 0 the gradient is that of the Lagrangian f + lam . c and the
multipliers take a projected ascent step lam <- max(0, lam + rho c(x)) after each primal step
(a first-order primal-dual method on the augmented Lagrangian). The residual is the norm of the
(projected) gradient, plus the constraint violation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


@dataclass(frozen=True)
class Problem:
    """An inner problem on a flat variable: objective, constraints (c <= 0, flat; None when
    unconstrained) and the solver's options."""

    f: Callable[[Array], Array]
    c: Callable[[Array], Array] | None
    options: dict

    def lagrangian_grad(self, x: Array, lam: Array) -> Array:
        g = jax.grad(self.f)(x)
        if self.c is None:
            return g
        return g + jax.vjp(self.c, x)[1](lam)[0]

    def project(self, x: Array) -> Array:
        lo, hi = self.options.get("lower"), self.options.get("upper")
        return x if lo is None else jnp.clip(x, lo, hi)

    def residual(self, x: Array, g: Array) -> Array:
        r = jnp.linalg.norm(x - self.project(x - g))
        if self.c is not None:
            r = r + jnp.linalg.norm(jnp.maximum(self.c(x), 0.0))
        return r


class State(NamedTuple):
    k: Array
    x: Array
    g: Array
    lam: Array
    aux: object


def _gd(p: Problem, x, g, aux, k):
    return x - p.options["lr"] * g, aux


def _momentum(p: Problem, x, g, m, k):
    m = p.options["beta"] * m + g
    return x - p.options["lr"] * m, m


def _adam(p: Problem, x, g, aux, k):
    o = p.options
    m, v = aux
    m = o["b1"] * m + (1 - o["b1"]) * g
    v = o["b2"] * v + (1 - o["b2"]) * g * g
    t = (k + 1).astype(x.dtype)
    mhat, vhat = m / (1 - o["b1"] ** t), v / (1 - o["b2"] ** t)
    return x - o["lr"] * mhat / (jnp.sqrt(vhat) + o["eps"]), (m, v)


def _projected(p: Problem, x, g, aux, k):
    return p.project(x - p.options["lr"] * g), aux


def _backtrack(p: Problem, x, g, d):
    """Armijo backtracking from a unit step: at most 30 halvings (the step is 2^-30 after 30
    failed tests), the first step that passes kept (a NaN objective passes: no step can be
    judged). A loop of fixed trip count whose finished iterations skip the test: the same
    loop written as a data-dependent `while_loop` never ended on XLA's optimized CPU code for
    one fuzzed program (tests/fuzzrun.py seed 3880: newton_cg in an argmin in a scan under
    vmap), even with an integer bound in its condition, and ended in seconds with XLA's
    optimizations off."""
    fx, slope = p.f(x), jnp.vdot(g, d)

    def test(t):
        passed = ~(p.f(x + t * d) > fx + 1e-4 * t * slope)
        return jnp.where(passed, t, t * 0.5), passed

    def halve(_, state):
        t, done = state
        return lax.cond(done, lambda t: (t, done), test, t)

    t, _ = lax.fori_loop(0, 30, halve, (jnp.ones((), x.dtype), jnp.zeros((), bool)))
    return x + t * d


def _lbfgs(p: Problem, x, g, aux, k):
    """Two-loop recursion on the last `memory` pairs (s, y), newest last; masked while filling."""
    s_hist, y_hist, x_prev, g_prev = aux
    s, y = x - x_prev, g - g_prev
    keep = (k > 0) & (jnp.vdot(s, y) > 1e-10)
    s_hist = jnp.where(keep, jnp.roll(s_hist, -1, 0).at[-1].set(s), s_hist)
    y_hist = jnp.where(keep, jnp.roll(y_hist, -1, 0).at[-1].set(y), y_hist)
    sy = jnp.sum(s_hist * y_hist, axis=1)
    valid = sy > 0
    rho = jnp.where(valid, 1.0 / jnp.where(valid, sy, 1.0), 0.0)
    q, alphas = g, []
    for i in reversed(range(s_hist.shape[0])):
        a = rho[i] * jnp.vdot(s_hist[i], q)
        alphas.append(a)
        q = q - a * y_hist[i]
    yy = jnp.vdot(y_hist[-1], y_hist[-1])
    r = q * jnp.where(valid[-1], sy[-1] / jnp.where(valid[-1], yy, 1.0), 1.0)
    for i, a in zip(range(s_hist.shape[0]), reversed(alphas)):
        b = rho[i] * jnp.vdot(y_hist[i], r)
        r = r + s_hist[i] * (a - b)
    return _backtrack(p, x, g, -r), (s_hist, y_hist, x, g)


def _newton_cg(p: Problem, x, g, aux, k):
    def hvp(u):
        return jax.jvp(jax.grad(p.f), (x,), (u,))[1]

    d = krylov("cg", hvp, g, int(p.options["iters"]), 0.0)
    return _backtrack(p, x, g, -d), aux


def krylov(method: str, matvec, b: Array, iters: int, tol: float) -> Array:
    """x with matvec(x) = b by `iters` steps of CG or GMRES, or fewer once the residual is at
    most tol |b| or at machine precision (past it, the step sizes divide roundoff by
    roundoff)."""
    atol = jnp.finfo(b.dtype).eps * jnp.linalg.norm(b)
    if method == "cg":
        return jax.scipy.sparse.linalg.cg(matvec, b, maxiter=iters, tol=tol, atol=atol)[0]
    return jax.scipy.sparse.linalg.gmres(matvec, b, tol=tol, atol=atol, restart=iters,
                                         maxiter=1, solve_method="batched")[0]


def _aux(name: str, x: Array, options: dict):
    zeros = jnp.zeros_like(x)
    if name == "momentum":
        return zeros
    if name == "adam":
        return zeros, zeros
    if name == "lbfgs":
        hist = jnp.zeros((int(options["memory"]),) + x.shape, x.dtype)
        return hist, hist, x, zeros
    return ()


UPDATES = {"gd": _gd, "momentum": _momentum, "adam": _adam, "projected": _projected,
           "lbfgs": _lbfgs, "newton_cg": _newton_cg}


def start(name: str, p: Problem, x0: Array, lam0: Array) -> State:
    x0 = p.project(x0)
    k = jnp.zeros((), jnp.int32)
    return State(k, x0, p.lagrangian_grad(x0, lam0), lam0, _aux(name, x0, p.options))


def step(name: str, p: Problem, s: State, regrad: bool = True) -> State:
    """One iteration; the gradient at the new iterate is evaluated when `regrad`."""
    x, aux = UPDATES[name](p, s.x, s.g, s.aux, s.k)
    lam = s.lam
    if p.c is not None:
        lam = jnp.maximum(0.0, lam + p.options["rho"] * p.c(x))
    return State(s.k + 1, x, p.lagrangian_grad(x, lam) if regrad else s.g, lam, aux)


def run(name: str, p: Problem, s: State, steps: int, tol: float) -> State:
    """`steps` iterations from s; with tol > 0, stop early once the residual is <= tol. A
    fixed-step run skips the gradient at its last iterate (nothing in the loop would use it),
    so its result's g is stale: `fresh` evaluates it where it is needed."""
    if tol > 0:
        stop = s.k + steps
        return lax.while_loop(lambda t: (t.k < stop) & (p.residual(t.x, t.g) > tol),
                              lambda t: step(name, p, t), s)
    if steps == 0:
        return s
    s = lax.fori_loop(0, steps - 1, lambda _, t: step(name, p, t), s)
    return step(name, p, s, regrad=False)


def fresh(p: Problem, s: State) -> State:
    """s with the gradient at its iterate."""
    return s._replace(g=p.lagrangian_grad(s.x, s.lam))


def multipliers(p: Problem, x: Array) -> Array:
    """Zero multipliers shaped like the flat constraint vector (empty when unconstrained)."""
    if p.c is None:
        return jnp.zeros((0,), x.dtype)
    return jnp.zeros(jax.eval_shape(p.c, x).shape, x.dtype)
