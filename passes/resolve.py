"""Name resolution: bind every free name and call to a builtin, function, struct or dim.

- `call` becomes a builtin op (static arguments folded into its params), `call_fn` or
  `struct_new`; `ref` becomes `dim` (the runtime size of a symbolic dimension) or an error.
- Struct names in types are expanded to `StructType`s; loop bounds are folded into `for`.
- Exports are checked: the function exists and each `wrt` names one of its parameters.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace

from gradlang.builtins import BUILTINS, REQUIRED, Arg, Builtin
from gradlang.builder import qualify
from gradlang.diagnostics import Diagnostics, Span
from gradlang.ir import Function, Module, Op, Param, Region, StructDef, Value, walk
from gradlang.ops import OPS, CalleeParams, CallParams, ForParams, NoParams, StructParams
from gradlang.types import (DType, NamedType, StructType, TensorType, TupleType, Type,
                            substitute_dims, type_dims)

from .rewrite import dce_function


class _Fail(Exception):
    """A static argument could not be folded; the diagnostic is already reported."""


@dataclass
class _Scope:
    """What names mean inside one unit (source file)."""

    module: Module
    unit: str
    structs: dict[str, StructType]

    def _candidates(self, name: str) -> list[str]:
        if "." in name:
            alias, _, rest = name.rpartition(".")
            target = dict(self.module.unit(self.unit).imports).get(alias)
            return [] if target is None else [qualify(target, rest)]
        own = qualify(self.unit, name)
        return [own, *[qualify(u, name) for _, u in self.module.unit(self.unit).imports]]

    def lookup(self, name: str) -> tuple[str, object] | list[str]:
        """("fn", Function) | ("struct", StructType) | ("builtin", Builtin), or ambiguous names."""
        found = []
        for i, q in enumerate(self._candidates(name)):
            fn = self.module.function(q)
            if fn is not None:
                found.append(("fn", fn))
            elif q in self.structs:
                found.append(("struct", self.structs[q]))
            if i == 0 and found:
                return found[0]
            if i == 0 and "." not in name and name in BUILTINS:
                return ("builtin", BUILTINS[name])
        if len(found) > 1:
            return [f[1].name for f in found]  # type: ignore[union-attr]
        return found[0] if found else []

    def known_names(self) -> list[str]:
        names = list(BUILTINS)
        for fn in self.module.functions:
            names.append(fn.name.rpartition(".")[2])
        return names + [s.rpartition(".")[2] for s in self.structs]


def _did_you_mean(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def _resolve_structs(module: Module, diags: Diagnostics) -> dict[str, StructType]:
    defs = {s.name: s for s in module.structs}
    done: dict[str, StructType] = {}

    def resolve(sdef: StructDef, stack: tuple[str, ...]) -> StructType:
        if sdef.name in done:
            return done[sdef.name]
        if sdef.name in stack:
            diags.error(f"struct '{sdef.name}' contains itself", sdef.span)
            return StructType(sdef.name, ())
        fields = tuple((n, _resolve_type(t, sdef.unit, defs, resolve, stack + (sdef.name,),
                                         sdef.span, diags)) for n, t in sdef.fields)
        done[sdef.name] = StructType(sdef.name, fields)
        return done[sdef.name]

    for sdef in module.structs:
        resolve(sdef, ())
    return done


def _resolve_type(t: Type, unit: str, defs: dict[str, StructDef], resolve_struct, stack,
                  span: Span, diags: Diagnostics) -> Type:
    if isinstance(t, NamedType):
        sdef = defs.get(qualify(unit, t.name)) or next(
            (d for d in defs.values() if d.name.rpartition(".")[2] == t.name and d.unit != unit),
            None)
        if sdef is None:
            diags.error(f"unknown type '{t.name}'" + _did_you_mean(
                t.name, [d.rpartition(".")[2] for d in defs]), span)
            return TensorType(DType.F32)
        st = resolve_struct(sdef, stack)
        dims = type_dims(st)
        for k, _ in t.bindings:
            if k not in dims:
                diags.error(f"struct '{t.name}' has no dimension '{k}' (dimensions: "
                            f"{', '.join(dims) or 'none'})", span)
        return substitute_dims(st, dict(t.bindings)) if t.bindings else st
    if isinstance(t, TupleType):
        return TupleType(tuple(_resolve_type(e, unit, defs, resolve_struct, stack, span, diags)
                               for e in t.elems))
    return t


@dataclass(frozen=True)
class Resolve:
    """The name-resolution pass."""

    name: str = "resolve"
    checks_only: bool = True

    def run(self, module: Module, diags: Diagnostics) -> Module:
        module_before = module
        structs = _resolve_structs(module, diags)
        defs = {s.name: s for s in module.structs}

        def resolve_type(t: Type, unit: str, span: Span) -> Type:
            return _resolve_type(t, unit, defs, lambda s, _: structs[s.name], (), span, diags)

        # Signatures first: calls need the callee's resolved parameter types.
        signatures = []
        for fn in module.functions:
            params = tuple(Param(p.name, Value(resolve_type(p.value.type, fn.unit, p.span), p.name),
                                 p.span) for p in fn.params)
            signatures.append(replace(fn, params=params,
                                      result_type=resolve_type(fn.result_type, fn.unit, fn.result_span)))
        module = replace(module, functions=tuple(signatures),
                         structs=tuple(replace(s, fields=structs[s.name].fields) for s in module.structs))
        functions = []
        for fn, before in zip(signatures, module_before.functions):
            subst = {old.value: new.value for old, new in zip(before.params, fn.params)}
            scope = _Scope(module, fn.unit, structs)
            functions.append(_FunctionResolver(scope, fn, subst, diags).run())
        module = replace(module, functions=tuple(functions))
        _check_exports(module, diags)
        return module


def _check_exports(module: Module, diags: Diagnostics) -> None:
    for export in module.exports:
        t = export.transform
        fn = module.function(t.fn)
        if fn is None:
            names = [f.name for f in module.functions]
            diags.error(f"unknown function '{t.fn}'" + _did_you_mean(t.fn, names), export.fn_span)
            continue
        seen: set[str] = set()
        for name, span in zip(t.wrt, t.wrt_spans):
            if fn.param(name) is None:
                params = ", ".join(p.name for p in fn.params)
                diags.error(f"'{name}' is not a parameter of '{fn.name}' (parameters: {params})", span)
            elif name in seen:
                diags.error(f"'{name}' appears twice in wrt", span)
            seen.add(name)


class _FunctionResolver:
    def __init__(self, scope: _Scope, fn: Function, subst: dict[Value, Value], diags: Diagnostics):
        self.scope = scope
        self.fn = fn
        self.subst = subst
        self.diags = diags
        self.dims: list[str] = []
        for p in fn.params:
            self.dims += [d for d in type_dims(p.value.type) if d not in self.dims]
        self.defs: dict[Value, Op] = {}
        self.locals = sorted({v.hint for op in walk(fn.body) for v in op.results if v.hint}
                             | {p.name for p in fn.params})

    def run(self) -> Function:
        body = self.region(self.fn.body)
        return dce_function(replace(self.fn, body=body))

    def region(self, region: Region) -> Region:
        ops: list[Op] = []
        for op in region.ops:
            new = self.op(replace(op, operands=tuple(self.subst.get(v, v) for v in op.operands)))
            for r in new.results:
                self.defs[r] = new
            ops.append(new)
        results = tuple(self.subst.get(v, v) for v in region.results)
        return replace(region, ops=tuple(ops), results=results)

    def error_op(self, op: Op, message: str, span: Span | None = None) -> Op:
        self.diags.error(message, span or op.span)
        return Op("error", (), op.results, NoParams(), (), op.span)

    def op(self, op: Op) -> Op:
        if op.regions:
            op = replace(op, regions=tuple(self.region(r) for r in op.regions))
        if op.name == "ref":
            return self.ref(op)
        if op.name == "call":
            return self.call(op)
        if op.name == "for":
            return self.loop(op)
        self.reject_lists(op, op.operands)
        return op

    def reject_lists(self, op: Op, operands) -> None:
        for v in operands:
            d = self.defs.get(v)
            if d is not None and d.name == "list":
                self.diags.error("a list literal can only be an argument of a builtin such as "
                                 "zeros([...]) or concat([...]); use a tuple (a, b) for values", d.span)

    def ref(self, op: Op) -> Op:
        name = op.params.name
        if name in self.dims:
            return replace(op, name="dim")
        found = self.scope.lookup(name)
        if isinstance(found, tuple):
            return self.error_op(op, f"'{name}' is a function and cannot be used as a value; "
                                     f"call it as {name}(...)")
        return self.error_op(op, f"unknown name '{name}'" + _did_you_mean(
            name, self.locals + self.dims + self.scope.known_names()))

    def call(self, op: Op) -> Op:
        p: CallParams = op.params
        found = self.scope.lookup(p.callee)
        if isinstance(found, list):
            if found:
                return self.error_op(op, f"'{p.callee}' is ambiguous: it could be "
                                         + " or ".join(found) + "; qualify it with its module name")
            return self.error_op(op, f"unknown function '{p.callee}'" + _did_you_mean(
                p.callee, self.scope.known_names()))
        npos = len(op.operands) - len(p.kwnames)
        positional, keywords = op.operands[:npos], dict(zip(p.kwnames, op.operands[npos:]))
        kind, target = found
        if kind == "builtin":
            return self.builtin(op, target, positional, keywords)
        if kind == "struct":
            return self.struct_new(op, target, positional, keywords)
        return self.call_fn(op, target, positional, keywords)

    def bind_args(self, op: Op, what: str, names: list[str], positional, keywords,
                  required: set[str]) -> dict[str, Value] | None:
        if len(positional) > len(names):
            self.diags.error(f"{what} takes {len(names)} argument{'s' * (len(names) != 1)} "
                             f"but {len(positional)} were given", op.span)
            return None
        bound = dict(zip(names, positional))
        ok = True
        for k, v in keywords.items():
            if k not in names:
                self.diags.error(f"{what} has no parameter '{k}'" + _did_you_mean(k, names), op.span)
                ok = False
            elif k in bound:
                self.diags.error(f"argument '{k}' of {what} given twice", op.span)
                ok = False
            bound[k] = v
        missing = [n for n in names if n in required and n not in bound]
        if missing:
            self.diags.error(f"{what} is missing argument{'s' * (len(missing) > 1)} "
                             + ", ".join(f"'{m}'" for m in missing), op.span)
            ok = False
        return bound if ok else None

    def call_fn(self, op: Op, fn: Function, positional, keywords) -> Op:
        names = [q.name for q in fn.params]
        bound = self.bind_args(op, f"'{fn.name}'", names, positional, keywords, set(names))
        if bound is None:
            return Op("error", (), op.results, NoParams(), (), op.span)
        self.reject_lists(op, bound.values())
        return Op("call_fn", tuple(bound[n] for n in names), op.results, CalleeParams(fn.name),
                  (), op.span)

    def struct_new(self, op: Op, st: StructType, positional, keywords) -> Op:
        names = [n for n, _ in st.fields]
        if positional:
            return self.error_op(op, f"struct '{st.name}' is built with field names: "
                                     f"{st.name}({', '.join(f'{n}=...' for n in names)})")
        bound = self.bind_args(op, f"struct '{st.name}'", names, (), keywords, set(names))
        if bound is None:
            return Op("error", (), op.results, NoParams(), (), op.span)
        return Op("struct_new", tuple(bound[n] for n in names), op.results,
                  StructParams(st.name, tuple(names)), (), op.span)

    def builtin(self, op: Op, b: Builtin, positional, keywords) -> Op:
        names = [a.name for a in b.args]
        required = {a.name for a in b.args if a.default is REQUIRED}
        bound = self.bind_args(op, b.signature, names, positional, keywords, required)
        if bound is None:
            return Op("error", (), op.results, NoParams(), (), op.span)
        operands: list[Value] = []
        static: dict[str, object] = {}
        try:
            for a in b.args:
                if a.name not in bound:
                    static[a.name] = a.default
                elif a.kind == "tensor":
                    self.reject_lists(op, [bound[a.name]])
                    operands.append(bound[a.name])
                elif a.kind == "tensors":
                    operands.extend(self.tensor_list(bound[a.name], a, b))
                else:
                    static[a.name] = self.fold(bound[a.name], a, b)
        except _Fail:
            return Op("error", (), op.results, NoParams(), (), op.span)
        params = OPS[b.op].params(**static)
        return Op(b.op, tuple(operands), op.results, params, (), op.span)

    def loop(self, op: Op) -> Op:
        start, stop, *inits = op.operands
        bound = Arg("bound", "dim")
        try:
            lo = self.fold(start, bound, None)
            hi = self.fold(stop, bound, None)
        except _Fail:
            return Op("error", (), op.results, NoParams(), (), op.span)
        self.reject_lists(op, inits)
        return replace(op, operands=tuple(inits), params=ForParams(op.params.carries, lo, hi))

    # ---- static arguments
    def tensor_list(self, v: Value, a: Arg, b: Builtin) -> tuple[Value, ...]:
        d = self.defs.get(v)
        if d is None or d.name != "list" or not d.operands:
            self.static_error(v, f"argument '{a.name}' of {b.name} must be a list of tensors, "
                                 f"e.g. [a, b]")
        return d.operands  # type: ignore[union-attr]

    def static_error(self, v: Value, message: str) -> None:
        d = self.defs.get(v)
        if d is not None and d.name == "error":
            raise _Fail  # already reported
        self.diags.error(message, d.span if d is not None else None)
        raise _Fail

    def static_int(self, v: Value, message: str) -> int:
        d = self.defs.get(v)
        if d is not None and d.name == "const" and d.params.dtype is DType.I32:
            return d.params.value
        self.static_error(v, message)
        raise AssertionError

    def fold(self, v: Value, a: Arg, b: Builtin | None) -> object:
        what = f"argument '{a.name}' of {b.name}" if b else "loop bounds"
        d = self.defs.get(v)
        if a.kind == "axis":
            return self.static_int(v, f"{what} must be an integer literal")
        if a.kind == "bool":
            if d is not None and d.name == "const" and d.params.dtype is DType.BOOL:
                return d.params.value
            self.static_error(v, f"{what} must be true or false")
        if a.kind == "axes":
            msg = f"{what} must be an integer literal or a list of them"
            if d is not None and d.name == "list":
                return tuple(self.static_int(x, msg) for x in d.operands)
            return (self.static_int(v, msg),)
        if a.kind == "dim":
            return self.dim(v, f"{what} must be an integer literal or a dimension name")
        assert a.kind == "shape"
        msg = f"{what} must be a list of integer literals and dimension names, e.g. [B, 10]"
        if d is None or d.name != "list":
            self.static_error(v, msg)
        return tuple(self.dim(x, msg, allow_minus_one=b is not None and b.name == "reshape")
                     for x in d.operands)  # type: ignore[union-attr]

    def dim(self, v: Value, message: str, allow_minus_one: bool = False) -> int | str:
        d = self.defs.get(v)
        if d is not None and d.name == "dim":
            return d.params.name
        value = self.static_int(v, message)
        if value < 0 and not (allow_minus_one and value == -1):
            self.static_error(v, message.replace("integer literals", "non-negative integers"))
        return value
