"""Lowering of `argmin`: the inner problem as functions of the flattened inner variable.

The first region computes the objective f(v, theta) from the inner variable v (its argument)
and the float values it uses from outside (theta; the others, integers, are held fixed); an
optional second region computes the `subject to` constraints (each <= 0). The op's solver and
hypergradient method (`estimators.solvers`, `estimators.hypergrads`) build the solver loop and
its hypergradient. The op has one result (the solution, in the structure of its start value: a
tensor, a struct or a tree) or two (and the solver's report: final residual and steps taken).
The jax fns the problem calls go with it (`Opaque`), so that Hessian-vector products through one
that has no forward mode are an error naming it, and so does where it is written, which a
method without forward mode names when `jax.jvp` goes through it (`ForwardModeError`).
"""

from __future__ import annotations

from contextlib import nullcontext

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from gradlang.estimators.hypergrads import Inner, method_of
from gradlang.estimators.solvers import Opaque, solver_of
from gradlang.ir import Op, Region, free_values, jax_functions_of, walk


def _argmin(ctx, op: Op, init):
    """The solution (and report). The captured values may be structs (a parameter's field read
    in the objective, another problem's report): their float leaves are the thetas."""
    p = op.params
    captured = list(dict.fromkeys(v for r in op.regions for v in free_values(r)))
    leaves, tree = jax.tree.flatten([ctx.env[v] for v in captured])
    is_theta = [jnp.issubdtype(jnp.result_type(leaf), jnp.floating) for leaf in leaves]
    sign = -1.0 if p.maximize else 1.0
    x0, unravel = ravel_pytree(ctx.coerce(init, op.results[0].type))
    # a problem that draws takes one key per solve, passed with the fixed leaves: every
    # evaluation of its objective sees the same samples (a sample-average approximation), but
    # for a solver with fresh draws, whose steps fold it with their index
    key = ctx.next_key() if any(ctx.lowering.key_uses(r) for r in op.regions) else None

    def evaluate(region: Region, x, thetas, fixed):
        drawn = nullcontext()
        if key is not None:
            *fixed, k = fixed
            drawn = ctx.scope(k, region)
        floats, others = iter(thetas), iter(fixed)
        values = jax.tree.unflatten(tree, [next(floats) if t else next(others) for t in is_theta])
        saved = {v: ctx.env[v] for v in captured}
        ctx.env.update(zip(captured, values))
        try:
            with drawn:
                return ctx.region(region, (unravel(x),))
        finally:
            ctx.env.update(saved)

    def objective(x, thetas, fixed):
        (value,) = evaluate(op.regions[0], x, thetas, fixed)
        return sign * value

    def constraints(x, thetas, fixed):
        return jnp.concatenate([jnp.ravel(c) for c in evaluate(op.regions[1], x, thetas, fixed)])

    constrained = len(op.regions) > 1
    solver = solver_of(p.solver, constrained)
    where = f"{ctx.file}:{op.span.line}:{op.span.col}"
    solve = method_of(p.hyper, solver, constrained).build(
        Inner(solver, objective, constraints if constrained else None, len(op.results) > 1,
              _opaque(ctx, op, where), where, key is not None))
    # the other leaves (integers: a loop index, a report's steps) are arguments too, never
    # closed over: the backward pass is traced outside the region that made them
    fixed = tuple(leaf for leaf, t in zip(leaves, is_theta) if not t)
    x, residual, steps = solve(tuple(leaf for leaf, t in zip(leaves, is_theta) if t),
                               fixed + ((key,) if key is not None else ()), x0)
    if len(op.results) == 1:
        return unravel(x)
    return unravel(x), {"residual": residual, "steps": steps}


def _opaque(ctx, op: Op, where: str) -> Opaque | None:
    """The jax fns the problem's objective and constraints call, directly or not (None if
    none), with where the problem is written."""
    callees = [o.params.callee for r in op.regions for o in walk(r)
               if o.name in ("call_fn", "inline", "map_leaves")]
    module = ctx.lowering.module
    names = tuple(dict.fromkeys(j for c in callees for j in jax_functions_of(module, c)))
    return Opaque(names, where) if names else None


ARGMIN_LOWERINGS = {"argmin": _argmin}
