"""`gradlang lsp`: a language server for .grad files (pygls, on stdio).

`analyze` compiles one document as `gradlang check` does (its imports found from the file's
folder and the standard library) and indexes what an editor asks about: the diagnostics, and
the symbols written in the document, each with a hover text (a value's type; at a draw, an
argmin or a non-smooth op, the estimator, method or backward rule chosen and why, from the facts
`gradlang explain` prints) and a definition (across `use` imports). The server around it
converts positions only: gradlang's spans are 1-based lines and columns in code points, LSP's
positions 0-based lines and columns in code units (UTF-16 unless the client asks otherwise).

pygls is imported here and nowhere else (the `lsp` extra); pygls 1.3 and 2.x are supported.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from lsprotocol import types
from pygls import uris

try:
    from pygls.lsp.server import LanguageServer  # pygls 2
except ModuleNotFoundError as exc:
    if exc.name != "pygls.lsp.server":
        raise
    from pygls.server import LanguageServer  # pygls 1.3

from . import ast
from .builtins import BUILTINS
from .diagnostics import Diagnostic, Diagnostics, Severity, SourceFile, Span
from .distributions import DISTRIBUTIONS
from .driver import build_module
from .estimators import REGISTRY
from .explain import _control_variate, _label, _nonsmooth, _overrides, explain
from .facts import SiteChoice
from .ir import Function, Module, Op, reachable, walk
from .parser import _children, parse
from .passes.pipeline import PIPELINE, run_pipeline
from .passes.resolve import _struct_def
from .types import NamedType, TupleType, Type
from .version import __version__

_TYPED = [p.name for p in PIPELINE].index("typecheck") + 1
"""The passes up to typecheck: their module has every value's type, even after errors."""


@dataclass(frozen=True)
class Symbol:
    """Something written in the document: what hovering over it shows (markdown) and where it
    is defined."""

    span: Span
    hover: str
    definition: Span | None = None


@dataclass(frozen=True)
class Analysis:
    """One version of a document, compiled."""

    source: SourceFile
    diagnostics: tuple[Diagnostic, ...]
    symbols: tuple[Symbol, ...] = ()

    def at(self, line: int, col: int) -> Symbol | None:
        """The innermost symbol at a 1-based line and column; a position just after a symbol
        counts as on it, after the symbols it is inside."""

        def key(s: Symbol) -> tuple:
            at_end = (line, col) == (s.span.end_line, s.span.end_col)
            return at_end, s.span.end_line - s.span.line, s.span.end_col - s.span.col

        hits = [s for s in self.symbols
                if (s.span.line, s.span.col) <= (line, col) <= (s.span.end_line, s.span.end_col)]
        return min(hits, key=key, default=None)


def analyze(text: str, path: Path | None, name: str = "<untitled>") -> Analysis:
    """Compile `text`, the document saved at `path` (its imports are found from path's
    folder; None: an unsaved document named `name`, which can import std.* only), with the
    passes `gradlang check` runs, and index its symbols."""
    source = SourceFile(name if path is None else str(path), text)
    diags = Diagnostics()
    module = build_module(source, None if path is None else path.parent, diags)
    if module is None:
        return Analysis(source, tuple(diags.sorted()))
    typed = run_pipeline(module, diags, PIPELINE[:_TYPED])
    final = run_pipeline(typed, diags, PIPELINE[_TYPED:])
    index = _Index(typed, None if diags.has_errors else final)
    index.program(parse(source, Diagnostics()))
    return Analysis(source, tuple(diags.sorted()), tuple(index.symbols))


@dataclass(frozen=True)
class _Binding:
    """A local name in scope: where it is bound, its type and what hovering over it shows."""

    span: Span
    type: Type | None
    hover: str


class _Index:
    """The symbols of the main unit: its AST walked beside its typed IR (values are matched
    by the span they were built from) and, for the facts, the compiled module (None when the
    program has errors)."""

    def __init__(self, typed: Module, final: Module | None):
        self.typed = typed
        self.final = final
        self.structs = {s.name: s for s in typed.structs}
        self.sites = {s.span: s for s in final.facts.estimators} if final else {}
        self.problems = {h.span: h for h in final.facts.hypergrad} if final else {}
        self.symbols: list[Symbol] = []
        self.fn: Function | None = None
        self.ops: dict[Span, list[Op]] = {}
        """The current function's ops by the span they were built from."""

    def add(self, span: Span, hover: str, definition: Span | None = None) -> None:
        self.symbols.append(Symbol(span, hover, definition))

    def program(self, program: ast.Program) -> None:
        for decl in program.decls:
            if isinstance(decl, ast.Use):
                self.use(decl)
            elif isinstance(decl, ast.StructDecl):
                self.types(p.type for p in decl.fields)
            elif isinstance(decl, ast.FnDecl):
                self.function(decl)
            elif isinstance(decl, (ast.ExternDecl, ast.JaxDecl)):
                self.types([*(p.type for p in decl.params), decl.result])
            elif isinstance(decl, ast.ExportDecl):
                self.export(decl)

    def use(self, decl: ast.Use) -> None:
        target = dict(self.typed.unit("").imports).get(decl.path[-1])
        if target is None:
            return
        path = self.typed.unit(target).path
        self.add(decl.span, f"module `{target}`: {path}", Span(SourceFile(path, ""), 1, 1, 1, 1))

    def types(self, exprs: Iterable[ast.TypeExpr]) -> None:
        """Struct names in type expressions: their definitions."""
        todo = list(exprs)
        while todo:
            t = todo.pop()
            if isinstance(t, ast.TupleTypeExpr):
                todo.extend(t.elems)
            elif isinstance(t, ast.NamedTypeExpr):
                sdef = _struct_def(NamedType(t.name), "", self.structs)
                if sdef is not None:
                    fields = ", ".join(f"{n}: {ft}" for n, ft in sdef.fields)
                    span = Span(t.span.source, t.span.line, t.span.col, t.span.line,
                                t.span.col + len(t.name))
                    shown = _code(f"struct {sdef.name} {{ {fields} }}") + _defined(sdef.span)
                    self.add(span, shown, _name_span(sdef.span, sdef.name))

    def function(self, decl: ast.FnDecl) -> None:
        self.types([*(p.type for p in decl.params), decl.result])
        fn = self.typed.function(decl.name)
        if fn is None:
            return
        self.fn = fn
        self.ops = {}
        for op in walk(fn.body):
            self.ops.setdefault(op.span, []).append(op)
        self.add(decl.name_span, self.signature(fn), decl.name_span)
        scope = {}
        for p in decl.params:
            param = fn.param(p.name)
            self.bind(scope, p.name, Span(p.span.source, p.span.line, p.span.col, p.span.line,
                                          p.span.col + len(p.name)),
                      "param", None if param is None else param.value.type)
        self.block(decl.body, scope)

    # ---- statements and expressions
    def bind(self, scope: dict[str, _Binding], name: str, span: Span, kind: str,
             type: Type | None, facts: str = "") -> None:
        shown = f"{kind} {name}" + (f": {type}" if type is not None else "")
        binding = _Binding(span, type, _code(shown) + facts)
        scope[name] = binding
        self.add(span, binding.hover, span)

    def block(self, stmts: tuple[ast.Stmt, ...], scope: dict[str, _Binding]) -> None:
        for stmt in stmts:
            if isinstance(stmt, ast.Let) and isinstance(stmt.value, ast.Report):
                self.report(stmt, scope)
            elif isinstance(stmt, ast.Let):
                self.expr(stmt.value, scope)
                self.pattern(stmt.pattern, self.type_of(stmt.value, scope), scope)
            elif isinstance(stmt, ast.Sample):
                self.sample(stmt, scope)
            elif isinstance(stmt, ast.Return):
                self.expr(stmt.value, scope)

    def pattern(self, p: ast.Pattern, type: Type | None, scope: dict[str, _Binding]) -> None:
        """Bind a `let` pattern: a tuple's elements are typed by the value's tuple type, else by
        the `get` ops built at the pattern's span."""
        if isinstance(p, ast.PName):
            self.bind(scope, p.name, p.span, "let", type)
            return
        assert isinstance(p, ast.PTuple)
        got = {o.params.index: o.result.type for o in self.ops.get(p.span, ()) if o.name == "get"}
        if isinstance(type, TupleType) and len(type.elems) == len(p.elems):
            got = dict(enumerate(type.elems))  # also the elements no op uses (dead code is gone)
        for i, sub in enumerate(p.elems):
            self.pattern(sub, got.get(i), scope)

    def report(self, stmt: ast.Let, scope: dict[str, _Binding]) -> None:
        """`argmin ... as (solution, report)`: the names are the argmin op's two results."""
        self.expr(stmt.value.value, scope)
        op = self.op(stmt.value.value.span, "argmin")
        results = op.results if op is not None else ()
        for i, sub in enumerate(stmt.pattern.elems):
            if isinstance(sub, ast.PName):
                self.bind(scope, sub.name, sub.span, "let",
                          results[i].type if i < len(results) else None)

    def sample(self, stmt: ast.Sample, scope: dict[str, _Binding]) -> None:
        self.expr(stmt.dist, scope)
        op = self.op(stmt.span, "sample")
        site = self.sites.get(stmt.span)
        facts = "" if site is None else self.draw(site)
        self.bind(scope, stmt.name, stmt.name_span, "draw", None if op is None else op.result.type,
                  facts)
        if stmt.annotation is not None and facts:
            self.add(stmt.annotation.span, _code(f"{stmt.name} ~ {site.family}") + facts)

    def expr(self, e: ast.Expr, scope: dict[str, _Binding]) -> None:
        """The symbols in an expression (no recursion along it: a chain of binary operators
        can be as long as the file)."""
        todo = [e]
        while todo:
            node = todo.pop()
            if isinstance(node, ast.Name):
                self.name(node, scope)
            elif isinstance(node, ast.For):
                self.loop(node, scope)
            elif isinstance(node, ast.Checkpoint):
                inner = dict(scope)
                self.block(node.body, inner)
                self.expr(node.result, inner)
            elif isinstance(node, ast.Argmin):
                self.argmin(node, scope)
            elif isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name)
                                                     and node.func.id in scope):
                self.call(node)
                todo.extend(node.args)
                todo.extend(k.value for k in node.kwargs)
            elif isinstance(node, ast.With):
                self.annotation(node)
                todo.append(node.value)
            else:
                if isinstance(node, ast.FieldAccess) and self.op(node.span, "getfield") is not None:
                    self.add(node.span, _code(f"{node.span.text}: {self.type_of(node, scope)}"))
                todo.extend(c for c in _children(node) if not isinstance(c, ast.Annotation))

    def name(self, e: ast.Name, scope: dict[str, _Binding]) -> None:
        if e.id in scope:
            self.add(e.span, scope[e.id].hover, scope[e.id].span)
        elif self.op(e.span, "dim") is not None:
            self.add(e.span, _code(f"dim {e.id}") + "\nthe size of a symbolic dimension")

    def loop(self, e: ast.For, scope: dict[str, _Binding]) -> None:
        for x in (e.start, e.stop, *(c.init for c in e.carries)):
            if x is not None:
                self.expr(x, scope)
        op = self.op(e.span, "for")
        args = [a.type for a in op.regions[0].args] if op is not None else []
        types = args + [None] * (1 + len(e.carries) - len(args))
        inner = dict(scope)
        self.bind(inner, e.var, _name_span(e.span, e.var), "loop variable", types[0])
        for c, t in zip(e.carries, types[1:]):
            self.bind(inner, c.name, _name_span(c.span, c.name), "carry", t)
        self.block(e.body, inner)
        self.expr(e.result, inner)

    def argmin(self, e: ast.Argmin, scope: dict[str, _Binding]) -> None:
        self.expr(e.init, scope)
        self.types([e.type])
        op = self.op(e.span, "argmin")
        word = "argmax" if e.maximize else "argmin"
        facts = self.inner_problem(e.span)
        result = f": {op.results[0].type}" if op is not None else ""
        hover = _code(f"{word} {e.var}{result}") + facts
        self.add(Span(e.span.source, e.span.line, e.span.col, e.span.line, e.span.col + len(word)),
                 hover)
        for a in (e.solver, e.hyper):
            if a is not None and facts:
                self.add(a.span, hover)
        inner = dict(scope)
        self.bind(inner, e.var, _name_span(e.span, e.var), f"{word} variable",
                  op.regions[0].args[0].type if op is not None else None)
        constrained = dict(inner)
        self.block(e.body, inner)
        self.expr(e.objective, inner)
        for c in e.constraints:
            self.expr(c, constrained)

    def call(self, e: ast.Call) -> None:
        """The callee of a call: a function, a struct, a builtin or a distribution."""
        ops = self.ops.get(e.span, [])
        if not ops:
            return
        op, span = ops[-1], e.func.span
        result = f"\n\nhere: `{op.results[0].type}`" if len(op.results) == 1 else ""
        if op.name == "call_fn" and self.typed.function(op.params.callee) is not None:
            callee = self.typed.function(op.params.callee)
            self.add(span, self.signature(callee) + result + self.inside(callee.name),
                     _name_span(callee.span, callee.name))
        elif op.name == "struct_new" and op.params.name in self.structs:
            sdef = self.structs[op.params.name]
            self.add(span, _code(f"struct {sdef.name}") + result + _defined(sdef.span),
                     _name_span(sdef.span, sdef.name))
        elif op.name == "dist":
            spec = DISTRIBUTIONS[op.params.family]
            self.add(span, _code(f"{spec.name}({', '.join(spec.params)})") + "\na distribution"
                     + result)
        elif isinstance(e.func, ast.Name) and e.func.id in BUILTINS:
            builtin = BUILTINS[e.func.id]
            if any(o.name == builtin.op for o in ops):
                self.add(span, _code(builtin.signature) + f"\n{builtin.doc}" + result
                         + self.backward(builtin.op, e.span))

    def annotation(self, e: ast.With) -> None:
        """`f(x) with rule`: the backward rule the non-smooth op got."""
        if isinstance(e.value, ast.Call) and isinstance(e.value.func, ast.Name):
            op = e.value.func.id
            rule = self.backward(BUILTINS[op].op if op in BUILTINS else op, e.value.span)
            if rule:
                self.add(e.annotation.span, _code(e.annotation.span.text) + rule)

    # ---- types and facts
    def op(self, span: Span, name: str) -> Op | None:
        """The op named `name` built from `span` in the current function."""
        return next((o for o in reversed(self.ops.get(span, ())) if o.name == name), None)

    def type_of(self, e: ast.Expr, scope: dict[str, _Binding]) -> Type | None:
        """The type of an expression's value: its binding's for a local name, else the type
        of the last op built from its span."""
        while isinstance(e, ast.With):
            e = e.value
        if isinstance(e, ast.Name) and e.id in scope:
            return scope[e.id].type
        ops = [o for o in self.ops.get(e.span, ()) if len(o.results) == 1]
        return ops[-1].result.type if ops else None

    def signature(self, fn: Function) -> str:
        params = ", ".join(f"{p.name}: {p.value.type}" for p in fn.params)
        return _code(f"fn {fn.name}({params}) -> {fn.result_type}") + _defined(fn.span)

    def draw(self, site: SiteChoice) -> str:
        """The estimator of a random choice, as `gradlang explain` shows it."""
        cvs = self.final.facts.control_variates
        found = sorted(set().union(*(v for (_, span), v in cvs.items() if span == site.span)))
        cost = REGISTRY[site.estimator.name].cost(site.estimator, site.size)
        lines = [f"**estimator**: {_label(site.estimator)}",
                 f"**why**: {site.why}",
                 f"**control variate**: {_control_variate(site, found)}",
                 f"**cost per sample**: {cost}",
                 f"**other choices**: {_overrides(site, found)}"]
        return "".join(f"\n\n{line}" for line in lines if not line.endswith(": -"))

    def inner_problem(self, span: Span) -> str:
        """The solver and hypergradient of an argmin, as `gradlang explain` shows them."""
        h = self.problems.get(span)
        if h is None:
            return ""
        return (f"\n\n**solver**: {h.solver}\n\n**hypergradient**: {h.method}\n\n"
                f"**why**: {h.why}")

    def backward(self, op: str, span: Span) -> str:
        """The backward rule of the non-smooth op `op` written at `span`, from explain's rows
        (by function and line)."""
        if self.final is None:
            return ""
        where = f"{self.fn.name}, line {span.line}"
        rules = dict.fromkeys(r[2] for r in _nonsmooth(self.final, [self.fn.name])
                              if r[0] == op and r[1] == where)
        return "".join(f"\n\n**backward rule**: {rule}" for rule in rules)

    def inside(self, fn: str) -> str:
        """The draws and non-smooth ops of a function and those it calls, with their
        estimators and backward rules."""
        if self.final is None or self.final.function(fn) is None:
            return ""
        reach = reachable(self.final, fn)
        lines = [f"- draw `{s.site}` ({s.function}, line {s.span.line}): {_label(s.estimator)}"
                 for s in self.final.facts.estimators if s.function in reach]
        lines += [f"- `{op}` ({where}): backward {rule}" for op, where, rule
                  in _nonsmooth(self.final, reach)]
        return "\n\n" + "\n".join(lines) if lines else ""

    def export(self, decl: ast.ExportDecl) -> None:
        export = next((e for e in self.typed.exports if e.name == decl.name), None)
        if export is None:
            return
        compiled = [e for e in self.final.exports if e.name == decl.name] if self.final else []
        shown = (explain(replace(self.final, exports=tuple(compiled))) if compiled
                 else f"export {decl.name}\n")
        self.add(decl.name_span, f"```text\n{shown}```")
        t = export.transform
        refs = [(export.fn_span, t.fn)] if t.fn else []
        refs += [(o.span, o.fn) for o in t.objectives]
        refs += [(t.compose.outer_span, t.compose.outer)] if t.compose is not None else []
        fns = []
        for span, name in refs:
            fn = self.typed.function(name)
            if fn is not None:
                fns.append(fn)
                self.add(span, self.signature(fn), _name_span(fn.span, fn.name))
        for name, span in zip(t.wrt, t.wrt_spans):
            params = [fn.param(name) for fn in fns if fn.param(name) is not None]
            if params:
                self.add(span, _code(f"param {name}: {params[0].value.type}"), params[0].span)


def _code(text: str) -> str:
    return f"```grad\n{text}\n```"


def _defined(span: Span) -> str:
    """The comment above a declaration (its documentation) and where it is."""
    lines, n = [], span.line - 1
    while n >= 1 and span.source.line(n).lstrip().startswith("#"):
        lines.insert(0, span.source.line(n).lstrip().lstrip("#").strip())
        n -= 1
    doc = f"\n{' '.join(lines)}" if lines else ""
    return f"{doc}\n\n{Path(span.source.path).name}, line {span.line}"


def _name_span(span: Span, name: str) -> Span:
    """Where a construct starting at `span` (`fn name`, `struct name`, `for name`, `argmin
    name`, a carry `name = ...`) writes `name` (unqualified) on its first line, else its first
    character."""
    name = name.rpartition(".")[2]
    found = re.compile(rf"\b{re.escape(name)}\b").search(span.source.line(span.line), span.col - 1)
    col = span.col if found is None else found.start() + 1
    return Span(span.source, span.line, col, span.line, col + (0 if found is None else len(name)))


@dataclass(frozen=True)
class _Units:
    """LSP's positions: 0-based lines, columns in the code units of the position encoding the
    server and the client agreed on (UTF-16 unless the client offers only others)."""

    encoding: str = "utf-16"

    def count(self, text: str) -> int:
        if self.encoding == "utf-8":
            return len(text.encode("utf-8"))
        if self.encoding == "utf-32":
            return len(text)
        return len(text.encode("utf-16-le")) // 2

    def position(self, source: SourceFile, line: int, col: int) -> types.Position:
        """The position of a 1-based line and column (past the line's end too)."""
        text = source.line(line)[:col - 1]
        return types.Position(line=max(line - 1, 0),
                              character=self.count(text) + max(0, col - 1 - len(text)))

    def range(self, span: Span) -> types.Range:
        return types.Range(start=self.position(span.source, span.line, span.col),
                           end=self.position(span.source, span.end_line, span.end_col))

    def column(self, text: str, character: int) -> int:
        """The 1-based column in `text` of a position's character offset."""
        units = 0
        for i, c in enumerate(text):
            if units >= character:
                return i + 1
            units += self.count(c)
        return len(text) + 1 + max(0, character - units)

    def location(self, span: Span, analysis: Analysis, uri: str) -> types.Location:
        """Where `span` is, `uri` when it is in the analysed document."""
        target = uri if span.source is analysis.source else uris.from_fs_path(span.source.path)
        return types.Location(uri=target, range=self.range(span))


_SEVERITY = {Severity.ERROR: types.DiagnosticSeverity.Error,
             Severity.WARNING: types.DiagnosticSeverity.Warning,
             Severity.NOTE: types.DiagnosticSeverity.Information}


def _diagnostic(d: Diagnostic, analysis: Analysis, uri: str, units: _Units) -> types.Diagnostic:
    """The LSP diagnostic; one in another file (an imported one) is shown at the document's
    start, naming and linking the place."""
    span, severity = d.span, _SEVERITY[d.severity]
    if span is not None and span.source is analysis.source:
        return types.Diagnostic(range=units.range(span), message=d.message, severity=severity,
                                source="gradlang")
    start = types.Range(start=types.Position(line=0, character=0),
                        end=types.Position(line=0, character=0))
    if span is None:
        return types.Diagnostic(range=start, message=d.message, severity=severity,
                                source="gradlang")
    related = types.DiagnosticRelatedInformation(location=units.location(span, analysis, uri),
                                                 message=d.message)
    return types.Diagnostic(range=start, message=f"{span!r}: {d.message}", severity=severity,
                            source="gradlang", related_information=[related])


def _analyze(text: str, uri: str) -> Analysis:
    """`analyze` of the document at `uri`; an internal compiler error (a bug) becomes a
    diagnostic, never an exception in the server."""
    path = Path(uris.to_fs_path(uri)) if uris.uri_scheme(uri) == "file" else None
    try:
        return analyze(text, path, uri)
    except Exception as exc:  # noqa: BLE001 - any bug: shown in the editor, the server goes on
        source = SourceFile(uri, text)
        message = (f"internal compiler error: {type(exc).__name__}: {exc}; this is a bug in "
                   f"gradlang, please report it with this file")
        return Analysis(source, (Diagnostic(Severity.ERROR, message, Span(source, 1, 1, 1, 1)),))


def _publish(ls: LanguageServer, uri: str, diagnostics: list[types.Diagnostic]) -> None:
    if hasattr(ls, "text_document_publish_diagnostics"):  # pygls 2
        ls.text_document_publish_diagnostics(
            types.PublishDiagnosticsParams(uri=uri, diagnostics=diagnostics))
    else:  # pygls 1.3
        ls.publish_diagnostics(uri, diagnostics)


def server() -> LanguageServer:
    """The language server with its features (start it with `start_io()`): diagnostics when a
    document is opened, changed or saved; hover; go to definition."""
    ls = LanguageServer("gradlang", __version__)
    analyses: dict[str, Analysis] = {}

    def units() -> _Units:
        return _Units(ls.server_capabilities.position_encoding or "utf-16")

    def refresh(uri: str) -> Analysis:
        analysis = _analyze(ls.workspace.get_text_document(uri).source, uri)
        analyses[uri] = analysis
        _publish(ls, uri, [_diagnostic(d, analysis, uri, units()) for d in analysis.diagnostics])
        return analysis

    def symbol(params: types.TextDocumentPositionParams) -> tuple[Analysis, Symbol] | None:
        uri = params.text_document.uri
        analysis = analyses.get(uri) or refresh(uri)
        line = params.position.line + 1
        col = units().column(analysis.source.line(line), params.position.character)
        found = analysis.at(line, col)
        return None if found is None else (analysis, found)

    @ls.feature(types.TEXT_DOCUMENT_DID_OPEN)
    def did_open(params: types.DidOpenTextDocumentParams) -> None:
        refresh(params.text_document.uri)

    @ls.feature(types.TEXT_DOCUMENT_DID_CHANGE)
    def did_change(params: types.DidChangeTextDocumentParams) -> None:
        refresh(params.text_document.uri)

    @ls.feature(types.TEXT_DOCUMENT_DID_SAVE)
    def did_save(params: types.DidSaveTextDocumentParams) -> None:
        refresh(params.text_document.uri)

    @ls.feature(types.TEXT_DOCUMENT_DID_CLOSE)
    def did_close(params: types.DidCloseTextDocumentParams) -> None:
        analyses.pop(params.text_document.uri, None)
        _publish(ls, params.text_document.uri, [])

    @ls.feature(types.TEXT_DOCUMENT_HOVER)
    def hover(params: types.HoverParams) -> types.Hover | None:
        found = symbol(params)
        if found is None:
            return None
        contents = types.MarkupContent(kind=types.MarkupKind.Markdown, value=found[1].hover)
        return types.Hover(contents=contents, range=units().range(found[1].span))

    @ls.feature(types.TEXT_DOCUMENT_DEFINITION)
    def definition(params: types.DefinitionParams) -> types.Location | None:
        found = symbol(params)
        if found is None or found[1].definition is None:
            return None
        return units().location(found[1].definition, found[0], params.text_document.uri)

    return ls


def serve() -> None:
    """Run the language server on stdin and stdout until the client asks it to exit."""
    server().start_io()
