"""Credit assignment for score-function draws: the additive cost terms of an expectation's
value, and which draws each term depends on.

`Terms.split` rewrites a value as a sum of terms of its type, through `add`, `sub`, `neg`,
`sum` / `mean` (linear reductions), `mul` / `div` by another factor (distributivity), and the
bodies of called functions (a call becomes an `inline` op whose body yields its terms), tuple
elements and loops' accumulators (`Terms.accumulated`). It stops at any other op: that value
is one term. A scalar's sum or mean over every axis of a tensor is kept apart (`Term.reduce`),
so that the tensor's entries can be credited one by one.

`influence` is a forward dependency analysis over a region and the regions nested in it: a
term depends on a draw when a chain of ops leads from the draw (or from the loop or branch that
draws it) to the term. Through `inline` bodies each result depends only on what it is computed
from; through any other op with regions (a loop, a branch, a nested expectation, an inner
problem) every result depends on everything the op reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import NamedTuple

from gradlang.diagnostics import Span
from gradlang.ir import Module, Op, Value
from gradlang.ops import ConstParams, NoParams, OneHotParams, ReduceParams, ShapeParams
from gradlang.types import Dim, DType, TensorType, Type, scalar

from .rewrite import inline_body


class Term(NamedTuple):
    """An additive term of a value: `value` itself, or its sum or mean over every axis
    (`reduce`: a scalar objective's reduction, kept apart so that its entries can be credited
    one by one); `span` is the expression it stands for (None: a value from outside)."""

    value: Value
    span: Span | None
    reduce: str | None = None
    steps: Value | None = None
    """With `reduce`: the index of the loop whose iterations added the entries, one each (the
    value is the loop's accumulator split per iteration, `Terms.accumulated`)."""


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

    def whole(self, t: Term) -> Value:
        """The term's value, its reduction emitted if it has one."""
        if t.reduce is None:
            return t.value
        return self.emit(t.reduce, (t.value,), ReduceParams(), scalar(t.value.type.dtype), t.span)

    def split(self, v: Value) -> list[Term]:
        """Terms summing to v."""
        i = self.defs.get(v)
        if i is None:
            return [Term(v, None)]
        op = self.ops[i]
        same = [x.type == v.type for x in op.operands]

        def each(terms: list[Term], name: str, with_term) -> list[Term]:
            return [t._replace(value=self.emit(name, with_term(t.value), op.params, t.value.type,
                                               op.span)) for t in terms]

        if op.name in ("add", "sub") and all(same):
            a, b = (self.split(x) for x in op.operands)
            if op.name == "sub":
                b = each(b, "neg", lambda x: (x,))
            return a + b
        if op.name == "neg":
            return each(self.split(op.operands[0]), "neg", lambda x: (x,))
        if op.name in ("sum", "mean") and op.operands[0].type.rank > 0:
            inner = self.split(op.operands[0])
            if _entire(op) and _splits_entries(v):  # each term's entries kept apart
                return [Term(t.value, t.span if len(inner) > 1 else op.span, op.name)
                        for t in inner]
            if len(inner) > 1:
                return [t._replace(value=self.emit(op.name, (t.value,), op.params, v.type, op.span))
                        for t in inner]
        if op.name in ("mul", "div"):
            for k in (0, 1) if op.name == "mul" else (0,):
                if not same[k]:
                    continue
                inner = self.split(op.operands[k])
                if len(inner) > 1 or inner[0].reduce is not None:
                    other = op.operands[1 - k]
                    if any(t.steps is not None and self.reads_loop(other, t.steps) for t in inner):
                        continue  # each iteration's entry times a later state: one term
                    return each(inner, op.name, lambda x: (x, other) if k == 0 else (other, x))
        if op.name == "call_fn" and v is op.results[0] and self.splittable(op.params.callee):
            op = Op("inline", op.operands, op.results, op.params,
                    (inline_body(self.module.function(op.params.callee)),), op.span)
            self.ops[i] = op
        if op.name == "inline" and v is op.results[0]:
            return self.split_inline(i, op, v)
        if op.name == "get" and self.defs.get(op.operands[0]) is not None:
            built = self.ops[self.defs[op.operands[0]]]
            if built.name == "tuple":  # a destructured tuple (`let (a, b) = for ...`)
                return self.split(built.operands[op.params.index])
        if op.name == "for" and _splits_entries(v):
            found = self.accumulated(i, op, op.results.index(v))
            if found is not None:
                return found
        return [Term(v, op.span)]

    def accumulated(self, i: int, op: Op, k: int) -> list[Term] | None:
        """Carry k of the loop `op` (at index i) as its initial value plus what each iteration
        adds, when each iteration's next value is the carry plus terms that do not read it
        (`total = total + cost`): the additions are collected in a new carry, a vector with
        one entry per iteration (None: not such a carry, or the trip count is not known)."""
        (body,) = op.regions
        index, carry = body.args[0], body.args[1 + k]
        trips = trip_count(op)
        if trips is None:
            return None
        inner = Terms(self.module, list(body.ops))
        terms = inner.split(body.results[k])
        if [t.value for t in terms].count(carry) != 1:
            return None
        added = [inner.whole(t) for t in terms if t.value is not carry]
        if not added or any(influence(inner.ops, [(carry,)], added)):
            return None
        span = op.span
        cost = added[0]
        for a in added[1:]:
            cost = inner.emit("add", (cost, a), NoParams(), cost.type, span)
        entries = Value(TensorType(cost.type.dtype, (trips,)), "steps")
        nxt = per_step(lambda *a: inner.emit(*a, span), op, entries, cost)
        body = replace(body, args=body.args + (entries,), ops=tuple(inner.ops),
                       results=body.results + (nxt,))
        zeros = Op("zeros", (), (Value(entries.type),), ShapeParams(entries.type.shape), (), span)
        loop = replace(op, operands=op.operands + zeros.results,
                       results=op.results + (Value(entries.type),),
                       params=replace(op.params, carries=op.params.carries + ("steps",)),
                       regions=(body,))
        self.ops[i:i + 1] = [zeros, loop]
        self.defs = {r: j for j, o in enumerate(self.ops) for r in o.results}
        where = next((inner.ops[inner.defs[a]].span for a in added if a in inner.defs), span)
        return self.split(op.operands[k]) + [Term(loop.results[-1], where, "sum", index)]

    def reads_loop(self, v: Value, index: Value) -> bool:
        """Whether v depends on the loop with this index (on what holds it): then a factor v
        of its per-iteration costs would make each depend on later iterations."""
        def holds(op: Op) -> bool:
            return any(r.args[:1] == (index,) and op.name == "for" or any(holds(o) for o in r.ops)
                       for r in op.regions)

        holder = next((op for op in self.ops if holds(op)), None)
        return holder is None or bool(influence(self.ops, [holder.results], [v])[0])

    def splittable(self, callee: str) -> bool:
        """A user function (not an extern or a jax fn, whose body is one call into Python)."""
        return not any(o.name in ("host_call", "call_jax")
                       for o in self.module.function(callee).body.ops)

    def split_inline(self, i: int, op: Op, v: Value) -> list[Term]:
        """The terms of an inlined body's result, yielded as extra results of the op."""
        (body,) = op.regions
        inner = Terms(self.module, list(body.ops))
        terms = inner.split(body.results[0])
        if len(terms) == 1 and terms[0].reduce is None:
            return [Term(v, terms[0].span or op.span)]
        extra = tuple(Value(t.value.type) for t in terms)
        body = replace(body, ops=tuple(inner.ops), results=body.results + tuple(t.value for t in terms))
        self.ops[i] = replace(op, results=op.results + extra, regions=(body,))
        for r in extra:
            self.defs[r] = i
        return [t._replace(value=r, span=t.span or op.span) for r, t in zip(extra, terms)]


def trip_count(loop: Op) -> Dim | None:
    """A `for` loop's number of iterations, when known as a dim (None: a symbolic start)."""
    start, stop = loop.params.start, loop.params.stop
    if start == 0:
        return stop
    return stop - start if isinstance(start, int) and isinstance(stop, int) else None


def per_step(emit: Callable[..., Value], loop: Op, entries: Value, x: Value) -> Value:
    """In the body of `loop`: `entries` (a carry, one entry per iteration) with this
    iteration's entry increased by the scalar x. `emit(name, operands, params, type)`."""
    index = loop.regions[0].args[0]
    start, vec = loop.params.start, entries.type
    if start != 0:
        first = emit("const", (), ConstParams(start, DType.I32), scalar(DType.I32))
        index = emit("sub", (index, first), NoParams(), scalar(DType.I32))
    hot = emit("one_hot", (index,), OneHotParams(vec.shape[0]), vec)
    return emit("add", (entries, emit("mul", (hot, x), NoParams(), vec)), NoParams(), vec)


def _entire(op: Op) -> bool:
    """A sum or mean over every axis of its operand."""
    return op.results[0].type.rank == 0


def _splits_entries(v: Value) -> bool:
    """A float scalar: a reduction to it may be kept apart as a term's `reduce`."""
    return isinstance(v.type, TensorType) and v.type.rank == 0 and v.type.dtype.is_float


def influence(ops: list[Op], sources: list[tuple[Value, ...]],
              targets: list[Value]) -> list[frozenset[int]]:
    """For each target value, the indices of the `sources` entries it depends on."""
    seeds: dict[Value, set[int]] = {}
    for k, values in enumerate(sources):
        for v in values:
            seeds.setdefault(v, set()).add(k)
    taint = {v: frozenset(k) for v, k in seeds.items()}  # sources defined outside the ops too

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
