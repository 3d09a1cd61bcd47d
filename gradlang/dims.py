"""Dims bound at compile time: `compile_file(path, dims={"K": 8})`, `gradlang compile --dim K=8`.

A dim is a name in a shape (`f32[K]`). A function's arguments bind the dims of their declared
types at each call; a dim that no argument of a function binds is fixed by the compile: in each
function of the compiled file whose parameters do not have K, every K (in its result type, an
`argmin` variable's type, a shape, a value, `samples=K`, an option) reads as the integer, and so
does K in an export's options (`expect(f, samples=K)`). Imported files are left as written.

Run on the main file's syntax tree before the IR is built. It also reports a dim that nothing
binds (with or without bindings) at its first use where a size goes, saying how to bind it,
where the later passes would say less.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass, replace

from . import ast
from .builtins import BUILTINS
from .diagnostics import Diagnostics, Span
from .distributions import DISTRIBUTIONS
from .limits import I32_MAX
from .parser import _children


@dataclass
class DimBindings:
    """The sizes a compile fixes dims to; `used` collects the names it substituted."""

    sizes: Mapping[str, int] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)


def check_sizes(sizes: Mapping[str, object]) -> dict[str, int]:
    """`sizes` as Python ints (a NumPy integer is one), after a ValueError for a name that is
    no identifier or a size that is no integer from 1 to 2^31 - 1 (an i32 value in programs)."""
    out = {}
    for name, size in sizes.items():
        if not (isinstance(name, str) and name.isidentifier()):
            raise ValueError(f"dims: {name!r} is not a dim name")
        n = None if isinstance(size, bool) or not hasattr(size, "__index__") else size.__index__()
        if n is None or not 1 <= n <= I32_MAX:
            raise ValueError(f"dims={{'{name}': {size!r}}}: a size must be an integer from 1 to "
                             f"{I32_MAX}")
        out[name] = n
    return out


def bind_dims(program: ast.Program, imported: Sequence[ast.Program], bindings: DimBindings,
              diags: Diagnostics) -> ast.Program:
    """`program` with its dims fixed by `bindings` (see the module docstring); an error at each
    use of a dim that nothing binds."""
    binder = _Binder(program, imported, bindings, diags)
    return replace(program, decls=tuple(binder.decl(d) for d in program.decls))


class _Binder:
    def __init__(self, program: ast.Program, imported: Sequence[ast.Program],
                 bindings: DimBindings, diags: Diagnostics):
        self.bindings = bindings
        self.diags = diags
        self.structs: dict[str, list[ast.StructDecl]] = {}
        """Struct declarations of every file by their unqualified name."""
        self.top: set[str] = set()
        """The names every file declares (an unqualified call may name an import's)."""
        for p in (program, *imported):
            for d in p.decls:
                name = getattr(d, "name", None)
                if isinstance(name, str):
                    self.top.add(name)
                if isinstance(d, ast.StructDecl):
                    self.structs.setdefault(d.name, []).append(d)

    def decl(self, d: ast.Decl) -> ast.Decl:
        if isinstance(d, ast.FnDecl):
            return self.function(d)
        if isinstance(d, ast.ExportDecl):
            return replace(d, value=self.export_value(d.name, d.value, False))
        return d

    # ---- the dims a type has

    def type_dims(self, t: ast.TypeExpr, seen: frozenset[str] = frozenset()) -> set[str]:
        """Every dim name of `t`; a struct's dims are over-approximated by those of every
        struct of that name (a dim counted bound by mistake is reported by resolve)."""
        if isinstance(t, ast.TensorTypeExpr):
            return {d for d in t.dims if isinstance(d, str)}
        if isinstance(t, ast.TupleTypeExpr):
            return set().union(*(self.type_dims(e, seen) for e in t.elems))
        if not isinstance(t, ast.NamedTypeExpr):
            return set()
        short = t.name.rpartition(".")[2]
        own: set[str] = set()
        if short not in seen:
            for s in self.structs.get(short, ()):
                for f in s.fields:
                    own |= self.type_dims(f.type, seen | {short})
        bound = dict(t.bindings)
        return (own - set(bound)) | {v for v in bound.values() if isinstance(v, str)}

    # ---- functions

    def function(self, fn: ast.FnDecl) -> ast.FnDecl:
        bound = set().union(*(self.type_dims(p.type) for p in fn.params))
        subst = {k: v for k, v in self.bindings.sizes.items() if k not in bound}
        names = _binders(fn)
        free = _FreeDims(self, bound | set(subst), names, fn.name)
        free.visit(fn.body)
        if not subst and not free.values:
            return fn
        # A value named K shadows the dim K (as it does an argument's), and a value reported
        # unbound reads as 1 after its error, so that later passes do not report it again
        values = {**dict.fromkeys(free.values, 1),
                  **{k: v for k, v in subst.items() if k not in names}}
        rewrite = _Rewrite(subst, values, self.bindings.used)
        return replace(fn, result=rewrite.type(fn.result), body=rewrite.node(fn.body))

    # ---- exports: K in an option (`samples=K`, `by=es(pop=K)`), never a function's name

    def export_value(self, export: str, e: ast.Expr, in_option: bool) -> ast.Expr:
        if isinstance(e, ast.Name) and in_option:
            size = self.bindings.sizes.get(e.id)
            if size is not None:
                self.bindings.used.add(e.id)
                return ast.IntLit(e.span, size)
            if e.id[:1].isupper() and e.id not in self.top:
                self.unbound(f"dim '{e.id}' is bound by nothing in export '{export}'", e.id,
                             e.span)
                return ast.IntLit(e.span, 1)  # after its error, so that it is reported once
            return e
        if isinstance(e, ast.Call):
            return replace(e, args=tuple(self.export_value(export, a, in_option) for a in e.args),
                           kwargs=tuple(k if k.name == "wrt" else
                                        replace(k, value=self.export_value(export, k.value, True))
                                        for k in e.kwargs))
        if isinstance(e, ast.ListLit):
            return replace(e, elems=tuple(self.export_value(export, x, in_option)
                                          for x in e.elems))
        return e

    def unbound(self, problem: str, name: str, span: Span) -> None:
        """An error at `span`: the problem, and how a dim `name` is bound."""
        self.diags.error(f"{problem}; a dim is bound by an argument's shape (k: f32[{name}]) or "
                         f"when compiling (--dim {name}=SIZE, or dims={{'{name}': SIZE}} in "
                         f"Python)", span)


def _options(call: ast.Call) -> tuple[ast.Keyword, ...]:
    """The keyword arguments of a call but `wrt=`, which names parameters."""
    return tuple(k for k in call.kwargs if k.name != "wrt")


def _binders(fn: ast.FnDecl) -> set[str]:
    """Every name a function binds: its parameters, lets, draws, loop variables and carries,
    argmin variables."""
    out = {p.name for p in fn.params}
    stack: list[object] = list(fn.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.PName | ast.Sample):
            out.add(node.name)
        elif isinstance(node, ast.For | ast.Argmin):
            out.add(node.var)
        elif isinstance(node, ast.Carry):
            out.add(node.name)
        stack += _children(node)
    return out


@dataclass
class _FreeDims:
    """Reports a dim that nothing binds in a function: a capitalized name where a size goes
    that is no value, function, struct or builtin. (A dim of its result type that its
    arguments do not bind is the size its body gives: `-> f32[N]` of `reshape(x, [-1])`.)"""

    binder: _Binder
    bound: set[str]
    names: set[str]
    fn: str
    values: set[str] = field(default_factory=set)
    """The names reported (each at its first use only)."""

    def name(self, e: ast.Name) -> None:
        known = self.bound | self.names | self.binder.top | self.values
        if e.id[:1].isupper() and e.id not in known and e.id not in BUILTINS \
                and e.id not in DISTRIBUTIONS:  # a name resolve would not find
            close = difflib.get_close_matches(e.id, sorted(self.names | self.bound), 1, 0.7)
            guess = f" (did you mean '{close[0]}'?)" if close else ""
            self.binder.unbound(f"unknown name '{e.id}' in '{self.fn}'{guess}", e.id, e.span)
            self.values.add(e.id)

    def visit(self, node: object) -> None:
        """Each name in a dim's place (a shape list, `range(K)`, `f32(K)`, a slice's bound,
        `samples=K`) that nothing binds; a name elsewhere is left to resolve."""
        stack: list[tuple[object, bool]] = [(node, False)]  # a node, and if in a dim's place
        while stack:
            n, place = stack.pop()
            if isinstance(n, tuple | ast.ListLit):  # a list in a dim's place: a shape
                items = n.elems if isinstance(n, ast.ListLit) else n
                stack += [(x, place) for x in reversed(items)]
            elif isinstance(n, ast.Name):
                if place:
                    self.name(n)
            elif isinstance(n, ast.Call):  # the callee and `wrt=` name functions, parameters
                ranged = isinstance(n.func, ast.Name) and n.func.id in ("range", "arange")
                stack += [(k.value, k.name == "samples" or isinstance(k.value, ast.ListLit))
                          for k in reversed(_options(n))]
                stack += [(a, ranged or isinstance(a, ast.ListLit)) for a in reversed(n.args)]
                if not isinstance(n.func, ast.Name):
                    stack.append((n.func, False))
            elif isinstance(n, ast.Cast | ast.Slice | ast.For):
                sizes = (n.operand,) if isinstance(n, ast.Cast) else (
                    (n.start, n.stop) if isinstance(n, ast.For) else (n.start, n.stop, n.step))
                stack += [(c, any(c is x for x in sizes)) for c in reversed(_children(n))]
            elif isinstance(n, ast.FieldAccess):  # `nn.f`: the base may be an import's alias
                if not isinstance(n.base, ast.Name):
                    stack.append((n.base, False))
            elif not isinstance(n, ast.Annotation | ast.TypeExpr):
                stack += [(c, False) for c in reversed(_children(n))]


@dataclass
class _Rewrite:
    """Replaces the fixed dims of a function that its parameters do not bind."""

    sizes: Mapping[str, int]
    """The fixed dims, in types."""
    values: Mapping[str, int]
    """The names to replace as values: the fixed dims, and those reported unbound."""
    used: set[str]

    def dim(self, d: int | str) -> int | str:
        if isinstance(d, str) and d in self.sizes:
            self.used.add(d)
            return self.sizes[d]
        return d

    def type(self, t: ast.TypeExpr) -> ast.TypeExpr:
        if isinstance(t, ast.TensorTypeExpr):
            return replace(t, dims=tuple(self.dim(d) for d in t.dims))
        if isinstance(t, ast.NamedTypeExpr):
            return replace(t, bindings=tuple((k, self.dim(v)) for k, v in t.bindings))
        if isinstance(t, ast.TupleTypeExpr):
            return replace(t, elems=tuple(self.type(e) for e in t.elems))
        return t

    def node(self, n):
        if isinstance(n, tuple):
            return tuple(self.node(x) for x in n)
        if isinstance(n, ast.Name):
            if n.id in self.values:
                self.used.update({n.id} & set(self.sizes))
                return ast.IntLit(n.span, self.values[n.id])
            return n
        if isinstance(n, ast.TypeExpr):
            return self.type(n)
        if isinstance(n, ast.Binary):  # `a + b + c` nests on the left: a loop, however long
            chain = []
            while isinstance(n, ast.Binary):
                chain.append(n)
                n = n.lhs
            n = self.node(n)
            for b in reversed(chain):
                n = replace(b, lhs=n, rhs=self.node(b.rhs))
            return n
        if isinstance(n, ast.Call):  # the callee and `wrt=` name functions, parameters
            func = n.func if isinstance(n.func, ast.Name) else self.node(n.func)
            return replace(n, func=func, args=self.node(n.args), kwargs=tuple(
                k if k.name == "wrt" else self.node(k) for k in n.kwargs))
        if not is_dataclass(n) or isinstance(n, Span):
            return n
        changes = {f.name: self.node(getattr(n, f.name)) for f in fields(n)}
        return replace(n, **changes)
