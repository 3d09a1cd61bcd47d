"""Credit assignment for score-function draws: the additive cost terms of an expectation's
value, and which draws each term depends on.

`Terms.split` rewrites a value as a sum of terms of its type, through `add`, `sub`, `neg`,
`sum` / `mean` (linear reductions), `mul` / `div` by another factor (distributivity), and the
bodies of called functions (a call becomes an `inline` op whose body yields its terms). It stops
at any other op: that value is one term.

`influence` is a forward dependency analysis over a region and the regions nested in it: a
term depends on a draw when a chain of ops leads from the draw (or from the loop or branch that
draws it) to the term. Through `inline` bodies each result depends only on what it is computed
from; through any other op with regions (a loop, a branch, a nested expectation, an inner
problem) every result depends on everything the op reads.
"""

from __future__ import annotations

from dataclasses import replace

from gradlang.diagnostics import Span
from gradlang.ir import Module, Op, Value
from gradlang.types import Type

from .rewrite import inline_body


class Terms:
    """Splits values defined by `ops` (a region's op list, extended in place) into terms."""

    def __init__(self, module: Module, ops: list[Op]):
        self.module = module
        self.ops = ops
        self.defs = {r: i for i, op in enumerate(ops) for r in op.results}

    def emit(self, name: str, operands: tuple[Value, ...], params: object, t: Type,
             span: Span | None) -> Value:
        op = Op(name, operands, (Value(t),), params, (), span)
        self.defs[op.result] = len(self.ops)
        self.ops.append(op)
        return op.result

    def split(self, v: Value) -> list[tuple[Value, Span | None]]:
        """Terms summing to v, each with the span of the expression it stands for (None: a
        value from outside these ops)."""
        i = self.defs.get(v)
        if i is None:
            return [(v, None)]
        op = self.ops[i]
        same = [x.type == v.type for x in op.operands]
        if op.name in ("add", "sub") and all(same):
            a, b = (self.split(x) for x in op.operands)
            if op.name == "sub":
                b = [(self.emit("neg", (t,), op.params, v.type, op.span), s) for t, s in b]
            return a + b
        if op.name == "neg":
            return [(self.emit("neg", (t,), op.params, v.type, op.span), s)
                    for t, s in self.split(op.operands[0])]
        if op.name in ("sum", "mean"):
            inner = self.split(op.operands[0])
            if len(inner) > 1:
                return [(self.emit(op.name, (t,), op.params, v.type, op.span), s) for t, s in inner]
        if op.name in ("mul", "div"):
            for k in (0, 1) if op.name == "mul" else (0,):
                if not same[k]:
                    continue
                inner = self.split(op.operands[k])
                if len(inner) > 1:
                    other = op.operands[1 - k]
                    return [(self.emit(op.name, (t, other) if k == 0 else (other, t), op.params,
                                       v.type, op.span), s) for t, s in inner]
        if op.name == "call_fn" and v is op.results[0] and self.splittable(op.params.callee):
            op = Op("inline", op.operands, op.results, op.params,
                    (inline_body(self.module.function(op.params.callee)),), op.span)
            self.ops[i] = op
        if op.name == "inline" and v is op.results[0]:
            return self.split_inline(i, op, v)
        return [(v, op.span)]

    def splittable(self, callee: str) -> bool:
        """A user function (not an extern or a jax fn, whose body is one call into Python)."""
        return not any(o.name in ("host_call", "call_jax")
                       for o in self.module.function(callee).body.ops)

    def split_inline(self, i: int, op: Op, v: Value) -> list[tuple[Value, Span | None]]:
        """The terms of an inlined body's result, yielded as extra results of the op."""
        (body,) = op.regions
        inner = Terms(self.module, list(body.ops))
        terms = inner.split(body.results[0])
        if len(terms) == 1:
            return [(v, terms[0][1] or op.span)]
        extra = tuple(Value(t.type) for t, _ in terms)
        body = replace(body, ops=tuple(inner.ops), results=body.results + tuple(t for t, _ in terms))
        self.ops[i] = replace(op, results=op.results + extra, regions=(body,))
        for r in extra:
            self.defs[r] = i
        return [(r, s or op.span) for r, (_, s) in zip(extra, terms)]


def influence(ops: list[Op], sources: list[tuple[Value, ...]],
              targets: list[Value]) -> list[frozenset[int]]:
    """For each target value, the indices of the `sources` entries it depends on."""
    seeds: dict[Value, set[int]] = {}
    for k, values in enumerate(sources):
        for v in values:
            seeds.setdefault(v, set()).add(k)
    taint: dict[Value, frozenset[int]] = {}

    def get(v: Value) -> frozenset[int]:
        return taint.get(v, frozenset())

    def put(v: Value, dep: frozenset[int]) -> None:
        taint[v] = dep | seeds.get(v, frozenset())

    def inside(op: Op) -> frozenset[int]:
        """Everything the ops of op's regions read or yield."""
        out: frozenset[int] = frozenset()
        for r in op.regions:
            out = out.union(*(get(v) for v in r.results))
            for o in r.ops:
                out = out.union(*(get(v) for v in o.operands), inside(o))
        return out

    def run(ops: list[Op] | tuple[Op, ...]) -> None:
        for op in ops:
            dep = frozenset().union(*(get(v) for v in op.operands))
            if op.name == "inline":
                (body,) = op.regions
                for a, x in zip(body.args, op.operands):
                    put(a, get(x))
                run(body.ops)
                for r, y in zip(op.results, body.results):
                    put(r, get(y))
                continue
            for _ in range(2 if op.regions else 0):  # twice: loop carries flow around
                for r in op.regions:
                    for a in r.args:
                        put(a, dep)
                    run(r.ops)
                dep = dep | inside(op)
            for r in op.results:
                put(r, dep)

    run(ops)
    return [get(t) for t in targets]
