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

import difflib
import math
from dataclasses import dataclass, replace
from functools import cache

from gradlang.diagnostics import Diagnostics, Span
from gradlang.distributions import DISTRIBUTIONS, DistSpec
from gradlang.ir import Function, Module, Op, Region, walk
from gradlang.ops import OPS, Estimator
from gradlang.types import DistType, TensorType, has_float_leaf

from .callgraph import random_functions
from .rewrite import defining_ops
from gradlang.options import number_problem

BASELINES = ("auto", "none", "loo", "grpo", "ma", "vimco")
CREDIT = ("downstream", "whole")
"""What a score-function draw is credited with: the costs that depend on it, or all of them."""
OPTIONS: dict[str, dict[str, type]] = {
    "auto": {"enum_max": int}, "reparam": {},
    "score": {"baseline": str, "decay": float, "credit": str},
    "gumbel": {"tau": float},
    "st_gumbel": {"tau": float}, "enum": {}, "mvd": {}, "arm": {}, "disarm": {}, "dreg": {},
    "rebar": {"eta": float, "tau": float},
    "relax": {"control": str, "eta": float, "tau": float, "lr": float},
    "swor": {"k": int, "baseline": str}, "unordered": {"k": int},
}
"""Every estimator name with its options and their types."""
RELAXABLE = ("Bernoulli", "OneHotCategorical")
BRANCHES: dict[tuple[str, str], int] = {("mvd", "Normal"): 4, ("mvd", "Bernoulli"): 3,
                                        ("arm", "Bernoulli"): 2, ("disarm", "Bernoulli"): 2,
                                        ("rebar", "Bernoulli"): 3, ("relax", "Bernoulli"): 3}
"""Branched estimators (`runtime.branched`): per (estimator, family), the number of values of
the draw the objective is evaluated at."""
BRANCHED = ("enum", "mvd", "arm", "disarm", "rebar", "relax", "swor", "unordered")
"""Estimators that evaluate the objective at several values of their draw."""
WOR = ("swor", "unordered")
"""Estimators that evaluate the objective at k categories drawn without replacement."""
WOR_BASELINES = ("none", "normalized")
MAX_UNORDERED = 5
"""The largest k of the unordered set estimator (its set probabilities sum k! orderings)."""
BATCHED = ("arm", "disarm", "rebar", "relax")
"""Branched estimators whose draw may have batch axes (their evaluations do not multiply)."""


@dataclass(frozen=True)
class SiteChoice:
    """The estimator of one random choice, for `explain`."""

    function: str
    site: str
    family: str
    span: Span
    estimator: Estimator
    why: str
    annotated: bool


CONTROL_VARIATES = ("gaussian_lower", "gaussian_upper", "none")
"""The control variates of sliced_wasserstein (`runtime.ot`)."""


@dataclass(frozen=True)
class SlicedChoice:
    """The control variate of one sliced Wasserstein estimate, for `explain`."""

    function: str
    span: Span
    projections: object
    p: object
    kind: str
    why: str
    annotated: bool


def _why_not_pathwise(spec: DistSpec) -> str:
    if spec.discrete:
        return f"{spec.name} is discrete: there is no pathwise derivative"
    return f"{spec.name} has no reparameterized sampler"


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
    checks_only: bool = True
    """It only annotates `sample` and `sliced_wasserstein` ops, so it runs (and reports) after
    earlier errors too."""

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
            chooser.enumerable = fn.name in objectives
            functions.append(replace(fn, body=chooser.region(fn.body, top=True)))
        return replace(module, functions=tuple(functions),
                       facts=module.facts | {"estimators": tuple(choices), "sliced": tuple(sliced)})


class _Chooser:
    def __init__(self, fn: Function, flow: _Flow, used_dirty: bool, default: Estimator | None,
                 diags: Diagnostics, out: list[SiteChoice], sliced_out: list[SlicedChoice]):
        self.fn, self.flow, self.used_dirty = fn, flow, used_dirty
        self.default, self.diags, self.out = default, diags, out
        self.sliced_out = sliced_out
        """The control variates chosen for the sliced Wasserstein estimates (for explain)."""
        self.defs = defining_ops(fn.body)
        self.enumerable = False
        """Draws at the top level of this function can be enumerated: it is an export's
        objective and no function calls it (so each such draw happens once per sample)."""

    def region(self, region: Region, top: bool = False) -> Region:
        ops = []
        for op in region.ops:
            if op.regions:
                op = replace(op, regions=tuple(self.region(r) for r in op.regions))
            if op.name == "sample":
                op = self.site(op, top and self.enumerable)
            elif op.name == "sliced_wasserstein":
                op = self.sliced(op)
            ops.append(op)
        return replace(region, ops=tuple(ops))

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
        control = Estimator("control_variate", (("kind", kind),), op.span)
        return replace(op, params=replace(op.params, control=control))

    def support_size(self, op: Op) -> int | None:
        """The number of values a finite-support draw can take (None: not static)."""
        dist = self.defs[op.operands[0]]
        if dist.params.family == "Bernoulli":
            return 2
        k = dist.operands[0].type.shape[-1]
        return k if isinstance(k, int) else None

    def enum_problem(self, op: Op, spec: DistSpec, top: bool, name: str = "enum") -> str | None:
        """Why the objective cannot be evaluated at several values of this draw, to enumerate
        it or for a branched estimator `name` (mvd, arm, disarm); None when it can."""
        if name == "enum" and not spec.finite:
            return f"cannot enumerate {spec.name}: its support is not finite"
        batch = op.operands[0].type.batch
        single = all(isinstance(d, int) for d in batch) and math.prod(batch) == 1
        if batch and not single and name not in BATCHED:
            what = "enumerates one draw" if name == "enum" else "differentiates one draw"
            return (f"{name} {what}, but this {spec.name} has batch shape "
                    f"[{', '.join(map(str, batch))}] (the evaluations multiply)")
        if name in ("enum",) + WOR and self.support_size(op) is None:
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
                  and s.estimator.name in BRANCHED]
        if any(o != "enum" for o in others) or (name != "enum" and others):
            return (f"an objective can have one {'/'.join(BRANCHED[1:])} draw, and no enum draw "
                    f"beside it (their evaluations would multiply)")
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
            problem = self.problem(annotation, spec) or (
                self.enum_problem(op, spec, top, annotation.name)
                if annotation.name in BRANCHED else None)
            if problem is not None:
                self.diags.error(problem, annotation.span)
                return op
            chosen, why = _complete(annotation), "annotated in the source"
            problem = (self.control_problem(chosen, op) if chosen.name == "relax"
                       else self.wor_problem(chosen, op) if chosen.name in WOR else None)
            if problem is not None:
                self.diags.error(problem, annotation.span)
                return op
        else:
            chosen, why = self.automatic(op, spec, top, None)
        if chosen.name == "enum":
            chosen = Estimator("enum", (("size", self.support_size(op)),), chosen.span)
        elif chosen.name in WOR:
            chosen = Estimator(chosen.name, chosen.options + (("size", chosen.option("k")),),
                               chosen.span)
        elif chosen.name in BRANCHED:
            chosen = Estimator(chosen.name, chosen.options
                               + (("size", BRANCHES[chosen.name, spec.name]),), chosen.span)
        self.out.append(SiteChoice(self.fn.name, op.params.site, spec.name, op.span, chosen, why,
                                   annotation is not None))
        return replace(op, params=replace(op.params, estimator=chosen))

    def wor_problem(self, e: Estimator, op: Op) -> str | None:
        """Why k categories cannot be drawn without replacement here (None when they can)."""
        k, size = e.option("k"), self.support_size(op)
        if k < 2 or k > size:
            return f"{e.name}(k={k}) needs 2 <= k <= {size} (the number of categories)"
        if e.name == "unordered" and k > MAX_UNORDERED:
            return (f"unordered(k={k}): the unordered set estimator sums over the k! orderings "
                    f"of its sample, so k is at most {MAX_UNORDERED}; use swor for larger k")
        return None

    def control_problem(self, e: Estimator, op: Op) -> str | None:
        """Why relax's control=NAME is not a function r(psi, s) -> f32 of parameters psi and a
        relaxed draw s shaped as this draw (None when it is)."""
        name = e.option("control")
        if not name:
            return "relax needs control=NAME: the function r(psi, s) of its learned control variate"
        module = self.flow.module
        fn = module.function(name) or module.function(f"{self.fn.unit}.{name}")
        if fn is None:
            return f"relax's control '{name}' is not a function"
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
            return f"relax's control '{name}' " + "; ".join(problems)
        return None

    def automatic(self, op: Op, spec: DistSpec, top: bool,
                  auto: Estimator | None) -> tuple[Estimator, str]:
        if auto is None and self.default is not None and self.default.name == "auto":
            auto = self.default
        limit = auto.option("enum_max") if auto is not None else None
        if limit is not None and self.enum_problem(op, spec, top) is None:
            size = self.support_size(op)
            if size <= limit:
                return (Estimator("enum"), f"{spec.name} has {size} values (<= enum_max={limit}): "
                                           f"enumerating them gives the exact expectation")
        pragma = ""
        if self.default is not None and self.default.name != "auto":
            if self.problem(self.default, spec) is None and (
                    self.default.name not in BRANCHED
                    or self.enum_problem(op, spec, top, self.default.name) is None):
                return _complete(self.default), f"pragma estimator {self.default}"
            pragma = f"pragma estimator {self.default} does not apply: "
        if not spec.reparam:
            return _complete(Estimator("score")), pragma + _why_not_pathwise(spec)
        flow = self.flow.result_flow(self.fn, op.result)
        if flow == "dirty" or (flow != "none" and self.used_dirty):
            if not spec.fixed_support:
                self.diags.warning(f"no unbiased estimator for this {spec.name} draw: it reaches "
                                   f"the objective through a non-differentiable operation, which "
                                   f"a pathwise gradient misses, and its support depends on its "
                                   f"parameters, which biases the score function; using reparam",
                                   op.span)
                return _complete(Estimator("reparam")), pragma + "no unbiased estimator (warned)"
            return (_complete(Estimator("score")),
                    pragma + "the draw reaches the objective through a non-differentiable "
                             "operation (comparison, integer cast, if condition, "
                             "stop_gradient), which a pathwise gradient would miss")
        return (_complete(Estimator("reparam")),
                pragma + f"{spec.name} is reparameterizable and every path from the draw to "
                         f"the objective is differentiable")

    def problem(self, e: Estimator, spec: DistSpec) -> str | None:
        """Why estimator `e` cannot be used on a `spec` site (None when it can); where a draw
        is enumerable is checked by `enum_problem`."""
        problem = option_problem(e)
        if problem is not None:
            return problem
        if e.name == "mvd" and not spec.mvd:
            return (f"measure-valued derivatives are implemented for Normal and Bernoulli, not "
                    f"{spec.name}; use score" + (" or reparam" if spec.reparam else ""))
        if e.name in WOR and spec.name not in ("Categorical", "OneHotCategorical"):
            return (f"'{e.name}' draws categories without replacement: it is for Categorical "
                    f"and OneHotCategorical draws, not {spec.name}; use score")
        if e.name in BATCHED and spec.name != "Bernoulli":
            return f"'{e.name}' is an estimator for Bernoulli draws, not {spec.name}; use score"
        if e.name == "score" and not spec.fixed_support:
            return (f"cannot use 'score' on {spec.name}: its support depends on its parameters, "
                    f"so the score function misses the boundary terms and is biased; use reparam")
        if e.name in ("reparam", "dreg") and not spec.reparam:
            alts = "score, gumbel or st_gumbel" if spec.name in RELAXABLE else "score"
            return f"cannot use '{e.name}' on {spec.name}: {_why_not_pathwise(spec)}; use {alts}"
        if e.name in ("gumbel", "st_gumbel") and spec.name not in RELAXABLE:
            hint = "; draw a OneHotCategorical instead" if spec.name == "Categorical" else ""
            return (f"'{e.name}' relaxes Bernoulli and OneHotCategorical draws, not "
                    f"{spec.name}" + hint)
        return None


_NUMBER_KINDS = {float: "positive", int: "count"}
"""How options of each type in `OPTIONS` are checked (`gradlang.options.number_problem`)."""


def option_problem(e: Estimator) -> str | None:
    """Why `e` is not a known estimator with valid options (None when it is)."""
    if e.name not in OPTIONS:
        close = difflib.get_close_matches(e.name, OPTIONS, n=1)
        return (f"unknown estimator '{e.name}'" + (f"; did you mean '{close[0]}'?" if close
                                                   else f" (estimators: {', '.join(OPTIONS)})"))
    allowed = OPTIONS[e.name]
    for k, v in e.options:
        if k not in allowed:
            return (f"estimator '{e.name}' has no option '{k}'"
                    + (f" (options: {', '.join(allowed)})" if allowed else " (it takes none)"))
        if k == "decay" and isinstance(v, (int, float)) and not v < 1:
            return f"option 'decay' of '{e.name}' must be below 1, got {v}"
        want = number_problem(v, _NUMBER_KINDS[allowed[k]]) if allowed[k] in _NUMBER_KINDS else None
        if want is not None:
            return f"option '{k}' of '{e.name}' must be {want}, got {v}"
        if k == "baseline" and e.name == "swor" and v not in WOR_BASELINES:
            return f"unknown baseline '{v}' for swor (baselines: {', '.join(WOR_BASELINES)})"
        if k == "baseline" and e.name != "swor" and v not in BASELINES:
            return f"unknown baseline '{v}' (baselines: {', '.join(BASELINES)})"
        if k == "credit" and v not in CREDIT:
            return f"unknown credit '{v}' (credit: {', '.join(CREDIT)})"
    if e.name == "score" and "decay" in dict(e.options) and e.option("baseline") != "ma":
        return "option 'decay' of 'score' needs baseline=ma (a moving average)"
    return None


def _fits(t, draw) -> bool:
    """A parameter type that takes the draw's values: a float tensor of its rank, dims equal
    where both are numbers."""
    return (isinstance(t, TensorType) and t.dtype.is_float and t.rank == len(draw.shape)
            and all(a == b or isinstance(a, str) or isinstance(b, str)
                    for a, b in zip(t.shape, draw.shape)))


def _complete(e: Estimator) -> Estimator:
    """The estimator with its defaults filled in (baseline=auto, decay=0.9, tau=1.0)."""
    given = dict(e.options)
    defaults = {"score": (("baseline", "auto"),), "gumbel": (("tau", 1.0),),
                "st_gumbel": (("tau", 1.0),), "rebar": (("eta", 1.0), ("tau", 0.5)),
                "relax": (("control", ""), ("eta", 1.0), ("tau", 0.5), ("lr", 0.01)),
                "swor": (("k", 4), ("baseline", "none")), "unordered": (("k", 4),)
                }.get(e.name, ())
    if given.get("baseline") == "ma":
        defaults += (("decay", 0.9),)
    options = tuple((k, given.get(k, v)) for k, v in defaults)
    if "credit" in given:
        options += (("credit", given["credit"]),)
    return Estimator(e.name, options, e.span)
