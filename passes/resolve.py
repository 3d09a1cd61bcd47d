"""Name resolution: bind every free name and call to a builtin, function, struct or dim.

- `call` becomes a builtin op (static arguments folded into its params), `call_fn` or
  `struct_new`; `ref` becomes `dim` (the runtime size of a symbolic dimension), the callee of
  a `map_leaves` (a function's name) or an error.
- `tree` names the parameter-tree type, allowed as a parameter's or a result's type only.
- Struct names in types are expanded to `StructType`s; loop bounds are folded into `for`.
- Exports are checked: the function exists and each `wrt` names one of its parameters.
- Recursive calls (cycles in the call graph) are errors at the call site.
- Nesting beyond the limits of `gradlang.limits` is an error where it starts: structs and
  tuples in a struct's fields (MAX_DEPTH), blocks nested through calls (MAX_BLOCKS) and chains
  of calls (MAX_CALLS); the later stages, recursive, never see such a program.

After an error, values that cannot be trusted become `error` ops or the ERROR type (unknown
types, calls to functions whose signature failed to resolve, bad list literals), so that later
passes stay silent about them instead of reporting a cascade of follow-up errors.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, fields, replace

from gradlang.builtins import BUILTINS, REQUIRED, Arg, Builtin
from gradlang.builder import qualify
from gradlang.diagnostics import Diagnostics, Span
from gradlang.distributions import DISTRIBUTIONS, DistSpec
from gradlang.limits import MAX_BLOCKS, MAX_CALLS, MAX_DEPTH
from gradlang.ir import Export, Function, Module, Op, Param, Region, StructDef, Value, walk
from gradlang.ops import (OPS, CalleeParams, CallParams, DistParams, EinsumParams, GradParams,
                          NoParams, StructParams)
from gradlang.types import (ERROR, SOLVER_REPORT, TREE, DType, NamedType, StructType, TupleType,
                            Type, is_float_tree, scalar, substitute_dims, type_dims)

from .aux import derivative, result_problem
from .rewrite import dce_function, map_ops, region_uses


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
            if i == 0 and "." not in name and name in DISTRIBUTIONS:
                return ("dist", DISTRIBUTIONS[name])
        if len(found) > 1:
            return [f[1].name for f in found]  # type: ignore[union-attr]
        return found[0] if found else []

    def known_names(self) -> list[str]:
        names = list(BUILTINS) + list(DISTRIBUTIONS)
        for fn in self.module.functions:
            names.append(fn.name.rpartition(".")[2])
        return names + [s.rpartition(".")[2] for s in self.structs]

    def unknown(self, what: str, name: str, local: list[str] = ()) -> str:
        """The message for an unknown (possibly qualified) name, with a suggestion."""
        if "." not in name:
            return f"unknown {what} '{name}'" + _did_you_mean(name, [*local, *self.known_names()])
        alias, _, rest = name.rpartition(".")
        imports = dict(self.module.unit(self.unit).imports)
        if alias not in imports and what == "name" and "." not in alias:  # `prams.w`
            return f"unknown name '{alias}'" + _did_you_mean(alias, [*local, *imports])
        if alias not in imports:
            known = ", ".join(sorted(imports)) or "none"
            return (f"unknown {what} '{name}': no module is imported as '{alias}' "
                    f"(imported: {known})")
        target = imports[alias]
        members = [f.name.rpartition(".")[2] for f in self.module.functions if f.unit == target]
        members += [s.rpartition(".")[2] for s in self.structs if s.rpartition(".")[0] == target]
        close = difflib.get_close_matches(rest, members, n=1, cutoff=0.7)
        return f"unknown {what} '{name}'" + (f"; did you mean '{alias}.{close[0]}'?" if close else
                                            f": module '{target}' has no '{rest}'")


def _not_a_value(name: str, what: str) -> str:
    return f"'{name}' is a {what} and cannot be used as a value; call it as {name}(...)"


def _did_you_mean(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.7)
    return f"; did you mean '{close[0]}'?" if close else ""


def _field_span(sdef: StructDef, name: str) -> Span:
    """The span of `name: type` in a struct declaration (the IR keeps only the struct's)."""
    span = sdef.span
    lines = span.source.lines[span.line - 1:span.end_line]
    text = "\n".join(lines)
    start = text.find("{", span.col - 1)
    match = re.compile(rf"\b{re.escape(name)}\s*:").search(text, start + 1) if start >= 0 else None
    if match is None:
        return span
    depth, end = 0, match.end()
    while end < len(text) and not (depth == 0 and text[end] in ",}\n"):
        depth += {"[": 1, "(": 1, "]": -1, ")": -1}.get(text[end], 0)
        end += 1
    while text[end - 1] == " ":
        end -= 1

    def position(offset: int) -> tuple[int, int]:
        before = text[:offset]
        return span.line + before.count("\n"), offset - (before.rfind("\n") + 1) + 1

    (line, col), (end_line, end_col) = position(match.start()), position(end)
    return Span(span.source, line, col, end_line, end_col)


def _struct_def(t: NamedType, unit: str, defs: dict[str, StructDef]) -> StructDef | None:
    """The struct a type names in `unit`: its own, else one of another unit by that name."""
    return defs.get(qualify(unit, t.name)) or next(
        (d for d in defs.values() if d.name.rpartition(".")[2] == t.name and d.unit != unit), None)


def _struct_depths(defs: dict[str, StructDef]) -> dict[str, int]:
    """The levels of structs and tuples in each struct's fields, the struct itself included,
    computed without recursion (a struct on a cycle, reported elsewhere, counts once)."""
    depth: dict[str, int] = {}

    def level(t: Type, unit: str) -> int | str:
        """The levels of `t`, or the name of a struct whose depth is still needed."""
        todo, deepest = [(t, 0)], 0
        while todo:
            x, above = todo.pop()
            if isinstance(x, TupleType):
                todo.extend((e, above + 1) for e in x.elems)
            elif isinstance(x, NamedType) and (sdef := _struct_def(x, unit, defs)) is not None:
                if sdef.name not in depth:
                    return sdef.name
                deepest = max(deepest, above + depth[sdef.name])
        return deepest

    for name in defs:
        stack, open_ = [name], set()
        while stack:
            sdef = defs[stack[-1]]
            if sdef.name in depth:
                stack.pop()
                continue
            open_.add(sdef.name)
            levels = [level(t, sdef.unit) for _, t in sdef.fields]
            needed = next((x for x in levels if isinstance(x, str) and x not in open_), None)
            if needed is not None:
                stack.append(needed)
                continue
            depth[sdef.name] = 1 + max((x for x in levels if isinstance(x, int)), default=0)
            stack.pop()
    return depth


def _resolve_structs(module: Module, diags: Diagnostics) -> dict[str, StructType]:
    defs = {s.name: s for s in module.structs}
    done: dict[str, StructType] = {}
    depths = _struct_depths(defs)
    for sdef in module.structs:  # too deep: reported where the excess starts, then not expanded
        if depths[sdef.name] <= MAX_DEPTH:
            continue
        done[sdef.name] = StructType(sdef.name, tuple((n, ERROR) for n, _ in sdef.fields))
        inner = [d for _, t in sdef.fields for x in _named_types(t)
                 if (d := _struct_def(x, sdef.unit, defs)) is not None]
        if all(depths[d.name] <= MAX_DEPTH for d in inner):
            diags.error(f"struct '{sdef.name}' is nested too deeply ({depths[sdef.name]} levels "
                        f"of structs and tuples; the limit is {MAX_DEPTH})", sdef.span)

    def resolve(sdef: StructDef, stack: tuple[str, ...], span: Span | None = None) -> Type:
        if sdef.name in done:
            return done[sdef.name]
        if sdef.name in stack:
            cycle = stack[stack.index(sdef.name):] + (sdef.name,)
            what = (f"struct '{sdef.name}' contains itself" if len(cycle) == 2 else
                    "structs contain each other: " + " -> ".join(cycle))
            diags.error(f"{what}; a struct cannot hold a value of its own type", span or sdef.span)
            return ERROR
        fields = tuple((n, _resolve_type(t, sdef.unit, defs, resolve, stack + (sdef.name,),
                                         _field_span(sdef, n), diags)) for n, t in sdef.fields)
        done[sdef.name] = StructType(sdef.name, fields)
        return done[sdef.name]

    for sdef in module.structs:
        resolve(sdef, ())
    return done


def _named_types(t: Type) -> list[NamedType]:
    """The struct names in a declared type (in its tuples)."""
    if isinstance(t, TupleType):
        return [n for e in t.elems for n in _named_types(e)]
    return [t] if isinstance(t, NamedType) else []


def _resolve_type(t: Type, unit: str, defs: dict[str, StructDef], resolve_struct, stack,
                  span: Span, diags: Diagnostics, in_tuple: bool = False) -> Type:
    if isinstance(t, NamedType):
        sdef = _struct_def(t, unit, defs)
        if sdef is None and t.name == SOLVER_REPORT.name and not t.bindings:
            return SOLVER_REPORT
        if sdef is None and t.name == str(TREE) and not t.bindings:
            if stack or in_tuple:  # a struct's field, a tuple's element
                diags.error(f"a tree can only be the type of a parameter or a result, not of a "
                            f"{'struct field' if stack else 'tuple element'}: its structure is "
                            f"unknown to the compiler", span)
                return ERROR
            return TREE
        if sdef is None:
            diags.error(f"unknown type '{t.name}'" + _did_you_mean(
                t.name, [d.rpartition(".")[2] for d in defs]), span)
            return ERROR
        st = resolve_struct(sdef, stack, span)
        if st is ERROR:
            return ERROR
        dims = type_dims(st)
        bad = [k for k, _ in t.bindings if k not in dims]
        for k in bad:
            diags.error(f"struct '{t.name}' has no dimension '{k}' (dimensions: "
                        f"{', '.join(dims) or 'none'})" + _did_you_mean(k, dims), span)
        names = [k for k, _ in t.bindings]
        twice = sorted({k for k in names if names.count(k) > 1})
        for k in twice:
            diags.error(f"dimension '{k}' of struct '{t.name}' is bound twice", span)
        bad += twice
        if bad:
            return ERROR
        return substitute_dims(st, dict(t.bindings)) if t.bindings else st
    if isinstance(t, TupleType):
        return TupleType(tuple(_resolve_type(e, unit, defs, resolve_struct, stack, span, diags,
                                             in_tuple=True) for e in t.elems))
    return t


def _has_error(t: Type) -> bool:
    """Whether a type failed to resolve somewhere inside."""
    if t is ERROR:
        return True
    if isinstance(t, TupleType):
        return any(_has_error(e) for e in t.elems)
    if isinstance(t, StructType):
        return any(_has_error(f) for _, f in t.fields)
    return False


def _broken(fn: Function) -> bool:
    """A function whose signature names an unknown type (already reported)."""
    return _has_error(fn.result_type) or any(_has_error(p.value.type) for p in fn.params)


def _within(inner: Span, outer: Span) -> bool:
    return ((outer.line, outer.col) <= (inner.line, inner.col)
            and (inner.end_line, inner.end_col) <= (outer.end_line, outer.end_col))


@dataclass(frozen=True)
class Resolve:
    """The name-resolution pass."""

    name: str = "resolve"
    after_errors: bool = True
    requires: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()

    def run(self, module: Module, diags: Diagnostics) -> Module:
        module_before = module
        structs = _resolve_structs(module, diags)
        defs = {s.name: s for s in module.structs}

        def resolve_type(t: Type, unit: str, span: Span) -> Type:
            return _resolve_type(t, unit, defs, lambda s, *_: structs[s.name], (), span, diags)

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
            resolver = _FunctionResolver(scope, fn, subst, diags)
            resolver.resolve_type = lambda t, span, unit=fn.unit: resolve_type(t, unit, span)
            functions.append(resolver.run())
        module = replace(module, functions=tuple(_silence_result(f) for f in functions))
        module = _cut_deep_nesting(_reject_recursion(module, diags), diags)
        return _check_exports(_derivatives(_bind_export_names(module, structs), diags), diags)


def _silence_result(fn: Function) -> Function:
    """When the declared result type failed to resolve, the body's result becomes an error
    value, so that it is not compared with the (unknown) declared type."""
    if not _has_error(fn.result_type):
        return fn
    error = Op("error", fn.body.results, (Value(),), NoParams(), (), fn.result_span)
    return replace(fn, body=replace(fn.body, ops=fn.body.ops + (error,), results=error.results))


def _bind_export_names(module: Module, structs: dict[str, StructType]) -> Module:
    """Exports name functions as the main file sees them: its own, or imported ones
    (unqualified, `l2`, or through their module, `nn.l2`)."""
    scope = _Scope(module, module.units[0].name, structs)
    def bind(export: Export) -> Export:
        t = export.transform
        found = scope.lookup(t.fn) if module.function(t.fn) is None else None
        if isinstance(found, tuple) and found[0] == "fn":
            export = replace(export, transform=replace(t, fn=found[1].name))
        c = t.compose
        found = scope.lookup(c.outer) if c is not None and module.function(c.outer) is None else None
        if isinstance(found, tuple) and found[0] == "fn":
            export = replace(export, transform=replace(export.transform,
                                                       compose=replace(c, outer=found[1].name)))
        return export

    return replace(module, exports=tuple(e.joined(tuple(map(bind, e.parts())))
                                         for e in module.exports))


def _derivatives(module: Module, diags: Diagnostics) -> Module:
    """The function `f@grad(x)` of each `grad(grad(f, wrt=[x]), ...)` export: f's parameters,
    returning f's derivative with respect to x (a float scalar), through a `grad` op; the export
    differentiates it. An export whose x is not such a parameter is dropped, with an error."""
    functions, exports = list(module.functions), []
    for whole in module.exports:
        parts = []
        for export in whole.parts():
            t = export.transform
            fn = module.function(t.fn)
            if t.of_grad is None or fn is None:
                parts.append(export)
                continue
            p = fn.param(t.of_grad)
            if p is None or p.value.type != scalar(DType.F32):
                what = ("is not a parameter of it" if p is None else f"is {p.value.type}")
                diags.error(f"grad(grad({fn.name}, wrt=[{t.of_grad}]), ...) needs '{t.of_grad}' to "
                            f"be a float scalar parameter of '{fn.name}' (f32); it {what}",
                            export.fn_span)
                break
            name = derivative(fn.name, p.name)
            if module.function(name) is None and all(f.name != name for f in functions):
                functions.append(_derivative(fn, p.name, name, export.fn_span))
            parts.append(replace(export, transform=replace(t, fn=name, of_grad=None)))
        else:
            exports.append(whole.joined(tuple(parts)))
    return replace(module, functions=tuple(functions), exports=tuple(exports))


def _derivative(fn: Function, wrt: str, name: str, span: Span) -> Function:
    """`fn name(<fn's params>) -> f32 { return grad(fn, wrt=[wrt])(<params>) }`."""
    params = tuple(Param(p.name, Value(p.value.type, p.name), p.span) for p in fn.params)
    args = tuple(Value(p.value.type, p.name) for p in fn.params)
    call = Op("call_fn", args, (Value(fn.result_type),), CalleeParams(fn.name), (), span)
    index = [p.name for p in fn.params].index(wrt)
    grad = Op("grad", tuple(p.value for p in params), (Value(scalar(DType.F32)),),
              GradParams(fn.name, (wrt,), (index,)), (Region(args, (call,), call.results),), span)
    return Function(name, fn.unit, params, scalar(DType.F32),
                    Region((), (grad,), grad.results), fn.span, fn.result_span)


def _check_exports(module: Module, diags: Diagnostics) -> Module:
    """Report bad exports (unknown function, a result that is not a float scalar, wrt names
    that are not float parameters); drop the exports and wrt names in error (and the exports of
    functions whose signature failed), so that later passes report no follow-up errors or
    warnings about them."""
    exports = []
    for export in module.exports:
        parts = export.parts()
        if export.transform.kind == "minimize":
            parts = _objectives_wrt(module, export, parts, diags)
        parts = [_check_export(module, part, diags) for part in parts]
        if all(p is not None for p in parts):
            exports.append(export.joined(tuple(parts)))
    return replace(module, exports=tuple(exports))


def _objectives_wrt(module: Module, export: Export, parts: tuple[Export, ...],
                    diags: Diagnostics) -> list[Export]:
    """The objectives of a `minimize` export, each differentiated with respect to the `wrt`
    names it takes (the others get a zero gradient from it); a name none takes is an error."""
    fns = [module.function(p.transform.fn) for p in parts]
    t = export.transform
    for name, span in zip(t.wrt, t.wrt_spans):
        if all(fn is not None and fn.param(name) is None for fn in fns):
            params = sorted({p.name for fn in fns if fn is not None for p in fn.params})
            diags.error(f"'{name}' is not a parameter of any objective (parameters: "
                        f"{', '.join(params)})" + _did_you_mean(name, params), span)
    out = []
    for part, fn in zip(parts, fns):
        pt = part.transform
        kept = [(n, s) for n, s in zip(pt.wrt, pt.wrt_spans) if fn is None or fn.param(n) is not None]
        if fn is not None and not kept and t.wrt:
            diags.error(f"objective '{fn.name}' takes none of wrt=[{', '.join(t.wrt)}]: its "
                        f"gradient would be zero", part.fn_span)
        out.append(replace(part, transform=replace(pt, wrt=tuple(n for n, _ in kept),
                                                   wrt_spans=tuple(s for _, s in kept))))
    return out


def _check_export(module: Module, export: Export, diags: Diagnostics) -> Export | None:
    """One export (or one objective of a `minimize` export) checked; None when dropped."""
    t = export.transform
    fn = module.function(t.fn)
    if fn is None:
        names = [f.name for f in module.functions]
        diags.error(f"unknown function '{t.fn}'" + _did_you_mean(t.fn, names), export.fn_span)
        return export
    if _broken(fn):
        return None
    outer = module.function(t.compose.outer) if t.compose is not None else None
    clash = next((f for f in (fn, outer) if f is not None and f.param("lr") is not None), None)
    if t.kind == "descend" and t.lr is None and clash is not None:  # a composition's outer too
        diags.error(f"descend without lr= takes the step size as an argument 'lr', but "
                    f"'{clash.name}' has a parameter 'lr'; write lr=VALUE or rename it",
                    export.fn_span)
        return None
    if t.compose is not None:  # the compose pass checks both functions and wrt
        return export if outer is None or not _broken(outer) else None
    problem = t.kind != "fn" and result_problem(t.kind, t.has_aux, fn.name, fn.result_type)
    if problem:
        diags.error(problem, export.fn_span)
        return None
    seen: set[str] = set()
    wrt = []
    for name, span in zip(t.wrt, t.wrt_spans):
        p = fn.param(name)
        if p is None:
            params = ", ".join(p.name for p in fn.params) or "none"
            diags.error(f"'{name}' is not a parameter of '{fn.name}' (parameters: {params})"
                        + _did_you_mean(name, [p.name for p in fn.params]), span)
        elif name in seen:
            diags.error(f"'{name}' appears twice in wrt", span)
        elif not is_float_tree(p.value.type):
            diags.error(f"cannot differentiate with respect to '{name}' of type "
                        f"{p.value.type}: only float tensors (or structs of them) have "
                        f"gradients", span)
        else:
            wrt.append((name, span))
        seen.add(name)
    if len(wrt) != len(t.wrt):
        t = replace(t, wrt=tuple(n for n, _ in wrt), wrt_spans=tuple(s for _, s in wrt))
        export = replace(export, transform=t)
    return export


def _reject_recursion(module: Module, diags: Diagnostics) -> Module:
    """Calls that are part of a cycle of the call graph become errors at the call site."""
    calls: dict[str, list[str]] = {
        fn.name: [op.params.callee for op in walk(fn.body) if op.name == "call_fn"]
        for fn in module.functions}

    def path(src: str, dst: str) -> list[str] | None:
        """A shortest call chain src -> ... -> dst, or None."""
        parents: dict[str, str | None] = {src: None}
        todo = [src]
        while todo:
            cur = todo.pop(0)
            if cur == dst:
                chain = [cur]
                while parents[chain[-1]] is not None:
                    chain.append(parents[chain[-1]])  # type: ignore[arg-type]
                return chain[::-1]
            for nxt in calls.get(cur, ()):
                if nxt not in parents:
                    parents[nxt] = cur
                    todo.append(nxt)
        return None

    functions = []
    for fn in module.functions:
        def check(op: Op, fn: Function = fn) -> Op:
            if op.name != "call_fn":
                return op
            chain = path(op.params.callee, fn.name)
            if chain is None:
                return op
            if len(chain) == 1:
                what = f"'{fn.name}' calls itself"
            else:
                what = "recursive call: " + " -> ".join(f"'{n}'" for n in [fn.name, *chain])
            diags.error(f"{what}; recursion is not supported (write the iteration as a for "
                        f"loop)", op.span)
            return Op("error", op.operands, op.results, NoParams(), (), op.span)

        functions.append(replace(fn, body=map_ops(fn.body, check)))
    return replace(module, functions=tuple(functions))


def _leveled(region: Region) -> list[tuple[Op, int]]:
    """Every op of a region with the number of blocks (ops with regions) around it."""
    out, todo = [], [(region, 0)]
    while todo:
        r, level = todo.pop()
        for op in r.ops:
            out.append((op, level))
            todo.extend((inner, level + 1) for inner in op.regions)
    return out


@dataclass(frozen=True)
class _Nesting:
    """How deep a function nests when the lowering inlines its calls: `blocks` (if, for, ...,
    through its callees) and `calls` (the longest chain of calls it starts, `chain`)."""

    blocks: int
    calls: int
    chain: tuple[str, ...]


def _nesting(module: Module) -> dict[str, _Nesting]:
    """Each function's nesting, callees first, without recursion (the call graph is acyclic:
    recursive calls are errors by now)."""
    out: dict[str, _Nesting] = {}
    functions = {fn.name: fn for fn in module.functions}
    for fn in module.functions:
        stack = [fn.name]
        while stack:
            name = stack[-1]
            if name in out:
                stack.pop()
                continue
            ops = _leveled(functions[name].body)
            todo = [op.params.callee for op, _ in ops
                    if op.name == "call_fn" and op.params.callee not in out]
            if todo:
                stack.extend(todo)
                continue
            blocks, calls, chain = 0, 0, (name,)
            for op, level in ops:
                if op.regions:
                    blocks = max(blocks, level + 1)
                if op.name == "call_fn":
                    inner = out[op.params.callee]
                    blocks = max(blocks, level + inner.blocks)
                    if 1 + inner.calls > calls:
                        calls, chain = 1 + inner.calls, (name, *inner.chain)
            out[name] = _Nesting(blocks, calls, chain)
            stack.pop()
    return out


def _cut_deep_nesting(module: Module, diags: Diagnostics) -> Module:
    """Blocks nested deeper than MAX_BLOCKS (through calls) and chains of more than MAX_CALLS
    calls are reported where the excess starts; every op that goes past a limit becomes an
    error op, so that the later, recursive stages never see it."""
    nesting = _nesting(module)
    limit = (f"the limit is {MAX_BLOCKS} levels of if, for, checkpoint, argmin and expect, "
             f"counted through calls")

    def cut(op: Op, level: int, fn: Function) -> Op | None:
        """The error op that replaces `op` (reported when the excess starts here), or None."""
        if op.regions and level + 1 > MAX_BLOCKS:
            diags.error(f"blocks nested too deeply: this '{op.name}' is level {level + 1} "
                        f"({limit})", op.span)
        elif op.name == "call_fn":
            inner = nesting[op.params.callee]
            if level + inner.blocks > MAX_BLOCKS:
                if inner.blocks <= MAX_BLOCKS:
                    diags.error(f"blocks nested too deeply: the blocks of '{inner.chain[0]}' "
                                f"are at levels up to {level + inner.blocks} here ({limit})",
                                op.span)
            elif 1 + inner.calls > MAX_CALLS:
                if inner.calls == MAX_CALLS:
                    chain = [f"'{n}'" for n in (fn.name, *inner.chain)]
                    shown = chain if len(chain) <= 6 else [*chain[:3], "...", *chain[-2:]]
                    diags.error(f"calls nested too deeply: {' -> '.join(shown)} is a chain of "
                                f"{len(chain) - 1} calls (the limit is {MAX_CALLS})", op.span)
            else:
                return None
        else:
            return None
        return Op("error", op.operands, op.results, NoParams(), (), op.span)

    def region(r: Region, level: int, fn: Function) -> Region:
        ops = []
        for op in r.ops:
            new = cut(op, level, fn)
            if new is None and op.regions:
                new = replace(op, regions=tuple(region(x, level + 1, fn) for x in op.regions))
            ops.append(op if new is None else new)
        return replace(r, ops=tuple(ops))

    return replace(module, functions=tuple(replace(fn, body=region(fn.body, 0, fn))
                                           for fn in module.functions))


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
        self.reported_lists: set[Value] = set()
        self.fn_refs: dict[Op, str] = {}
        """`fn_ref` ops: a function named as a value, with the name as written."""
        self.taken: set[Op] = set()
        """The `fn_ref` ops folded into a map_leaves as its function."""
        self.site: Op | None = None
        """The op whose static arguments are being folded."""

    def run(self) -> Function:
        body = self.region(self.fn.body)
        used = region_uses(body)
        body = map_ops(body, lambda op: self.reject_function_values(op, used))
        fn = dce_function(replace(self.fn, body=body))
        return replace(fn, body=map_ops(fn.body, self.reject_list_values))

    def reject_function_values(self, op: Op, used: set[Value]) -> Op:
        """A function named as a value is an error unless it is map_leaves' argument only."""
        if op.name != "fn_ref" or (op in self.taken and op.result not in used):
            return op
        return self.error_op(op, _not_a_value(self.fn_refs[op], "function"))

    def reject_list_values(self, op: Op) -> Op:
        """A list or string literal still used after folding is used as a value: an error."""
        if op.name == "str":
            self.diags.error("a string literal can only be a static argument of a builtin, "
                             "such as einsum's subscripts", op.span)
            return self.failed(op)
        if op.name != "list":
            return op
        if op.result not in self.reported_lists:
            self.report_list(op)
        return self.failed(op)

    def report_list(self, d: Op) -> None:
        self.reported_lists.add(d.result)
        self.diags.error("a list literal can only be an argument of a builtin such as "
                         "zeros([...]) or concat([...]); use a tuple (a, b) for values", d.span)

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
        return self.failed(op)

    def failed(self, op: Op) -> Op:
        """An `error` op in place of `op` (whose error is reported). It keeps the operands (the
        elements of list operands) alive, so that errors in computing them are reported too."""
        keep: list[Value] = []

        def add(v: Value) -> None:
            d = self.defs.get(v)
            if d is not None and d.name == "list":
                for x in d.operands:
                    add(x)
            elif v not in keep:
                keep.append(v)

        for v in op.operands:
            add(v)
        return Op("error", tuple(keep), op.results, NoParams(), (), op.span)

    def op(self, op: Op) -> Op:
        if op.name == "argmin":  # the inner variable's declared type may name a struct
            regions = []
            for region in op.regions:
                args = tuple(Value(self.resolve_type(a.type, op.span), a.hint) for a in region.args)
                self.subst.update(zip(region.args, args))
                regions.append(replace(region, args=args))
            op = replace(op, regions=tuple(regions))
        if op.regions:
            op = replace(op, regions=tuple(self.region(r) for r in op.regions))
        if op.name == "ref":
            return self.ref(op)
        if op.name == "call":
            return self.call(op)
        if op.name == "for":
            return self.loop(op)
        if op.name == "grad":
            return self.gradient(op)
        self.reject_lists(op, op.operands)
        if op.name == "getfield":
            return self.getfield(op)
        return op

    def gradient(self, op: Op) -> Op:
        """`grad(f, wrt=[...])(args)`: f must be a function of the user's (its call, resolved,
        is the region's); each wrt parameter becomes the position of the region argument
        given for it."""
        self.reject_lists(op, op.operands)
        p = op.params
        region = op.regions[0]
        call = next((o for o in walk(region) if o.name in ("call_fn", "error")), None)
        if call is None:
            return self.error_op(op, f"grad differentiates a function of yours; '{p.fn}' is not "
                                     f"one: call it in a function and differentiate that")
        if call.name == "error":
            return self.failed(op)
        fn = self.scope.module.function(call.params.callee)
        names = [q.name for q in fn.params]
        argnums = []
        for w in p.wrt:
            if w not in names:
                return self.error_op(op, f"'{w}' is not a parameter of '{fn.name}' (parameters: "
                                         f"{', '.join(names)})" + _did_you_mean(w, names))
            argnums.append(region.args.index(call.operands[names.index(w)]))
        return replace(op, params=replace(p, fn=fn.name, argnums=tuple(argnums)))

    def getfield(self, op: Op) -> Op:
        """A field of a struct built in place is known now: check that it exists."""
        d = self.defs.get(op.operands[0])
        if d is None or d.name != "struct_new" or op.params.name in d.params.fields:
            return op
        name, fields = d.params.name, d.params.fields
        return self.error_op(op, f"struct {name} has no field '{op.params.name}' (fields: "
                                 f"{', '.join(fields) or 'none'})"
                                 + _did_you_mean(op.params.name, list(fields)))

    def reject_lists(self, op: Op, operands) -> None:
        for v in operands:
            d = self.defs.get(v)
            if d is not None and d.name == "list" and v not in self.reported_lists:
                self.report_list(d)

    def ref(self, op: Op) -> Op:
        name = op.params.name
        if name in self.dims:
            return replace(op, name="dim")
        found = self.scope.lookup(name)
        if isinstance(found, tuple) and found[0] == "struct":
            fields = ", ".join(f"{n}=..." for n, _ in found[1].fields)
            return self.error_op(op, f"'{name}' is a struct type and cannot be used as a value; "
                                     f"build one with {name}({fields})")
        if isinstance(found, tuple) and found[0] == "dist":
            return self.error_op(op, f"'{name}' is a distribution and cannot be used as a value "
                                     f"by itself; give its parameters: {name}("
                                     + ", ".join(found[1].params) + ")")
        if isinstance(found, tuple) and found[0] == "fn":  # map_leaves(p, f) takes it
            ref = Op("fn_ref", (), op.results, CalleeParams(found[1].name), (), op.span)
            self.fn_refs[ref] = name
            return ref
        if isinstance(found, tuple):
            return self.error_op(op, _not_a_value(name, "builtin function"))
        return self.error_op(op, self.scope.unknown("name", name, self.locals + self.dims))

    def call(self, op: Op) -> Op:
        p: CallParams = op.params
        found = self.scope.lookup(p.callee)
        if isinstance(found, list):
            if found:
                return self.error_op(op, f"'{p.callee}' is ambiguous: it could be "
                                         + " or ".join(found) + "; qualify it with its module name")
            return self.error_op(op, self.scope.unknown("function", p.callee))
        npos = len(op.operands) - len(p.kwnames)
        positional, keywords = op.operands[:npos], dict(zip(p.kwnames, op.operands[npos:]))
        kind, target = found
        if p.annotation is not None and kind != "builtin":
            what = {"fn": "a function", "struct": "a struct", "dist": "a distribution"}[kind]
            hint = (f"; to choose a draw's estimator, write z ~ {p.callee}(...) with "
                    f"{p.annotation.name}" if kind == "dist" else "")
            return self.error_op(op, f"'{p.callee}' is {what}: 'with {p.annotation.name}' gives a "
                                     f"backward rule to a non-smooth builtin only" + hint,
                                 p.annotation.span)
        if kind == "builtin":
            return self.builtin(op, target, positional, keywords)
        if kind == "dist":
            return self.dist(op, target, positional, keywords)
        if kind == "struct":
            return self.struct_new(op, target, positional, keywords)
        return self.call_fn(op, target, positional, keywords)

    def bind_args(self, op: Op, what: str, names: list[str], positional, keywords,
                  required: set[str], struct: bool = False) -> dict[str, Value] | None:
        """Match arguments to parameter names (or struct fields); None after an error."""
        noun, arg = ("field", "field") if struct else ("parameter", "argument")
        if len(positional) > len(names):
            given = len(positional)
            self.diags.error(f"{what} takes {len(names)} argument{'s' * (len(names) != 1)} "
                             f"but {given} {'was' if given == 1 else 'were'} given", op.span)
            return None
        bound = dict(zip(names, positional))
        ok = True
        for k, v in keywords.items():
            if k not in names:
                hint = _did_you_mean(k, names) or (
                    f" ({noun}s: {', '.join(names)})" if names else f" (it takes no {noun}s)")
                self.diags.error(f"{what} has no {noun} '{k}'" + hint, op.span)
                ok = False
            elif k in bound:
                self.diags.error(f"argument '{k}' of {what} is given twice, by position and "
                                 f"by name", op.span)
                ok = False
            bound[k] = v
        missing = [n for n in names if n in required and n not in bound]
        if missing:
            self.diags.error(f"{what} is missing {arg}{'s' * (len(missing) > 1)} "
                             + ", ".join(f"'{m}'" for m in missing), op.span)
            ok = False
        return bound if ok else None

    def call_fn(self, op: Op, fn: Function, positional, keywords) -> Op:
        names = [q.name for q in fn.params]
        bound = self.bind_args(op, f"'{fn.name}'", names, positional, keywords, set(names))
        if bound is None:
            return self.failed(op)
        self.reject_lists(op, bound.values())
        if _broken(fn):  # its signature has an unknown type, already reported
            return self.failed(op)
        return Op("call_fn", tuple(bound[n] for n in names), op.results, CalleeParams(fn.name),
                  (), op.span)

    def dist(self, op: Op, spec: DistSpec, positional, keywords) -> Op:
        """`Normal(mu, sigma)`, `Categorical(probs=p)`: one operand per canonical parameter,
        each given by position, by its name or by an alias (`probs` for `logits`)."""
        what = f"{spec.name}({', '.join(spec.params)})"
        if len(positional) > len(spec.params):
            return self.error_op(op, f"{what} takes {len(spec.params)} parameter"
                                     f"{'s' * (len(spec.params) != 1)} but {len(positional)} "
                                     f"were given")
        given: dict[str, tuple[str, Value]] = {p: (p, v) for p, v in zip(spec.params, positional)}
        for k, v in keywords.items():
            canonical = spec.canonical(k)
            if canonical is None:
                names = list(spec.params) + [a for a, _ in spec.aliases]
                return self.error_op(op, f"{spec.name} has no parameter '{k}' (parameters: "
                                         f"{', '.join(names)})" + _did_you_mean(k, names))
            if canonical in given:
                return self.error_op(op, f"parameter '{canonical}' of {spec.name} is given twice"
                                     + (f" (as '{given[canonical][0]}' and '{k}')"
                                        if given[canonical][0] != k else ""))
            given[canonical] = (k, v)
        missing = [p for p in spec.params if p not in given]
        if missing:
            return self.error_op(op, f"{what} is missing " + ", ".join(f"'{m}'" for m in missing))
        self.reject_lists(op, [v for _, v in given.values()])
        return Op("dist", tuple(given[p][1] for p in spec.params), op.results,
                  DistParams(spec.name, tuple(given[p][0] for p in spec.params)), (), op.span)

    def struct_new(self, op: Op, st: StructType, positional, keywords) -> Op:
        names = [n for n, _ in st.fields]
        if positional:
            return self.error_op(op, f"struct '{st.name}' is built with field names: "
                                     f"{st.name}({', '.join(f'{n}=...' for n in names)})")
        bound = self.bind_args(op, f"struct '{st.name}'", names, (), keywords, set(names),
                               struct=True)
        if bound is None:
            return self.failed(op)
        self.reject_lists(op, bound.values())
        if _has_error(st):
            return self.failed(op)
        return Op("struct_new", tuple(bound[n] for n in names), op.results,
                  StructParams(st.name, tuple(names)), (), op.span)

    def builtin(self, op: Op, b: Builtin, positional, keywords) -> Op:
        names = [a.name for a in b.args]
        required = {a.name for a in b.args if a.default is REQUIRED}
        bound = self.bind_args(op, b.signature, names, positional, keywords, required)
        if bound is None:
            return self.failed(op)
        operands: list[Value] = []
        static: dict[str, object] = {}
        self.site = op
        try:
            for a in b.args:
                if a.name not in bound:  # an optional tensor is recorded as given or not
                    static[a.name] = False if a.kind == "tensor" else a.default
                elif a.kind == "tensor":
                    self.reject_lists(op, [bound[a.name]])
                    operands.append(bound[a.name])
                    if a.default is not REQUIRED:
                        static[a.name] = True
                elif a.kind == "tensors":
                    operands.extend(self.tensor_list(bound[a.name], a, b))
                elif a.kind == "fn":  # the op's callee (CalleeParams)
                    static["callee"] = self.function_name(bound[a.name], a, b)
                else:
                    static[a.name] = self.fold(bound[a.name], a, b)
        except _Fail:
            return self.failed(op)
        names = iter(a.name for a in b.args)  # positional arguments come first, in order
        op = replace(op, arg_spans=tuple((name or next(names), span)
                                         for name, span in op.arg_spans))
        rule = op.params.annotation
        if rule is not None and b.op == "sliced_wasserstein":
            if rule.name != "control_variate":
                return self.error_op(op, f"sliced_wasserstein takes 'with control_variate(kind)' "
                                         f"(gaussian_lower, gaussian_upper or none), not "
                                         f"'{rule.name}'", rule.span)
            static["control"] = rule
        elif rule is not None and b.op == "einsum":
            return self.sampled_einsum(op, rule, operands, static)
        elif rule is not None:
            if "rule" not in {f.name for f in fields(OPS[b.op].params)}:
                return self.error_op(op, f"'{b.name}' is differentiable: it takes no backward rule "
                                         f"('with {rule.name}'); rules are for non-smooth builtins "
                                         f"such as sign, round or argmax", rule.span)
            static["rule"] = rule
        d = self.defs.get(operands[0]) if operands else None
        if b.name == "mean" and d is not None and d.name == "dist":
            if static != {"axis": None, "keepdims": False}:
                return self.error_op(op, "mean of a distribution takes no axis or keepdims")
            return Op("dist_mean", tuple(operands), op.results, NoParams(), (), op.span)
        params = OPS[b.op].params(**static)
        return Op(b.op, tuple(operands), op.results, params, (), op.span, op.arg_spans)

    def sampled_einsum(self, op: Op, rule, operands: list[Value], static: dict) -> Op:
        """`einsum(s, x, w) with wta_crs(keep=K)`: a projection whose weight's backward
        samples K rows of x (as `(x @ w) with wta_crs(keep=K)`)."""
        keep = rule.option("keep")
        if rule.name != "wta_crs" or set(dict(rule.options)) != {"keep"}:
            return self.error_op(op, f"einsum takes 'with wta_crs(keep=K)': its weight's "
                                     f"backward from K sampled rows of x; not '{rule.name}'",
                                 rule.span)
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 2:
            return self.error_op(op, f"wta_crs(keep=...) needs an integer of at least 2, got "
                                     f"{keep}", rule.span)
        params = EinsumParams(**static, keep=keep)
        return Op("sampled_einsum", tuple(operands), op.results, params, (), op.span,
                  op.arg_spans)

    def loop(self, op: Op) -> Op:
        start, stop, *inits = op.operands
        bound = Arg("bound", "dim")
        self.site = op
        try:
            lo = self.fold(start, bound, None)
            hi = self.fold(stop, bound, None)
        except _Fail:
            return self.failed(op)
        self.reject_lists(op, inits)
        return replace(op, operands=tuple(inits), params=replace(op.params, start=lo, stop=hi))

    # ---- static arguments
    def function_name(self, v: Value, a: Arg, b: Builtin) -> str:
        """The function an argument names (`map_leaves(p, quantized)`)."""
        d = self.defs.get(v)
        if d is None or d.name != "fn_ref":
            self.static_error(v, f"argument '{a.name}' of {b.name} must be the name of a "
                                 f"function, e.g. {b.name}(p, quantized)")
        self.taken.add(d)
        if _broken(self.scope.module.function(d.params.callee)):
            raise _Fail  # its signature has an unknown type, already reported
        return d.params.callee

    def tensor_list(self, v: Value, a: Arg, b: Builtin) -> tuple[Value, ...]:
        d = self.defs.get(v)
        if d is None or d.name != "list" or not d.operands:
            self.static_error(v, f"argument '{a.name}' of {b.name} must be a list of tensors, "
                                 f"e.g. [a, b]")
        return d.operands  # type: ignore[union-attr]

    def static_error(self, v: Value, message: str) -> None:
        d = self.defs.get(v)
        if d is not None and d.name in ("error", "fn_ref"):
            raise _Fail  # already reported (a function as a value: once resolved)
        site = self.site.span if self.site is not None else None
        if d is not None and d.span is not None and (site is None or _within(d.span, site)):
            span = d.span  # the argument itself
        else:  # a parameter or a value computed elsewhere: point at the call, name the value
            span = site
            if v.hint:
                message += f"; '{v.hint}' is a value computed at run time"
        self.diags.error(message, span)
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
        if a.kind == "padding":
            return self.padding(v, f"{what} must be \"SAME\", \"VALID\" or a list of (low, "
                                   f"high) pairs of integer literals, one per spatial axis, e.g. "
                                   f"[(1, 1), (2, 2)]")
        if a.kind == "string":
            if d is None or d.name != "str":
                self.static_error(v, f"{what} must be a string literal, e.g. \"{a.example}\"")
            return d.params.name  # type: ignore[union-attr]
        assert a.kind == "shape"
        msg = f"{what} must be a list of integer literals and dimension names, e.g. [B, 10]"
        if d is None or d.name != "list":
            self.static_error(v, msg)
        return tuple(self.dim(x, msg, allow_minus_one=b is not None and b.name == "reshape")
                     for x in d.operands)  # type: ignore[union-attr]

    def padding(self, v: Value, message: str) -> str | tuple[tuple[int, int], ...]:
        """A padding name, or explicit (low, high) amounts per spatial axis."""
        d = self.defs.get(v)
        if d is not None and d.name == "str":
            return d.params.name
        if d is None or d.name != "list":
            self.static_error(v, message)
        pairs = []
        for pair in d.operands:  # type: ignore[union-attr]
            t = self.defs.get(pair)
            if t is None or t.name != "tuple" or len(t.operands) != 2:
                self.static_error(pair, message)
            lo, hi = (self.static_int(x, message) for x in t.operands)  # type: ignore[union-attr]
            if lo < 0 or hi < 0:
                self.static_error(pair, message.replace("integer literals", "non-negative "
                                                                            "integers"))
            pairs.append((lo, hi))
        return tuple(pairs)

    def dim(self, v: Value, message: str, allow_minus_one: bool = False) -> int | str:
        d = self.defs.get(v)
        if d is not None and d.name == "dim":
            return d.params.name
        value = self.static_int(v, message)
        if value < 0 and not (allow_minus_one and value == -1):
            self.static_error(v, message.replace("integer literals", "non-negative integers"))
        return value
