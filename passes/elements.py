"""Independence along named dims: which entries of a value a draw's elements reach.

The elements of a batched draw z (its batch axes: one independent draw per entry, given the
distribution's parameters) are followed forward through a region. For each batch axis of z,
a value's `Align` entry is the axis of the value whose entry k depends on z only through z's
entries k along that axis, or `Mixed`: the first op that combined z's entries along it (a
reduction over it, a matmul contracting it, a reshape merging it with another axis, an op with
no rule here). A value that does not depend on z has no alignment (None).

Rules: elementwise ops (broadcasting), reductions, softmax-like and sorting ops along an axis,
matmul / einsum (contracted axes mix), transpose, reshape (an axis kept with the same size and
the same product of sizes before it), broadcast_to, one_hot, stack / concat, distributions
and their densities (per batch element), convolutions and norms (their leading batch axis),
calls of user functions (their bodies), loops (to a fixpoint) and branches. Everything else
mixes whatever it reads.

The surrogate pass credits a draw element by element with a cost `sum(x)` / `mean(x)` when x
is aligned with the draw's axis: each element's score term multiplies only its own cost.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import reduce

from gradlang.diagnostics import Span
from gradlang.distributions import DISTRIBUTIONS
from gradlang.ir import Module, Op, Region, Value
from gradlang.ops import OPS
from gradlang.types import Dim, TensorType


@dataclass(frozen=True)
class Mixed:
    """Where a draw's elements along one of its axes were first combined."""

    op: str
    span: Span | None


Entry = int | Mixed
Align = tuple[Entry, ...]
"""Per batch axis of the draw: the value's axis that carries it, or where it was mixed."""

_LEADING = frozenset("conv conv_transpose avg_pool max_pool group_norm dot_product_attention".split())
"""Ops that keep their first operand's leading (batch) axis and mix every other one."""
_ALONG = frozenset("softmax log_softmax sort argmax topk".split())
"""Ops that keep their operand's shape and mix along `params.axis`."""


def _rank(v: Value) -> int:
    return v.type.rank if isinstance(v.type, TensorType) else 0


def _shape(v: Value) -> tuple[Dim, ...]:
    return v.type.shape if isinstance(v.type, TensorType) else ()


def _factors(dims: Sequence[Dim]) -> tuple[int, tuple[str, ...]]:
    """The product of sizes, as its integer part and its sorted symbolic factors."""
    n, names = 1, []
    for d in dims:
        if isinstance(d, int):
            n *= d
        else:
            names.append(d)
    return n, tuple(sorted(names))


class Alignment:
    """The alignment of every value of a region (and of the bodies it calls) with one draw."""

    def __init__(self, module: Module, draw: Value, rank: int):
        self.module = module
        self.draw = draw
        self.rank = rank
        self.state: dict[Value, Align] = {}
        self.calls: dict[tuple[str, tuple[Align | None, ...]], tuple[Align | None, ...]] = {}

    def of(self, v: Value) -> Align | None:
        return self.state.get(v)

    def run(self, ops: Sequence[Op]) -> None:
        for op in ops:
            self.op(op)

    # ---- helpers

    def mixed(self, op: Op) -> Align:
        return tuple(Mixed(op.name, op.span) for _ in range(self.rank))

    def join(self, aligns: Sequence[Align | None], op: Op) -> Align | None:
        found = [a for a in aligns if a is not None]
        if not found:
            return None

        def two(a: Entry, b: Entry) -> Entry:
            if isinstance(a, Mixed):
                return a
            if isinstance(b, Mixed):
                return b
            return a if a == b else Mixed(op.name, op.span)

        return tuple(reduce(two, entries) for entries in zip(*found))

    def moved(self, a: Align | None, op: Op, where: Callable[[int], int | None]) -> Align | None:
        """a with each axis k moved to where(k) (None: mixed by op)."""
        if a is None:
            return None
        out = []
        for e in a:
            k = e if isinstance(e, Mixed) else where(e)
            out.append(Mixed(op.name, op.span) if k is None else k)
        return tuple(out)

    def put(self, op: Op, aligns: Sequence[Align | None]) -> None:
        for r, a in zip(op.results, aligns):
            if a is not None:
                self.state[r] = a
        if self.draw in op.results:
            self.state[self.draw] = tuple(range(self.rank))

    # ---- ops

    def op(self, op: Op) -> None:
        ins = [self.of(x) for x in op.operands]
        if op.name == "call_fn" and self.callable(op.params.callee):
            fn = self.module.function(op.params.callee)
            self.put(op, self.call(fn.name, Region(tuple(p.value for p in fn.params), fn.body.ops,
                                                   fn.body.results), tuple(ins)))
        elif op.name in ("inline", "checkpoint"):
            (body,) = op.regions
            self.put(op, self.body(body, tuple(ins)))
        elif op.name == "for":
            self.loop(op, ins)
        elif op.name == "if":
            self.branch(op, ins)
        elif op.regions:  # nested expectations, inner problems, compositions: mixed if read
            read = ins + [self.of(v) for v in _reads(op)]
            self.put(op, [None if all(a is None for a in read) else self.mixed(op)] * len(op.results))
        elif all(a is None for a in ins):
            self.put(op, [None] * len(op.results))
        else:
            self.put(op, [self.rule(op, ins)] + [self.mixed(op)] * (len(op.results) - 1))

    def callable(self, callee: str) -> bool:
        return not any(o.name in ("host_call", "call_jax")
                       for o in self.module.function(callee).body.ops)

    def call(self, callee: str, body: Region, ins: tuple[Align | None, ...]) -> tuple:
        key = (callee, ins)
        if key not in self.calls:
            self.calls[key] = self.body(body, ins)
        return self.calls[key]

    def body(self, body: Region, ins: tuple[Align | None, ...]) -> tuple[Align | None, ...]:
        for a, x in zip(body.args, ins):
            if x is None:
                self.state.pop(a, None)
            else:
                self.state[a] = x
        self.run(body.ops)
        return tuple(self.of(y) for y in body.results)

    def loop(self, op: Op, ins: list[Align | None]) -> None:
        """A loop's carries to a fixpoint (each entry can only go from an axis to mixed)."""
        (body,) = op.regions
        carries = list(ins)
        for _ in range((len(carries) + 1) * (self.rank + 1) + 1):  # each change is permanent
            out = self.body(body, (None, *carries))
            new = [self.join([c, o], op) for c, o in zip(carries, out)]
            if new == carries:
                break
            carries = new
        else:  # not reached (it cannot happen): nothing is known
            carries = [self.mixed(op) for _ in carries]
        self.put(op, carries)

    def branch(self, op: Op, ins: list[Align | None]) -> None:
        cond = ins[0]
        outs = [self.body(r, ()) for r in op.regions]
        aligns = []
        for r, *branches in zip(op.results, *outs):
            c = self.moved(cond, op, lambda k: k + _rank(r) - _rank(op.operands[0]))
            aligns.append(self.join([c, *branches], op))
        self.put(op, aligns)

    def rule(self, op: Op, ins: list[Align | None]) -> Align | None:
        """The first result's alignment, from its operands' (some not None)."""
        name = op.name
        if name == "straight_through":  # its op's rule
            return self.rule(Op(op.params.op, op.operands, op.results, op.params.params, (),
                                op.span), ins)
        out = op.results[0]
        if "elementwise" in OPS[name].traits or name in ("stop_gradient", "cast", "dropout"):
            return self.elementwise(op, ins, out)
        if name in ("sum", "mean", "max", "min", "logsumexp", "var"):
            r = _rank(op.operands[0])
            axes = set(range(r)) if op.params.axis is None else {a % r for a in op.params.axis}
            keep = op.params.keepdims
            return self.moved(ins[0], op, lambda k: None if k in axes
                              else k if keep else k - sum(a < k for a in axes))
        if name in _ALONG:
            axis = op.params.axis % _rank(op.operands[0])
            return self.moved(ins[0], op, lambda k: None if k == axis else k)
        if name == "matmul":
            return self.matmul(op, ins, out)
        if name == "einsum":
            return self.einsum(op, ins)
        if name == "transpose":
            r = _rank(op.operands[0])
            perm = op.params.axes or tuple(reversed(range(r)))
            return self.moved(ins[0], op, lambda k: perm.index(k))
        if name == "reshape":
            return self.moved(ins[0], op, lambda k: _reshaped(_shape(op.operands[0]), _shape(out), k))
        if name == "broadcast_to":
            return self.elementwise(op, ins[:1], out)
        if name == "one_hot":
            return ins[0]
        if name == "stack":
            axis = op.params.axis % _rank(out)
            return self.join([self.moved(a, op, lambda k: k + (k >= axis)) for a in ins], op)
        if name == "concat":
            axis = op.params.axis % _rank(out)
            return self.join([self.moved(a, op, lambda k: None if k == axis else k) for a in ins], op)
        if name in ("dist", "sample", "log_prob", "entropy", "kl", "dist_mean"):
            return self.density(op, ins)
        if name in _LEADING:  # attention's q, k, v (and a full mask) share the batch axis
            def lead(x: Value) -> Callable[[int], int | None]:
                same = _rank(x) == _rank(out) and _shape(x)[:1] == _shape(out)[:1]
                shared = x is op.operands[0] or name == "dot_product_attention"
                return lambda k: 0 if k == 0 and same and shared else None

            return self.join([self.moved(a, op, lead(x)) for a, x in zip(ins, op.operands)], op)
        if name in ("layer_norm", "rms_norm"):  # normalized along the last axis
            def norm(x: Value) -> Callable[[int], int | None]:
                offset = _rank(out) - _rank(x)
                return lambda k: None if k + offset == _rank(out) - 1 else k + offset

            return self.join([self.moved(a, op, norm(x)) for a, x in zip(ins, op.operands)], op)
        return self.mixed(op)

    def elementwise(self, op: Op, ins: Sequence[Align | None], out: Value) -> Align | None:
        """Operands broadcast to the result (NumPy rules): an axis of size 1 stretched over a
        larger one mixes."""
        shape = _shape(out)

        def placed(x: Value) -> Callable[[int], int | None]:
            offset = len(shape) - _rank(x)
            return lambda k: None if _shape(x)[k] == 1 and shape[k + offset] != 1 else k + offset

        return self.join([self.moved(a, op, placed(x)) for a, x in zip(ins, op.operands)], op)

    def matmul(self, op: Op, ins: list[Align | None], out: Value) -> Align | None:
        """a @ b: the contracted axis mixes; a's rows and b's columns keep their axes; the
        leading (batch) axes broadcast."""
        ra, rb, r = _rank(op.operands[0]), _rank(op.operands[1]), _rank(out)

        def left(k: int) -> int | None:
            if k == ra - 1:
                return None
            return k + r - ra + (1 if rb == 1 else 0) if ra > 1 else None

        def right(k: int) -> int | None:
            if rb == 1 or k == rb - 2:
                return None
            if k == rb - 1:
                return r - 1
            return k + (r - 2) - (rb - 2)

        return self.join([self.moved(ins[0], op, left), self.moved(ins[1], op, right)], op)

    def einsum(self, op: Op, ins: list[Align | None]) -> Align | None:
        """Each operand's letters: an axis whose letter is in the output moves there; a
        contracted or repeated one mixes."""
        terms, output = op.params.terms()

        def where(term: str) -> Callable[[int], int | None]:
            return lambda k: (output.index(term[k]) if term[k] in output and term.count(term[k]) == 1
                              else None)

        return self.join([self.moved(a, op, where(t)) for a, t in zip(ins, terms)], op)

    def density(self, op: Op, ins: list[Align | None]) -> Align | None:
        """A distribution is aligned on its batch axes: each parameter's trailing event axes
        (categories) mix, the others are right-aligned with the batch. Its draws, densities,
        entropies and means keep the batch axes; a value's event axes mix."""
        if op.name == "dist":
            spec = DISTRIBUTIONS[op.params.family]
            batch = len(op.results[0].type.batch)

            def param(x: Value) -> Callable[[int], int | None]:
                lead = _rank(x) - spec.event
                return lambda k: k + batch - lead if k < lead else None

            return self.join([self.moved(a, op, param(x)) for a, x in zip(ins, op.operands)], op)
        out = op.results[0].type
        event = len(op.operands[0].type.event) if op.name in ("sample", "dist_mean") else 0
        batch = out.rank - event  # the result's batch axes lead
        aligns = []
        for a, x in zip(ins, op.operands):
            if isinstance(x.type, TensorType):  # a value: its batch axes, then its event axes
                lead = x.type.rank - len(op.operands[0].type.event)
                aligns.append(self.moved(a, op, lambda k, lead=lead: k + batch - lead
                                         if k < lead else None))
            else:  # a distribution (kl's two may broadcast their batches)
                aligns.append(self.moved(a, op, lambda k, x=x: k + batch - len(x.type.batch)))
        return self.join(aligns, op)


def _reshaped(before: tuple[Dim, ...], after: tuple[Dim, ...], k: int) -> int | None:
    """The axis of `after` that carries axis k of `before` entry for entry: the same size,
    with the same product of sizes before it (None: k is merged or split)."""
    prefix = _factors(before[:k])
    for j in range(len(after)):
        if _factors(after[:j]) == prefix and after[j] == before[k]:
            return j
    return None


def _sized(d: Dim) -> bool:
    """A size the program can read: static, or a symbolic dim bound by the arguments (not a
    derived one such as `N+2`)."""
    return isinstance(d, int) or d.isidentifier()


def _reads(op: Op) -> list[Value]:
    """The values the ops of op's regions read (outer values among them)."""
    out = []
    for r in op.regions:
        for o in r.ops:
            out += list(o.operands) + _reads(o)
        out += list(r.results)
    return out


@dataclass(frozen=True)
class Pairing:
    """Which score terms are credited entry by entry with which costs."""

    axis: tuple[int | None, ...]
    """Per draw: the batch axis along which its entries are credited one by one (None: its
    summed log-probability is credited with whole costs)."""
    term_axis: tuple[int | None, ...]
    """Per term: the axis of its tensor whose entries are separate costs (None: one cost)."""
    paired: tuple[frozenset[int], ...]
    """Per term: the draws credited with its entries one by one."""
    why: tuple[tuple[tuple[Dim, Mixed | None], ...], ...]
    """Per draw: each batch axis (its size) and the op that mixed its entries on the way to a
    cost (None: no such op, e.g. the objective is not a sum or mean of its entries)."""


def pairing(module: Module, ops: Sequence[Op], draws: Sequence[tuple[Value, tuple[Dim, ...]] | None],
            terms: Sequence, deps: Sequence[frozenset[int]]) -> Pairing:
    """Choose, for each batched draw (its value and batch shape; None: not credited per entry),
    the batch axis that reaches the most terms entry for entry, and for each term the axis of
    its tensor that most of those draws reach. A term qualifies when it is a sum or mean of a
    tensor's entries (`Term.reduce`) and depends on the draw."""
    aligned: list[dict[int, Align]] = []
    for i, d in enumerate(draws):
        found: dict[int, Align] = {}
        if d is not None and d[1]:
            analysis = Alignment(module, d[0], len(d[1]))
            analysis.run(ops)
            for j, t in enumerate(terms):
                a = analysis.of(t.value)
                if t.reduce is not None and i in deps[j] and a is not None:
                    found[j] = a
        aligned.append(found)
    axis = []
    for d, found in zip(draws, aligned):  # an axis of one entry gains nothing
        counts = [sum(isinstance(a[k], int) for a in found.values()) if d[1][k] != 1 else 0
                  for k in range(len(next(iter(found.values()), ())))]
        axis.append(counts.index(max(counts)) if counts and max(counts) else None)
    term_axis, paired = [], []
    for j in range(len(terms)):
        reach = {i: found[j][axis[i]] for i, found in enumerate(aligned)
                 if axis[i] is not None and j in found and isinstance(found[j][axis[i]], int)
                 and _sized(_shape(terms[j].value)[found[j][axis[i]]])}
        ks = list(reach.values())
        k = max(set(ks), key=ks.count) if ks else None
        term_axis.append(k)
        paired.append(frozenset(i for i, kk in reach.items() if kk == k))
    used = set().union(*paired)
    axis = [a if i in used else None for i, a in enumerate(axis)]
    why = []
    for i, (d, found) in enumerate(zip(draws, aligned)):
        if d is None or axis[i] is not None:
            why.append(())
            continue
        why.append(tuple((dim, next((a[k] for a in found.values() if isinstance(a[k], Mixed)), None))
                         for k, dim in enumerate(d[1])))
    return Pairing(tuple(axis), tuple(term_axis), tuple(paired), tuple(why))
