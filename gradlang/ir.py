"""The typed SSA IR: values, ops with typed params and regions, functions, modules.

Values have identity but no name (the printer numbers them); ops are frozen and edited with
`dataclasses.replace`. A region is a block with arguments, a flat list of ops and yielded
results; it may use values defined outside it (implicit capture).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .diagnostics import Span
from .types import UNKNOWN, Type
from .ops import Estimator


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
    by: Estimator | None
    """`scgd(beta=...)` or `plugin`; None before the compose pass picks the default."""
    span: Span
    """The whole `compose(...)` call."""
    outer_span: Span
    inner_span: Span
    """The `expect(g, samples=N)` argument."""


@dataclass(frozen=True)
class Transform:
    """What an export computes: `fn` itself, grad / value_and_grad of it wrt some params, or
    one step of gradient descent on them (`descend`)."""

    kind: str  # "fn" | "grad" | "value_and_grad" | "descend"
    fn: str
    wrt: tuple[str, ...] = ()
    wrt_spans: tuple[Span, ...] = ()
    samples: int = 0
    """`expect(fn, samples=N)`: the Monte Carlo mean over N draws (0: fn as it is)."""
    by: Estimator | None = None
    """`grad(f, wrt=[...], by=spsa(...))`: a black-box (zeroth-order) gradient estimator."""
    lr: float | None = None
    """`descend(f, wrt=[...], lr=...)`: the step size (None: the export takes it as an argument
    `lr`, before the key)."""
    scope: str = "expect"
    """With samples: `expect` (the mean of the draws) or `logmeanexp` (the log of the mean of
    their exp, e.g. an importance-weighted bound)."""
    compose: Composition | None = None
    """`compose(f, expect(fn, samples=N))`: f of the expectation (the compose pass builds it)."""

    def call(self, fn: str) -> str:
        """`kind(fn, wrt=[...], lr=..., by=...)` as written in source (`fn` as given)."""
        lr = f", lr={self.lr:g}" if self.lr is not None else ""
        by = f", by={self.by}" if self.by is not None else ""
        return f"{self.kind}({fn}, wrt=[{', '.join(self.wrt)}]{lr}{by})"


@dataclass(frozen=True)
class Export:
    name: str
    transform: Transform
    span: Span
    fn_span: Span


@dataclass(frozen=True)
class Unit:
    """One source file: its name, path and the modules it imports (alias -> unit name)."""

    name: str
    path: str
    imports: tuple[tuple[str, str], ...] = ()
    estimator: Any = None
    """The unit's default estimator (`pragma estimator ...`), an `ops.Estimator`."""
    backward: Any = None
    """The unit's default backward rule of non-smooth ops (`pragma backward ...`)."""


@dataclass(frozen=True)
class Module:
    name: str
    units: tuple[Unit, ...]
    structs: tuple[StructDef, ...]
    functions: tuple[Function, ...]
    exports: tuple[Export, ...]
    facts: dict[str, Any] = field(default_factory=dict, compare=False)
    """Analysis results keyed by analysis name (e.g. "gradflow")."""

    def function(self, name: str) -> Function | None:
        return next((f for f in self.functions if f.name == name), None)

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
    """fn and every function it calls (or inlines), callers first."""
    out = [fn]
    for name in out:
        for op in walk(module.function(name).body):
            if op.name in ("call_fn", "inline") and op.params.callee not in out:
                out.append(op.params.callee)
    return out


def externs_of(module: Module, fn: str) -> tuple[str, ...]:
    """The extern functions fn calls, directly or not."""
    return tuple(op.params.name for name in reachable(module, fn)
                 for op in module.function(name).body.ops if op.name == "host_call")
