"""Reads the textual IR that `gradlang.printer` writes back into a `Module`, so that a test can
start at any pass from hand-written IR: `print_module(parse_module(text)) == text` for every
printed module.

A hand-written recursive descent over the text, one token kind at a time (linear in its length).
Op params are read by their dataclass's field types (`ops.OPS`), literals with
`ast.literal_eval` only. Every parsed node gets a span into the IR text, so that diagnostics of a
pass run on parsed IR point into it. Not printed, hence not parsed: the facts (except the
gradflow notes `# grad: ...`), a unit's path and the module's name (an argument).
"""

from __future__ import annotations

import ast
import re
import typing
from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import fields, replace
from functools import cache
from types import NoneType, UnionType

from .diagnostics import SourceFile, Span
from .ir import (Combination, Composition, Export, Facts, Function, Module, Objective, Op, Param,
                 Region, StructDef, Transform, Unit, Value)
from .ops import OPS, Annotation, CallParams, CalleeParams, ConstParams, IndexItem, NameParams
from .printer import unit_of
from .types import (ERROR, KEY, SOLVER_REPORT, TREE, UNKNOWN, DistType, DType, ListType, NamedType,
                    StructType, TensorType, TupleType, Type, substitute_dims)

_INT = re.compile(r"-?\d+")
_FLOAT = re.compile(r"-?(\d+\.\d*|\.\d+|\d+)([eE][-+]?\d+)?|-?inf|nan")
_NAME = re.compile(r"[A-Za-z_][\w.]*")
_NAMED = re.compile(r"[A-Za-z_][\w.]*=")
"""An option's name and its `=` (an annotation's first option may be unnamed)."""
_VALUE = re.compile(r"%([^\s,():{}\[\]]+)")
_SYMBOL = re.compile(r"[\w.@]+")
_OPNAME = re.compile(r"[a-z_]+")
_UNIT = re.compile(r'unit "([\w.]*)"')
_IN_UNIT = re.compile(r' in "([\w.]*)"')
_BLANK = re.compile(r"[ \t]*(\n|\Z)")
_REGION = re.compile(r" *\^\(")
_DTYPES = {d.value: d for d in DType}
_KINDS = ("grad", "value_and_grad", "descend", "minimize")
_SCOPES = ("expect", "logmeanexp")


class IRSyntaxError(ValueError):
    """Malformed IR text: `path:line:col: message`."""

    def __init__(self, message: str, path: str, line: int, col: int):
        super().__init__(f"{path}:{line}:{col}: {message}")
        self.line, self.col = line, col


def parse_module(text: str, path: str = "<ir>", name: str = "module") -> Module:
    """The module `print_module` printed as `text` (`path` names it in errors and spans)."""
    return _Parser(text, path).module(name)


def parse_function(text: str, path: str = "<ir>",
                   structs: Mapping[str, StructDef] | None = None) -> Function:
    """The one function `print_function` printed as `text`; struct types name `structs`."""
    p = _Parser(text, path)
    p.defs = dict(structs or {})
    p.blank_lines()
    fn = p.function()
    p.blank_lines()
    if not p.at_end():
        p.fail("expected the end of the text after the function")
    return fn


class _Parser:
    def __init__(self, text: str, path: str):
        self.source = SourceFile(path, text)
        self.text = self.source.text
        self.pos = 0
        self.starts = [0] + [m.end() for m in re.finditer("\n", self.text)]
        self.struct_lines: dict[str, tuple[str, int, int]] = {}
        """Struct name -> (unit, position of its fields, of its name), parsed when named."""
        self.defs: dict[str, StructDef] = {}
        self.resolving: set[str] = set()
        self.notes: dict[Value, str] = {}
        self.names: dict[str, Value] = {}

    # ---- positions and tokens

    def where(self, pos: int) -> tuple[int, int]:
        line = bisect_right(self.starts, pos)
        return line, pos - self.starts[line - 1] + 1

    def span(self, start: int, end: int | None = None) -> Span:
        (line, col), (end_line, end_col) = self.where(start), self.where(
            self.pos if end is None else end)
        return Span(self.source, line, col, end_line, end_col)

    def fail(self, message: str, pos: int | None = None) -> typing.NoReturn:
        line, col = self.where(self.pos if pos is None else pos)
        rest = self.text[self.pos:self.pos + 20].split("\n", 1)[0]
        found = repr(rest) if rest else "the end of the text" if self.at_end() else "the line's end"
        raise IRSyntaxError(message + (f", found {found}" if pos is None else ""),
                            self.source.path, line, col)

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def peek(self, s: str) -> bool:
        return self.text.startswith(s, self.pos)

    def accept(self, s: str) -> bool:
        if self.peek(s):
            self.pos += len(s)
            return True
        return False

    def expect(self, s: str) -> None:
        if not self.accept(s):
            self.fail(f"expected {s!r}")

    def match(self, pattern: re.Pattern[str], what: str) -> re.Match[str]:
        m = pattern.match(self.text, self.pos)
        if m is None:
            self.fail(f"expected {what}")
        self.pos = m.end()
        return m

    def spaces(self) -> None:
        while self.peek(" "):
            self.pos += 1

    def end_line(self) -> None:
        self.spaces()
        if not self.at_end():
            self.expect("\n")

    def blank_lines(self) -> None:
        while not self.at_end():
            m = _BLANK.match(self.text, self.pos)
            if m is None:
                return
            self.pos = m.end()

    def extent(self, stops: str) -> tuple[int, int]:
        """The text up to the first of `stops` outside brackets and quotes."""
        start, depth, quote = self.pos, 0, ""
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if quote:
                quote = "" if c == quote else quote
            elif c in "'\"":
                quote = c
            elif c in "([{":
                depth += 1
            elif c in ")]}" and depth:
                depth -= 1
            elif c == "\n" or (c in stops and not depth):
                break
            self.pos += 1
        if self.pos == start:
            self.fail("expected a value")
        return start, self.pos

    def symbol(self) -> str:
        """A function name after `@`: `f`, `std.nn.dense`, `f@expect4`, `f@compose(g)@e` (a
        parenthesis starts the operands when a value or `)` follows it)."""
        self.expect("@")
        start = self.pos
        while True:
            self.match(_SYMBOL, "a function name")
            if not self.peek("(") or self.text[self.pos + 1:self.pos + 2] in ("%", ")"):
                return self.text[start:self.pos]
            self.pos += 1
            self.extent(")")
            self.expect(")")

    # ---- module

    def module(self, name: str) -> Module:
        units: list[Unit] = []
        functions: list[Function] = []
        exports: list[Export] = []
        struct_order: list[str] = []
        self.blank_lines()
        while not self.at_end():
            if self.peek("unit "):
                units.append(self.unit())
            elif self.peek("struct "):
                struct_order.append(self.struct_line())
            elif self.peek("func "):
                functions.append(self.function())
            elif self.peek("export "):
                exports.append(self.export())
            else:
                self.fail("expected 'unit', 'struct', 'func' or 'export'")
            self.blank_lines()
        structs = tuple(self.struct_def(s) for s in struct_order)
        named = {u.name for u in units}
        implied = [unit_of(x) for x in ["", *struct_order, *(f.name for f in functions)]]
        implied += [f.unit for f in functions]
        units += [Unit(u, "") for u in dict.fromkeys(implied) if u not in named]
        units.sort(key=lambda u: u.name != "")
        return Module(name, tuple(units), structs, tuple(functions), tuple(exports),
                      Facts(gradflow_notes=self.notes))

    def unit(self) -> Unit:
        name = self.match(_UNIT, 'unit "NAME"').group(1)
        imports: list[tuple[str, str]] = []
        if self.accept(" imports("):
            while not self.accept(")"):
                if imports:
                    self.expect(", ")
                alias = self.match(_NAME, "an import alias").group()
                self.expect("=")
                imports.append((alias, self.match(_NAME, "a unit name").group()))
        pragmas: dict[str, Annotation] = {}
        for key in ("estimator", "backward"):
            if self.accept(f" {key}="):
                pragmas[key] = self.annotation()
        self.end_line()
        return Unit(name, "", tuple(imports), pragmas.get("estimator"), pragmas.get("backward"))

    def struct_line(self) -> str:
        """Records `struct NAME { fields }`; its fields are parsed when a type names it."""
        self.expect("struct ")
        at = self.pos
        name = self.match(_NAME, "a struct name").group()
        if name in self.struct_lines:
            self.fail(f"struct {name} is defined twice", at)
        self.expect(" {")
        self.struct_lines[name] = (unit_of(name), self.pos, at)
        self.extent("}")
        self.expect("}")
        self.end_line()
        return name

    def struct_def(self, name: str) -> StructDef:
        if name in self.defs:
            return self.defs[name]
        unit, start, at = self.struct_lines[name]
        if name in self.resolving:
            self.fail(f"struct {name} contains itself", at)
        self.resolving.add(name)
        saved, self.pos = self.pos, start
        found: list[tuple[str, Type]] = []
        self.spaces()
        while not self.accept("}"):
            if found:
                self.expect(", ")
            field = self.match(_NAME, "a field name").group()
            self.expect(": ")
            found.append((field, self.type()))
            self.spaces()
        self.defs[name] = StructDef(name, unit, tuple(found), self.span(at))
        self.pos = saved
        return self.defs[name]

    # ---- types

    def type(self) -> Type:
        start = self.pos
        if self.accept("?"):
            if not _NAME.match(self.text, self.pos):
                return UNKNOWN
            return NamedType(self.match(_NAME, "a struct name").group(), self.bindings())
        if self.accept("("):
            return TupleType(self.types_until(")"))
        if self.accept("["):
            return ListType(self.types_until("]"))
        if self.accept("<error>"):
            return ERROR
        name = self.match(_NAME, "a type").group()
        if name in _DTYPES:
            return TensorType(_DTYPES[name], self.dims()[0] if self.accept("[") else ())
        if name == "key" and not self.peek("["):
            return KEY
        if self.accept("["):
            if self.peek_dist():
                return self.dist_type(name)
            self.pos -= 1
            return self.struct_type(name, self.bindings(), start)
        if self.peek(" -> "):
            return self.dist_type(name, opened=False)
        return self.struct_type(name, (), start)

    def types_until(self, close: str) -> tuple[Type, ...]:
        found: list[Type] = []
        while not self.accept(close):
            if found:
                self.expect(", ")
            found.append(self.type())
        return tuple(found)

    def peek_dist(self) -> bool:
        """After `Name[`: a distribution's dims (followed by ` -> `), not struct bindings."""
        saved = self.pos
        self.extent("]")
        dist = self.accept("] -> ")
        self.pos = saved
        return dist

    def dims(self) -> tuple[tuple[int | str, ...], str]:
        """`B, 3]` -> the dims and the character after them (`]`, or `;` before event dims)."""
        found: list[int | str] = []
        while True:
            start, stop = self.extent(",;]")
            text = self.text[start:stop]
            found.append(int(text) if _INT.fullmatch(text) else text)
            if not self.accept(", "):
                end = self.text[self.pos:self.pos + 1]
                if end not in ("]", ";"):
                    self.fail("expected ']' or ', ' after a dimension")
                self.pos += 1
                return tuple(found), end

    def bindings(self) -> tuple[tuple[str, int | str], ...]:
        if not self.accept("["):
            return ()
        found = []
        while not self.accept("]"):
            if found:
                self.expect(", ")
            key = self.match(_NAME, "a dimension name").group()
            self.expect("=")
            start, stop = self.extent(",]")
            text = self.text[start:stop]
            found.append((key, int(text) if _INT.fullmatch(text) else text))
        return tuple(found)

    def dist_type(self, family: str, opened: bool = True) -> DistType:
        batch: tuple[int | str, ...] = ()
        event: tuple[int | str, ...] | None = None
        if opened:
            if self.accept("; "):
                event = self.dims()[0]
            else:
                batch, end = self.dims()
                if end == ";":
                    self.expect(" ")
                    event = self.dims()[0]
        self.expect(" -> ")
        at = self.pos
        value = self.type()
        if not isinstance(value, TensorType):
            self.fail("a distribution's draws must be a tensor type", at)
        return DistType(family, batch, value,
                        value.shape[len(batch):] if event is None else event)

    def struct_type(self, name: str, bindings: tuple, at: int) -> Type:
        if name not in self.struct_lines and name not in self.defs:
            if name == SOLVER_REPORT.name and not bindings:
                return SOLVER_REPORT
            if name == str(TREE) and not bindings:
                return TREE
            self.fail(f"unknown type {name!r} (no struct defines it)", at)
        sdef = self.struct_def(name) if name not in self.defs else self.defs[name]
        st = StructType(name, sdef.fields)
        return substitute_dims(st, dict(bindings)) if bindings else st

    # ---- functions, regions, ops

    def define(self, name: str, type: Type, at: int) -> Value:
        if name in self.names:
            self.fail(f"%{name} is defined twice", at)
        base, _, k = name.rpartition(".")
        hint = "" if name.isdigit() else base if k.isdigit() and base in self.names else name
        v = self.names[name] = Value(type, hint)
        return v

    def use(self) -> Value:
        at = self.pos
        name = self.match(_VALUE, "a value (%name)").group(1)
        if name not in self.names:
            self.fail(f"%{name} is not defined before this use", at)
        return self.names[name]

    def values(self) -> tuple[Value, ...]:
        found = [self.use()]
        while self.accept(", "):
            found.append(self.use())
        return tuple(found)

    def typed_args(self, close: str) -> list[tuple[str, Value, int]]:
        found = []
        while not self.accept(close):
            if found:
                self.expect(", ")
            at = self.pos
            name = self.match(_VALUE, "a parameter (%name)").group(1)
            self.expect(": ")
            found.append((name, self.define(name, self.type(), at), at))
        return found

    def function(self) -> Function:
        start = self.pos
        self.names = {}
        self.expect("func ")
        name = self.symbol()
        self.expect("(")
        params = tuple(Param(v.hint or n, v, self.span(at, at + len(n) + 1))
                       for n, v, at in self.typed_args(")"))
        self.expect(" -> ")
        at = self.pos
        result = self.type()
        result_span = self.span(at)
        unit = self.match(_IN_UNIT, 'in "UNIT"').group(1) if self.peek(" in ") else unit_of(name)
        ops, results = self.block("return")
        return Function(name, unit, params, result, Region((), ops, results),
                        self.span(start, start + 5 + len(name)), result_span)

    def ops(self, closer: str) -> tuple[Op, ...]:
        """Op lines up to the line starting with `closer` (consumed with its space)."""
        found = []
        while True:
            self.spaces()
            if self.accept(closer):
                self.accept(" ")
                return tuple(found)
            if self.at_end():
                self.fail(f"expected {closer!r} before the end of the text")
            found.append(self.op())

    def region(self) -> Region:
        self.spaces()
        self.expect("^(")
        args = tuple(v for _, v, _ in self.typed_args(")"))
        return Region(args, *self.block("yield"))

    def block(self, closer: str) -> tuple[tuple[Op, ...], tuple[Value, ...]]:
        """` {`, op lines, the `closer` line (`return` / `yield`) with its values, `}`."""
        self.expect(" {")
        self.end_line()
        ops = self.ops(closer)
        results = self.values() if self.peek("%") else ()
        self.end_line()
        self.spaces()
        self.expect("}")
        self.end_line()
        return ops, results

    def op(self) -> Op:
        start = self.pos
        names: list[tuple[str, int]] = []
        while self.peek("%"):
            names.append((self.match(_VALUE, "a result (%name)").group(1), self.pos))
            if not self.accept(", "):
                break
        self.spaces()
        self.expect("= ")
        at = self.pos
        name = self.match(_OPNAME, "an op name").group()
        if name not in OPS:
            self.fail(f"unknown op {name!r}", at)
        operands, params = self.head(name)
        self.expect(" : ")
        types = self.result_types()
        if len(types) != len(names):
            self.fail(f"{len(names)} results but {len(types)} types", start)
        results = tuple(self.define(n, t, p - len(n) - 1) for (n, p), t in zip(names, types))
        self.op_notes(results)
        span = self.span(start)
        self.end_line()
        regions = []
        while _REGION.match(self.text, self.pos):
            regions.append(self.region())
        return Op(name, operands, results, params, tuple(regions), span)

    def result_types(self) -> list[Type]:
        found: list[Type] = []
        while not (self.at_end() or self.peek("\n") or self.peek("  #")):
            if found:
                self.expect(", ")
            found.append(self.type())
        return found

    def op_notes(self, results: tuple[Value, ...]) -> None:
        """`  # grad: w` notes: one per result in order, the last one for the rest."""
        found = []
        while self.accept("  # "):
            start, _ = self.extent("")
            end = self.text.find("  # ", start, self.pos)
            if end != -1:
                self.pos = end
            found.append(self.text[start:self.pos])
        if found:
            for i, r in enumerate(results):
                self.notes[r] = found[min(i, len(found) - 1)]

    def head(self, name: str) -> tuple[tuple[Value, ...], object]:
        """What follows the op name: its operands and params, in the op kind's form."""
        cls = OPS[name].params
        if cls is ConstParams:
            self.expect(" ")
            start, end = self.extent(" ")
            text = self.text[start:end]
            if text in ("True", "False"):
                return (), ConstParams(text == "True", DType.BOOL)
            if _INT.fullmatch(text):
                return (), ConstParams(int(text), DType.I32)
            if _FLOAT.fullmatch(text):
                return (), ConstParams(float(text), DType.F32)
            self.fail("expected a literal (True, False, an integer or a float)", start)
        if cls in (CalleeParams, CallParams):
            self.expect(" ")
            callee = self.symbol()
            self.expect("(")
            operands = self.values() if self.peek("%") else ()
            self.expect(")")
            if cls is CalleeParams:
                return operands, CalleeParams(callee)
            kwnames = self.literal(self.extent(" ")) if self.accept(" kw=") else []
            rule = self.annotation() if self.accept(" with ") else None
            return operands, CallParams(callee, tuple(kwnames), rule)
        if cls is NameParams:
            self.expect(" ")
            start, end = self.extent(" ")
            return self.operands(), NameParams(self.text[start:end])
        operands = self.operands()
        if self.accept(" {"):
            self.pos -= 1
            return operands, self.params(cls)
        return operands, self.build(cls, {}, self.pos)

    def operands(self) -> tuple[Value, ...]:
        """` %a, %b` after an op's name, or nothing."""
        if not self.peek(" %"):
            return ()
        self.pos += 1
        return self.values()

    # ---- params

    def params(self, cls: type) -> object:
        start = self.pos
        self.expect("{")
        hints = _hints(cls)
        given: dict[str, object] = {}
        while not self.accept("}"):
            if given:
                self.expect(", ")
            at = self.pos
            key = self.match(_NAME, "a param name").group()
            if key not in hints:
                self.fail(f"{cls.__name__} has no param {key!r}", at)
            self.expect("=")
            given[key] = self.param_value(hints[key], given)
        return self.build(cls, given, start)

    def build(self, cls: type, given: dict[str, object], at: int) -> object:
        try:
            return cls(**given)
        except TypeError as e:
            self.fail(f"bad params for {cls.__name__}: {e}", at)

    def param_value(self, hint: object, given: dict[str, object]) -> object:
        options = typing.get_args(hint) if isinstance(hint, UnionType) else (hint,)
        if self.peek("None") and NoneType in options:
            self.pos += 4
            return None
        options = tuple(o for o in options if o is not NoneType)
        if Annotation in options:
            return self.annotation()
        if Type in options:
            return self.type()
        if options == (object,):  # STParams.params: the params of the op it wraps
            op = given.get("op")
            if op not in OPS:
                self.fail("expected the op's name before its params")
            return self.params(OPS[op].params) if self.peek("{") else OPS[op].params()
        if str in options and self.peek('"'):  # a string that is not a plain name
            end = self.text.find('"', self.pos + 1)
            if end < 0:
                self.fail("unterminated string")
            text, self.pos = self.text[self.pos + 1:end], end + 1
            return text
        start, end = self.extent(",}")
        text = self.text[start:end]
        if DType in options and text in _DTYPES:
            return _DTYPES[text]
        if int in options and _INT.fullmatch(text):  # before a tuple: `stride=1` or `(1, 2)`
            return int(text)
        if str in options and not text.startswith(("(", "[")):  # a name, or a tuple
            return text
        if any(typing.get_origin(o) is tuple for o in options):
            if typing.get_args(next(o for o in options if typing.get_origin(o) is tuple))[0] \
                    is IndexItem:
                return self.index_items(start, end)
            return tuple(self.literal((start, end)))
        if bool in options and text in ("True", "False"):
            return text == "True"
        if int in options and _INT.fullmatch(text):
            return int(text)
        if float in options and _FLOAT.fullmatch(text):
            return float(text)
        if str in options:
            return text
        self.fail(f"expected a value of type {hint}", start)

    def literal(self, extent: tuple[int, int]) -> list | tuple:
        """A printed tuple or list of Python literals."""
        start, end = extent
        try:
            value = ast.literal_eval(self.text[start:end])
        except (ValueError, SyntaxError):
            value = None
        if not isinstance(value, (tuple, list)):
            self.fail("expected a tuple or list literal", start)
        return value

    def index_items(self, start: int, end: int) -> tuple[IndexItem, ...]:
        text = self.text[start:end]
        if not (text.startswith("[") and text.endswith("]")):
            self.fail("expected subscripts [...]", start)
        items = []
        for part in filter(None, text[1:-1].split(", ")):
            if part == "?":
                items.append(IndexItem("dynamic"))
            elif ":" in part:
                bounds = [None if b == "" else int(b) for b in part.split(":")]
                items.append(IndexItem("slice", 0, *bounds))
            elif _INT.fullmatch(part):
                items.append(IndexItem("int", int(part)))
            else:
                self.fail(f"bad subscript {part!r}", start)
        return tuple(items)

    def annotation(self) -> Annotation:
        name = self.match(_NAME, "a name").group()
        options: list[tuple[str | None, bool | int | float | str]] = []
        if self.accept("("):
            while not self.accept(")"):
                if options:
                    self.expect(", ")
                key = None
                if options or _NAMED.match(self.text, self.pos):
                    key = self.match(_NAME, "an option name").group()
                    self.expect("=")
                options.append((key, _option(self.text[slice(*self.extent(",)"))])))
        return Annotation(name, tuple(options))

    # ---- exports

    def export(self) -> Export:
        start = self.pos
        self.expect("export ")
        name = self.symbol()
        self.expect(" = ")
        fn_at = self.pos
        kind = next((k for k in _KINDS if self.peek(k + "(")), "fn")
        if self.accept("descend(minimize("):  # descend over minimize: its step size after it
            self.pos -= len("minimize(")
            transform = replace(self.call("minimize"), descend=True)
            if self.accept(", lr="):
                transform = replace(transform, lr=float(self.text[slice(*self.extent(")"))]))
            self.expect(")")
        elif kind == "fn":
            fn, samples, scope, compose = self.target()
            transform = Transform("fn", fn, samples=samples, scope=scope, compose=compose)
        else:
            transform = self.call(kind)
        end = self.pos
        self.end_line()
        return Export(name, transform, self.span(start, end), self.span(fn_at, end))

    def call(self, kind: str) -> Transform:
        self.expect(kind + "(")
        objectives: tuple[Objective, ...] = ()
        fn, samples, scope, compose = "", 0, "expect", None
        if kind == "minimize":
            self.expect("[")
            found = []
            while not self.accept("]"):
                if found:
                    self.expect(", ")
                at = self.pos
                o = self.objective()
                by = self.annotation() if self.accept(" with ") else None
                own = None
                if self.accept(" {wrt=["):
                    own = []
                    while not self.accept("]}"):
                        if own:
                            self.expect(", ")
                        own.append(self.match(_NAME, "a parameter name").group())
                    own = tuple(own)
                found.append(Objective(o[0], self.span(at), o[1], o[2], by, own))
            objectives = tuple(found)
        else:
            fn, samples, scope, compose = self.target()
        self.expect(", wrt=[")
        wrt, spans = [], []
        while not self.accept("]"):
            if wrt:
                self.expect(", ")
            at = self.pos
            wrt.append(self.match(_NAME, "a parameter name").group())
            spans.append(self.span(at))
        lr = float(self.text[slice(*self.extent(",)"))]) if self.accept(", lr=") else None
        by = rule = None
        if self.accept(", by="):
            if kind == "minimize":
                rule = self.combination()
            else:
                by = self.annotation()
        has_aux = self.accept(", has_aux=true")
        aux = self.symbol() if has_aux and self.accept(", aux=") else None
        self.expect(")")
        return Transform(kind, fn, tuple(wrt), tuple(spans), samples, by, lr, scope, objectives,
                         rule, compose, has_aux, aux)

    def target(self) -> tuple[str, int, str, Composition | None]:
        """An objective, or `compose(@outer, objective, by=...)`."""
        start = self.pos
        if not self.accept("compose("):
            return (*self.objective(), None)
        at = self.pos
        outer = self.symbol()
        outer_span = self.span(at)
        self.expect(", ")
        inner = self.pos
        fn, samples, scope = self.objective()
        inner_span = self.span(inner)
        by = self.annotation() if self.accept(", by=") else None
        self.expect(")")
        span = self.span(start)
        return fn, samples, scope, Composition(outer, by, span, outer_span, inner_span)

    def objective(self) -> tuple[str, int, str]:
        scope = next((s for s in _SCOPES if self.accept(s + "(")), "")
        fn = self.symbol()
        if not scope:
            return fn, 0, "expect"
        self.expect(", samples=")
        samples = int(self.match(_INT, "a number of samples").group())
        self.expect(")")
        return fn, samples, scope

    def combination(self) -> Combination:
        name = self.match(_NAME, "a combination rule").group()
        weights: list[float] = []
        options: list[tuple[str, bool | int | float | str]] = []
        if self.accept("("):
            while not self.accept(")"):
                if weights or options:
                    self.expect(", ")
                start, end = self.extent(",)")
                key, eq, value = self.text[start:end].partition("=")
                if eq:
                    options.append((key, _option(value)))
                elif _FLOAT.fullmatch(key):
                    weights.append(float(key))
                else:
                    self.fail("expected a weight or option=value", start)
        return Combination(name, tuple(weights), tuple(options))


def _option(text: str) -> bool | int | float | str:
    """An annotation option as `Annotation.__str__` prints it."""
    if text in ("true", "false"):
        return text == "true"
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text) and text not in ("inf", "-inf", "nan"):
        return float(text)
    return text


@cache
def _hints(cls: type) -> dict[str, object]:
    """The params dataclass's field types (its annotations are strings)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}
