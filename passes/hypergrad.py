"""Hypergradients: check each inner problem's solver and choose its hypergradient method.

`argmin v: T = init { f(v, theta) } via SOLVER(options) [subject to c(v, theta) <= 0, ...]
[with METHOD(options)]`. Solvers run as XLA loops of `steps` iterations, or stop early at
residual `tol` when tol > 0 (`runtime.solvers`). Methods (`runtime.hypergrads`):
`implicit(cg | gmres | neumann, iters, tol, damping)`, the default for unconstrained problems;
`value_function(sigma, steps)`, the default for constrained ones; `unrolled`; `truncated(k)`.
The choice, completed with every option's value, is written into the op; `explain` reads the
`hypergrad` fact.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace

from gradlang.diagnostics import Diagnostics, Span
from gradlang.ir import Module, Op, Region, walk
from gradlang.ops import OPS, Estimator

from .callgraph import random_functions
from gradlang.options import number_problem

REQUIRED = None
SOLVERS: dict[str, dict[str, object]] = {
    "gd": {"steps": 100, "lr": 0.1, "tol": 0.0},
    "momentum": {"steps": 100, "lr": 0.1, "beta": 0.9, "tol": 0.0},
    "adam": {"steps": 200, "lr": 0.01, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "tol": 0.0},
    "lbfgs": {"steps": 50, "memory": 10, "tol": 0.0},
    "newton_cg": {"steps": 10, "iters": 20, "tol": 0.0},
    "projected": {"steps": 100, "lr": 0.1, "lower": REQUIRED, "upper": REQUIRED, "tol": 0.0},
}
CONSTRAINED = ("gd", "momentum", "adam")
"""Solvers that take `subject to` (primal-dual, with the multipliers' step `rho`)."""
DIFFERENTIABLE = ("gd", "momentum", "adam", "projected")
"""Solvers reverse mode can go through (the others' line search is a while loop)."""
METHODS: dict[str, dict[str, object]] = {
    "implicit": {"method": "cg", "iters": 30, "tol": 0.0, "damping": 0.0},
    "value_function": {"sigma": 0.01, "steps": REQUIRED},
    "unrolled": {},
    "truncated": {"k": 10},
}
LINEAR_SOLVERS = ("cg", "gmres", "neumann")
KINKED = frozenset({"abs", "relu", "maximum", "minimum", "clip", "max", "min", "straight_through"})
_COUNTS = ("steps", "iters", "memory", "k")
_REALS = ("lower", "upper")
_NON_NEGATIVE = ("tol", "damping")
_FRACTIONS = ("beta", "b1", "b2")


@dataclass(frozen=True)
class InnerProblem:
    """One argmin, for `explain`."""

    function: str
    span: Span
    solver: Estimator
    method: Estimator
    why: str


def _option_problem(what: str, name: str, k: str, v: object) -> str | None:
    if k == "method":
        return None if v in LINEAR_SOLVERS else \
            f"unknown linear solver '{v}' (solvers: {', '.join(LINEAR_SOLVERS)})"
    if k in _FRACTIONS:
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        want = None if number and 0 <= v < 1 else "a number in [0, 1)"
    else:
        kind = ("count" if k in _COUNTS else "real" if k in _REALS
                else "non-negative" if k in _NON_NEGATIVE else "positive")
        want = number_problem(v, kind)
    return None if want is None else f"option '{k}' of {what} '{name}' must be {want}, got {v}"


def _problem(e: Estimator, table: dict, what: str) -> str | None:
    if e.name not in table:
        close = difflib.get_close_matches(e.name, table, n=1)
        return (f"unknown {what} '{e.name}'" + (f"; did you mean '{close[0]}'?" if close
                                                else f" ({what}s: {', '.join(table)})"))
    for k, v in e.options:
        if k not in table[e.name]:
            opts = ", ".join(table[e.name]) or "none"
            return f"{what} '{e.name}' has no option '{k}' (options: {opts})"
        problem = _option_problem(what, e.name, k, v)
        if problem:
            return problem
    return None


def complete(e: Estimator, table: dict) -> Estimator:
    given = dict(e.options)
    return replace(e, options=tuple((k, given.get(k, v)) for k, v in table[e.name].items()))


def _solver_table(constrained: bool) -> dict:
    if not constrained:
        return SOLVERS
    return {n: o | {"rho": 1.0} if n in CONSTRAINED else o for n, o in SOLVERS.items()}


@dataclass(frozen=True)
class Hypergrad:
    """The hypergradient pass (checks and annotates `argmin` ops)."""

    name: str = "hypergrad"
    checks_only: bool = True

    def run(self, module: Module, diags: Diagnostics) -> Module:
        found: list[InnerProblem] = []
        functions = []
        random = random_functions(module)
        for fn in module.functions:
            functions.append(replace(fn, body=_region(fn.name, fn.body, diags, found, random)))
        return replace(module, functions=tuple(functions),
                       facts=module.facts | {"hypergrad": tuple(found)})


def _region(fn: str, region: Region, diags: Diagnostics, found: list, random: set[str]) -> Region:
    ops = []
    for op in region.ops:
        if op.regions:
            op = replace(op, regions=tuple(_region(fn, r, diags, found, random)
                                           for r in op.regions))
        if op.name == "argmin":
            _check_deterministic(op, random, diags)
            op = _choose(fn, op, diags, found)
        ops.append(op)
    return replace(region, ops=tuple(ops))


def _own_ops(region: Region):
    """The ops of an inner problem's region, those of problems nested in it excluded (each is
    checked on its own)."""
    for op in region.ops:
        yield op
        if op.name != "argmin":
            for r in op.regions:
                yield from _own_ops(r)


def _check_deterministic(op: Op, random: set[str], diags: Diagnostics) -> None:
    """An inner problem's objective and constraints draw nothing (stochastic inner problems are
    not supported yet): the first draw, expectation or call of a drawing function is an error."""
    for inner in (o for r in op.regions for o in _own_ops(r)):
        if inner.name == "call_fn" and inner.params.callee in random:
            what = f"'{inner.params.callee}' draws (itself or in a function it calls), which"
        elif "random" not in OPS[inner.name].traits:
            continue
        elif inner.name in ("expect", "samples"):
            what = f"'{inner.params.kind}' (a Monte Carlo estimate)"
        else:
            what = f"'{inner.name}' draws at random, which"
        diags.error(f"{what} is not supported inside an inner problem: its solver and "
                    f"hypergradient need a deterministic objective; draw outside the argmin "
                    f"and pass the values in", inner.span)
        return


def _choose(fn: str, op: Op, diags: Diagnostics, found: list) -> Op:
    p = op.params
    constrained = len(op.regions) > 1
    table = _solver_table(constrained)
    problem = _problem(p.solver, table, "solver")
    missing = [k for k, v in table.get(p.solver.name, {}).items()
               if v is REQUIRED and k not in dict(p.solver.options)]
    if problem is None and missing:
        problem = f"solver '{p.solver.name}' needs option{'s' * (len(missing) > 1)} " + \
                  " and ".join(f"'{k}'" for k in missing)
    if problem is None and constrained and p.solver.name not in CONSTRAINED:
        problem = (f"solver '{p.solver.name}' cannot take 'subject to' constraints; use "
                   f"{', '.join(CONSTRAINED)} (or projected, without 'subject to', for a box)")
    if problem is None and p.solver.name == "projected" and \
            not p.solver.option("lower") < p.solver.option("upper"):
        problem = "solver 'projected' needs lower < upper"
    if problem is not None:
        diags.error(problem, p.solver.span)
        return op
    solver = complete(p.solver, table)
    if p.hyper is not None:
        problem = _problem(p.hyper, METHODS, "hypergradient method")
        if problem is None:
            problem = _method_problem(solver, p.hyper, constrained)
        if problem is not None:
            diags.error(problem, p.hyper.span)
            return op
        method, why = p.hyper, "annotated in the source"
    elif constrained:
        method, why = Estimator("value_function"), (
            "the default for a problem with 'subject to': a first-order, Hessian-free "
            "value-function method that accounts for constraints coupling the inner variable "
            "and the outer parameters (implicit differentiation assumes no constraints)")
    else:
        method, why = Estimator("implicit"), (
            "the default: implicit differentiation needs no storage of the solver's iterates "
            "(memory flat in its steps) and only Hessian-vector products; write "
            "'with unrolled' to differentiate through the loop instead")
    method = complete(method, METHODS)
    if method.name == "value_function" and method.option("steps") is REQUIRED:
        method = replace(method, options=tuple((k, solver.option("steps") if k == "steps" else v)
                                               for k, v in method.options))
    _warn_kinks(op, method, diags)
    _check_nested(op, solver, method, diags)
    found.append(InnerProblem(fn, op.span, solver, method, why))
    return replace(op, params=replace(p, solver=solver, hyper=method))


def _method_problem(solver: Estimator, method: Estimator, constrained: bool) -> str | None:
    if method.name == "implicit" and constrained:
        return ("implicit differentiation assumes an unconstrained inner problem (its gradient "
                "is zero at the solution); with 'subject to' use value_function or unrolled")
    if method.name in ("unrolled", "truncated") and solver.name not in DIFFERENTIABLE:
        return (f"'{method.name}' differentiates through the solver's loop, but '{solver.name}' "
                f"searches its step in a while loop; use {', '.join(DIFFERENTIABLE)}, or "
                f"implicit / value_function")
    if method.name == "unrolled" and solver.option("tol"):
        return ("'unrolled' differentiates through a fixed number of steps; remove the solver's "
                "tol, or use truncated(k) or implicit")
    if method.name == "truncated" and method.option("k", 10) > solver.option("steps"):
        return (f"truncated(k={method.option('k', 10)}) needs k <= the solver's steps "
                f"({solver.option('steps')})")
    return None


def _warn_kinks(op: Op, method: Estimator, diags: Diagnostics) -> None:
    if method.name != "implicit":
        return
    kinks = sorted({o.params.op if o.name == "straight_through" else o.name
                    for o in walk(op.regions[0])
                    if o.name in KINKED or "nonsmooth" in OPS[o.name].traits})
    if kinks:
        which = "which is" if len(kinks) == 1 else "which are"
        diags.warning(f"the inner objective uses {', '.join(repr(k) for k in kinks)}, {which} "
                      f"not twice differentiable: implicit differentiation assumes a smooth "
                      f"inner problem, and its hypergradient can be wrong at a kink; consider "
                      f"'with value_function' or 'with unrolled'", op.span)


def _check_nested(op: Op, solver: Estimator, method: Estimator, diags: Diagnostics) -> None:
    """Implicit differentiation (and Newton-CG) take forward-mode derivatives of the inner
    objective, which a nested inner problem with a custom backward (implicit, value_function)
    does not have."""
    if method.name != "implicit" and solver.name != "newton_cg":
        return
    for r in op.regions:
        for inner in walk(r):
            h = inner.params.hyper if inner.name == "argmin" else None
            if h is not None and h.name in ("implicit", "value_function"):
                who = "implicit differentiation" if method.name == "implicit" else "newton_cg"
                diags.error(f"this inner problem is nested in one that uses {who}, which needs "
                            f"forward-mode derivatives through it; give this one 'with "
                            f"unrolled' or 'with truncated(k)', or the outer one 'with "
                            f"value_function' or 'with unrolled'", inner.span)
