"""Surrogate construction: rewrite expectations so that reverse mode yields the chosen estimators.

Each score-function draw `z` gets its log-probability `sum(log_prob(d, z))` (differentiable in
the distribution's parameters; the draw itself carries no gradient). These score terms flow to
the enclosing expectation: a function that draws (directly or through calls) returns them next
to its value, `if` branches yield them, and each expectation scope (`expect` in a body, or the
export itself, with `samples=N` or a single draw) becomes

    %v, %l... = samples {samples=N} { ...; yield value, score terms }   # stacked on axis 0
    %e = surrogate %v, %l... {baselines=(...)}

where `surrogate` is the DiCE magic-box form  mean_s[ magic(L_s) v_s + sum_g (1 - magic(l_gs)) b_gs ]
whose value is the Monte Carlo mean and whose derivatives (of any order) are the score-function
estimators; `b` is the control variate of each baseline group (leave-one-out over the samples,
or GRPO's group-normalized advantage). Scopes without score terms become `samples` + `mean`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from gradlang.diagnostics import Diagnostics, Span
from gradlang.ir import Export, Function, Module, Op, Param, Region, Value, walk
from gradlang.ops import (OPS, CalleeParams, ConstParams, ExpectParams, GetParams, NoParams,
                          ReduceParams, SurrogateParams)
from gradlang.types import DType, TensorType, TupleType, Type, scalar

from .typecheck_random import stacked

GROUPS = ("auto", "none", "loo", "grpo", "ma", "enum", "mvd_loc", "mvd_scale")
"""Baseline groups, in the order score terms are returned; `enum` holds the log-probabilities
of enumerated draws (the weights of the enumerated combinations, not score terms);
`mvd_loc` / `mvd_scale` the parameters of a measure-valued draw (what its weak derivatives
differentiate)."""
BRANCHED = ("enum", "mvd")
"""Estimators whose draws are evaluated on several values (combinations of `samples` axis 1)."""
F32 = scalar(DType.F32)


def random_functions(module: Module) -> set[str]:
    """Functions that draw, directly or through the functions they call."""
    own = {fn.name: {"random"} if any("random" in OPS[op.name].traits for op in walk(fn.body))
           else set() for fn in module.functions}
    calls = {fn.name: {op.params.callee for op in walk(fn.body) if op.name == "call_fn"}
             for fn in module.functions}
    return {name for name, found in _through_calls(module, own, calls).items() if found}


@dataclass
class _Scores:
    """Score terms produced in a region, per baseline group, with the sites behind them."""

    values: dict[str, list[Value]]
    sites: dict[str, list[Span]]

    @staticmethod
    def empty() -> _Scores:
        return _Scores({}, {})

    def add(self, group: str, value: Value, sites: list[Span]) -> None:
        self.values.setdefault(group, []).append(value)
        self.sites.setdefault(group, []).extend(sites)

    def merge(self, other: _Scores) -> None:
        for g, vs in other.values.items():
            for v in vs:
                self.add(g, v, [])
            self.sites.setdefault(g, []).extend(other.sites.get(g, []))


class _Rewriter:
    def __init__(self, module: Module, scored: dict[str, tuple[str, ...]], diags: Diagnostics):
        self.module = module
        self.scored = scored
        """Functions that return score terms -> the groups they return, in GROUPS order."""
        self.site_spans: dict[str, dict[str, list[Span]]] = {}
        self.diags = diags
        self.ops: list[Op] = []
        self.sizes: dict[Span, int] = {}
        """The support size of each enumerated draw."""
        self.decays: dict[Span, float] = {}
        """The decay of each moving-average site."""
        self.resolved: dict[tuple[str, Span], set[str]] = {}
        """The control variates each score site ends up with, per expectation it is in: keyed
        by (export name, site) for an export's expectation, ("", site) for a nested one."""
        self.label = ""
        """The export whose expectation is being built ("" inside function bodies)."""

    def emit(self, name: str, operands: tuple[Value, ...], params: object, types: tuple[Type, ...],
             span: Span | None, regions: tuple[Region, ...] = ()) -> Op:
        op = Op(name, operands, tuple(Value(t) for t in types), params, regions, span)
        self.ops.append(op)
        return op

    def total(self, values: list[Value], span: Span | None) -> Value:
        acc = values[0]
        for v in values[1:]:
            acc = self.emit("add", (acc, v), NoParams(), (F32,), span).result
        return acc

    def region(self, region: Region) -> tuple[Region, _Scores]:
        """The region rewritten, and the score terms its ops produce (not yet yielded)."""
        outer, self.ops = self.ops, []
        scores = _Scores.empty()
        try:
            for op in region.ops:
                self.op(op, scores)
            return replace(region, ops=tuple(self.ops)), scores
        finally:
            self.ops = outer

    def op(self, op: Op, scores: _Scores) -> None:
        if op.name == "sample" and op.params.estimator.name in BRANCHED:
            est = op.params.estimator
            slot = sum(1 for o in self.ops if o.name == "sample"
                       and o.params.estimator.name in BRANCHED)
            est = replace(est, options=est.options + (("slot", slot),))
            op = replace(op, params=replace(op.params, estimator=est))
            self.ops.append(op)
            self.sizes[op.span] = est.option("size")
            if est.name == "enum":
                lp = self.emit("log_prob", (op.operands[0], op.result), NoParams(), (F32,),
                               op.span).result
                scores.add("enum", lp, [op.span])
            else:
                dist = next(o for o in self.ops if op.operands[0] in o.results)
                loc, scale = dist.operands
                scores.add("mvd_loc", loc, [op.span])
                scores.add("mvd_scale", scale, [])
        elif op.name == "sample" and op.params.estimator.name == "score":
            self.ops.append(op)
            dist = op.operands[0].type
            lp = self.emit("log_prob", (op.operands[0], op.result), NoParams(),
                           (TensorType(DType.F32, dist.batch),), op.span).result
            total = self.emit("sum", (lp,), ReduceParams(), (F32,), op.span).result
            baseline = op.params.estimator.option("baseline")
            if baseline == "ma":
                self.decays[op.span] = op.params.estimator.option("decay")
            scores.add(baseline, total, [op.span])
        elif op.name == "call_fn" and op.params.callee in self.scored:
            groups = self.scored[op.params.callee]
            callee = self.module.function(op.params.callee)
            rtype = TupleType((callee.result_type,) + (F32,) * len(groups))
            t = self.emit("call_fn", op.operands, op.params, (rtype,), op.span).result
            self.ops.append(Op("get", (t,), op.results, GetParams(0, len(rtype.elems)), (), op.span))
            for i, g in enumerate(groups):
                v = self.emit("get", (t,), GetParams(i + 1, len(rtype.elems)), (F32,), op.span).result
                scores.add(g, v, self.site_spans.get(callee.name, {}).get(g, []))
        elif op.name == "if":
            self.if_op(op, scores)
        elif op.name == "for":
            self.loop(op, scores)
        elif op.name == "expect":
            self.expect(op)
        else:
            self.ops.append(op)

    def loop(self, op: Op, scores: _Scores) -> None:
        """Score terms of draws in a loop body are summed over the iterations in extra carries."""
        body, inner = self.region(op.regions[0])
        groups = [g for g in GROUPS if g in inner.values]
        if not groups:
            self.ops.append(replace(op, regions=(body,)))
            return
        outer, self.ops = self.ops, list(body.ops)
        args = tuple(Value(F32, f"score_{g}") for g in groups)
        nexts = tuple(self.emit("add", (a, self.total(inner.values[g], op.span)), NoParams(), (F32,),
                                op.span).result for a, g in zip(args, groups))
        body = replace(body, args=body.args + args, ops=tuple(self.ops), results=body.results + nexts)
        self.ops = outer
        inits = tuple(self.emit("const", (), ConstParams(0.0, DType.F32), (F32,), op.span).result
                      for _ in groups)
        params = replace(op.params, carries=op.params.carries + tuple(f"score_{g}" for g in groups))
        new = Op("for", op.operands + inits, op.results + tuple(Value(F32) for _ in groups), params,
                 (body,), op.span)
        self.ops.append(new)
        for g, v in zip(groups, new.results[len(op.results):]):
            scores.add(g, v, inner.sites.get(g, []))

    def if_op(self, op: Op, scores: _Scores) -> None:
        branches = [self.region(r) for r in op.regions]
        groups = [g for g in GROUPS if any(g in s.values for _, s in branches)]
        if not groups:
            self.ops.append(replace(op, regions=tuple(r for r, _ in branches)))
            return
        regions = []
        for region, s in branches:
            outer, self.ops = self.ops, list(region.ops)
            extra = [self.total(s.values[g], op.span) if g in s.values else
                     self.emit("const", (), ConstParams(0.0, DType.F32), (F32,), op.span).result
                     for g in groups]
            regions.append(replace(region, ops=tuple(self.ops), results=region.results + tuple(extra)))
            self.ops = outer
        new = Op("if", op.operands, op.results + tuple(Value(F32) for _ in groups), op.params,
                 tuple(regions), op.span)
        self.ops.append(new)
        for g, v in zip(groups, new.results[1:]):
            scores.add(g, v, [span for _, s in branches for span in s.sites.get(g, [])])

    def expect(self, op: Op) -> None:
        region, scores = self.region(op.regions[0])
        for span in scores.sites.get("ma", ()):
            self.diags.error("baseline=ma keeps a running average across calls, which only the "
                             "export's own expectation can carry (as its 'baseline' argument "
                             "and result); use loo or grpo inside expect(...)", span)
        ops = self.scope(region, scores, op.params.samples, op.span)
        self.ops += ops[:-1] + [replace(ops[-1], results=op.results)]

    def scope(self, region: Region, scores: _Scores, n: int, span: Span | None,
              state: Value | None = None) -> list[Op]:
        """The ops of an expectation over `region` (its value yielded first), n draws. With
        moving-average sites, `state` is the running average and the last op has a second
        result, its update."""
        outer, self.ops = self.ops, list(region.ops)
        groups = [g for g in GROUPS if g in scores.values]
        extra = tuple(self.total(scores.values[g], span) for g in groups)
        inner = replace(region, ops=tuple(self.ops), results=region.results + extra)
        self.ops = []
        vtype = region.results[0].type
        sizes = tuple(self.sizes[s] for g in ("enum", "mvd_loc") for s in scores.sites.get(g, ()))
        combos = math.prod(sizes)

        def per_draw(t):
            t = stacked(combos, t) if sizes else t
            return stacked(n, t)

        types = (per_draw(vtype),) + tuple(per_draw(F32) for _ in groups)
        draws = self.emit("samples", (), ExpectParams(n, sizes), types, span, (inner,))
        if not groups:
            self.emit("mean", (draws.results[0],), ReduceParams((0,)), (vtype,), span)
        elif "ma" in groups and state is not None:
            baselines = tuple(self.baseline(g, n, scores.sites[g]) for g in groups)
            decay = self.decay(scores.sites["ma"])
            self.emit("surrogate", draws.results + (state,), SurrogateParams(baselines, decay),
                      (vtype, F32), span)
        else:
            baselines = tuple(self.baseline(g, n, scores.sites[g]) for g in groups)
            self.emit("surrogate", draws.results, SurrogateParams(baselines), (vtype,), span)
        out, self.ops = self.ops, outer
        return out

    def decay(self, sites: list[Span]) -> float:
        decays = sorted({self.decays[s] for s in sites})
        if len(decays) > 1:
            for span in sites:
                self.diags.error(f"the moving-average baselines of one expectation share their "
                                 f"average, so they need the same decay (found "
                                 f"{', '.join(map(str, decays))})", span)
        return decays[0]

    def baseline(self, group: str, n: int, sites: list[Span]) -> str:
        if group in ("enum", "mvd_loc", "mvd_scale"):
            return group
        resolved = ("loo" if n >= 2 else "none") if group == "auto" else group
        for span in sites:
            self.resolved.setdefault((self.label, span), set()).add(f"{resolved}, samples={n}")
        if group in ("loo", "grpo") and n < 2:
            for span in sites:
                self.diags.error(f"baseline={group} compares the samples of an expectation, but "
                                 f"this draw's expectation has 1 sample; use expect(f, "
                                 f"samples=N) with N >= 2", span)
        return resolved

    def function(self, fn: Function) -> Function:
        body, scores = self.region(fn.body)
        groups = self.scored.get(fn.name)
        if groups is None:
            return replace(fn, body=body)
        self.site_spans[fn.name] = scores.sites
        outer, self.ops = self.ops, list(body.ops)
        extra = tuple(self.total(scores.values[g], fn.span) for g in groups)
        rtype = TupleType((fn.result_type,) + (F32,) * len(groups))
        t = self.emit("tuple", body.results + extra, NoParams(), (rtype,), fn.span).result
        body = replace(body, ops=tuple(self.ops), results=(t,))
        self.ops = outer
        return replace(fn, body=body, result_type=rtype)

    def objective(self, export: Export, random: set[str]) -> Function | None:
        """The wrapper function computing an export's expectation (None: not stochastic)."""
        t = export.transform
        fn = self.module.function(t.fn)
        if t.samples == 0 and fn.name not in random:
            return None
        params = tuple(Param(p.name, Value(p.value.type, p.name), p.span) for p in fn.params)
        call = Op("call_fn", tuple(p.value for p in params), (Value(fn.result_type),),
                  CalleeParams(fn.name), (), export.fn_span)
        branched = {"enum", "mvd_loc"} & set(self.scored.get(fn.name, ()))
        if t.kind == "fn" and t.samples == 0 and not branched:  # one draw, its value as it is
            if fn.name not in self.scored:
                return None
            self.ops, outer = [], self.ops
            self.op(call, _Scores.empty())
            ops, self.ops = self.ops, outer
            return Function(f"{fn.name}@draw", fn.unit, params, fn.result_type,
                            Region((), tuple(ops), call.results), fn.span, fn.result_span)
        r = fn.result_type
        if not (isinstance(r, TensorType) and r.dtype.is_float):
            what = f"expect({fn.name}, ...)" if t.samples else f"{t.kind} of a drawing function"
            self.diags.error(f"{what} needs '{fn.name}' to return a float tensor (a Monte Carlo "
                             f"mean); it returns {r}", export.fn_span)
            return None
        n = max(t.samples, 1)
        region, scores = self.region(Region((), (call,), call.results))
        if "ma" not in scores.values:
            ops = self.scope(region, scores, n, export.fn_span)
            return Function(f"{fn.name}@expect{n}", fn.unit, params, fn.result_type,
                            Region((), tuple(ops), ops[-1].results), fn.span, fn.result_span)
        if fn.param("baseline") is not None:
            self.diags.error(f"baseline=ma adds a parameter 'baseline' (the running average) to "
                             f"the export, but '{fn.name}' already has one; rename it",
                             fn.param("baseline").span)
        state = Param("baseline", Value(F32, "baseline"), export.fn_span)
        ops = self.scope(region, scores, n, export.fn_span, state.value)
        rtype = TupleType((fn.result_type, F32))
        self.ops, outer = [], self.ops
        result = self.emit("tuple", ops[-1].results, NoParams(), (rtype,), export.fn_span).result
        ops += self.ops
        self.ops = outer
        return Function(f"{fn.name}@expect{n}", fn.unit, params + (state,), rtype,
                        Region((), tuple(ops), (result,)), fn.span, fn.result_span)


def _scored_functions(module: Module) -> dict[str, tuple[str, ...]]:
    """Functions whose draws (outside nested expectations) have score terms, with their groups."""
    def own(region: Region) -> set[str]:
        groups: set[str] = set()
        for op in region.ops:
            if op.name == "sample" and op.params.estimator.name == "score":
                groups.add(op.params.estimator.option("baseline"))
            if op.name == "sample" and op.params.estimator.name == "enum":
                groups.add("enum")
            if op.name == "sample" and op.params.estimator.name == "mvd":
                groups |= {"mvd_loc", "mvd_scale"}
            if op.name != "expect":  # an expectation is its own scope
                for r in op.regions:
                    groups |= own(r)
        return groups

    def callees(region: Region) -> set[str]:
        out: set[str] = set()
        for op in region.ops:
            if op.name == "call_fn":
                out.add(op.params.callee)
            if op.name != "expect":
                for r in op.regions:
                    out |= callees(r)
        return out

    groups = _through_calls(module, {fn.name: own(fn.body) for fn in module.functions},
                            {fn.name: callees(fn.body) for fn in module.functions})
    return {n: tuple(g for g in GROUPS if g in gs) for n, gs in groups.items() if gs}


def _through_calls(module: Module, own: dict[str, set[str]],
                   calls: dict[str, set[str]]) -> dict[str, set[str]]:
    """Each function's set joined with those of the functions it calls (one pass in call
    order: resolve rejects recursion, so the call graph has no cycles)."""
    out: dict[str, set[str]] = {}
    for fn in _call_order(module):
        out[fn.name] = own[fn.name].union(*(out[c] for c in calls[fn.name]))
    return out


def _call_order(module: Module) -> list[Function]:
    """Callees before callers, so that a caller sees its callees' score terms."""
    done: list[str] = []

    def visit(name: str) -> None:
        if name in done:
            return
        for op in walk(module.function(name).body):
            if op.name == "call_fn":
                visit(op.params.callee)
        done.append(name)

    for fn in module.functions:
        visit(fn.name)
    return [module.function(n) for n in done]


@dataclass(frozen=True)
class Surrogate:
    """The surrogate-construction pass (score terms, expectation scopes, control variates)."""

    name: str = "surrogate"
    checks_only: bool = False

    def run(self, module: Module, diags: Diagnostics) -> Module:
        rewriter = _Rewriter(module, _scored_functions(module), diags)
        rewritten = {fn.name: rewriter.function(fn) for fn in _call_order(module)}
        random = random_functions(module)
        functions = [rewritten[fn.name] for fn in module.functions]
        exports = []
        objectives = {}
        stateful: set[str] = set()
        for export in module.exports:
            objectives[export.name] = (export.transform.fn, export.transform.samples)
            rewriter.label = export.name
            wrapper = rewriter.objective(export, random)
            if wrapper is not None:
                if all(f.name != wrapper.name for f in functions):
                    functions.append(wrapper)
                export = replace(export, transform=replace(export.transform, fn=wrapper.name,
                                                           samples=0))
                if wrapper.params[-1].name == "baseline" and isinstance(wrapper.result_type, TupleType):
                    stateful.add(wrapper.name)
            exports.append(export)
        return replace(module, functions=tuple(functions), exports=tuple(exports),
                       facts=module.facts | {"random": frozenset(random_functions(
                           replace(module, functions=tuple(functions)))), "objectives": objectives,
                           "stateful": frozenset(stateful),
                           "control_variates": rewriter.resolved})
