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

from dataclasses import dataclass, make_dataclass, replace
from typing import ClassVar

from gradlang.diagnostics import Diagnostics, Span
from gradlang.ir import Module, Op, Region, walk
from gradlang.ops import OPS, Annotation
from gradlang.options import OptionError, chosen, option, rendered

from .callgraph import random_functions
from .rewrite import map_ops

# ---- solvers: `tol` > 0 stops at that residual; a fraction (a momentum) is in [0, 1)


@dataclass(frozen=True)
class Gd:
    """Gradient descent."""

    name: ClassVar[str] = "gd"
    steps: int = option(100)
    lr: float = option(0.1)
    tol: float = option(0.0, "non-negative")


@dataclass(frozen=True)
class Momentum:
    """Gradient descent with heavy-ball momentum."""

    name: ClassVar[str] = "momentum"
    steps: int = option(100)
    lr: float = option(0.1)
    beta: float = option(0.9, "non-negative", below=1)
    tol: float = option(0.0, "non-negative")


@dataclass(frozen=True)
class Adam:
    """Adam."""

    name: ClassVar[str] = "adam"
    steps: int = option(200)
    lr: float = option(0.01)
    b1: float = option(0.9, "non-negative", below=1)
    b2: float = option(0.999, "non-negative", below=1)
    eps: float = option(1e-8)
    tol: float = option(0.0, "non-negative")


@dataclass(frozen=True)
class Lbfgs:
    """L-BFGS (its line search is a while loop)."""

    name: ClassVar[str] = "lbfgs"
    steps: int = option(50)
    memory: int = option(10)
    tol: float = option(0.0, "non-negative")


@dataclass(frozen=True)
class NewtonCg:
    """Newton steps solved by conjugate gradients."""

    name: ClassVar[str] = "newton_cg"
    steps: int = option(10)
    iters: int = option(20)
    """Conjugate-gradient iterations per step."""
    tol: float = option(0.0, "non-negative")


@dataclass(frozen=True)
class Projected:
    """Projected gradient descent onto the box [lower, upper] (both required)."""

    name: ClassVar[str] = "projected"
    steps: int = option(100)
    lr: float = option(0.1)
    lower: float | None = option(None, "real")
    upper: float | None = option(None, "real")
    tol: float = option(0.0, "non-negative")

    def check(self) -> str | None:
        missing = [k for k in ("lower", "upper") if getattr(self, k) is None]
        if missing:
            return (f"solver 'projected' needs option{'s' * (len(missing) > 1)} "
                    + " and ".join(f"'{k}'" for k in missing))
        return None if self.lower < self.upper else "solver 'projected' needs lower < upper"


def _primal_dual(solver: type) -> type:
    """`solver`'s options for a problem with `subject to`: the multipliers' step `rho` last."""
    return make_dataclass(f"PrimalDual{solver.__name__}", [("rho", float, option(1.0))],
                          bases=(solver,), frozen=True, namespace={"__module__": __name__})


SOLVERS: dict[str, type] = {s.name: s for s in (Gd, Momentum, Adam, Lbfgs, NewtonCg, Projected)}
CONSTRAINED: dict[str, type] = {s.name: _primal_dual(s) for s in (Gd, Momentum, Adam)}
"""Solvers that take `subject to` (primal-dual, with the multipliers' step `rho`)."""
DIFFERENTIABLE = ("gd", "momentum", "adam", "projected")
"""Solvers reverse mode can go through (the others' line search is a while loop)."""

# ---- hypergradient methods

LINEAR_SOLVERS = ("cg", "gmres", "neumann")


@dataclass(frozen=True)
class Implicit:
    """Implicit differentiation: one linear solve (`method`) at the solution."""

    name: ClassVar[str] = "implicit"
    method: str = option("cg", choices=LINEAR_SOLVERS, plural="linear solvers")
    iters: int = option(30)
    tol: float = option(0.0, "non-negative")
    damping: float = option(0.0, "non-negative")


@dataclass(frozen=True)
class ValueFunction:
    """The value-function method: first-order, it accounts for constraints."""

    name: ClassVar[str] = "value_function"
    sigma: float = option(0.01)
    steps: int | None = option(None, "count")
    """The steps of its solves (the solver's by default)."""


@dataclass(frozen=True)
class Unrolled:
    """Reverse mode through every step of the solver's loop."""

    name: ClassVar[str] = "unrolled"


@dataclass(frozen=True)
class Truncated:
    """Reverse mode through the last k steps of the solver's loop."""

    name: ClassVar[str] = "truncated"
    k: int = option(10)


METHODS: dict[str, type] = {m.name: m for m in (Implicit, ValueFunction, Unrolled, Truncated)}
KINKED = frozenset({"abs", "relu", "maximum", "minimum", "clip", "max", "min", "straight_through"})


@dataclass(frozen=True)
class InnerProblem:
    """One argmin, for `explain`."""

    function: str
    span: Span
    solver: Annotation
    method: Annotation
    why: str


def _solver(e: Annotation, constrained: bool) -> Annotation:
    """The solver checked and with its defaults filled in (raises OptionError)."""
    options = chosen(SOLVERS | CONSTRAINED if constrained else SOLVERS, e.name, e.options, "solver")
    if constrained and e.name not in CONSTRAINED:
        raise OptionError(f"solver '{e.name}' cannot take 'subject to' constraints; use "
                          f"{', '.join(CONSTRAINED)} (or projected, without 'subject to', for "
                          f"a box)")
    return replace(e, options=rendered(options))


def _method(e: Annotation, solver: Annotation, constrained: bool) -> Annotation:
    """The hypergradient method checked against the completed solver and with its defaults
    filled in (raises OptionError)."""
    options = chosen(METHODS, e.name, e.options, "hypergradient method")
    if isinstance(options, ValueFunction) and options.steps is None:
        options = replace(options, steps=solver.option("steps"))
    method = replace(e, options=rendered(options))
    problem = _method_problem(solver, method, constrained)
    if problem is not None:
        raise OptionError(problem)
    return method


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
        solver = _solver(p.solver, constrained)
    except OptionError as exc:
        diags.error(str(exc), p.solver.span)
        return op
    if p.hyper is not None:
        method, why = p.hyper, "annotated in the source"
    elif constrained:
        method, why = Annotation("value_function"), (
            "the default for a problem with 'subject to': a first-order, Hessian-free "
            "value-function method that accounts for constraints coupling the inner variable "
            "and the outer parameters (implicit differentiation assumes no constraints)")
    else:
        method, why = Annotation("implicit"), (
            "the default: implicit differentiation needs no storage of the solver's iterates "
            "(memory flat in its steps) and only Hessian-vector products; write "
            "'with unrolled' to differentiate through the loop instead")
    try:
        method = _method(method, solver, constrained)
    except OptionError as exc:
        diags.error(str(exc), method.span)
        return op
    _warn_kinks(op, method, diags)
    _check_nested(op, solver, method, diags)
    found.append(InnerProblem(fn, op.span, solver, method, why))
    return replace(op, params=replace(p, solver=solver, hyper=method))


def _method_problem(solver: Annotation, method: Annotation, constrained: bool) -> str | None:
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
    if method.name == "truncated" and method.option("k") > solver.option("steps"):
        return (f"truncated(k={method.option('k')}) needs k <= the solver's steps "
                f"({solver.option('steps')})")
    return None


def _warn_kinks(op: Op, method: Annotation, diags: Diagnostics) -> None:
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


def _check_nested(op: Op, solver: Annotation, method: Annotation, diags: Diagnostics) -> None:
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
