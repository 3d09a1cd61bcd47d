"""Hypergradients: check each inner problem's solver and choose its hypergradient method.

`argmin v: T = init { f(v, theta) } via SOLVER(options) [subject to c(v, theta) <= 0, ...]
[with METHOD(options)]`. Solvers (`estimators.solvers`) run as XLA loops of `steps`
iterations, or stop early at residual `tol` when tol > 0. Methods (`estimators.hypergrads`):
`implicit(cg | gmres | neumann, iters, tol, damping)`, the default for unconstrained problems;
`value_function(sigma, steps)`, the default for constrained ones; `unrolled`; `truncated(k)`.
The choice, completed with every option's value, is written into the op; `explain` reads the
`hypergrad` fact. A problem whose objective draws takes one key per solve
(`runtime.rules_argmin`): a sample-average approximation, or, with `sgd`, fresh draws at every
step; this pass checks that its draws keep it differentiable, and records for `explain` how it
samples and the bias that makes (`_sampling`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from gradlang.diagnostics import Diagnostics
from gradlang.estimators.hypergrads import METHODS, Implicit, Method, ValueFunction, method_of
from gradlang.estimators.solvers import Solver, solver_of
from gradlang.distributions import DISTRIBUTIONS
from gradlang.facts import InnerProblem
from gradlang.ir import Module, Op, Region, free_values, walk
from gradlang.ops import OPS, Annotation
from gradlang.options import OptionError, rendered
from gradlang.types import DistType, StructType, TensorType

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
                fn.name, op, module, diags, found, random) if op.name == "argmin" else op)))
        return replace(module, functions=tuple(functions),
                       facts=replace(module.facts, hypergrad=tuple(found)))


def _argmin(fn: str, op: Op, module: Module, diags: Diagnostics, found: list,
            random: set[str]) -> Op:
    """An argmin (its nested ones already done) checked, with its solver and method chosen."""
    draws = _check_sampled(op, module, random, diags)
    return _choose(fn, op, diags, found, draws)


def _check_sampled(op: Op, module: Module, random: set[str], diags: Diagnostics) -> bool:
    """An inner problem's draws (in its regions, in `expect(...)` there, or in the functions it
    calls) make it a sample-average approximation: every solve draws them once, from one key,
    and the solver and hypergradient see a deterministic objective of (v, theta). That needs
    each draw's distribution to be differentiable pathwise or not to depend on v or theta: a
    draw whose parameters do, through a family with no pathwise derivative (or annotated with
    another estimator), is an error. Returns whether the problem draws."""
    draws = False
    for region in op.regions:
        seeds = set(region.args) | {v for v in free_values(region) if _is_float(v.type)}
        for inner, depends in _draws(module, region, seeds, random, set()):
            draws = True
            if inner.name == "stochastic_round":
                if depends:
                    diags.error("stochastic_round of a value that depends on the inner variable "
                                "or the outer parameters has no derivative once its noise is "
                                "fixed (as a sample-average problem fixes it); round outside "
                                "the argmin, or use round(...) with a backward rule", inner.span)
                continue
            d = inner.operands[0].type
            spec = DISTRIBUTIONS[d.family] if isinstance(d, DistType) else None
            a = inner.params.annotation
            if a is not None and a.name not in ("reparam", "auto"):
                diags.error(f"a draw inside an inner problem is sampled once per solve (a "
                            f"sample-average approximation) and differentiated pathwise, not by "
                            f"'{a.name}'; remove the annotation", a.span or inner.span)
            elif depends and spec is not None and not spec.reparam:
                diags.error(f"this {spec.name} draw inside an inner problem depends on the inner "
                            f"variable or the outer parameters, but has no pathwise derivative: "
                            f"the sample-average objective would not be differentiable; draw it "
                            f"from fixed parameters (minibatch indices, noise) or outside the "
                            f"argmin", inner.span)
    return draws


def _draws(module: Module, region: Region, seeds: set, random: set[str], seen: set):
    """(sample op, whether its distribution depends on `seeds`) for the draws of a region and
    of the functions it calls (whose parameters all count as dependent)."""
    dependent = set(seeds)
    for op in walk(region):
        if any(v in dependent for v in op.operands):
            dependent.update(op.results)
        if op.name in ("sample", "stochastic_round"):
            yield op, op.operands[0] in dependent
        elif op.name == "call_fn" and op.params.callee in random and op.params.callee not in seen:
            seen.add(op.params.callee)
            fn = module.function(op.params.callee)
            yield from _draws(module, fn.body, {p.value for p in fn.params}, random, seen)


def _is_float(t) -> bool:
    return isinstance(t, TensorType) and t.dtype.is_float or isinstance(t, StructType)


def _choose(fn: str, op: Op, diags: Diagnostics, found: list, draws: bool) -> Op:
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
    if solver.fresh_draws and not draws:
        diags.warning(f"this inner problem does not draw, so {solver.name}'s steps have no "
                      f"fresh samples to take: it runs as gradient descent with step "
                      f"lr / (1 + decay k), averaging its last iterates; for a deterministic "
                      f"problem use gd or lbfgs", p.solver.span)
    solved = replace(p.solver, options=rendered(solver))
    hyper = replace(given, options=rendered(method))
    found.append(InnerProblem(fn, op.span, solved, hyper, why,
                              _sampling(solver, method) if draws else ""))
    return replace(op, params=replace(p, solver=solved, hyper=hyper))


def _sampling(solver: Solver, method: Method) -> str:
    """How a problem that draws takes its samples, and what that does to its hypergradient."""
    if not solver.fresh_draws:
        return ("a sample-average approximation, its draws taken once per solve from one key; "
                "the hypergradient is exact for the sampled problem, and for the expected one "
                "biased by O(1 / the samples)")
    solution = (f"{solver.name}, fresh draws at every step (the solve's key folded with the "
                f"step), its solution the mean of its last iterates, which tends to the expected "
                f"problem's (its error, SGD's noise, shrinks as 1 / sqrt(the averaged steps))")
    if isinstance(method, Implicit):
        return solution + ("; implicit differentiation at it takes its Hessian-vector products "
                           "and mixed derivative from one more fresh draw (the solve's key): "
                           "for the expected problem biased by O(1 / the samples of one draw), "
                           "from inverting a sampled Hessian, and O(the solution's variance)")
    return solution + (f"; {method.label} differentiates this run's sampled steps: biased, as "
                       f"for a deterministic solver, by the steps short of convergence, and by "
                       f"O(the solution's variance)")


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
