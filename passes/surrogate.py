"""Surrogate construction: rewrite expectations so that reverse mode yields the chosen estimators.

Each expectation scope (an `expect` in a body, or the export of a drawing function, with
`samples=N` or a single draw) becomes

    %v, %c..., %l... = samples {samples=N} { ...; yield value, costs, score terms }   # axis 0
    %e = surrogate %v, %c..., %l... {baselines=(...), costs=K, credit=(...)}

Inside a scope, calls of drawing functions are inlined (`inline` ops, lowered like the call), so
that every draw is visible. A score-function draw `z` contributes its log-probability
`l = sum(log_prob(d, z))` (differentiable in the distribution's parameters; the draw itself
carries no gradient); draws in a loop or a branch contribute one summed term per baseline.

Credit assignment (`credit`): the scope's value is split into additive terms (through add, sub,
neg, sum, mean, scaling and the bodies of the functions it calls, `credit.py`), a dependency
analysis finds the score terms each depends on, and terms with the same dependencies are summed
into one cost. The surrogate is DiCE's magic box with per-cost dependencies,

    mean_s[ sum_j magic(sum_{i -> j} l_is) c_js + sum_i (1 - magic(l_is)) b_is ],

whose value is the Monte Carlo mean and whose derivatives of every order are the score-function
estimators in which each draw is credited only with the costs downstream of it. b_i is its
control variate, computed from R_i, the sum of the costs credited to it: the mean of the other
samples' R_i (leave-one-out), GRPO's group-normalized advantage, or the moving average of the
whole value (`ma`: such draws, and those annotated `score(credit=whole)`, are credited with
every cost). Scopes without score terms become `samples` + `mean`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from gradlang.diagnostics import Diagnostics, Span
from gradlang.estimators import REGISTRY, SiteEstimator
from gradlang.estimators.combine import combination_rule
from gradlang.ir import Export, Function, Module, Op, Param, Region, Value
from gradlang.ops import (OPS, Annotation, CalleeParams, ConstParams, ExpectParams, NoParams,
                          ReduceParams, ShapeParams, SurrogateParams)
from gradlang.types import Dim, DType, TensorType, TupleType, Type, scalar

from .callgraph import random_functions
from .credit import Terms, influence, per_step, trip_count
from .elements import Mixed, pairing
from .multiobjective import state_name_free
from .rewrite import inline_body

GROUPS = ("auto", "none", "loo", "grpo", "ma", "vimco", "enum", "param", "draw", "aux", "dreg")
"""Kinds of terms, in the order they are passed to `surrogate`: score terms per baseline;
`enum`, the log-probabilities of enumerated draws (the weights of the enumerated combinations);
`param` / `draw` / `aux`, a branched draw's distribution parameters (what its weak derivative
differentiates), its values and its auxiliary noise; `dreg`, draws with doubly reparameterized
gradients."""
SCORE = GROUPS[:6]
"""The baseline groups: score terms proper, credited with costs."""
F32 = scalar(DType.F32)


@dataclass
class _Unit:
    """Score terms of the current region: one draw's, or the summed ones of the draws of a
    loop or branch (per group), with the values through which those draws reach the rest of
    the program (`sources`)."""

    group: str
    value: Value
    spans: list[Span]
    sources: tuple[Value, ...]
    whole: bool = False
    """Credited with every cost (`score(credit=whole)`, or a moving-average baseline)."""
    draw: Value | None = None
    """A single draw's value (not one of a loop's or a branch's)."""
    entries: Value | None = None
    """A single draw's log-probability per batch entry, or a loop's draws' per iteration,
    which `value` sums."""
    steps: Value | None = None
    """For a loop's draws: the loop's index (the loop `Term.steps` names)."""


@dataclass
class _Scope:
    """What the rewriter tracks per expectation scope."""

    slots: int = 0
    """Branched (enumerated / measure-valued) draws numbered so far."""
    sizes: dict[Span, int] = field(default_factory=dict)
    """The number of values each branched draw is evaluated on."""
    branched: tuple[Annotation, tuple[str, ...]] | None = None
    """The scope's draw with a weak derivative: its estimator and (family, parameter names)
    (`SurrogateParams.branched` and `family`), if any."""
    kind: str = "expect"
    """`expect` or `logmeanexp`."""
    dreg: dict[Value, tuple[Op, list[Span]]] = field(default_factory=dict)
    """Each DReG draw: its distribution op, and the log_prob ops of it found (their spans)."""
    shifts: int = 0
    """Draws shifted so far (DReG draws and `shifted` branched ones: `ExpectParams.shifts`)."""

    @property
    def estimator(self) -> SiteEstimator | None:
        """The estimator of the scope's branched draw with a weak derivative, if any."""
        return None if self.branched is None else REGISTRY[self.branched[0].name]

    @property
    def controlled(self) -> bool:
        """The scope's branched draw has a learned control variate (its parameters are state)."""
        return self.estimator is not None and self.estimator.control


class _Rewriter:
    def __init__(self, module: Module, random: set[str], diags: Diagnostics):
        self.module = module
        self.random = random
        self.diags = diags
        self.ops: list[Op] = []
        self.scope_state = _Scope()
        self.decays: dict[Span, float] = {}
        """The decay of each moving-average site."""
        self.resolved: dict[tuple[str, Span], set[str]] = {}
        """The control variates each score site ends up with, per expectation it is in: keyed
        by (export name, site) for an export's expectation, ("", site) for a nested one."""
        self.credit: dict[tuple[str, Span], set[str]] = {}
        """The costs each score site is credited with (their source text), per expectation."""
        self.label = ""
        """The export whose expectation is being built ("" inside function bodies)."""
        self.alias: dict[Value, Value] = {}
        """The arguments of inlined bodies, as the values passed for them."""


    def emit(self, name: str, operands: tuple[Value, ...], params: object, types: tuple[Type, ...],
             span: Span | None, regions: tuple[Region, ...] = ()) -> Op:
        op = Op(name, operands, tuple(Value(t) for t in types), params, regions, span)
        self.ops.append(op)
        return op

    def total(self, values: list[Value], span: Span | None) -> Value:
        acc = values[0]
        for v in values[1:]:
            acc = self.emit("add", (acc, v), NoParams(), (acc.type,), span).result
        return acc

    def zero(self, span: Span | None) -> Value:
        return self.emit("const", (), ConstParams(0.0, DType.F32), (F32,), span).result

    # ---- function bodies (outside any expectation scope): only nested expectations change

    def body(self, region: Region) -> Region:
        ops = []
        outer, self.ops = self.ops, ops
        try:
            for op in region.ops:
                if op.name == "expect":
                    self.expect(op)
                elif op.name == "grad":
                    self.gradient(op, None)
                else:
                    self.ops.append(replace(op, regions=tuple(self.body(r) for r in op.regions))
                                    if op.regions else op)
        finally:
            self.ops = outer
        return replace(region, ops=tuple(ops))

    # ---- inside a scope

    def region(self, region: Region) -> tuple[Region, list[_Unit]]:
        """The region rewritten, and the score terms its ops produce (not yet yielded)."""
        outer, self.ops = self.ops, []
        units: list[_Unit] = []
        try:
            for op in region.ops:
                self.op(op, units)
            return replace(region, ops=tuple(self.ops)), units
        finally:
            self.ops = outer

    def op(self, op: Op, units: list[_Unit]) -> None:
        estimator = REGISTRY[op.params.estimator.name] if op.name == "sample" else None
        role = estimator.role if estimator is not None else None
        if estimator is not None and estimator.branched:
            self.branched(op, units)
        elif role == "score":
            est = op.params.estimator
            self.ops.append(op)
            dist = op.operands[0].type
            lp = self.emit("log_prob", (op.operands[0], op.result), NoParams(),
                           (TensorType(DType.F32, dist.batch),), op.span).result
            total = self.emit("sum", (lp,), ReduceParams(), (F32,), op.span).result
            baseline = est.option("baseline")
            if baseline == "ma":
                self.decays[op.span] = est.option("decay")
            units.append(_Unit(baseline, total, [op.span], (op.result,),
                               whole=est.option("credit") == "whole",
                               draw=op.result, entries=lp if dist.batch else None))
        elif role == "dreg":
            self.dreg(op, units)
        elif op.name == "log_prob" and self.own_density(op):
            self.stopped_density(op)
        elif op.name == "call_fn" and op.params.callee in self.random:
            self.inline(op, units)
        elif op.name == "checkpoint":
            self.hoisted(op, op.regions[0], units)
        elif op.name == "if":
            self.if_op(op, units)
        elif op.name == "for":
            self.loop(op, units)
        elif op.name == "expect":
            self.expect(op)
        elif op.name == "grad":
            self.gradient(op, units)
        elif op.name == "argmin":  # a sample-average problem: its expectations are means
            self.ops.append(replace(op, regions=tuple(self.body(r) for r in op.regions)))
        else:
            self.ops.append(op)

    def branched(self, op: Op, units: list[_Unit]) -> None:
        """A draw evaluated at several values: numbered (its slot), with the log-probability
        weighting its values (enum), or its distribution's parameters, its values and its
        noise (`aux`, ARM's uniforms: a second result of the draw) for its weak derivative."""
        est = op.params.estimator
        estimator = REGISTRY[est.name]
        if self.scope_state.kind == "logmeanexp":
            others = [e.name for e in REGISTRY.values() if e.branched and e is not estimator]
            self.diags.error(f"{est.name} evaluates the objective at several values of its draw, "
                             f"which does not apply in a logmeanexp(...) scope (nor do "
                             f"{', '.join(others)}); use score or a pathwise estimator", op.span)
        slot = self.scope_state.slots
        self.scope_state.slots += 1
        dist = next(o for o in self.ops if op.operands[0] in o.results)
        batch = dist.result.type.batch
        if estimator.aux is not None:
            op = replace(op, results=(op.result, Value(TensorType(DType.F32, estimator.aux + batch))))
        shift = None
        if estimator.shifted:
            shift = self.scope_state.shifts
            self.scope_state.shifts += 1
        op = replace(op, params=replace(op.params, slot=slot, shift=shift))
        self.ops.append(op)
        self.scope_state.sizes[op.span] = op.params.size
        if estimator.role == "enum":  # unbatched, or a batch of one
            lp = self.emit("log_prob", (op.operands[0], op.result), NoParams(),
                           (TensorType(DType.F32, batch),), op.span).result
            lp = self.emit("sum", (lp,), ReduceParams(), (F32,), op.span).result
            units.append(_Unit("enum", lp, [op.span], (op.result,)))
            return
        self.scope_state.branched = (op.params.estimator, (dist.params.family,) + dist.params.given)
        units += [_Unit("param", x, [], op.results[:1]) for x in dist.operands]
        units += [_Unit(g, x, [op.span], op.results[:1]) for g, x in zip(("draw", "aux"), op.results)]

    def dreg(self, op: Op, units: list[_Unit]) -> None:
        """A pathwise draw with doubly reparameterized gradients (in a logmeanexp scope): drawn
        as reparam plus a zero shift (`samples` differentiates the value with respect to it),
        its own log-density with its parameters stopped."""
        state = self.scope_state
        if state.kind != "logmeanexp":
            self.diags.error("dreg (doubly reparameterized gradients) applies to draws in a "
                             "logmeanexp(...) scope, whose value is an importance-weighted "
                             "bound; use reparam here", op.params.estimator.span or op.span)
        op = replace(op, params=replace(op.params, shift=state.shifts))
        state.shifts += 1
        self.ops.append(op)
        state.dreg[op.result] = (next(o for o in self.ops if op.operands[0] in o.results), [])
        units.append(_Unit("dreg", op.result, [op.span], (op.result,)))

    def own_density(self, op: Op) -> bool:
        """Is this `log_prob(d, z)` the density of a DReG draw z under its own distribution (the
        same value, or the same family built from the same values)?"""
        d, z = (self.alias.get(v, v) for v in op.operands)
        found = self.scope_state.dreg.get(z)
        if found is None:
            return False
        site = found[0]
        dist = next((o for o in self.ops if op.operands[0] in o.results), None)
        same = dist is not None and dist.params == site.params and all(
            self.alias.get(a, a) is self.alias.get(b, b) for a, b in zip(dist.operands, site.operands))
        if same or d is site.result:
            found[1].append(op.span)
        return same or d is site.result

    def stopped_density(self, op: Op) -> None:
        """log_prob(d, z) with d's parameters stopped: only the path through z is
        differentiated (DReG drops the draw's direct score term)."""
        dist = next(o for o in self.ops if op.operands[0] in o.results)
        stopped = tuple(self.emit("stop_gradient", (x,), NoParams(), (x.type,), op.span).result
                        for x in dist.operands)
        d = self.emit("dist", stopped, dist.params, (dist.result.type,), op.span).result
        self.ops.append(replace(op, operands=(d, op.operands[1])))

    def inline(self, op: Op, units: list[_Unit]) -> None:
        """A call of a drawing function: its body inlined, its score terms yielded each on
        its own."""
        body = inline_body(self.module.function(op.params.callee))
        self.alias.update({a: self.alias.get(x, x) for a, x in zip(body.args, op.operands)})
        self.hoisted(Op("inline", op.operands, op.results, op.params, (), op.span), body, units)

    def hoisted(self, op: Op, body: Region, units: list[_Unit]) -> None:
        """`op` with `body` as its region, rewritten, the score terms of its draws yielded each
        on its own as more results (an inlined call, a checkpoint block)."""
        body, inner = self.region(body)
        yielded = [v for u in inner for v in (u.value, u.entries) if v is not None]
        body = replace(body, results=body.results + tuple(yielded))
        new = replace(op, results=op.results + tuple(Value(v.type) for v in yielded), regions=(body,))
        self.ops.append(new)
        extra = iter(new.results[len(op.results):])
        units += [replace(u, value=next(extra), entries=None if u.entries is None else next(extra))
                  for u in inner]

    def summed(self, branches: list[list[_Unit]]) -> list[tuple[str, bool, list[list[_Unit]]]]:
        """Per score group present, whether its terms are credited whole, and each branch's
        terms (of a loop body, or of the branches of an if)."""
        for u in (u for b in branches for u in b if u.group == "dreg"):
            self.diags.error("dreg draws must be at the top level of the logmeanexp(...) scope "
                             "(not in a loop or a branch)", u.spans[0])
        out = []
        for g in SCORE:
            per = [[u for u in b if u.group == g] for b in branches]
            if any(per):
                out.append((g, any(u.whole for b in per for u in b), per))
        return out

    def loop(self, op: Op, units: list[_Unit]) -> None:
        """Score terms of draws in a loop body are summed per iteration, into extra carries:
        a vector with one entry per iteration (when the trip count is known and the draws are
        not credited whole: reward-to-go pairs it with per-iteration costs), else a scalar."""
        body, inner = self.region(op.regions[0])
        groups = self.summed([inner])
        if not groups:
            self.ops.append(replace(op, regions=(body,)))
            return
        trips = trip_count(op)
        outer, self.ops = self.ops, list(body.ops)
        args = tuple(Value(F32 if whole or trips is None else TensorType(DType.F32, (trips,)),
                           f"score_{g}") for g, whole, _ in groups)
        nexts = []
        for a, (_, _, per) in zip(args, groups):
            step = self.total([u.value for u in per[0]], op.span)
            if a.type.rank:
                nexts.append(per_step(lambda n, x, p, t: self.emit(n, x, p, (t,), op.span).result,
                                      replace(op, regions=(body,)), a, step))
            else:
                nexts.append(self.emit("add", (a, step), NoParams(), (F32,), op.span).result)
        body = replace(body, args=body.args + args, ops=tuple(self.ops),
                       results=body.results + tuple(nexts))
        self.ops = outer
        inits = tuple(self.emit("zeros", (), ShapeParams(a.type.shape), (a.type,), op.span).result
                      if a.type.rank else self.zero(op.span) for a in args)
        params = replace(op.params, carries=op.params.carries + tuple(f"score_{g}" for g, _, _ in groups))
        new = Op("for", op.operands + inits, op.results + tuple(Value(a.type) for a in args), params,
                 (body,), op.span)
        self.ops.append(new)
        for (g, whole, per), v in zip(groups, new.results[len(op.results):]):
            spans = [s for u in per[0] for s in u.spans]
            sources = tuple(x for u in per[0] for x in u.sources)  # what reads them, reads the loop
            if v.type.rank:
                total = self.emit("sum", (v,), ReduceParams(), (F32,), op.span).result
                units.append(_Unit(g, total, spans, sources, whole, entries=v, steps=body.args[0]))
            else:
                units.append(_Unit(g, v, spans, sources, whole))

    def if_op(self, op: Op, units: list[_Unit]) -> None:
        branches = [self.region(r) for r in op.regions]
        groups = self.summed([b for _, b in branches])
        if not groups:
            self.ops.append(replace(op, regions=tuple(r for r, _ in branches)))
            return
        regions = []
        for k, (region, _) in enumerate(branches):
            outer, self.ops = self.ops, list(region.ops)
            extra = [self.total([u.value for u in per[k]], op.span) if per[k] else self.zero(op.span)
                     for _, _, per in groups]
            regions.append(replace(region, ops=tuple(self.ops), results=region.results + tuple(extra)))
            self.ops = outer
        new = Op("if", op.operands, op.results + tuple(Value(F32) for _ in groups), op.params,
                 tuple(regions), op.span)
        self.ops.append(new)
        for (g, whole, per), v in zip(groups, new.results[len(op.results):]):
            units.append(_Unit(g, v, [s for b in per for u in b for s in u.spans], op.results, whole))

    def expect(self, op: Op) -> None:
        ops, _ = self.nested(op.regions[0], op.params.kind, op.params.samples, op.span)
        self.ops += ops[:-1] + [replace(ops[-1], results=op.results)]

    def gradient(self, op: Op, units: list[_Unit] | None) -> None:
        """`grad(f, ...)(args)`: a region that draws is an expectation of its own (of
        `samples` draws), whose surrogate the op differentiates where it stands. Inside an
        enclosing expectation (`units`), the op also yields its samples' score terms summed,
        per baseline group, which that expectation credits with the costs downstream of the
        gradient: the draws' outer term, so that its derivative is the gradient of the
        expectation of everything downstream."""
        (region,) = op.regions
        if not any("random" in OPS[o.name].traits or (o.name == "call_fn"
                                                     and o.params.callee in self.random)
                   for o in region.ops):
            self.ops.append(replace(op, regions=(self.body(region),)))
            return
        ops, inner = self.nested(replace(region, args=()), "expect", op.params.samples, op.span,
                                 outer=units is not None)
        yielded = len(ops[0].regions[0].results)
        stacked = ops[0].results[yielded - len(inner):yielded]
        self.ops, outer = [], self.ops
        sums = [self.emit("sum", (v,), ReduceParams(), (F32,), op.span).result for v in stacked]
        ops += self.ops
        self.ops = outer
        body = Region(region.args, tuple(ops), ops[-1 - len(sums)].results[:1] + tuple(sums))
        new = replace(op, results=op.results + tuple(Value(F32) for _ in sums), regions=(body,))
        self.ops.append(new)
        if units is not None:
            units += [_Unit(u.group, v, u.spans, op.results, u.whole)
                      for u, v in zip(inner, new.results[1:])]

    def nested(self, region: Region, kind: str, n: int, span: Span | None,
               outer: bool = False) -> tuple[list[Op], list[_Unit]]:
        """The ops of an expectation nested in a body (an `expect`, a `grad`'s objective);
        with `outer`, its score units too, whose terms its `samples` op yields last."""
        saved, self.scope_state = self.scope_state, _Scope(kind=kind)
        try:
            region, units = self.region(region)
            for u in units:
                if u.group == "ma":
                    for site in u.spans:
                        self.diags.error("baseline=ma keeps a running average across calls, which "
                                         "only the export's own expectation can carry (as its "
                                         "'baseline' argument and result); use loo or grpo inside "
                                         "expect(...) and grad(...)", site)
            scored = [u for u in units if u.group in SCORE] if outer else []
            label, self.label = self.label, ""
            ops = self.scope(region, units, n, span, keep=tuple(u.value for u in scored))
            self.label = label
        finally:
            self.scope_state = saved
        return ops, scored

    # ---- the expectation itself

    def scope(self, region: Region, units: list[_Unit], n: int, span: Span | None,
              state: Value | None = None, keep: tuple[Value, ...] = ()) -> list[Op]:
        """The ops of an expectation over `region` (its value yielded first), n draws; the
        first is the `samples` op. With moving-average sites, `state` is the running average
        and the last op has a second result, its update. `keep`: values of the region the
        `samples` op also yields, stacked, as its last results (the surrogate ignores
        them)."""
        if self.scope_state.kind == "logmeanexp":
            return self.importance(region, units, n, span)
        outer, self.ops = self.ops, list(region.ops)
        try:
            costs, credited = self.credit_costs(region.results[0], units, span)
            operands = [value for _, _, value, _, _, _ in credited]
            baselines = tuple(self.baseline(g, n, spans) for g, spans, _, _, _, _ in credited)
            credit = tuple(to for _, _, _, to, _, _ in credited)
            paired = tuple(p for _, _, _, _, p, _ in credited)
            causal = tuple(c for _, _, _, _, _, c in credited)
            if state is not None:  # a moving average per entry, when its draw is credited so
                state = next((Value(v.type, state.hint) for g, _, v, _, p, c in credited
                              if g == "ma" and (p or c)), state)
            enum = [u.value for u in units if u.group == "enum"]
            if enum:
                operands.append(self.total(enum, span))
            roles = {g: [u.value for u in units if u.group == g] for g in ("param", "draw", "aux")}
            operands += roles["param"] + roles["draw"] + roles["aux"]
            inner = replace(region, ops=tuple(self.ops),
                            results=region.results + tuple(c for c, _, _ in costs)
                            + tuple(operands) + keep)
        finally:
            self.ops = []
        vtype = region.results[0].type
        branch_spans = [s for u in units if u.group in ("enum", "draw") for s in u.spans]
        sizes = tuple(self.scope_state.sizes[s] for s in branch_spans)
        combos = math.prod(sizes)

        def per_draw(t):
            t = _stacked(combos, t) if sizes else t
            return _stacked(n, t)

        types = tuple(per_draw(v.type) for v in inner.results)
        branched, family = self.scope_state.branched or (None, ())
        shifted = self.scope_state.estimator is not None and self.scope_state.estimator.shifted
        if shifted:  # d value / d parameters per evaluation, shaped as the draw
            types += (per_draw(next(u.value.type for u in units if u.group == "draw")),)
        draws = self.emit("samples", (), ExpectParams(n, sizes, shifts=int(shifted)), types, span,
                          (inner,))
        kept = len(inner.results) - len(keep)
        results = draws.results[:kept] + draws.results[len(inner.results):]
        if not operands:
            self.emit("mean", (draws.results[0],), ReduceParams((0,)), (vtype,), span)
            out, self.ops = self.ops, outer
            return out
        params = SurrogateParams(baselines, costs=len(costs), credit=credit if costs else (),
                                 paired=paired if any(paired) else (),
                                 causal=causal if any(causal) else (),
                                 averaged=tuple(j for j, (_, _, a) in enumerate(costs) if a),
                                 enum=int(bool(enum)), params=len(roles["param"]),
                                 draw=len(roles["draw"]), aux=len(roles["aux"]),
                                 shift_grad=int(shifted), branched=branched, family=family)
        if self.scope_state.controlled:
            params = replace(params, control=branched.option("control"))
        if state is not None and params.stateful:
            if params.control == "":
                params = replace(params, decay=self.decay([s for u in units if u.group == "ma"
                                                           for s in u.spans]))
            self.emit("surrogate", results + (state,), params, (vtype, state.type), span)
        else:
            self.emit("surrogate", results, params, (vtype,), span)
        out, self.ops = self.ops, outer
        return out

    def importance(self, region: Region, units: list[_Unit], n: int, span: Span | None) -> list[Op]:
        """The ops of `logmeanexp(..., samples=n)`: log(mean_k exp(v_k)) over n draws (an
        importance-weighted bound when v_k = log w_k). Score terms get VIMCO's per-sample
        baselines (or none); DReG draws are yielded (`samples` adds d v / d draw)."""
        for u in units:
            if u.group in ("loo", "grpo", "ma"):
                for site in u.spans:
                    self.diags.error(f"baseline={u.group} does not apply in a logmeanexp(...) "
                                     f"scope; use vimco (leave-one-out for importance-weighted "
                                     f"bounds) or none", site)
        for z, (dist, found) in self.scope_state.dreg.items():
            if not found:
                self.diags.error("dreg drops the direct derivative of the draw's own log-density, "
                                 "but the objective has no log_prob(d, z) of this draw under its "
                                 "distribution (in the function that draws it)", dist.span)
        value = region.results[0]
        dregs = [u.value for u in units if u.group == "dreg"]
        if dregs and not (isinstance(value.type, TensorType) and value.type.rank == 0):
            self.diags.error(f"dreg needs a scalar log-weight; logmeanexp(...) averages "
                             f"{value.type} values", span)
        outer, self.ops = self.ops, list(region.ops)
        try:
            scored = [(g, [u for u in units if u.group == g]) for g in SCORE]
            scored = [(g, us) for g, us in scored if us]
            baselines = [self.baseline(g, n, [s for u in us for s in u.spans]) for g, us in scored]
            operands = [self.total([u.value for u in us], span) for _, us in scored]
            inner = replace(region, ops=tuple(self.ops),
                            results=region.results + tuple(operands) + tuple(dregs))
        finally:
            self.ops = []
        types = tuple(_stacked(n, v.type) for v in inner.results)
        types += tuple(_stacked(n, z.type) for z in dregs)
        draws = self.emit("samples", (), ExpectParams(n, shifts=len(dregs)), types, span, (inner,))
        if operands or dregs:
            params = SurrogateParams(tuple(baselines), dregs=len(dregs), kind="logmeanexp")
            self.emit("surrogate", draws.results, params, (value.type,), span)
        else:
            lse = self.emit("logsumexp", (draws.results[0],), ReduceParams((0,)), (value.type,),
                            span).result
            log_n = self.emit("const", (), ConstParams(math.log(n), DType.F32), (F32,), span).result
            self.emit("sub", (lse, log_n), NoParams(), (value.type,), span)
        out, self.ops = self.ops, outer
        return out

    def credit_costs(self, value: Value, units: list[_Unit], span: Span | None):
        """The costs of a scope (empty: its value is the only one) and its score terms merged
        by their group and credit: [(group, sites, summed term, credited cost indices, those
        paired entry by entry, those paired step by step)]; each cost is (its value, the spans
        of its terms, whether its entries are averaged). A cost is a scalar, or a vector
        of entries when batched draws are credited entry by entry with it (per element,
        `elements.pairing`) or a loop's draws step by step (reward-to-go, `Term.steps`).
        Terms credited with no cost are dropped (their expected contribution is zero)."""
        scored = [u for u in units if u.group in SCORE]
        if not scored:
            return [], []
        if (sum(u.group == "ma" for u in scored) > 1 or self.scope_state.branched is not None
                or any(u.group == "enum" for u in units)):  # one running average of the value
            scored = [replace(u, whole=True) if u.group == "ma" else u for u in scored]
        split = Terms(self.module, self.ops)
        terms = split.split(value)
        deps = influence(self.ops, [u.sources for u in scored], [t.value for t in terms])
        pairs = pairing(self.module, self.ops, [
            None if u.draw is None or u.entries is None or u.whole
            else (u.draw, u.entries.type.shape)
            for u in scored], terms, deps)
        causal = [frozenset(i for i, u in enumerate(scored) if t.steps is not None
                            and u.steps is t.steps and i in deps[k] and not u.whole)
                  for k, t in enumerate(terms)]
        classes: dict[tuple[frozenset[int], frozenset[int], frozenset[int], str], list[int]] = {}
        for k, d in enumerate(deps):  # entries of means apart from those of sums
            kind = terms[k].reduce if pairs.paired[k] or causal[k] else ""
            classes.setdefault((d, pairs.paired[k], causal[k], kind), []).append(k)
        order = sorted(classes, key=lambda d: min(classes[d]))
        if len(order) == 1 and order[0] == (frozenset(range(len(scored))), frozenset(), frozenset(), ""):
            costs: list[tuple[Value, list[Span], bool]] = []
            reach = [() for _ in scored]
        else:
            costs = [(self.total([self.along(terms[k].value, pairs.term_axis[k] or 0, kind,
                                             terms[k].span) if kind
                                  else split.whole(terms[k]) for k in classes[key]], span),
                      [terms[k].span for k in classes[key]], kind == "mean")
                     for key in order for kind in key[3:]]
            reach = [tuple(j for j, key in enumerate(order) if i in key[0]) for i in range(len(scored))]
        merged: dict[tuple, tuple[list[Span], list[Value]]] = {}
        for i, (u, r) in enumerate(zip(scored, reach)):
            paired = tuple(j for j, key in enumerate(order) if i in key[1]) if costs else ()
            steps = tuple(j for j, key in enumerate(order) if i in key[2]) if costs else ()
            if costs and u.whole:
                r = tuple(range(len(costs)))
            elif costs and not r:
                self.note_credit(u.spans, "no cost (it does not affect the objective)")
                continue
            spans, values = merged.setdefault((u.group, r, paired, steps), ([], []))
            spans += u.spans
            values.append(u.entries if steps else self.along(u.entries, pairs.axis[i], "sum", span)
                          if paired else u.value)
            self.note_credit(u.spans, _describe(costs, r, paired, steps, u, pairs.axis[i],
                                                pairs.why[i]))
        credited = [(g, spans, self.total(values, span), r, p, c)
                    for (g, r, p, c), (spans, values) in sorted(merged.items(),
                                                                key=lambda kv: GROUPS.index(kv[0][0]))]
        return costs, credited

    def along(self, x: Value, axis: int, how: str, span: Span | None) -> Value:
        """x reduced (`how`: sum or mean) over its axes other than `axis`: a term's entries
        along it, each a separate cost (a mean's entries are then averaged, `averaged`), or a
        draw's log-probability per entry along it."""
        others = tuple(k for k in range(x.type.rank) if k != axis)
        if not others:
            return x
        t = x.type.with_shape((x.type.shape[axis],))
        return self.emit(how, (x,), ReduceParams(others), (t,), span).result

    def note_credit(self, spans: list[Span], what: str) -> None:
        for s in spans:
            self.credit.setdefault((self.label, s), set()).add(what)

    def decay(self, sites: list[Span]) -> float:
        decays = sorted({self.decays[s] for s in sites})
        if len(decays) > 1:
            for span in sites:
                self.diags.error(f"the moving-average baselines of one expectation share their "
                                 f"average, so they need the same decay (found "
                                 f"{', '.join(map(str, decays))})", span)
        return decays[0]

    def baseline(self, group: str, n: int, sites: list[Span]) -> str:
        """The baseline a group of score terms gets (auto: leave-one-out, or VIMCO in a
        logmeanexp scope, with 2 samples or more)."""
        mean = self.scope_state.kind == "expect"
        resolved = (("loo" if mean else "vimco") if n >= 2 else "none") if group == "auto" else group
        if group == "vimco" and mean:
            for span in sites:
                self.diags.error("baseline=vimco is the leave-one-out baseline of "
                                 "logmeanexp(...) scopes (importance-weighted bounds); use loo "
                                 "in expect(...)", span)
        for span in sites:
            self.resolved.setdefault((self.label, span), set()).add(f"{resolved}, samples={n}")
        if group in ("loo", "grpo", "vimco") and n < 2:
            for span in sites:
                self.diags.error(f"baseline={group} compares the samples of an expectation, but "
                                 f"this draw's expectation has 1 sample; use expect(f, "
                                 f"samples=N) with N >= 2", span)
        return resolved

    # ---- exports

    def function(self, fn: Function) -> Function:
        return replace(fn, body=self.body(fn.body))

    def objective(self, export: Export) -> Function | None:
        """The wrapper function computing an export's expectation (None: not stochastic)."""
        t = export.transform
        fn = self.module.function(t.fn)
        if (t.samples == 0 and fn.name not in self.random) or t.compose is not None:
            return None  # a composition's inner expectation is a nested one
        params = tuple(Param(p.name, Value(p.value.type, p.name), p.span) for p in fn.params)
        call = Op("call_fn", tuple(p.value for p in params), (Value(fn.result_type),),
                  CalleeParams(fn.name), (), export.fn_span)
        self.scope_state = _Scope(kind=t.scope)
        region, units = self.region(Region((), (call,), call.results))
        groups = {u.group for u in units}
        if t.kind == "fn" and t.samples == 0 and not groups & {"enum", "draw"}:
            if not groups:  # no score terms: the function draws as it is
                return None
            return Function(f"{fn.name}@draw", fn.unit, params, fn.result_type,  # one draw
                            region, fn.span, fn.result_span)
        r = fn.result_type
        if not (isinstance(r, TensorType) and r.dtype.is_float):
            what = f"expect({fn.name}, ...)" if t.samples else f"{t.kind} of a drawing function"
            self.diags.error(f"{what} needs '{fn.name}' to return a float tensor (a Monte Carlo "
                             f"mean); it returns {r}", export.fn_span)
            return None
        n = max(t.samples, 1)
        name = f"{fn.name}@{t.scope}{n}"
        state = self.state(fn, groups, export.fn_span)
        if state is None:
            ops = self.scope(region, units, n, export.fn_span)
            return Function(name, fn.unit, params, fn.result_type,
                            Region((), tuple(ops), ops[-1].results), fn.span, fn.result_span)
        ops = self.scope(region, units, n, export.fn_span, state.value)
        if ops[-1].name == "surrogate" and ops[-1].params.stateful:  # as it takes the state
            state = replace(state, value=ops[-1].operands[-1])
        rtype = TupleType((fn.result_type, state.value.type))
        self.ops, outer = [], self.ops
        result = self.emit("tuple", ops[-1].results, NoParams(), (rtype,), export.fn_span).result
        ops += self.ops
        self.ops = outer
        return Function(name, fn.unit, params + (state,), rtype,
                        Region((), tuple(ops), (result,)), fn.span, fn.result_span)

    def state(self, fn: Function, groups: set[str], span: Span) -> Param | None:
        """The state an export's expectation threads through calls (None: none): a moving
        average (`baseline`, f32) or a learned control variate's parameters (`control`, typed
        as the first parameter of its function)."""
        est = self.scope_state.estimator
        controlled = self.scope_state.controlled
        if "ma" in groups and controlled:
            self.diags.error(f"an expectation carries one state across calls: a moving-average "
                             f"baseline or a {_acronym(est)} control variate, not both", span)
            return None
        if not ("ma" in groups or controlled):
            return None
        name = "baseline" if "ma" in groups else "control"
        what = "the running average" if name == "baseline" else "the control variate's parameters"
        if fn.param(name) is not None:
            who = "baseline=ma" if name == "baseline" else est.name
            self.diags.error(f"{who} adds a parameter '{name}' ({what}) to the export, but "
                             f"'{fn.name}' already has one; rename it", fn.param(name).span)
        if name == "baseline":
            return Param(name, Value(F32, name), span)
        control = self.module.function(self.scope_state.branched[0].option("control"))
        return Param(name, Value(control.params[0].value.type, name), span)


def _stateless(part: Export, wrapper: Function, diags: Diagnostics) -> None:
    """A black-box gradient (of an export, or of one objective of `minimize`) carries no state
    across calls: its perturbed evaluations would each update it."""
    est = _controlled_by(wrapper)
    black_box = part.transform.black_box
    if black_box is not None:
        what, fix = (("a moving-average baseline", "baseline=loo") if est is None
                     else (f"a {_acronym(est)} control variate", est.stateless))
        diags.error(f"by={black_box.name} cannot thread {what} through its perturbed "
                    f"evaluations; use another estimator, e.g. {fix}", black_box.span)


def _controlled_by(wrapper: Function) -> SiteEstimator | None:
    """The estimator whose learned control variate a stateful objective's wrapper threads
    (None: it threads a moving-average baseline)."""
    found = [op.params.branched for op in wrapper.body.ops
             if op.name == "surrogate" and op.params.control]
    return REGISTRY[found[0].name] if found else None


def _acronym(est: SiteEstimator) -> str:
    """How messages name an estimator with a learned control variate (RELAX, LAX)."""
    return est.name.upper()


def _key_free(module: Module, export: Export, random: set[str], diags: Diagnostics) -> None:
    """An export that draws takes its random key as a last parameter `key` (its function, or
    the first objective of `minimize`, whose parameters the export takes, must not have one):
    when a function it differentiates draws or is averaged over samples, with a black-box or
    private gradient (`by=`), or with PCGrad's shuffled orders."""
    t = export.transform
    parts = [part.transform.fn for part in export.parts()]
    sampled = [part.transform for part in export.parts() if part.transform.samples]
    if any(fn in random for fn in parts):
        why = f"'{next(fn for fn in parts if fn in random)}' draws, which"
    elif sampled:  # its draws may all be unused (and removed), but the samples take keys
        why = f"{sampled[0].scope}({sampled[0].fn}, samples={sampled[0].samples})"
    elif t.by is not None:
        why = f"by={t.by.name}"
    elif t.kind == "minimize" and combination_rule(t.rule).stochastic:
        why = str(t.rule)
    else:
        return
    first = module.function(parts[0])
    if first.param("key") is not None:
        diags.error(f"{why} adds a parameter 'key' (the random key) to the export, but "
                    f"'{first.name}' already has one; rename it", first.param("key").span)


def _stacked(n: int, t: Type) -> TensorType:
    """The type of a value evaluated n times, stacked on a new axis 0."""
    return t.with_shape((n,) + t.shape)


def _describe(costs: list[tuple[Value, list[Span | None], bool]], to: tuple[int, ...],
              paired: tuple[int, ...], steps: tuple[int, ...], unit: _Unit, axis: int | None,
              why: tuple[tuple[Dim, Mixed | None], ...]) -> str:
    """The costs `to` as source text ("the whole objective" when they are all of them), those
    credited entry by entry (per element, or per step: reward-to-go) first, and why a batched
    draw is not credited entry by entry."""
    if steps:
        own = "; ".join(_source_text(s) for j in steps for s in costs[j][1])
        rest = "; ".join(_source_text(s) for j in to if j not in steps for s in costs[j][1])
        return (f"per step (reward-to-go: the draws of each iteration with what it and later "
                f"iterations add to: {own})" + (f"; and, whole: {rest}" if rest else ""))
    if paired:
        dim = unit.entries.type.shape[axis]
        own = "; ".join(_source_text(s) for j in paired for s in costs[j][1])
        rest = "; ".join(_source_text(s) for j in to if j not in paired for s in costs[j][1])
        return (f"per element of {dim} (its axis {axis}), each with its own entries of: {own}"
                + (f"; and, whole: {rest}" if rest else ""))
    text = ("the whole objective" if len(to) == len(costs)
            else "; ".join(_source_text(s) for j in to for s in costs[j][1]))
    if unit.whole and unit.entries is not None and unit.entries.type.rank:
        return text + (" (credit=whole)" if unit.group != "ma" else
                       " (credit=whole, or a moving-average baseline that tracks the whole value: "
                       "several such draws, or a branched one beside it)")
    mixed = [f"{dim} by {m.op} at {_where(m.span)}" for dim, m in why if m is not None]
    if why and mixed:
        return text + f" (not per element: entries mixed: {', '.join(mixed)})"
    if why:
        return text + " (not per element: the objective is not a sum or mean of entries it reaches)"
    return text


def _where(span: Span | None) -> str:
    return "?" if span is None else f"{Path(span.source.path).name}:{span.line}:{span.col}"


def _source_text(span: Span | None) -> str:
    """`file.grad:12: text` of the span's first line (None: a value passed in)."""
    if span is None:
        return "an argument"
    line = span.source.line(span.line)
    text = line[span.col - 1:span.end_col - 1] if span.end_line == span.line else line[span.col - 1:] + " ..."
    return f"{Path(span.source.path).name}:{span.line}: {text.strip()}"


@dataclass(frozen=True)
class Surrogate:
    """The surrogate-construction pass (score terms, expectation scopes, control variates)."""

    name: str = "surrogate"
    after_errors: bool = False
    requires: tuple[str, ...] = ("stateful",)
    provides: tuple[str, ...] = ("random", "objectives", "stateful", "control_variates", "credit")

    def run(self, module: Module, diags: Diagnostics) -> Module:
        random = random_functions(module)
        for export in module.exports:
            _key_free(module, export, random, diags)
        rewriter = _Rewriter(module, random, diags)
        functions = [rewriter.function(fn) for fn in module.functions]
        exports = []
        objectives = {}
        stateful: set[str] = set()
        for whole in module.exports:
            parts, carries = [], False
            for export in whole.parts():
                objectives[export.name] = (export.transform.fn, export.transform.samples,
                                           export.transform.scope)
                rewriter.label = export.name
                wrapper = rewriter.objective(export)
                if wrapper is not None:
                    if all(f.name != wrapper.name for f in functions):
                        functions.append(wrapper)
                    export = replace(export, transform=replace(export.transform, fn=wrapper.name,
                                                               samples=0))
                    if (wrapper.params[-1].name in ("baseline", "control")
                            and isinstance(wrapper.result_type, TupleType)):
                        stateful.add(wrapper.name)
                        _stateless(export, wrapper, diags)
                        carries = True
                parts.append(export)
            if carries and whole.transform.kind == "minimize":
                state_name_free(module, whole, diags)
            exports.append(whole.joined(tuple(parts)))
        return replace(module, functions=tuple(functions), exports=tuple(exports),
                       facts=replace(module.facts, random=frozenset(random_functions(
                           replace(module, functions=tuple(functions)))), objectives=objectives,
                           stateful=frozenset(stateful) | module.facts.stateful,
                           control_variates=rewriter.resolved, credit=rewriter.credit))
