"""Parse .grad text into an AST with spans; syntax errors become diagnostics.

The Lark LALR parser runs once per top-level declaration chunk, so that a syntax error in one
declaration does not hide the errors in the next ones. Parsing and building the AST take time
linear in the text and no Python recursion, however deep the nesting; declarations nested
deeper than the later, recursive stages take (see `limits`) are refused here.
"""

from __future__ import annotations

import math
import re
from dataclasses import fields, replace
from functools import cache

import lark
from lark import Token, v_args
from lark.visitors import Transformer_NonRecursive

from . import ast, parse_table
from .diagnostics import Diagnostics, SourceFile, Span, printable
from .limits import I64_MAX, MAX_DEPTH

_DECL_START = re.compile(r"^(use|struct|fn|extern|jax|export|pragma)\b")

_TOKEN_TEXT = {
    "NAME": "a name",
    "INT": "an integer",
    "FLOAT": "a number",
    "STRING": "a string",
    "$END": "end of input",
    "F32": "'f32'",
    "F64": "'f64'",
    "I32": "'i32'",
    "BOOL": "'bool'",
}


@cache
def _parser() -> lark.Lark:
    return parse_table.parser()


def _describe(term: str) -> str:
    if term in _TOKEN_TEXT:
        return _TOKEN_TEXT[term]
    try:
        pattern = _parser().get_terminal(term).pattern
    except KeyError:
        return term
    return f"'{pattern.value}'"


def _describe_expected(expected: set[str]) -> str:
    if {"NAME", "INT", "FLOAT"} <= expected:
        rest = sorted(_describe(t) for t in expected - _EXPR_START)
        return "an expression" + (" or " + ", ".join(rest) if 0 < len(rest) <= 3 else "")
    items = sorted(_describe(t) for t in expected)
    if len(items) > 6:
        items = items[:6] + ["..."]
    if len(items) == 2:
        return " or ".join(items)
    return "one of " + ", ".join(items) if len(items) > 1 else items[0]


_EXPR_START = {"NAME", "INT", "FLOAT", "STRING", "LPAR", "LSQB", "MINUS", "NOT", "IF", "FOR", "TRUE", "FALSE",
               "ARGMIN", "ARGMAX", "CHECKPOINT",
               "F32", "F64", "I32", "BOOL"}


def _chunks(source: SourceFile) -> list[tuple[int, str]]:
    """Split the text at lines that start a declaration; returns (first line number, text)."""
    lines = source.text.split("\n")
    starts = [i for i, line in enumerate(lines) if _DECL_START.match(line)]
    if not starts or starts[0] != 0:
        starts = [0] + starts
    bounds = starts + [len(lines)]
    return [(bounds[k] + 1, "\n".join(lines[bounds[k]:bounds[k + 1]])) for k in range(len(starts))]


def parse(source: SourceFile, diags: Diagnostics) -> ast.Program:
    """Parse a whole file; every syntax error is reported, one per declaration at most."""
    decls: list[ast.Decl] = []
    chunks = _chunks(source)
    for k, (first_line, chunk) in enumerate(chunks):
        try:
            tree = _parser().parse(chunk)
        except lark.exceptions.UnexpectedInput as exc:
            next_line = chunks[k + 1][0] if k + 1 < len(chunks) else None
            diags.error(*_syntax_error(exc, source, chunk, first_line - 1, next_line))
            continue
        for decl in _ToAst(source, diags, first_line - 1).transform(tree):
            check_depth(decl, diags)
            decls.append(decl)
    return ast.Program(source, tuple(decls))


def _describe_token(token: Token) -> str:
    text = str(token)
    if token.type == "NAME":
        return f"name '{text}'"
    if token.type == "INT":
        return f"integer {text}"
    if token.type == "FLOAT":
        return f"number {text}"
    return f"'{text}'"


def _end_of_text(source: SourceFile, text: str, offset: int) -> Span:
    """The position just after the last token of `text`, which starts after line `offset` of
    `source` (comments and blank lines skipped)."""
    lines = [re.sub(r"#.*", "", line).rstrip() for line in text.split("\n")]
    while len(lines) > 1 and not lines[-1]:
        lines.pop()
    line, col = offset + len(lines), len(lines[-1]) + 1
    return Span(source, line, col, line, col + 1)


def _syntax_error(exc: lark.exceptions.UnexpectedInput, source: SourceFile, text: str,
                  offset: int, next_line: int | None) -> tuple[str, Span]:
    """The message and span of a syntax error in `text`, one declaration of `source` that
    starts after its line `offset`; `next_line` is where the next declaration starts (None for
    the last one)."""
    if isinstance(exc, lark.exceptions.UnexpectedCharacters):
        line = exc.line + offset
        char = source.line(line)[exc.column - 1: exc.column] or "?"
        span = Span(source, line, exc.column, line, exc.column + 1)
        return f"unexpected character '{printable(char)}'", span
    assert isinstance(exc, (lark.exceptions.UnexpectedToken, lark.exceptions.UnexpectedEOF))
    # `accepts` (the terminals the parser can really shift here) is sharper than `expected`.
    terms = set(getattr(exc, "accepts", None) or exc.expected)
    expected = _describe_expected(terms)
    token = getattr(exc, "token", None)
    if token is None or token.type == "$END":
        span = _end_of_text(source, text, offset)
        where = "at the end of input" if next_line is None else \
            f"before the next declaration at line {next_line}"
        if "RBRACE" in terms:  # everything else is complete: a block or struct is still open
            return f"missing '}}' {where}", span
        if next_line is None:
            return f"unexpected end of input; expected {expected}", span
        return f"declaration is incomplete {where}; expected {expected}", span
    span = Span(source, token.line + offset, token.column, token.end_line + offset, token.end_column)
    paren = _continued_call(source, span.line) if token.type == "RBRACE" else None
    if paren is not None:
        return CONTINUED_CALL, paren
    return f"unexpected {_describe_token(token)}; expected {expected}", span


CONTINUED_CALL = ("this '(' calls the expression that ends on the line above (statements need no "
                  "separators); a call's '(' goes on the same line, and a line that starts with "
                  "'(' needs a ';' at the end of the line before")


def _continued_call(source: SourceFile, brace_line: int) -> Span | None:
    """The '(' that starts the line before an unexpected '}' (on `brace_line`) when the line
    above it does not end with ';': the body's last expression was read as a call of the
    previous one."""
    lines = [re.sub(r"#.*", "", text).rstrip() for text in source.lines[:brace_line - 1]]
    filled = [n for n, text in enumerate(lines, 1) if text.strip()]
    if len(filled) < 2:
        return None
    last, before = filled[-1], filled[-2]
    text = lines[last - 1]
    if not text.lstrip().startswith("(") or lines[before - 1].endswith((";", "{", ",", "(")):
        return None
    col = len(text) - len(text.lstrip()) + 1
    return Span(source, last, col, last, col + 1)


def _trailing_with(e: ast.Expr) -> tuple[ast.Expr, ast.Annotation | None]:
    """Take a `with` annotation off the rightmost operand of e, where the grammar put it."""
    path: list[ast.Expr] = []  # the operators from e down to the rightmost operand
    while isinstance(e, (ast.Binary, ast.Unary)):
        path.append(e)
        e = e.rhs if isinstance(e, ast.Binary) else e.operand
    if not isinstance(e, ast.With):
        return path[0] if path else e, None
    inner, annotation = e.value, e.annotation
    for op in reversed(path):
        inner = replace(op, rhs=inner) if isinstance(op, ast.Binary) else replace(op, operand=inner)
    return inner, annotation


_BLANK = re.compile(r"[ \t\f]*(#.*)?")
"""What the lexer skips within a line: blanks and a comment."""


def _int(tok: Token) -> int | None:
    """The value of an integer literal, or None when it does not fit in i64 (too many digits
    to convert cheaply, too)."""
    digits = str(tok).lstrip("0") or "0"
    if len(digits) > len(str(I64_MAX)) or int(digits) > I64_MAX:
        return None
    return int(digits)


def _describe_int(tok: Token) -> str:
    text = str(tok)
    return text if len(text) <= 24 else f"{text[:10]}...{text[-10:]} ({len(text)} digits)"


def _float(text: str) -> float | None:
    """The value of a number literal, or None when it is out of float64's range (it would
    round to infinity, or a nonzero literal to zero)."""
    value = float(text)
    mantissa = text.lower().partition("e")[0]
    if math.isinf(value) or (value == 0.0 and mantissa.strip("0.")):
        return None
    return value


class _ToAst(Transformer_NonRecursive):
    """Lark tree -> AST. Each rule method receives the node's meta for its span. The tree is
    one declaration chunk that starts after line `offset` of the source."""

    def __init__(self, source: SourceFile, diags: Diagnostics, offset: int):
        super().__init__(visit_tokens=False)
        self.source = source
        self.diags = diags
        self.offset = offset

    def _span(self, meta) -> Span:
        return Span(self.source, meta.line + self.offset, meta.column,
                    meta.end_line + self.offset, meta.end_column)

    def _tok_span(self, tok: Token) -> Span:
        return Span(self.source, tok.line + self.offset, tok.column, tok.end_line + self.offset,
                    tok.end_column)

    def _int_value(self, tok: Token) -> int:
        value = _int(tok)
        if value is None:
            self.diags.error(f"integer literal {_describe_int(tok)} does not fit in i64 (at most "
                             f"{I64_MAX})", self._tok_span(tok))
            return 0  # a program with errors is not built
        return value

    def start(self, items):
        return list(items)

    # ---- declarations
    @v_args(meta=True)
    def use_decl(self, meta, names):
        return ast.Use(self._span(meta), tuple(str(n) for n in names))

    @v_args(meta=True)
    def struct_decl(self, meta, items):
        name, *fields = items
        return ast.StructDecl(self._span(meta), str(name), tuple(f for f in fields if f is not None))

    @v_args(meta=True)
    def field(self, meta, items):
        return ast.Param(str(items[0]), items[1], self._span(meta))

    param = field

    def params(self, items):
        return tuple(p for p in items if p is not None)

    @v_args(meta=True)
    def fn_decl(self, meta, items):
        name, params, result, body = items
        return ast.FnDecl(self._span(meta), str(name), params, result, body, self._tok_span(name))

    @v_args(meta=True)
    def extern_decl(self, meta, items):
        name, params, result = items
        return ast.ExternDecl(self._span(meta), str(name), params, result)

    @v_args(meta=True)
    def jax_decl(self, meta, items):
        name, params, result = items
        return ast.JaxDecl(self._span(meta), str(name), params, result)

    @v_args(meta=True)
    def export_decl(self, meta, items):
        name, value = items
        return ast.ExportDecl(self._span(meta), str(name), value, self._tok_span(name))

    # ---- types
    def dtype(self, items):
        return str(items[0])

    @v_args(meta=True)
    def scalar_type(self, meta, items):
        return ast.ScalarTypeExpr(self._span(meta), items[0])

    @v_args(meta=True)
    def tensor_type(self, meta, items):
        return ast.TensorTypeExpr(self._span(meta), items[0], tuple(items[1:]))

    def dim(self, items):
        tok = items[0]
        return self._int_value(tok) if tok.type == "INT" else str(tok)

    @v_args(meta=True)
    def named_type(self, meta, items):
        return ast.NamedTypeExpr(self._span(meta), str(items[0]), tuple(items[1:]))

    def dim_binding(self, items):
        return (str(items[0]), items[1])

    @v_args(meta=True)
    def tuple_type(self, meta, items):
        return ast.TupleTypeExpr(self._span(meta), tuple(items))

    # ---- statements
    def block(self, items):
        return tuple(s for s in items if isinstance(s, ast.Stmt))

    @v_args(meta=True)
    def let_stmt(self, meta, items):
        return ast.Let(self._span(meta), items[0], items[1])

    @v_args(meta=True)
    def sample_stmt(self, meta, items):
        name, dist = items
        annotation = None
        if isinstance(dist, ast.With):  # `z ~ d with est(...)`: the draw's estimator
            dist, annotation = dist.value, dist.annotation
        return ast.Sample(self._span(meta), str(name), dist, annotation, self._tok_span(name))

    @v_args(meta=True)
    def with_expr(self, meta, items):
        value, annotation = items
        if isinstance(value, ast.Argmin) and value.hyper is None:  # its hypergradient method
            return replace(value, span=self._span(meta), hyper=annotation)
        return ast.With(self._span(meta), value, annotation)

    @v_args(meta=True)
    def report_stmt(self, meta, items):
        value, solution, report = items
        names = ast.PTuple(self._span(meta), (ast.PName(self._tok_span(solution), str(solution)),
                                              ast.PName(self._tok_span(report), str(report))))
        return ast.Let(self._span(meta), names, ast.Report(value.span, value))

    @v_args(meta=True)
    def annotation_body(self, meta, items):
        name, args = items
        pos, kws = [], []
        for a in args or ():
            (kws if isinstance(a, ast.Keyword) else pos).append(a)
        return ast.Annotation(str(name), tuple(pos), tuple(kws), self._span(meta))

    def annotation(self, items):
        return items[0]

    @v_args(meta=True)
    def pragma_decl(self, meta, items):
        return ast.Pragma(self._span(meta), str(items[0]), items[1])

    @v_args(meta=True)
    def return_stmt(self, meta, items):
        return ast.Return(self._span(meta), items[0])

    @v_args(meta=True)
    def pat_name(self, meta, items):
        return ast.PName(self._span(meta), str(items[0]))

    @v_args(meta=True)
    def pat_tuple(self, meta, items):
        return ast.PTuple(self._span(meta), tuple(items))

    # ---- expressions
    @v_args(meta=True)
    def if_expr(self, meta, items):
        return ast.If(self._span(meta), *items)

    def _binary(op):  # noqa: N805 - builds methods
        @v_args(meta=True)
        def rule(self, meta, items):
            return ast.Binary(self._span(meta), op, items[0], items[1])

        return rule

    or_ = _binary("or")
    and_ = _binary("and")
    eq = _binary("eq")
    ne = _binary("ne")
    lt = _binary("lt")
    le = _binary("le")
    gt = _binary("gt")
    ge = _binary("ge")
    add = _binary("add")
    sub = _binary("sub")
    mul = _binary("mul")
    div = _binary("div")
    matmul = _binary("matmul")
    pow = _binary("pow")

    @v_args(meta=True)
    def not_(self, meta, items):
        return ast.Unary(self._span(meta), "not", items[0])

    @v_args(meta=True)
    def neg(self, meta, items):
        return ast.Unary(self._span(meta), "neg", items[0])

    @v_args(meta=True)
    def call(self, meta, items):
        func, args = items
        paren = self._next_token_start(func.span)
        if paren is not None and paren[0] > func.span.end_line:
            # statements need no separators, so `let a = f(x)` then a line `(b, c)` would
            # silently be the call f(x)(b, c): refuse it where it happens
            self.diags.error(CONTINUED_CALL, Span(self.source, *paren, paren[0], paren[1] + 1))
        return self._call(meta, func, args)

    def _next_token_start(self, span: Span) -> tuple[int, int] | None:
        """(line, col) of the first character after `span` that is not blank or a comment."""
        lines = self.source.lines
        line, col = span.end_line, span.end_col
        while line <= len(lines):
            end = _BLANK.match(lines[line - 1], col - 1).end()
            if end < len(lines[line - 1]):
                return line, end + 1
            line, col = line + 1, 1
        return None

    def _call(self, meta, func, args):
        pos, kws = [], []
        for a in args or ():
            (kws if isinstance(a, ast.Keyword) else pos).append(a)
        return ast.Call(self._span(meta), func, tuple(pos), tuple(kws))

    def args(self, items):
        return [a for a in items if a is not None]

    @v_args(meta=True)
    def kwarg(self, meta, items):
        return ast.Keyword(str(items[0]), items[1], self._span(meta))

    @v_args(meta=True)
    def field_access(self, meta, items):
        return ast.FieldAccess(self._span(meta), items[0], str(items[1]))

    @v_args(meta=True)
    def index(self, meta, items):
        return ast.Index(self._span(meta), items[0], tuple(items[1]))

    def subscripts(self, items):
        return items

    @v_args(meta=True)
    def slice(self, meta, items):
        return ast.Slice(self._span(meta), *items)

    @v_args(meta=True)
    def name(self, meta, items):
        return ast.Name(self._span(meta), str(items[0]))

    @v_args(meta=True)
    def int_lit(self, meta, items):
        return ast.IntLit(self._span(meta), self._int_value(items[0]))

    @v_args(meta=True)
    def float_lit(self, meta, items):
        value = _float(str(items[0]))
        if value is None:
            self.diags.error(f"number {items[0]} is out of range: it would round to "
                             f"{'zero' if float(items[0]) == 0.0 else 'infinity'} (float64 "
                             f"numbers are from about 4.9e-324 to 1.8e+308)", self._span(meta))
            return ast.FloatLit(self._span(meta), 0.0)  # a program with errors is not built
        return ast.FloatLit(self._span(meta), value)

    @v_args(meta=True)
    def str_lit(self, meta, items):
        return ast.StrLit(self._span(meta), str(items[0])[1:-1])

    @v_args(meta=True)
    def true_lit(self, meta, items):
        return ast.BoolLit(self._span(meta), True)

    @v_args(meta=True)
    def false_lit(self, meta, items):
        return ast.BoolLit(self._span(meta), False)

    @v_args(meta=True)
    def tuple_lit(self, meta, items):
        return ast.TupleLit(self._span(meta), tuple(i for i in items if i is not None))

    @v_args(meta=True)
    def list_lit(self, meta, items):
        return ast.ListLit(self._span(meta), tuple(i for i in items if i is not None))

    @v_args(meta=True)
    def cast(self, meta, items):
        return ast.Cast(self._span(meta), items[0], items[1])

    @v_args(meta=True)
    def for_expr(self, meta, items):
        var, lo, hi, *rest = items
        body = rest[-1]
        carries = tuple(c for c in rest[:-1] if c is not None)
        start, stop = (None, lo) if hi is None else (lo, hi)
        return ast.For(self._span(meta), str(var), start, stop, carries, body[0], body[1])

    @v_args(meta=True)
    def checkpoint_expr(self, meta, items):
        (body,) = items
        return ast.Checkpoint(self._span(meta), body[0], body[1])

    @v_args(meta=True)
    def argmin_expr(self, meta, items):
        kind, var, type_, init, body, solver, constraints = items
        constraints, hyper = list(constraints or ()), None
        if constraints:  # `subject to c <= x + 1 with method(...)`: the annotation is the problem's
            constraints[-1], hyper = _trailing_with(constraints[-1])
        as_le = tuple(replace(c, op="sub") if c.op == "le" else
                      replace(c, op="sub", lhs=c.rhs, rhs=c.lhs) for c in constraints)
        return ast.Argmin(self._span(meta), str(kind) == "argmax", str(var), type_, init, body[0],
                          body[1], solver, as_le, hyper)

    def subject_to(self, items):
        to, *constraints = items
        if str(to) != "to":
            self.diags.error(f"unexpected name '{to}'; expected 'to' (subject to c <= 0)",
                             self._tok_span(to))
        return tuple(constraints)

    constraint_le = _binary("le")
    constraint_ge = _binary("ge")

    @v_args(meta=True)
    def argmax_call(self, meta, items):  # the builtin argmax(x), not an inner argmax problem
        return self._call(meta, ast.Name(self._tok_span(items[0]), "argmax"), items[1])

    @v_args(meta=True)
    def carry(self, meta, items):
        return ast.Carry(str(items[0]), items[1], self._span(meta))

    def body(self, items):
        *stmts, result = items
        return tuple(s for s in stmts if isinstance(s, ast.Stmt)), result


_LEVELS = ((ast.Expr, "expression"), (ast.TypeExpr, "type"), (ast.Pattern, "pattern"))
"""The nodes that are a level of nesting, and what a diagnostic calls them."""
_NODES = (ast.Expr, ast.TypeExpr, ast.Pattern, ast.Stmt, ast.Decl, ast.Keyword, ast.Annotation,
          ast.Carry, ast.Param)


@cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


def _children(node: object) -> list[object]:
    """The AST nodes directly inside `node` (in fields and tuples of them)."""
    out = []
    for name in _field_names(type(node)):
        value = getattr(node, name)
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, _NODES):
                out.append(item)
    return out


def _kind(node: object) -> str | None:
    return next((name for cls, name in _LEVELS if isinstance(node, cls)), None)


def nesting(decl: ast.Decl) -> dict[int, int]:
    """The nesting depth of every node under `decl` (by id), computed without recursion: the
    most levels (expressions, types, patterns) on a path from the node down. The left operand
    of a binary operator is not a level below it: `a + b + c` is as deep as its deepest
    operand plus one, as the builder evaluates such chains in a loop."""
    depth: dict[int, int] = {}
    stack: list[tuple[object, bool]] = [(decl, False)]
    while stack:
        node, ready = stack.pop()
        if not ready:
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node) if id(child) not in depth)
            continue
        own = 1 if _kind(node) else 0
        if isinstance(node, ast.Binary):
            depth[id(node)] = max(depth[id(node.lhs)], own + depth[id(node.rhs)])
        else:
            depth[id(node)] = own + max((depth[id(c)] for c in _children(node)), default=0)
    return depth


def check_depth(decl: ast.Decl, diags: Diagnostics) -> None:
    """Report each outermost expression, type or pattern of `decl` nested more than MAX_DEPTH
    levels deep, at the node where the excess starts."""
    depth = nesting(decl)
    todo: list[object] = [decl]
    while todo:
        node = todo.pop()
        kind = _kind(node)
        through = [c for c in _children(node) if depth[id(c)] > MAX_DEPTH]
        if isinstance(node, ast.Binary) and depth[id(node.lhs)] == depth[id(node)]:
            through = [node.lhs]  # the excess is in the chain's left operand, not a level here
        elif kind is not None:
            diags.error(f"{kind} nested too deeply ({depth[id(node)]} levels; the limit is "
                        f"{MAX_DEPTH})", node.span)  # type: ignore[attr-defined]
            continue
        todo.extend(through)
