"""Lowering of `argmin`: the inner problem as functions of the flattened inner variable.

The first region computes the objective f(v, theta) from the inner variable v (its argument)
and the float values it uses from outside (theta); an optional second region computes the
`subject to` constraints (each <= 0). `runtime.hypergrads` builds the solver loop and its
hypergradient. The op has one result (the solution) or two (and the solver's report: final
residual and steps taken).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from gradlang.ir import Op, Region, free_values

from .hypergrads import build


def _argmin(ctx, op: Op, init):
    p = op.params
    captured = [v for r in op.regions for v in free_values(r)]
    floats = list(dict.fromkeys(v for v in captured
                                if jnp.issubdtype(jnp.result_type(ctx.env[v]), jnp.floating)))
    sign = -1.0 if p.maximize else 1.0
    x0, unravel = ravel_pytree(init)

    def evaluate(region: Region, x, thetas):
        saved = {f: ctx.env[f] for f in floats}
        ctx.env.update(zip(floats, thetas))
        try:
            return ctx.region(region, (unravel(x),))
        finally:
            ctx.env.update(saved)

    def objective(x, thetas):
        (value,) = evaluate(op.regions[0], x, thetas)
        return sign * value

    def constraints(x, thetas):
        return jnp.concatenate([jnp.ravel(c) for c in evaluate(op.regions[1], x, thetas)])

    solve = build(p.solver.name, dict(p.solver.options), p.hyper.name, dict(p.hyper.options),
                  objective, constraints if len(op.regions) > 1 else None, len(op.results) > 1)
    x, residual, steps = solve(tuple(ctx.env[f] for f in floats), x0)
    if len(op.results) == 1:
        return unravel(x)
    return unravel(x), {"residual": residual, "steps": steps}


ARGMIN_LOWERINGS = {"argmin": _argmin}
