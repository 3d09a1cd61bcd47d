"""The typed SSA IR: values, ops with typed params and regions, functions, modules.

Values have identity but no name (the printer numbers them); ops are frozen and edited with
`dataclasses.replace`. A region is a block with arguments, a flat list of ops and yielded
results; it may use values defined outside it (implicit capture).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from .diagnostics import Span
from .facts import Facts
from .types import UNKNOWN, Type
from .ops import Annotation

PRIVATE = "dp"
"""The `by=` name of differentially private gradients; every other name is a black-box estimator."""

@dataclass(frozen=True, eq=False)
class Value:
    """An SSA value. `hint` is the source name it was bound to, used only for printing."""

    type: Type = UNKNOWN
    hint: str = ""

    def retyped(self, type: Type) -> Value:
        return Value(type, self.hint)


@dataclass(frozen=True, eq=False)
class Op:
    name: str
    operands: tuple[Value, ...]
    results: tuple[Value, ...]
    params: Any  # a frozen params dataclass declared by the op's OpDef
    regions: tuple[Region, ...] = ()
    span: Span | None = None
    arg_spans: tuple[tuple[str, Span], ...] = ()
    """Where each argument of a call was written, by name ("" for a positional argument of
    an unresolved `call`): diagnostics about one argument point at it."""

    @property
    def result(self) -> Value:
        assert len(self.results) == 1, self.name
        return self.results[0]


@dataclass(frozen=True, eq=False)
class Region:
    args: tuple[Value, ...]
    ops: tuple[Op, ...]
    results: tuple[Value, ...]


@dataclass(frozen=True)
class Param:
    name: str
    value: Value
    span: Span


@dataclass(frozen=True)
class Function:
    name: str  # qualified for imported functions, e.g. "nn.dense"
    unit: str  # the source unit (file) the function belongs to; scopes name resolution
    params: tuple[Param, ...]
    result_type: Type
    body: Region
    span: Span
    result_span: Span

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


@dataclass(frozen=True)
class StructDef:
    name: str
    unit: str
    fields: tuple[tuple[str, Type], ...]
    span: Span


@dataclass(frozen=True)
class Composition:
    """`compose(f, expect(g, samples=N), by=...)`: the export's objective is f(E[g], ...);
    the Transform's `fn` and `samples` are g's, `outer` is f."""

    outer: str
    by: Annotation | None
    """`scgd(beta=...)` or `plugin`; None before the compose pass picks the default."""
    span: Span
    """The whole `compose(...)` call."""
    outer_span: Span
    inner_span: Span
    """The `expect(g, samples=N)` argument."""


@dataclass(frozen=True)
class Combination:
    """How a `minimize` export combines its objectives' gradients (`by=mgda`, `pcgrad`,
    `weights(0.3, 0.7)`, `dynamic(temperature=2)`): the rule's name, its positional weights and
    its options (static literals)."""

    name: str
    weights: tuple[float, ...] = ()
    options: tuple[tuple[str, bool | int | float | str], ...] = ()
    span: Span | None = None

    def option(self, key: str, default: object = None) -> object:
        return dict(self.options).get(key, default)

    def __str__(self) -> str:
        args = [repr(w) for w in self.weights]
        args += [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in self.options]
        return f"{self.name}({', '.join(args)})" if args else self.name


HISTORY = "history"
"""The state parameter of a `minimize` export with `dynamic` weights: its objectives' values at
the previous two calls."""
STATE = "state"
"""The state parameter of a `minimize` export some of whose objectives carry state (a
moving-average baseline, a learned control variate): a tuple of theirs, then the history."""


@dataclass(frozen=True)
class Objective:
    """One objective of a `minimize` export: `f`, `expect(f, samples=N)` or `logmeanexp(...)`,
    optionally `... with spsa(...)` (its gradient by a black-box estimator)."""

    fn: str
    span: Span
    samples: int = 0
    scope: str = "expect"
    by: Annotation | None = None
    """`f with es(...)`: the black-box estimator of this objective's gradient (None: reverse
    mode, as the export's other objectives)."""
    wrt: tuple[str, ...] | None = None
    """The export's `wrt` names this objective takes when it does not take them all (set by
    resolve); the others get a zero gradient from it."""


@dataclass(frozen=True)
class Transform:
    """What an export computes: `fn` itself, grad / value_and_grad of it wrt some params, one
    step of gradient descent on them (`descend`), or the combined gradient of several
    objectives (`minimize`: `objectives` and `rule`; `fn` is empty)."""

    kind: str  # "fn" | "grad" | "value_and_grad" | "descend" | "minimize"
    fn: str
    wrt: tuple[str, ...] = ()
    wrt_spans: tuple[Span, ...] = ()
    samples: int = 0
    """`expect(fn, samples=N)`: the Monte Carlo mean over N draws (0: fn as it is)."""
    by: Annotation | None = None
    """`grad(f, wrt=[...], by=spsa(...))`: a black-box (zeroth-order) gradient estimator, or
    `by=dp(...)`: differentially private reverse mode."""
    lr: float | None = None
    """`descend(f, wrt=[...], lr=...)`: the step size (None: the export takes it as an argument
    `lr`, before the key)."""
    scope: str = "expect"
    """With samples: `expect` (the mean of the draws) or `logmeanexp` (the log of the mean of
    their exp, e.g. an importance-weighted bound)."""
    objectives: tuple[Objective, ...] = ()
    """`minimize([f1, f2, ...], wrt=[...], by=RULE)`: the objectives, in source order."""
    rule: Combination | None = None
    """`minimize`'s combination rule."""

    compose: Composition | None = None
    """`compose(f, expect(fn, samples=N))`: f of the expectation (the compose pass builds it)."""
    has_aux: bool = False
    """`has_aux=true`: `fn` returns a tuple, the objective first and auxiliary values after it
    (metrics), which the export returns beside its gradient."""
    aux: str | None = None
    """With `has_aux`, after the aux pass: the function computing the auxiliary values (`fn`
    is then the one returning the objective alone)."""
    descend: bool = False
    """`descend(minimize([...], ...), lr=...)`: the `minimize` export steps its parameters by
    the combined direction (`lr` as for `descend`) and returns them in its place."""
    of_grad: str | None = None
    """`grad(grad(fn, wrt=[x]), wrt=[...])`: the export differentiates fn's derivative with
    respect to its float scalar parameter x (resolve builds that function and names it `fn`)."""

    @property
    def black_box(self) -> Annotation | None:
        """The black-box (zeroth-order) estimator of `by=`; None for reverse mode and `by=dp`."""
        return self.by if self.by is not None and self.by.name != PRIVATE else None

    @property
    def private(self) -> Annotation | None:
        """`by=dp(...)`: reverse mode with per-example clipping and Gaussian noise (DP-SGD)."""
        return self.by if self.by is not None and self.by.name == PRIVATE else None

    def call(self, fn: str) -> str:
        """`kind(fn, wrt=[...], lr=..., by=...)` as written in source (`fn` as given; for
        `minimize`, the list of objectives)."""
        lr = f", lr={self.lr!r}" if self.lr is not None else ""
        by = self.by if self.by is not None else self.rule
        by = f", by={by}" if by is not None else ""
        aux = ", has_aux=true" if self.has_aux else ""
        if self.descend:
            return f"descend({self.kind}({fn}, wrt=[{', '.join(self.wrt)}]{by}){lr})"
        return f"{self.kind}({fn}, wrt=[{', '.join(self.wrt)}]{lr}{by}{aux})"


@dataclass(frozen=True)
class Export:
    name: str
    transform: Transform
    span: Span
    fn_span: Span

    def parts(self) -> tuple[Export, ...]:
        """The gradients this export asks for, each of one function: the export itself, or,
        for `minimize`, one export `name[i]` of kind minimize per objective (no objectives of
        its own), which passes check and rewrite like a `value_and_grad` export."""
        t = self.transform
        if t.kind != "minimize":
            return (self,)
        parts = []
        for i, o in enumerate(t.objectives):
            wrt = [(n, s) for n, s in zip(t.wrt, t.wrt_spans) if o.wrt is None or n in o.wrt]
            parts.append(Export(f"{self.name}[{i}]", Transform(
                "minimize", o.fn, tuple(n for n, _ in wrt), tuple(s for _, s in wrt), o.samples,
                o.by, scope=o.scope), self.span, o.span))
        return tuple(parts)

    def joined(self, parts: tuple[Export, ...]) -> Export:
        """This export with its parts replaced (as `parts()` made them, then rewritten); the
        `wrt` names that some part kept, each objective's own recorded."""
        t = self.transform
        if t.kind != "minimize":
            (part,) = parts
            return part
        kept = [(n, s) for n, s in zip(t.wrt, t.wrt_spans)
                if any(n in p.transform.wrt for p in parts)]
        names = tuple(n for n, _ in kept)
        own = [tuple(n for n in names if n in p.transform.wrt) for p in parts]
        objectives = tuple(Objective(p.transform.fn, p.fn_span, p.transform.samples,
                                     p.transform.scope, p.transform.by,
                                     None if wrt == names else wrt)
                           for p, wrt in zip(parts, own))
        return replace(self, transform=replace(t, objectives=objectives,
                                               wrt=tuple(n for n, _ in kept),
                                               wrt_spans=tuple(s for _, s in kept)))


@dataclass(frozen=True)
class Unit:
    """One source file: its name, path and the modules it imports (alias -> unit name)."""

    name: str
    path: str
    imports: tuple[tuple[str, str], ...] = ()
    estimator: Any = None
    """The unit's default estimator (`pragma estimator ...`), an `ops.Annotation`."""
    backward: Any = None
    """The unit's default backward rule of non-smooth ops (`pragma backward ...`)."""


@dataclass(frozen=True)
class Module:
    name: str
    units: tuple[Unit, ...]
    structs: tuple[StructDef, ...]
    functions: tuple[Function, ...]
    exports: tuple[Export, ...]
    facts: Facts = field(default_factory=Facts, compare=False)
    """What the passes found."""

    @cached_property
    def _by_name(self) -> dict[str, Function]:
        """The functions by name (the first of each name: resolve reports the others)."""
        found: dict[str, Function] = {}
        for f in self.functions:
            found.setdefault(f.name, f)
        return found

    def function(self, name: str) -> Function | None:
        return self._by_name.get(name)

    def struct(self, name: str) -> StructDef | None:
        return next((s for s in self.structs if s.name == name), None)

    def unit(self, name: str) -> Unit:
        return next(u for u in self.units if u.name == name)


def walk(region: Region) -> Iterator[Op]:
    """All ops of a region, nested regions included, in program order."""
    for op in region.ops:
        yield op
        for r in op.regions:
            yield from walk(r)


def free_values(region: Region) -> list[Value]:
    """The values a region uses but does not define (it captures them), in first-use order."""
    defined: set[Value] = set()
    found: dict[Value, None] = {}

    def visit(r: Region) -> None:
        defined.update(r.args)
        for op in r.ops:
            for v in op.operands:
                if v not in defined:
                    found.setdefault(v)
            for inner in op.regions:
                visit(inner)
            defined.update(op.results)
        for v in r.results:
            if v not in defined:
                found.setdefault(v)

    visit(region)
    return list(found)


def reachable(module: Module, fn: str) -> list[str]:
    """fn and every function it calls (or inlines, or maps over a tree's leaves), callers
    first."""
    out = [fn]
    for name in out:
        for op in walk(module.function(name).body):
            if op.name in ("call_fn", "inline", "map_leaves") and op.params.callee not in out:
                out.append(op.params.callee)
    return out


def _bound_in(module: Module, fn: str, op: str) -> tuple[str, ...]:
    """The functions bound from Python (their body an `op`) that fn calls, directly or not."""
    return tuple(o.params.name for name in reachable(module, fn)
                 for o in module.function(name).body.ops if o.name == op)


def bound_names(module: Module, op: str) -> set[str]:
    """The names of the module's functions bound from Python: their body an `op` (`host_call`
    for an extern fn, `call_jax` for a jax fn)."""
    return {o.params.name for f in module.functions for o in f.body.ops if o.name == op}


def externs_of(module: Module, fn: str) -> tuple[str, ...]:
    """The extern functions fn calls, directly or not."""
    return _bound_in(module, fn, "host_call")


def jax_functions_of(module: Module, fn: str) -> tuple[str, ...]:
    """The jax functions fn calls (traced inline), directly or not."""
    return _bound_in(module, fn, "call_jax")
