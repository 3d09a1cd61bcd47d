"""Hypergradients: check each inner problem's solver and choose its hypergradient method.

`argmin v: T = init { f(v, theta) } via SOLVER(options) [subject to c(v, theta) <= 0, ...]
[with METHOD(options)]`. Solvers (`estimators.solvers`) run as XLA loops of `steps`
iterations, or stop early at residual `tol` when tol > 0. Methods (`estimators.hypergrads`):
`implicit(cg | gmres | neumann, iters, tol, damping)`, the default for unconstrained problems;
`value_function(sigma, steps)`, the default for constrained ones; `unrolled`; `truncated(k)`.
The choice, completed with every option's value, is written into the op; `explain` reads the
`hypergrad` fact.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from gradlang.diagnostics import Diagnostics
from gradlang.estimators.hypergrads import METHODS, Implicit, Method, ValueFunction, method_of
from gradlang.estimators.solvers import Solver, solver_of
from gradlang.facts import InnerProblem
from gradlang.ir import Module, Op, Region, walk
from gradlang.ops import OPS, Annotation
from gradlang.options import OptionError, rendered

from .callgraph import random_functions
from .rewrite import map_ops

KINKED = frozenset({"abs", "relu", "maximum", "minimum", "clip", "max", "min", "straight_through"})


@dataclass(frozen=True)
class Hypergrad:
    """The hypergradient pass (checks and annotates `argmin` ops)."""

    name: str = "hypergrad"
    after_errors: bool = True
    requires: tuple[str, ...] = ()
    provides: tuple[str, ...] = ("hypergrad",)

    def run(self, module: Module, diags: Diagnostics) -> Module:
        found: list[InnerProblem] = []
        functions = []
        random = random_functions(module)
        for fn in module.functions:
            functions.append(replace(fn, body=map_ops(fn.body, lambda op, fn=fn: _argmin(
                fn.name, op, diags, found, random) if op.name == "argmin" else op)))
        return replace(module, functions=tuple(functions),
                       facts=replace(module.facts, hypergrad=tuple(found)))


def _argmin(fn: str, op: Op, diags: Diagnostics, found: list, random: set[str]) -> Op:
    """An argmin (its nested ones already done) checked, with its solver and method chosen."""
    _check_deterministic(op, random, diags)
    return _choose(fn, op, diags, found)


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
    try:
        solver = solver_of(p.solver, constrained)
    except OptionError as exc:
        diags.error(str(exc), p.solver.span)
        return op
    if p.hyper is not None:
        given, why = p.hyper, "annotated in the source"
    elif constrained:
        given, why = Annotation(ValueFunction.name), (
            "the default for a problem with 'subject to': a first-order, Hessian-free "
            "value-function method that accounts for constraints coupling the inner variable "
            "and the outer parameters (implicit differentiation assumes no constraints)")
    else:
        given, why = Annotation(Implicit.name), (
            "the default: implicit differentiation needs no storage of the solver's iterates "
            "(memory flat in its steps) and only Hessian-vector products; write "
            "'with unrolled' to differentiate through the loop instead")
    try:
        method = method_of(given, solver, constrained)
    except OptionError as exc:
        diags.error(str(exc), given.span)
        return op
    _warn_kinks(op, method, diags)
    _check_nested(op, solver, method, diags)
    solved = replace(p.solver, options=rendered(solver))
    hyper = replace(given, options=rendered(method))
    found.append(InnerProblem(fn, op.span, solved, hyper, why))
    return replace(op, params=replace(p, solver=solved, hyper=hyper))


def _warn_kinks(op: Op, method: Method, diags: Diagnostics) -> None:
    if not method.smooth:
        return
    kinks = sorted({o.params.op if o.name == "straight_through" else o.name
                    for o in walk(op.regions[0])
                    if o.name in KINKED or "nonsmooth" in OPS[o.name].traits})
    if kinks:
        which = "which is" if len(kinks) == 1 else "which are"
        diags.warning(f"the inner objective uses {', '.join(repr(k) for k in kinks)}, {which} "
                      f"not twice differentiable: {method.label} assumes a smooth "
                      f"inner problem, and its hypergradient can be wrong at a kink; consider "
                      f"'with value_function' or 'with unrolled'", op.span)


def _check_nested(op: Op, solver: Solver, method: Method, diags: Diagnostics) -> None:
    """Implicit differentiation (and Newton-CG) take forward-mode derivatives of the inner
    objective, which a nested inner problem whose method is reverse-only (value_function)
    does not have."""
    if not (method.forward_mode or solver.forward_mode):
        return
    for r in op.regions:
        for inner in walk(r):
            h = inner.params.hyper if inner.name == "argmin" else None
            if h is not None and h.name in METHODS and not METHODS[h.name].jvp:
                who = method.label if method.forward_mode else solver.name
                diags.error(f"this inner problem is nested in one that uses {who}, which needs "
                            f"forward-mode derivatives through it; give this one 'with "
                            f"implicit', 'with unrolled' or 'with truncated(k)', or the outer "
                            f"one 'with value_function' or 'with unrolled'", inner.span)
