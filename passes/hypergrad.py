"""Hypergradients: check each inner problem's solver and choose its hypergradient method.

`argmin v: T = init { f(v, theta) } via SOLVER(options) [with METHOD(options)]`. Solvers
(compiled as XLA loops with a fixed number of steps): `gd(steps, lr)`, `momentum(steps, lr,
beta)`. Methods: `implicit(cg | neumann, iters, damping)` (the default: implicit
differentiation of the optimality condition grad_v f = 0, solving the adjoint system with
Hessian-vector products only) and `unrolled` (reverse mode through the solver's loop). The
choice is written into the op; `explain` reads the `hypergrad` fact.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace

from gradlang.diagnostics import Diagnostics, Span
from gradlang.ir import Module, Op, Region
from gradlang.ops import Estimator

SOLVERS: dict[str, dict[str, float]] = {
    "gd": {"steps": 100, "lr": 0.1},
    "momentum": {"steps": 100, "lr": 0.1, "beta": 0.9},
}
METHODS: dict[str, dict[str, object]] = {
    "implicit": {"method": "cg", "iters": 30, "damping": 0.0},
    "unrolled": {},
}
LINEAR_SOLVERS = ("cg", "neumann")
DEFAULT = Estimator("implicit")


@dataclass(frozen=True)
class InnerProblem:
    """One argmin, for `explain`."""

    function: str
    span: Span
    solver: Estimator
    method: Estimator
    why: str


def _problem(e: Estimator, table: dict, what: str) -> str | None:
    if e.name not in table:
        close = difflib.get_close_matches(e.name, table, n=1)
        return (f"unknown {what} '{e.name}'" + (f"; did you mean '{close[0]}'?" if close
                                                else f" ({what}s: {', '.join(table)})"))
    for k, v in e.options:
        if k not in table[e.name]:
            opts = ", ".join(table[e.name]) or "none"
            return f"{what} '{e.name}' has no option '{k}' (options: {opts})"
        default = table[e.name][k]
        if k == "method":
            if v not in LINEAR_SOLVERS:
                return f"unknown linear solver '{v}' (solvers: {', '.join(LINEAR_SOLVERS)})"
        elif k in ("steps", "iters"):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                return f"option '{k}' of '{e.name}' must be a positive integer, got {v}"
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (
                default != 0.0 and v == 0):
            return f"option '{k}' of '{e.name}' must be a {'non-negative' if default == 0.0 else 'positive'} number, got {v}"
    if e.name == "momentum" and not e.option("beta", 0.9) < 1:
        return "option 'beta' of 'momentum' must be below 1"
    return None


def complete(e: Estimator, table: dict) -> Estimator:
    given = dict(e.options)
    return replace(e, options=tuple((k, given.get(k, v)) for k, v in table[e.name].items()))


@dataclass(frozen=True)
class Hypergrad:
    """The hypergradient pass (checks and annotates `argmin` ops)."""

    name: str = "hypergrad"
    checks_only: bool = True

    def run(self, module: Module, diags: Diagnostics) -> Module:
        found: list[InnerProblem] = []
        functions = []
        for fn in module.functions:
            functions.append(replace(fn, body=_region(fn.name, fn.body, diags, found)))
        return replace(module, functions=tuple(functions),
                       facts=module.facts | {"hypergrad": tuple(found)})


def _region(fn: str, region: Region, diags: Diagnostics, found: list) -> Region:
    ops = []
    for op in region.ops:
        if op.regions:
            op = replace(op, regions=tuple(_region(fn, r, diags, found) for r in op.regions))
        if op.name == "argmin":
            op = _choose(fn, op, diags, found)
        ops.append(op)
    return replace(region, ops=tuple(ops))


def _choose(fn: str, op: Op, diags: Diagnostics, found: list) -> Op:
    p = op.params
    problem = _problem(p.solver, SOLVERS, "solver")
    if problem is not None:
        diags.error(problem, p.solver.span)
        return op
    if p.hyper is not None:
        problem = _problem(p.hyper, METHODS, "hypergradient method")
        if problem is not None:
            diags.error(problem, p.hyper.span)
            return op
        method, why = p.hyper, "annotated in the source"
    else:
        method, why = DEFAULT, ("the default: implicit differentiation needs no storage of the "
                                "solver's iterates (memory flat in its steps) and only "
                                "Hessian-vector products; write 'with unrolled' to "
                                "differentiate through the loop instead")
    solver, method = complete(p.solver, SOLVERS), complete(method, METHODS)
    found.append(InnerProblem(fn, op.span, solver, method, why))
    return replace(op, params=replace(p, solver=solver, hyper=method))
