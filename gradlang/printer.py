"""Textual form of the IR, stable enough for golden tests.

Values print as `%name` when bound by `let` or as a parameter (suffixed `.1`, `.2` when a name is
rebound), otherwise as `%0, %1, ...` in definition order.
"""

from __future__ import annotations

from .ir import Function, Module, Op, Region, Value
from .ops import ConstParams, NameParams, CallParams, CalleeParams, params_text


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


def _op_text(op: Op, namer: _Namer, indent: str, notes: dict[Value, str]) -> list[str]:
    operands = _value_list(namer, op.operands)
    results = ", ".join(namer.define(r) for r in op.results)
    p = op.params
    if isinstance(p, ConstParams):
        head = f"{op.name} {p.value!r}"
    elif isinstance(p, (CalleeParams, CallParams)):
        kw = f" kw={list(p.kwnames)}" if isinstance(p, CallParams) and p.kwnames else ""
        head = f"{op.name} @{p.callee}({operands}){kw}"
    elif isinstance(p, NameParams):
        head = f"{op.name} {p.name}" + (f" {operands}" if operands else "")
    else:
        extra = params_text(p)
        head = op.name + (f" {operands}" if operands else "") + (f" {extra}" if extra else "")
    types = ", ".join(str(r.type) for r in op.results)
    note = "".join(f"  # {n}" for n in dict.fromkeys(notes[r] for r in op.results if r in notes))
    lines = [f"{indent}{results} = {head} : {types}{note}"]
    for region in op.regions:
        lines.extend(_region_text(region, namer, indent + "  ", notes))
    return lines


def _region_text(region: Region, namer: _Namer, indent: str, notes: dict[Value, str]) -> list[str]:
    args = ", ".join(f"{namer.define(a)}: {a.type}" for a in region.args)
    lines = [f"{indent}^({args}) {{"]
    for op in region.ops:
        lines.extend(_op_text(op, namer, indent + "  ", notes))
    lines.append(f"{indent}  yield {_value_list(namer, region.results)}")
    lines.append(f"{indent}}}")
    return lines


def print_function(fn: Function, notes: dict[Value, str] | None = None) -> str:
    namer = _Namer()
    notes = notes or {}
    params = ", ".join(f"{namer.define(p.value)}: {p.value.type}" for p in fn.params)
    lines = [f"func @{fn.name}({params}) -> {fn.result_type} {{"]
    for op in fn.body.ops:
        lines.extend(_op_text(op, namer, "  ", notes))
    lines.append(f"  return {_value_list(namer, fn.body.results)}")
    lines.append("}")
    return "\n".join(lines)


def print_module(module: Module) -> str:
    """The whole module: structs, functions (with analysis notes), exports."""
    notes: dict[Value, str] = module.facts.gradflow_notes
    parts = []
    for s in module.structs:
        fields = ", ".join(f"{n}: {t}" for n, t in s.fields)
        parts.append(f"struct {s.name} {{ {fields} }}")
    for fn in module.functions:
        parts.append(print_function(fn, notes))
    for e in module.exports:
        t = e.transform
        fn = _objective_text(t.fn, t.samples, t.scope)
        if t.kind == "minimize":
            fn = "[" + ", ".join(_objective_text(o.fn, o.samples, o.scope)
                                 for o in t.objectives) + "]"
        if t.kind == "fn":
            parts.append(f"export @{e.name} = {fn}")
        else:
            parts.append(f"export @{e.name} = {t.call(fn)}")
    return "\n\n".join(parts) + "\n"


def _objective_text(fn: str, samples: int, scope: str) -> str:
    return f"{scope}(@{fn}, samples={samples})" if samples else f"@{fn}"
