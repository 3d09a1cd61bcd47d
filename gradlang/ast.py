"""Abstract syntax tree of a .grad file; every node carries the span it was parsed from."""

from __future__ import annotations

from dataclasses import dataclass

from .diagnostics import SourceFile, Span

# ---- types


@dataclass(frozen=True)
class TypeExpr:
    span: Span


@dataclass(frozen=True)
class ScalarTypeExpr(TypeExpr):
    dtype: str


@dataclass(frozen=True)
class TensorTypeExpr(TypeExpr):
    dtype: str
    dims: tuple[int | str, ...]


@dataclass(frozen=True)
class NamedTypeExpr(TypeExpr):
    name: str
    bindings: tuple[tuple[str, int | str], ...] = ()
    """Struct dims bound at this use, e.g. `Dense[I=D, O=H]`."""


@dataclass(frozen=True)
class TupleTypeExpr(TypeExpr):
    elems: tuple[TypeExpr, ...]


# ---- expressions


@dataclass(frozen=True)
class Expr:
    span: Span


@dataclass(frozen=True)
class Name(Expr):
    id: str


@dataclass(frozen=True)
class IntLit(Expr):
    value: int


@dataclass(frozen=True)
class FloatLit(Expr):
    value: float


@dataclass(frozen=True)
class BoolLit(Expr):
    value: bool


@dataclass(frozen=True)
class StrLit(Expr):
    """A string literal: only a static argument of a builtin (einsum's subscripts, a
    convolution's padding)."""

    value: str


@dataclass(frozen=True)
class TupleLit(Expr):
    elems: tuple[Expr, ...]


@dataclass(frozen=True)
class ListLit(Expr):
    elems: tuple[Expr, ...]


@dataclass(frozen=True)
class Unary(Expr):
    op: str  # "neg" | "not"
    operand: Expr


@dataclass(frozen=True)
class Binary(Expr):
    op: str  # add sub mul div pow matmul eq ne lt le gt ge and or
    lhs: Expr
    rhs: Expr


@dataclass(frozen=True)
class Keyword:
    name: str
    value: Expr
    span: Span


@dataclass(frozen=True)
class Call(Expr):
    func: Expr
    args: tuple[Expr, ...]
    kwargs: tuple[Keyword, ...]


@dataclass(frozen=True)
class FieldAccess(Expr):
    base: Expr
    field: str


@dataclass(frozen=True)
class Slice(Expr):
    start: Expr | None
    stop: Expr | None
    step: Expr | None


@dataclass(frozen=True)
class Index(Expr):
    base: Expr
    subscripts: tuple[Expr, ...]  # Expr or Slice


@dataclass(frozen=True)
class If(Expr):
    cond: Expr
    then: Expr
    orelse: Expr


@dataclass(frozen=True)
class Annotation:
    """`with name(args)`: an estimator (or backward rule) chosen in the source."""

    name: str
    args: tuple[Expr, ...]
    kwargs: tuple[Keyword, ...]
    span: Span


@dataclass(frozen=True)
class With(Expr):
    """`e with name(options)`: an annotation on the operation that computes e."""

    value: Expr
    annotation: Annotation


@dataclass(frozen=True)
class Cast(Expr):
    dtype: str
    operand: Expr


@dataclass(frozen=True)
class Carry:
    name: str
    init: Expr
    span: Span


@dataclass(frozen=True)
class For(Expr):
    var: str
    start: Expr | None
    stop: Expr
    carries: tuple[Carry, ...]
    body: tuple[Stmt, ...]
    result: Expr


@dataclass(frozen=True)
class Checkpoint(Expr):
    """`checkpoint { ...; value }`: a block whose intermediates are recomputed for the backward
    pass instead of stored."""
    body: tuple[Stmt, ...]
    result: Expr


@dataclass(frozen=True)
class Argmin(Expr):
    """`argmin v: T = init { ...; objective } via solver(options) [subject to c <= 0, ...]
    [with method(options)]` (or argmax). Constraints are kept as `lhs - rhs` (<= 0)."""

    maximize: bool
    var: str
    type: TypeExpr
    init: Expr
    body: tuple[Stmt, ...]
    objective: Expr
    solver: Annotation
    constraints: tuple[Expr, ...] = ()
    hyper: Annotation | None = None


@dataclass(frozen=True)
class Report(Expr):
    """`e as (w, info)`: e must be an inner problem; its solution and its solver's report."""

    value: Expr


# ---- statements


@dataclass(frozen=True)
class Pattern:
    span: Span


@dataclass(frozen=True)
class PName(Pattern):
    name: str


@dataclass(frozen=True)
class PTuple(Pattern):
    elems: tuple[Pattern, ...]


@dataclass(frozen=True)
class Stmt:
    span: Span


@dataclass(frozen=True)
class Let(Stmt):
    pattern: Pattern
    value: Expr


@dataclass(frozen=True)
class Sample(Stmt):
    """`z ~ dist [with annotation]`: a random choice."""

    name: str
    dist: Expr
    annotation: Annotation | None
    name_span: Span


@dataclass(frozen=True)
class Return(Stmt):
    value: Expr


# ---- declarations


@dataclass(frozen=True)
class Param:
    name: str
    type: TypeExpr
    span: Span


@dataclass(frozen=True)
class Decl:
    span: Span


@dataclass(frozen=True)
class Use(Decl):
    path: tuple[str, ...]


@dataclass(frozen=True)
class StructDecl(Decl):
    name: str
    fields: tuple[Param, ...]


@dataclass(frozen=True)
class FnDecl(Decl):
    name: str
    params: tuple[Param, ...]
    result: TypeExpr
    body: tuple[Stmt, ...]
    name_span: Span


@dataclass(frozen=True)
class ExternDecl(Decl):
    name: str
    params: tuple[Param, ...]
    result: TypeExpr


@dataclass(frozen=True)
class JaxDecl(Decl):
    """`jax fn name(params) -> T`: a JAX function bound from Python, traced inline."""

    name: str
    params: tuple[Param, ...]
    result: TypeExpr


@dataclass(frozen=True)
class ExportDecl(Decl):
    name: str
    value: Expr
    name_span: Span


@dataclass(frozen=True)
class Pragma(Decl):
    """`pragma estimator NAME(options)`: a module-level default."""

    key: str
    value: Annotation


@dataclass(frozen=True)
class Program:
    source: SourceFile
    decls: tuple[Decl, ...]
