"""Gradient-flow analysis: which values carry gradient from which `wrt` parameters.

A value carries gradient for parameter `p` of a differentiated export when it depends on `p`
through differentiable ops (forward) and it reaches the objective through differentiable ops
(backward). Ops with the `zero_grad` trait and integer / bool values stop the flow. Calls use
per-function summaries. Later passes (estimator choice) read these facts; here they also
produce a warning when a `wrt` parameter can never receive a nonzero gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache

from gradlang.diagnostics import Diagnostics
from gradlang.estimators.backward import rules_for
from gradlang.facts import GradFlowFacts
from gradlang.ir import Function, Module, Op, Region, Value, walk
from gradlang.ops import OPS, Annotation
from gradlang.types import ERROR, has_float_leaf

from .rewrite import defining_ops
from .straight_through import rule_problem


def _has_rule(op: Op, default: Annotation | None) -> bool:
    """A non-smooth op that will get a backward rule (its own, or the file's applicable one)."""
    return op.params.rule is not None or (default is not None
                                          and rule_problem(default, op.name) is None)


class _Analysis:
    def __init__(self, module: Module, optimistic: bool = False):
        self.module = module
        self.summary = cache(self._summary)
        self.optimistic = optimistic
        """Let every non-smooth op pass gradient: finds the paths that rule-less ones cut."""
        self.rule_less = {id(op) for fn in module.functions for op in walk(fn.body)
                          if "nonsmooth" in OPS[op.name].traits
                          and not _has_rule(op, module.unit(fn.unit).backward)}
        """Non-smooth ops that get no backward rule (their own or the file's)."""

    def blocks(self, op: Op, value: Value) -> bool:
        traits = OPS[op.name].traits
        return ("zero_grad" in traits
                or (not self.optimistic and (id(op) in self.rule_less or "blackbox" in traits))
                or (op.name == "argmin" and value is not op.results[0])  # the solver's report
                or value.type is ERROR or not has_float_leaf(value.type))

    def reached(self, fn: Function, seeds: dict[Value, frozenset[str]], seen: set):
        """(op, taint) for each op on a path to fn's result, in fn and (with their seeds) in the
        functions it calls, each (function, seeds) visited once; taint maps fn's values to the
        seeded names they carry."""
        key = (fn.name, frozenset((p.name, seeds.get(p.value, frozenset())) for p in fn.params))
        if key in seen:
            return
        seen.add(key)
        taint = self.forward(fn, seeds)
        reach = self.backward(fn)
        for op in walk(fn.body):
            if not any(r in reach for r in op.results):
                continue
            yield op, taint
            if op.name in ("call_fn", "map_leaves"):  # map_leaves: its callee on each leaf
                callee = self.module.function(op.params.callee)
                inner = {p.value: taint[v] for p, v in zip(callee.params, op.operands) if taint.get(v)}
                yield from self.reached(callee, inner, seen)

    def nonsmooth_warnings(self, fn: Function, seeds: dict[Value, frozenset[str]]) -> dict:
        """Non-smooth ops without a rule on a path from the seeded parameters to fn's result
        (through the functions fn calls): op id -> (op, the wrt names it cuts off)."""
        found: dict[int, tuple[Op, set[str]]] = {}
        for op, taint in self.reached(fn, seeds, set()):
            incoming = frozenset().union(*(taint.get(v, frozenset()) for v in op.operands))
            if incoming and id(op) in self.rule_less:
                found.setdefault(id(op), (op, set()))[1].update(incoming)
        return found

    def unreached_inner_problems(self, fn: Function, seeds: dict[Value, frozenset[str]]) -> list[Op]:
        """`argmin` ops on a path to fn's result whose objective no seeded parameter reaches."""
        return [op for op, taint in self.reached(fn, seeds, set()) if op.name == "argmin"
                and not any(taint.get(v) for r in op.regions for v in r.results)]

    def _summary(self, fn_name: str) -> tuple[bool, ...]:
        """For each parameter of fn: does the result depend on it differentiably, or does it
        shape the distribution of a draw (a score-function gradient reaches it)?"""
        fn = self.module.function(fn_name)
        taint = self.forward(fn, {p.value: frozenset({p.name}) for p in fn.params})
        reached = taint.get(fn.body.results[0], frozenset()) | _into_draws(fn, taint)
        return tuple(p.name in reached for p in fn.params)

    def forward(self, fn: Function, seeds: dict[Value, frozenset[str]]) -> dict[Value, frozenset[str]]:
        defs = defining_ops(fn.body)
        taint = dict(seeds)
        self._forward_region(fn.body, taint, defs)
        return taint

    def _forward_region(self, region: Region, taint: dict[Value, frozenset[str]],
                        defs: dict[Value, Op]) -> None:
        empty: frozenset[str] = frozenset()
        for op in region.ops:
            if op.name == "for":
                body = op.regions[0]
                carries = [taint.get(v, empty) for v in op.operands]
                while True:
                    for arg, t in zip(body.args[1:], carries):
                        taint[arg] = t
                    self._forward_region(body, taint, defs)
                    new = [c | taint.get(r, empty) for c, r in zip(carries, body.results)]
                    if new == carries:
                        break
                    carries = new
                for r, t in zip(op.results, carries):
                    taint[r] = t if has_float_leaf(r.type) else empty
                continue
            if op.name == "grad":  # its arguments carry the operands' taint
                taint.update((a, taint.get(v, empty)) for a, v in zip(op.regions[0].args,
                                                                      op.operands))
            for r in op.regions:
                self._forward_region(r, taint, defs)
            source = defs.get(op.operands[0]) if op.operands else None
            if op.name == "call_fn":
                flows = self.summary(op.params.callee)
                incoming = [taint.get(v, empty) for v, f in zip(op.operands, flows) if f]
            elif op.name == "get" and source is not None and source.name == "tuple":
                incoming = [taint.get(source.operands[op.params.index], empty)]
            elif op.name == "getfield" and source is not None and source.name == "struct_new":
                element = source.operands[source.params.fields.index(op.params.name)]
                incoming = [taint.get(element, empty)]
            elif op.regions:  # if, expect, samples: the values their regions yield
                incoming = [taint.get(v, empty) for r in op.regions for v in r.results]
            else:
                incoming = [taint.get(v, empty) for v in op.operands]
            union = frozenset().union(*incoming)
            for r in op.results:
                taint[r] = empty if self.blocks(op, r) else union

    def backward(self, fn: Function) -> set[Value]:
        """Values that reach the result through differentiable ops (fixpoint over the body)."""
        reach: set[Value] = set(fn.body.results)
        while True:
            before = len(reach)
            self._backward_region(fn.body, reach)
            if len(reach) == before:
                return reach

    def _backward_region(self, region: Region, reach: set[Value]) -> None:
        for op in reversed(region.ops):
            live = [r for r in op.results if r in reach and not self.blocks(op, r)]
            if not live:
                continue
            if op.name == "for":
                body = op.regions[0]
                for i, r in enumerate(op.results):
                    if r in reach:
                        reach.update((body.results[i], op.operands[i]))
                    if body.args[i + 1] in reach:
                        reach.add(op.operands[i])
                self._backward_region(body, reach)
            elif op.regions:
                for r in op.regions:
                    reach.update(r.results)
                    self._backward_region(r, reach)
                if op.name == "grad":  # not argmin: its solution does not depend on the start
                    reach.update(v for a, v in zip(op.regions[0].args, op.operands) if a in reach)
            elif op.name == "call_fn":
                flows = self.summary(op.params.callee)
                reach.update(v for v, f in zip(op.operands, flows) if f)
            else:
                reach.update(op.operands)


@dataclass(frozen=True)
class GradFlow:
    """The gradient-flow analysis pass (adds facts, leaves the IR unchanged)."""

    name: str = "gradflow"
    after_errors: bool = True
    requires: tuple[str, ...] = ()
    provides: tuple[str, ...] = ("gradflow", "gradflow_notes")

    def run(self, module: Module, diags: Diagnostics) -> Module:
        analysis = _Analysis(module)
        optimistic = _Analysis(module, optimistic=True)
        reported: set[int] = set()
        facts: list[GradFlowFacts] = []
        notes: dict[Value, str] = {}
        for export in (part for e in module.exports for part in e.parts()):
            t = export.transform
            fn = module.function(t.fn)
            if t.kind == "fn" or fn is None:
                continue
            seeds = {p.value: frozenset({p.name}) for p in fn.params if p.name in t.wrt}
            # A black-box estimator (by=) needs no derivatives: every dependence carries.
            # by=dp is reverse mode: its gradient flows as without it.
            flow = optimistic if t.black_box is not None else analysis
            taint = flow.forward(fn, seeds)
            reach = flow.backward(fn)
            carries = {v: taint[v] for v in taint if v in reach and taint[v]}
            result = carries.get(fn.body.results[0], frozenset()) | _into_draws(fn, taint)
            zero = tuple(n for n in t.wrt if n not in result)
            cut_off: set[str] = set()
            if t.black_box is None:
                cut_off = self.warn_nonsmooth(optimistic, fn, seeds, reported, diags)
                cut_off |= self.reject_externs(optimistic, fn, seeds, export.name, reported, diags)
            for name, span in zip(t.wrt, t.wrt_spans):
                if name in zero and name not in cut_off and fn.body.results[0].type is not ERROR:
                    diags.warning(f"the gradient of '{fn.name}' with respect to '{name}' is always "
                                  f"zero: '{name}' does not reach the result through "
                                  f"differentiable operations", span)
            if len(zero) < len(t.wrt):
                for op in analysis.unreached_inner_problems(fn, seeds):
                    wrt = ", ".join(t.wrt)
                    diags.warning(f"no parameter in wrt=[{wrt}] of '{export.name}' reaches this "
                                  f"inner problem: its solution is a constant for this gradient "
                                  f"and no hypergradient is computed", op.span)
            facts.append(GradFlowFacts(export.name, fn.name, t.wrt, carries, zero))
            for v, names in carries.items():
                notes[v] = "grad: " + ", ".join(sorted(names | _names(notes.get(v))))
        return replace(module, facts=replace(module.facts, gradflow=tuple(facts),
                                             gradflow_notes=notes))

    @staticmethod
    def reject_externs(analysis: _Analysis, fn: Function, seeds, export: str, reported: set[int],
                       diags: Diagnostics) -> set[str]:
        """An error at each call of an extern that a wrt parameter reaches on its way to the
        result: reverse mode cannot go through a host callback. Returns the names cut off."""
        names: set[str] = set()
        for op, taint in analysis.reached(fn, seeds, set()):
            callee = analysis.module.function(op.params.callee) if op.name == "call_fn" else None
            if callee is None or not any(o.name == "host_call" for o in callee.body.ops):
                continue
            incoming = frozenset().union(*(taint.get(v, frozenset()) for v in op.operands))
            names |= incoming
            if incoming and id(op) not in reported:
                reported.add(id(op))
                wrt = ", ".join(f"'{n}'" for n in sorted(incoming))
                diags.error(f"'{export}' asks for the reverse-mode gradient with respect to {wrt} "
                            f"through extern '{callee.name}', a black box; use a black-box "
                            f"estimator: grad(..., by=spsa(eps=0.001)), by=es(sigma=0.1, pop=64) "
                            f"or by=eggroll(sigma=0.1, pop=64, rank=1)", op.span)
        return names

    @staticmethod
    def warn_nonsmooth(analysis: _Analysis, fn: Function, seeds, reported: set[int],
                       diags: Diagnostics) -> set[str]:
        """Warn at each non-smooth op without a backward rule that cuts a wrt parameter's
        gradient (once per op); returns the names cut off somewhere."""
        found = analysis.nonsmooth_warnings(fn, seeds)  # an optimistic analysis
        names: set[str] = set()
        for key, (op, cut) in found.items():
            names |= cut
            if key in reported:
                continue
            reported.add(key)
            rules = " | ".join(r.example for r in rules_for(op.name))
            wrt = ", ".join(f"'{n}'" for n in sorted(cut))
            diags.warning(f"'{op.name}' has a zero derivative almost everywhere: the gradient "
                          f"with respect to {wrt} does not flow through it; give it a backward "
                          f"rule: {op.name}(...) with {rules}", op.span)
        return names


def _into_draws(fn: Function, taint: dict[Value, frozenset[str]]) -> frozenset[str]:
    """Names that flow into the parameters of a distribution in fn: the distribution of a draw
    depends on them, so the expectation's gradient does (through its score function)."""
    out: frozenset[str] = frozenset()
    for op in walk(fn.body):
        if op.name == "dist":
            out = out.union(*(taint.get(v, frozenset()) for v in op.operands))
    return out


def _names(note: str | None) -> frozenset[str]:
    return frozenset(note.removeprefix("grad: ").split(", ")) if note else frozenset()
