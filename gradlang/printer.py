"""Textual form of the IR, stable enough for golden tests; `gradlang.ir_parser` reads it back.

Values print as `%name` when bound by `let` or as a parameter (suffixed `.1`, `.2` when a name is
rebound), otherwise as `%0, %1, ...` in definition order. Types print as in messages except where
that loses something a pass reads: a struct name before resolution prints as `?Name`, a struct
type whose dims are bound as `Name[I=D]`, a distribution whose event axes its draw does not show
(a Categorical's) as `Categorical[B; K] -> i32[B]`.
"""

from __future__ import annotations

from collections.abc import Mapping

from .ir import Function, Module, Op, Region, StructDef, Transform, Value
from .ops import ConstParams, NameParams, CallParams, CalleeParams, HostParams, params_text
from .types import (DistType, ListType, NamedType, StructType, TensorType, TupleType, Type,
                    substitute_dims, type_dims)

Structs = Mapping[str, StructDef]
"""The module's struct definitions by name (to print a struct type's dim bindings)."""


def type_text(t: Type, structs: Structs | None = None) -> str:
    """A type as the IR prints it (see the module docstring)."""
    if isinstance(t, NamedType):
        return f"?{t}"
    if isinstance(t, StructType):
        bound = _struct_bindings(t, structs or {})
        return f"{t.name}[{', '.join(f'{k}={v}' for k, v in bound)}]" if bound else t.name
    if isinstance(t, TupleType):
        return "(" + ", ".join(type_text(e, structs) for e in t.elems) + ")"
    if isinstance(t, ListType):
        return "[" + ", ".join(type_text(e, structs) for e in t.elems) + "]"
    if isinstance(t, DistType) and t.event and t.value.shape[len(t.batch):] != t.event:
        dims = ", ".join(str(d) for d in t.batch) + "; " + ", ".join(str(d) for d in t.event)
        return f"{t.family}[{dims.lstrip()}] -> {t.value}"
    return str(t)


def _struct_bindings(t: StructType, structs: Structs) -> list[tuple[str, object]]:
    """The dims of `t`'s definition bound to other dims or sizes in `t` (empty when `t` is
    the definition's own type or no definition is known)."""
    sdef = structs.get(t.name)
    if sdef is None:
        return []
    generic = StructType(t.name, sdef.fields)
    env: dict[str, object] = {}

    def unify(g: Type, x: Type) -> None:
        if isinstance(g, TensorType) and isinstance(x, TensorType):
            for a, b in zip(g.shape, x.shape):
                if isinstance(a, str):
                    env.setdefault(a, b)
        elif isinstance(g, StructType) and isinstance(x, StructType):
            for (_, a), (_, b) in zip(g.fields, x.fields):
                unify(a, b)
        elif isinstance(g, TupleType) and isinstance(x, TupleType):
            for a, b in zip(g.elems, x.elems):
                unify(a, b)

    unify(generic, t)
    bound = [(k, env[k]) for k in type_dims(generic) if k in env and env[k] != k]
    return bound if substitute_dims(generic, dict(bound)) == t else []


class _Namer:
    def __init__(self) -> None:
        self.names: dict[Value, str] = {}
        self.counter = 0
        self.used: set[str] = set()

    def define(self, v: Value) -> str:
        if v.hint:
            name, k = v.hint, 0
            while name in self.used:
                k += 1
                name = f"{v.hint}.{k}"
        else:
            name = str(self.counter)
            self.counter += 1
        self.used.add(name)
        self.names[v] = "%" + name
        return self.names[v]

    def __getitem__(self, v: Value) -> str:
        return self.names.get(v, "%<undefined>")


def _value_list(namer: _Namer, values: tuple[Value, ...]) -> str:
    return ", ".join(namer[v] for v in values)


def _op_text(op: Op, namer: _Namer, indent: str, notes: Mapping[Value, str],
             structs: Structs) -> list[str]:
    operands = _value_list(namer, op.operands)
    results = ", ".join(namer.define(r) for r in op.results)
    p = op.params
    if isinstance(p, ConstParams):
        head = f"{op.name} {p.value!r}"
    elif isinstance(p, (CalleeParams, CallParams)):
        kw = f" kw={list(p.kwnames)}" if isinstance(p, CallParams) and p.kwnames else ""
        rule = f" with {p.annotation}" if isinstance(p, CallParams) and p.annotation else ""
        head = f"{op.name} @{p.callee}({operands}){kw}{rule}"
    elif isinstance(p, NameParams):
        head = f"{op.name} {p.name}" + (f" {operands}" if operands else "")
    else:
        extra = (f"{{name={p.name}, result={type_text(p.result, structs)}}}"
                 if isinstance(p, HostParams) else params_text(p))
        head = op.name + (f" {operands}" if operands else "") + (f" {extra}" if extra else "")
    types = ", ".join(type_text(r.type, structs) for r in op.results)
    note = "".join(f"  # {n}" for n in dict.fromkeys(notes[r] for r in op.results if r in notes))
    lines = [f"{indent}{results} = {head} : {types}{note}"]
    for region in op.regions:
        lines.extend(_region_text(region, namer, indent + "  ", notes, structs))
    return lines


def _region_text(region: Region, namer: _Namer, indent: str, notes: Mapping[Value, str],
                 structs: Structs) -> list[str]:
    args = ", ".join(f"{namer.define(a)}: {type_text(a.type, structs)}" for a in region.args)
    lines = [f"{indent}^({args}) {{"]
    for op in region.ops:
        lines.extend(_op_text(op, namer, indent + "  ", notes, structs))
    lines.append(f"{indent}  yield {_value_list(namer, region.results)}")
    lines.append(f"{indent}}}")
    return lines


def unit_of(name: str) -> str:
    """The unit a function or struct name implies: its qualifier (`std.nn` for `std.nn.dense`
    and `std.nn.dense@expect4`), empty for the main file's."""
    return name.split("@")[0].rpartition(".")[0]


def print_function(fn: Function, notes: Mapping[Value, str] | None = None,
                   structs: Structs | None = None) -> str:
    """`func @name(params) -> type { ... }`, with ` in "unit"` after the result type when the
    function's unit is not the one its name implies."""
    namer = _Namer()
    notes = notes or {}
    structs = structs or {}
    params = ", ".join(f"{namer.define(p.value)}: {type_text(p.value.type, structs)}"
                       for p in fn.params)
    unit = f' in "{fn.unit}"' if fn.unit != unit_of(fn.name) else ""
    lines = [f"func @{fn.name}({params}) -> {type_text(fn.result_type, structs)}{unit} {{"]
    for op in fn.body.ops:
        lines.extend(_op_text(op, namer, "  ", notes, structs))
    lines.append(f"  return {_value_list(namer, fn.body.results)}")
    lines.append("}")
    return "\n".join(lines)


def print_module(module: Module) -> str:
    """The whole module: its units (unless it is one file without imports or pragmas),
    structs, functions (with analysis notes), exports."""
    notes = module.facts.gradflow_notes
    structs = {s.name: s for s in module.structs}
    parts = []
    for u in module.units:
        pragmas = "".join(f" {k}={v}" for k, v in (("estimator", u.estimator),
                                                   ("backward", u.backward)) if v is not None)
        if u.imports or pragmas or len(module.units) > 1:
            imports = ", ".join(f"{a}={t}" for a, t in u.imports)
            parts.append(f'unit "{u.name}"' + (f" imports({imports})" if imports else "") + pragmas)
    for s in module.structs:
        fields = ", ".join(f"{n}: {type_text(t, structs)}" for n, t in s.fields)
        parts.append(f"struct {s.name} {{ {fields} }}")
    for fn in module.functions:
        parts.append(print_function(fn, notes, structs))
    for e in module.exports:
        parts.append(f"export @{e.name} = {_transform_text(e.transform)}")
    return "\n\n".join(parts) + "\n"


def _transform_text(t: Transform) -> str:
    fn = _objective_text(t.fn, t.samples, t.scope)
    if t.kind == "minimize":
        fn = "[" + ", ".join(_objective_text(o.fn, o.samples, o.scope)
                             + (f" with {o.by}" if o.by is not None else "")
                             + (f" {{wrt=[{', '.join(o.wrt)}]}}" if o.wrt is not None else "")
                             for o in t.objectives) + "]"
    if t.compose is not None:
        by = f", by={t.compose.by}" if t.compose.by is not None else ""
        fn = f"compose(@{t.compose.outer}, {fn}{by})"
    if t.kind == "fn":
        return fn
    return t.call(fn) if t.aux is None else f"{t.call(fn)[:-1]}, aux=@{t.aux})"


def _objective_text(fn: str, samples: int, scope: str) -> str:
    return f"{scope}(@{fn}, samples={samples})" if samples else f"@{fn}"
