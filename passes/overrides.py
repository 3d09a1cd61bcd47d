"""Overrides: annotations a compile takes as though its source had them written.

`gradlang verify` compiles variants of a program this way: another estimator at a random
choice, another hypergradient method or solver at an `argmin`, another `by=` of an export or
a composition, another number of samples of an export's expectation. The pass runs first, on the
IR as built, so that every later pass sees what it would have seen had the user written the
annotation.

An override is keyed by the span of what it annotates, in a compile of the same `SourceFile`
(spans of two reads of one file differ: a SourceFile compares by identity). An override that
matches nothing is a bug of its caller: ValueError.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace

from gradlang.diagnostics import Diagnostics, Span
from gradlang.ir import Export, Module, Op
from gradlang.ops import Annotation

from .rewrite import map_ops


@dataclass(frozen=True)
class Overrides:
    """The annotations to compile with, by the span of what each annotates."""

    draws: Mapping[Span, Annotation] = field(default_factory=dict)
    """A random choice (the span of its `x ~ D` statement) -> `with ESTIMATOR`."""
    methods: Mapping[Span, Annotation] = field(default_factory=dict)
    """An argmin -> its hypergradient method, `with METHOD`."""
    solvers: Mapping[Span, Annotation] = field(default_factory=dict)
    """An argmin -> its solver, `via SOLVER`."""
    by: Mapping[Span, Annotation | None] = field(default_factory=dict)
    """An export, or a composition (the span of its `compose(...)` call) -> its `by=`; None:
    without `by=` (reverse mode; the composition's default)."""
    samples: Mapping[Span, int] = field(default_factory=dict)
    """An export of an expectation -> the N of its `expect(f, samples=N)` (of a composition:
    of its inner expectation)."""


@dataclass(frozen=True)
class ApplyOverrides:
    """Writes the overrides into the ops and exports they annotate (see the module docstring)."""

    overrides: Overrides
    name: str = "overrides"
    after_errors: bool = False
    requires: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()

    def run(self, module: Module, diags: Diagnostics) -> Module:
        used: set[tuple[str, Span]] = set()
        functions = tuple(replace(f, body=map_ops(f.body, lambda op: self.op(op, used)))
                          for f in module.functions)
        exports = tuple(self.export(e, used) for e in module.exports)
        unused = [(f.name, span) for f in fields(self.overrides)
                  for span in getattr(self.overrides, f.name) if (f.name, span) not in used]
        if unused:
            raise ValueError("overrides that match nothing: " +
                             ", ".join(f"{kind} at {span!r}" for kind, span in unused))
        return replace(module, functions=functions, exports=exports)

    def op(self, op: Op, used: set[tuple[str, Span]]) -> Op:
        o, span = self.overrides, op.span
        if op.name == "sample" and span in o.draws:
            used.add(("draws", span))
            return replace(op, params=replace(op.params, annotation=o.draws[span]))
        if op.name == "argmin":
            p = op.params
            if span in o.solvers:
                used.add(("solvers", span))
                p = replace(p, solver=o.solvers[span])
            if span in o.methods:
                used.add(("methods", span))
                p = replace(p, hyper=o.methods[span])
            return op if p is op.params else replace(op, params=p)
        return op

    def export(self, export: Export, used: set[tuple[str, Span]]) -> Export:
        o, t = self.overrides, export.transform
        if export.span in o.by:
            used.add(("by", export.span))
            t = replace(t, by=o.by[export.span])
        c = t.compose
        if c is not None and c.span in o.by:
            used.add(("by", c.span))
            t = replace(t, compose=replace(c, by=o.by[c.span]))
        if t.samples and export.span in o.samples:
            used.add(("samples", export.span))
            t = replace(t, samples=o.samples[export.span])
        return replace(export, transform=t)
