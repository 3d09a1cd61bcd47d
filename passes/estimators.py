"""Estimator choice: pick a gradient estimator for every random choice (`sample` op).

A user annotation (`z ~ d with score(baseline=loo)`) always wins when it applies to the site;
one that cannot apply (`reparam` on a Categorical) is an error at the annotation. Otherwise the
unit's `pragma estimator ...` applies where it can, and the automatic rule decides:

- pathwise (`reparam`) when the family has a reparameterized sampler and every path from the
  draw to the objective is differentiable (a draw that reaches a comparison, an integer cast
  or an `if` condition would make the pathwise gradient silently miss that path);
- score function otherwise, with an automatic baseline (leave-one-out when the enclosing
  expectation has several samples).

The choice is written into each `sample` op's `estimator` param; `explain` reads the
`estimators` fact (one `SiteChoice` per site).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cache

from gradlang.diagnostics import Diagnostics
from gradlang.facts import SiteChoice, SlicedChoice
from gradlang.distributions import DISTRIBUTIONS, DistSpec
from gradlang.estimators import REGISTRY, OptionError, SiteEstimator, lookup
from gradlang.estimators.pathwise import why_not_pathwise
from gradlang.ir import Function, Module, Op, Region, walk
from gradlang.ops import OPS, Annotation
from gradlang.options import option, parse
from gradlang.types import DistType, TensorType, has_float_leaf

from .callgraph import random_functions
from .rewrite import defining_ops, map_ops


@dataclass(frozen=True)
class AutoOptions:
    """`auto(enum_max=N)`: the automatic rule, enumerating finite draws of at most N values."""

    enum_max: int | None = option(None, "count")


CONTROL_VARIATES = ("gaussian_lower", "gaussian_upper", "none")
"""The control variates of sliced_wasserstein (`runtime.ot`)."""


class _Flow:
    """Does a value reach a function's result only through differentiable ops?"""

    def __init__(self, module: Module):
        self.module = module
        self.param_flow = cache(self._param_flow)

    def _param_flow(self, fn_name: str, index: int) -> str:
        fn = self.module.function(fn_name)
        return self.result_flow(fn, fn.params[index].value)

    def result_flow(self, fn: Function, seed) -> str:
        """"clean" (differentiable paths only), "dirty" (some non-differentiable path), or
        "none" (the result does not depend on `seed`)."""
        state = {seed: "clean"}
        self.region(fn.body, state)
        return state.get(fn.body.results[0], "none")

    def region(self, region: Region, state: dict) -> None:
        for op in region.ops:
            for r in op.regions:
                self.region(r, state)
            if op.name == "for":  # a second pass carries taint around the loop
                for arg, init, out in zip(op.regions[0].args[1:], op.operands, op.regions[0].results):
                    state[arg] = _join(state.get(init, "none"), state.get(out, "none"))
                self.region(op.regions[0], state)
                flows = [state.get(v, "none") for v in op.regions[0].results]
            elif op.name == "call_fn":
                flows = [_through(self.param_flow(op.params.callee, i), state.get(v, "none"))
                         for i, v in enumerate(op.operands)]
            elif op.name == "if":
                cond = "dirty" if state.get(op.operands[0], "none") != "none" else "none"
                flows = [cond] + [state.get(v, "none") for r in op.regions for v in r.results]
            else:
                flows = [state.get(v, "none") for v in op.operands]
                flows += [state.get(v, "none") for r in op.regions for v in r.results]
            flow = "none"
            for f in flows:
                flow = _join(flow, f)
            if flow == "none":
                continue
            for r in op.results:
                blocked = "zero_grad" in OPS[op.name].traits or not has_float_leaf(r.type)
                state[r] = "dirty" if blocked else flow

    def callers_use_dirty(self) -> set[str]:
        """Functions some caller uses (directly or up the call chain) non-differentiably."""
        dirty: set[str] = set()
        changed = True
        while changed:
            changed = False
            for fn in self.module.functions:
                for op in walk(fn.body):
                    callee = op.params.callee if op.name == "call_fn" else None
                    if callee is None or callee in dirty:
                        continue
                    flow = self.result_flow(fn, op.result)
                    if flow == "dirty" or (flow == "clean" and fn.name in dirty):
                        dirty.add(callee)
                        changed = True
        return dirty


def _join(a: str, b: str) -> str:
    return max(a, b, key=("none", "clean", "dirty").index)


def _through(param: str, arg: str) -> str:
    """The flow into a call's result from an argument with flow `arg`."""
    if arg == "none" or param == "none":
        return "none"
    return "dirty" if "dirty" in (param, arg) else "clean"


@dataclass(frozen=True)
class Estimators:
    """The estimator-choice pass."""

    name: str = "estimators"
    after_errors: bool = True
    """It only annotates `sample` and `sliced_wasserstein` ops, so it runs (and reports) after
    earlier errors too."""
    requires: tuple[str, ...] = ()
    provides: tuple[str, ...] = ("estimators", "sliced")

    def run(self, module: Module, diags: Diagnostics) -> Module:
        for unit in module.units:
            if unit.estimator is not None and option_problem(unit.estimator) is not None:
                diags.error(option_problem(unit.estimator), unit.estimator.span)
                return module
        flow = _Flow(module)
        dirty_callers = flow.callers_use_dirty()
        choices: list[SiteChoice] = []
        sliced: list[SlicedChoice] = []
        functions = []
        called = {op.params.callee for fn in module.functions for op in walk(fn.body)
                  if op.name == "call_fn"}
        objectives = {p.transform.fn for e in module.exports for p in e.parts()
                      if p.transform.kind != "fn" or p.transform.samples} - called
        for fn in module.functions:
            default = module.unit(fn.unit).estimator
            chooser = _Chooser(fn, flow, fn.name in dirty_callers, default, diags, choices, sliced)
            functions.append(replace(fn, body=chooser.choose(fn.name in objectives)))
        return replace(module, functions=tuple(functions),
                       facts=replace(module.facts, estimators=tuple(choices), sliced=tuple(sliced)))


class _Chooser:
    def __init__(self, fn: Function, flow: _Flow, used_dirty: bool, default: Annotation | None,
                 diags: Diagnostics, out: list[SiteChoice], sliced_out: list[SlicedChoice]):
        self.fn, self.flow, self.used_dirty = fn, flow, used_dirty
        self.default, self.diags, self.out = default, diags, out
        self.sliced_out = sliced_out
        """The control variates chosen for the sliced Wasserstein estimates (for explain)."""
        self.defs = defining_ops(fn.body)

    def choose(self, enumerable: bool) -> Region:
        """The function's body with an estimator chosen for every draw and a control variate
        for every sliced Wasserstein estimate. With `enumerable` (the function is an export's
        objective and no function calls it, so each draw at its top level happens once per
        sample), the top-level draws may be enumerated."""
        top = {id(op) for op in self.fn.body.ops} if enumerable else set()
        self.inner = {id(o) for op in walk(self.fn.body) if op.name == "argmin"
                      for r in op.regions for o in walk(r)}
        """The draws of inner problems: sampled once per solve, pathwise (`passes.hypergrad`)."""

        def choose(op: Op) -> Op:
            if op.name == "sample":
                return self.site(op, id(op) in top)
            return self.sliced(op) if op.name == "sliced_wasserstein" else op
        return map_ops(self.fn.body, choose)

    def sliced(self, op: Op) -> Op:
        """The control variate of a sliced Wasserstein estimate (`runtime.ot`): as annotated,
        else the Gaussian lower bound for p = 2 (none otherwise)."""
        given, p, count = op.params.control, op.params.p, op.params.projections
        if count == 0:
            self.diags.error("sliced_wasserstein averages over random directions: it needs "
                             "projections >= 1", op.span)
            return op
        if given is None:
            kind = "gaussian_lower" if p == 2 else "none"
            why = ("the mean-gap term (theta . dm)^2 carries most of the variance over directions "
                   "when the clouds' means differ, and is about 0 when they agree (no harm)"
                   if p == 2 else f"the Gaussian control variates are for p = 2, not {p}")
        else:
            kind, why = given.option("kind"), "annotated in the source"
            problem = None
            if set(dict(given.options)) != {"kind"} or kind not in CONTROL_VARIATES:
                problem = (f"control_variate takes one of {', '.join(CONTROL_VARIATES)}, e.g. "
                           f"with control_variate(gaussian_lower)")
            elif kind != "none" and p != 2:
                problem = f"the Gaussian control variates bound W_2^2: they need p=2, not p={p}"
            elif kind == "gaussian_upper" and isinstance(count, int) and count < 3:
                problem = (f"gaussian_upper fits its coefficient on the other directions (leave "
                           f"one out): it needs projections >= 3, not {count}")
            if problem is not None:
                self.diags.error(problem, given.span)
                return op
        self.sliced_out.append(SlicedChoice(self.fn.name, op.span, count, p, kind, why,
                                            given is not None))
        control = Annotation("control_variate", (("kind", kind),), op.span)
        return replace(op, params=replace(op.params, control=control))

    def support_size(self, op: Op) -> int | None:
        """The number of values a finite-support draw can take (None: not static)."""
        dist = self.defs[op.operands[0]]
        if dist.params.family == "Bernoulli":
            return 2
        k = dist.operands[0].type.shape[-1]
        return k if isinstance(k, int) else None

    def enum_problem(self, op: Op, spec: DistSpec, top: bool,
                     est: SiteEstimator = REGISTRY["enum"]) -> str | None:
        """Why the objective cannot be evaluated at several values of this draw, to enumerate
        it or for the branched estimator `est`; None when it can."""
        name = est.name
        problem = est.problem(spec)
        if problem is not None:
            return problem
        batch = op.operands[0].type.batch
        single = all(isinstance(d, int) for d in batch) and math.prod(batch) == 1
        if batch and not single and not est.batched:
            what = "enumerates one draw" if name == "enum" else "differentiates one draw"
            return (f"{name} {what}, but this {spec.name} has batch shape "
                    f"[{', '.join(map(str, batch))}] (the evaluations multiply)")
        if est.static_support and self.support_size(op) is None:
            return (f"{name} needs a static number of categories (the last axis of the logits is "
                    f"symbolic)")
        if not top:
            return (f"{name} works on draws at the top level of an export's objective function "
                    f"(not in a loop, a branch, an expect(...) or a function it calls)")
        result = self.fn.result_type
        if name != "enum" and not (isinstance(result, TensorType) and result.rank == 0):
            return (f"{name} weights differences of the objective's values, so the objective "
                    f"'{self.fn.name}' must return a scalar; it returns {result}")
        others = [s.estimator.name for s in self.out if s.function == self.fn.name
                  and REGISTRY[s.estimator.name].branched]
        if any(o != "enum" for o in others) or (name != "enum" and others):
            weak = [e.name for e in REGISTRY.values() if e.role == "branched"]
            return (f"an objective can have one {'/'.join(weak)} draw, and no enum draw beside "
                    f"it (their evaluations would multiply)")
        return None

    def site(self, op: Op, top: bool) -> Op:
        dtype = op.operands[0].type
        if not isinstance(dtype, DistType):  # its error is already reported
            return op
        spec = DISTRIBUTIONS[dtype.family]
        annotation = op.params.annotation
        if annotation is not None and annotation.name == "auto":
            problem = option_problem(annotation)
            if problem is not None:
                self.diags.error(problem, annotation.span)
                return op
            chosen, why = self.automatic(op, spec, top, annotation)
        elif annotation is not None:
            problem = self.problem(annotation, spec)
            est = None if problem is not None else REGISTRY[annotation.name]
            if est is not None and est.branched:
                problem = self.enum_problem(op, spec, top, est)
            if problem is None:
                chosen, why = est.complete(annotation), "annotated in the source"
                problem = (self.control_problem(chosen, op) if est.control
                           else est.fits(chosen, self.support_size(op)) if est.static_support
                           else None)
            if problem is not None:
                self.diags.error(problem, annotation.span)
                return op
        else:
            chosen, why = self.automatic(op, spec, top, None)
        est = REGISTRY[chosen.name]
        size = (est.size(chosen, spec, self.support_size(op) if est.static_support else None)
                if est.branched else None)
        others = () if id(op) in self.inner else tuple(
            n for n in REGISTRY if n != chosen.name and self.accepts(op, spec, top, n))
        self.out.append(SiteChoice(self.fn.name, op.params.site, spec.name, op.span, chosen, why,
                                   annotation is not None, size, others))
        return replace(op, params=replace(op.params, estimator=chosen, size=size))

    def accepts(self, op: Op, spec: DistSpec, top: bool, name: str) -> bool:
        """Whether `with NAME` (its default options) would be accepted at this draw: the
        other choices `explain` lists. A learned control variate needs a function of the
        user's, so it is not listed."""
        est = REGISTRY[name]
        if est.control or self.problem(Annotation(name), spec) is not None:
            return False
        if est.branched and self.enum_problem(op, spec, top, est) is not None:
            return False
        try:
            complete = est.complete(Annotation(name))
        except OptionError:
            return False
        return not est.static_support or est.fits(complete, self.support_size(op)) is None

    def control_problem(self, e: Annotation, op: Op) -> str | None:
        """Why the control=NAME of `e` (an estimator with a learned control variate: relax,
        lax) is not a function r(psi, s) -> f32 of parameters psi and a draw s shaped as this
        one, relaxed or not (None when it is)."""
        name = e.option("control")
        if not name:
            return (f"{e.name} needs control=NAME: the function r(psi, s) of its learned "
                    f"control variate")
        module = self.flow.module
        fn = module.function(name) or module.function(f"{self.fn.unit}.{name}")
        if fn is None:
            return f"{e.name}'s control '{name}' is not a function"
        draw = op.result.type
        problems = []
        if len(fn.params) != 2:
            problems.append(f"takes {len(fn.params)} parameters, not 2 (psi, s)")
        elif not _fits(fn.params[1].value.type, draw):
            problems.append(f"takes s as {fn.params[1].value.type}, but the draw is {draw}")
        r = fn.result_type
        if not (isinstance(r, TensorType) and r.rank == 0 and r.dtype.is_float):
            problems.append(f"returns {r}, not a float scalar")
        if fn.name in random_functions(module):
            problems.append("draws (its value must be a function of psi and s)")
        if problems:
            return f"{e.name}'s control '{name}' " + "; ".join(problems)
        return None

    def automatic(self, op: Op, spec: DistSpec, top: bool,
                  auto: Annotation | None) -> tuple[Annotation, str]:
        if auto is None and self.default is not None and self.default.name == "auto":
            auto = self.default
        limit = auto.option("enum_max") if auto is not None else None
        if limit is not None and self.enum_problem(op, spec, top) is None:
            size = self.support_size(op)
            if size <= limit:
                return (Annotation("enum"), f"{spec.name} has {size} values (<= enum_max={limit}): "
                                           f"enumerating them gives the exact expectation")
        pragma = ""
        if self.default is not None and self.default.name != "auto":
            if self.problem(self.default, spec) is None and (
                    not REGISTRY[self.default.name].branched
                    or self.enum_problem(op, spec, top, REGISTRY[self.default.name]) is None):
                return _complete(self.default), f"pragma estimator {self.default}"
            pragma = f"pragma estimator {self.default} does not apply: "
        if not spec.reparam:
            return _complete(Annotation("score")), pragma + why_not_pathwise(spec)
        flow = self.flow.result_flow(self.fn, op.result)
        if flow == "dirty" or (flow != "none" and self.used_dirty):
            if not spec.fixed_support:
                self.diags.warning(f"no unbiased estimator for this {spec.name} draw: it reaches "
                                   f"the objective through a non-differentiable operation, which "
                                   f"a pathwise gradient misses, and its support depends on its "
                                   f"parameters, which biases the score function; using reparam",
                                   op.span)
                return _complete(Annotation("reparam")), pragma + "no unbiased estimator (warned)"
            return (_complete(Annotation("score")),
                    pragma + "the draw reaches the objective through a non-differentiable "
                             "operation (comparison, integer cast, if condition, "
                             "stop_gradient), which a pathwise gradient would miss")
        return (_complete(Annotation("reparam")),
                pragma + f"{spec.name} is reparameterizable and every path from the draw to "
                         f"the objective is differentiable")

    def problem(self, e: Annotation, spec: DistSpec) -> str | None:
        """Why estimator `e` cannot be used on a `spec` site (None when it can); where a draw
        is enumerable is checked by `enum_problem`."""
        return option_problem(e) or REGISTRY[e.name].problem(spec)


def option_problem(e: Annotation) -> str | None:
    """Why `e` is not a known estimator (or `auto`) with valid options (None when it is)."""
    try:
        if e.name == "auto":
            parse(AutoOptions, e.options, "estimator 'auto'", "auto")
        else:
            lookup(e.name).options(e)
    except OptionError as exc:
        return str(exc)
    return None


def _fits(t, draw) -> bool:
    """A parameter type that takes the draw's values: a float tensor of its rank, dims equal
    where both are numbers."""
    return (isinstance(t, TensorType) and t.dtype.is_float and t.rank == len(draw.shape)
            and all(a == b or isinstance(a, str) or isinstance(b, str)
                    for a, b in zip(t.shape, draw.shape)))


def _complete(e: Annotation) -> Annotation:
    """The estimator with its defaults filled in."""
    return REGISTRY[e.name].complete(e)
