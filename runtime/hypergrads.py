"""Hypergradient methods: how the solution of an inner problem is differentiated.

An inner problem is given on a flat variable as `objective(x, thetas, fixed)` and optionally
`constraints(x, thetas, fixed)` (c <= 0), where thetas are the float values the problem
captures and fixed the others (integers). Each method returns
`solve(thetas, fixed, x0) -> (x, residual, steps)`, differentiable in thetas:

- `implicit`: a `custom_vjp` whose backward solves (H + damping I) u = g at the solution, H the
  Hessian in x, with Hessian-vector products only (forward-over-reverse), by CG, GMRES or a
  Neumann series, and returns -d/dthetas <grad_x f, u>. For box-projected solvers the system is
  restricted to the coordinates strictly inside the box (the others do not move).
- `unrolled`: reverse mode through the solver's loop; `truncated(k)`: through its last k steps.
- `value_function`: Hessian-free and first order. With d = g / |g|, it re-solves the problem with
  objective f +- sigma d.x (warm started; constraints kept) and returns
  |g| (grad_thetas L(x+, lam+) - grad_thetas L(x-, lam-)) / (2 sigma), L = f + lam.c the
  Lagrangian: by the envelope theorem this is the central difference, in sigma, of the gradient
  of the perturbed problem's value function, whose sigma-derivative is the wanted
  vector-Jacobian product, including constraints that couple x and thetas. Bias O(sigma^2).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from . import solvers as S

Solve = Callable[[tuple, jax.Array], tuple]


def _adjoint(matvec, g, options: dict, lr: float):
    """u with matvec(u) = g by CG, GMRES or a Neumann series (step lr, the solver's)."""
    iters, tol = int(options["iters"]), options["tol"]
    if options["method"] in ("cg", "gmres"):
        return S.krylov(options["method"], matvec, g, iters, tol)

    def term(_, state):  # u_k = sum_{j<k} (I - lr A)^j lr g
        u, r = state
        r = r - lr * matvec(r)
        return u + r, r

    first = lr * g
    return jax.lax.fori_loop(0, iters, term, (first, first))[0]


def build(solver: str, solver_opts: dict, method: str, method_opts: dict,
          objective, constraints, report: bool) -> Solve:
    """The differentiable solve for one inner problem; its residual is computed (one more
    gradient evaluation) only when `report`."""

    def problem(thetas, fixed, shift=None) -> S.Problem:
        def f(x):
            value = objective(x, thetas, fixed)
            return value if shift is None else value + jnp.vdot(shift, x)

        c = None if constraints is None else (lambda x: constraints(x, thetas, fixed))
        return S.Problem(f, c, solver_opts)

    steps, tol = int(solver_opts["steps"]), solver_opts["tol"]

    def forward(thetas, fixed, x0, last: int = 0):
        """The solve; with last > 0, reverse mode sees only its last `last` steps."""
        p = problem(thetas, fixed)
        state = S.start(solver, p, x0, S.multipliers(p, x0))
        if not last:
            return S.run(solver, p, state, steps, tol)
        state = jax.lax.stop_gradient(S.run(solver, p, state, steps - last, tol))
        return S.run(solver, p, S.fresh(p, state), last, 0.0)

    def result(p: S.Problem, state: S.State):
        if not report:
            return state.x, jnp.zeros((), state.x.dtype), state.k
        done = S.fresh(p, jax.lax.stop_gradient(state))
        return state.x, p.residual(done.x, done.g), state.k

    if method in ("unrolled", "truncated"):
        last = int(method_opts["k"]) if method == "truncated" else 0
        return lambda thetas, fixed, x0: result(problem(thetas, fixed),
                                                forward(thetas, fixed, x0, last))

    @jax.custom_vjp
    def solve(thetas, fixed, x0):
        return result(problem(thetas, fixed), forward(thetas, fixed, x0))

    def fwd(thetas, fixed, x0):
        state = forward(thetas, fixed, x0)
        return result(problem(thetas, fixed), state), (state, thetas, fixed, x0)

    def lagrangian(x, lam, thetas, fixed):
        value = objective(x, thetas, fixed)
        return value if constraints is None else value + jnp.vdot(lam, constraints(x, thetas, fixed))

    def implicit_bwd(saved, cts):
        state, thetas, fixed, x0 = saved
        x, g = state.x, cts[0]
        grad_x = jax.grad(objective)
        free = jnp.ones_like(x)
        if "lower" in solver_opts:  # box-projected: bound coordinates do not move
            free = ((x > solver_opts["lower"]) & (x < solver_opts["upper"])).astype(x.dtype)

        def matvec(u):
            hu = jax.jvp(lambda w: grad_x(w, thetas, fixed), (x,), (free * u,))[1]
            return free * hu + (1 - free) * u + method_opts["damping"] * u

        u = _adjoint(matvec, free * g, method_opts, solver_opts.get("lr", 1.0))
        (theta_bar,) = jax.vjp(lambda th: grad_x(x, th, fixed), thetas)[1](u)
        return jax.tree.map(jnp.negative, theta_bar), None, jnp.zeros_like(x0)

    def value_function_bwd(saved, cts):
        state, thetas, fixed, x0 = saved
        g = cts[0]
        norm = jnp.linalg.norm(g)
        d = g / jnp.where(norm > 0, norm, 1.0)
        sigma, n = method_opts["sigma"], int(method_opts["steps"])
        grad_theta = jax.grad(lagrangian, argnums=2)

        def perturbed(sign):
            p = problem(thetas, fixed, sign * sigma * d)
            s = S.run(solver, p, S.fresh(p, state), n, 0.0)
            return grad_theta(s.x, s.lam, thetas, fixed)

        up, down = perturbed(1.0), perturbed(-1.0)
        theta_bar = jax.tree.map(lambda a, b: norm * (a - b) / (2 * sigma), up, down)
        return theta_bar, None, jnp.zeros_like(x0)

    solve.defvjp(fwd, implicit_bwd if method == "implicit" else value_function_bwd)
    return solve
