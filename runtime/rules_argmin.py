"""Lowering of `argmin`: the inner solver as an XLA loop, and its hypergradient.

The region computes the objective f(v, theta) from the inner variable v (its argument) and the
float values it uses from outside (theta). `implicit` wraps the solver in a `jax.custom_vjp`
whose backward solves the adjoint system (H + damping I) u = g, H = d^2 f / dv^2 at the
solution, with Hessian-vector products only (forward-over-reverse: no Hessian is formed), by
conjugate gradients or a Neumann series, and returns theta's cotangent -d/dtheta <grad_v f, u>.
`unrolled` differentiates through the loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from gradlang.ir import Op, Region, Value, walk


def free_values(region: Region) -> list[Value]:
    """Values the region uses but does not define (its captures), in first-use order."""
    defined = set(region.args) | {r for op in walk(region) for r in op.results}
    for op in walk(region):
        for inner in op.regions:
            defined |= set(inner.args)
    out: list[Value] = []
    for op in walk(region):
        for v in op.operands:
            if v not in defined and v not in out:
                out.append(v)
    for v in region.results:
        if v not in defined and v not in out:
            out.append(v)
    return out


def _tree_axpy(a, x, y):
    return jax.tree.map(lambda xi, yi: a * xi + yi, x, y)


def _solve(grad_v, options: dict, name: str, thetas, v0):
    steps, lr = int(options["steps"]), options["lr"]
    if name == "gd":
        def step(_, v):
            return _tree_axpy(-lr, grad_v(v, thetas), v)

        return lax.fori_loop(0, steps, step, v0)
    beta = options["beta"]

    def momentum(_, state):
        v, m = state
        m = _tree_axpy(beta, m, grad_v(v, thetas))
        return _tree_axpy(-lr, m, v), m

    return lax.fori_loop(0, steps, momentum, (v0, jax.tree.map(jnp.zeros_like, v0)))[0]


def _adjoint(hvp, g, options: dict, lr: float):
    """u with (H + damping I) u = g, by CG or a Neumann series (step lr, the solver's)."""
    damping, iters = options["damping"], int(options["iters"])

    def matvec(u):
        return _tree_axpy(damping, u, hvp(u))

    if options["method"] == "cg":
        return jax.scipy.sparse.linalg.cg(matvec, g, maxiter=iters, tol=0.0)[0]

    def term(_, state):  # u_k = sum_{j<k} (I - lr A)^j lr g
        u, r = state
        r = _tree_axpy(-lr, matvec(r), r)
        return jax.tree.map(jnp.add, u, r), r

    first = jax.tree.map(lambda x: lr * x, g)
    return lax.fori_loop(0, iters, term, (first, first))[0]


def _argmin(ctx, op: Op, init):
    (region,) = op.regions
    p = op.params
    captured = free_values(region)
    floats = [v for v in captured if jnp.issubdtype(jnp.result_type(ctx.env[v]), jnp.floating)]
    sign = -1.0 if p.maximize else 1.0

    def objective(v, thetas):
        saved = {f: ctx.env[f] for f in floats}
        ctx.env.update(zip(floats, thetas))
        try:
            (value,) = ctx.region(region, (v,))
        finally:
            ctx.env.update(saved)
        return sign * value

    grad_v = jax.grad(objective)
    solver = dict(p.solver.options)
    thetas = tuple(ctx.env[f] for f in floats)

    def solve(thetas, v0):
        return _solve(grad_v, solver, p.solver.name, thetas, v0)

    if p.hyper.name == "unrolled":
        return solve(thetas, init)
    method = dict(p.hyper.options)

    @jax.custom_vjp
    def inner(thetas, v0):
        return solve(thetas, v0)

    def fwd(thetas, v0):
        v = solve(thetas, v0)
        return v, (v, thetas, v0)

    def bwd(saved, g):
        v, thetas, v0 = saved

        def hvp(u):
            return jax.jvp(lambda w: grad_v(w, thetas), (v,), (u,))[1]

        u = _adjoint(hvp, g, method, solver["lr"])
        _, cross = jax.vjp(lambda th: grad_v(v, th), thetas)
        (theta_bar,) = cross(u)
        return (jax.tree.map(jnp.negative, theta_bar), jax.tree.map(jnp.zeros_like, v0))

    inner.defvjp(fwd, bwd)
    return inner(thetas, init)


ARGMIN_LOWERINGS = {"argmin": _argmin}
