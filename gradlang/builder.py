"""Build the IR of one source unit from its AST.

The builder is syntax-directed: local names (parameters, `let`, loop variables) become SSA
values; every other name stays symbolic (`ref` / `call` ops) for the resolve pass, and every
type is left unknown for the typecheck pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from . import ast
from .diagnostics import Diagnostics, Span
from .limits import I32_MAX
from .options import number_problem
from .ir import (PRIVATE, Combination, Composition, Export, Function, Objective, Op, Param,
                 Region, StructDef, Transform, Value)
from .ops import (ArgminParams, CallParams, HostParams, CastParams, ConstParams, Annotation, ExpectParams, ForParams,
                  GetParams, GradParams, IndexItem, IndexParams, NameParams, NoParams, SampledParams, SampleParams)
from .types import DType, NamedType, TensorType, TupleType, Type

TRANSFORMS = ("grad", "value_and_grad", "descend", "minimize")
GRADIENTS = ("grad", "value_and_grad")
"""The transforms a function body may apply to arguments: `grad(f, wrt=[w])(w, x)`."""
MODULE_ATTRIBUTES = ("artifact", "exported", "exports", "header", "ir", "save", "stablehlo",
                     "verify")
"""The public attributes of the Python modules that hold the exports (`gradlang.api`'s
CompiledModule and LoadedModule; a test keeps this list equal to theirs): an export by one of
these names, or by a name starting with '_' (their private attributes), would be hidden by it."""


def annotation_from_ast(a: ast.Annotation, diags: Diagnostics,
                       positional: str | bool = False) -> Annotation | None:
    """`with name(k=v, ...)` as an Annotation; options must be literals or names. One leading
    positional option is allowed where `positional` names it (`keep` for wta_crs), or, when
    it is True, left unnamed for the pass that knows the annotation's options schema to name
    (`implicit(cg)`: method=cg, `gradlang.options.parse`)."""
    if len(a.args) > (1 if positional else 0):
        extra = a.args[1 if positional else 0]
        diags.error(f"options of '{a.name}' are given by name, e.g. {a.name}(option=value)", extra.span)
        return None
    options = []
    if a.args:
        v = _literal(a.args[0])
        if v is None:
            diags.error(f"option '{positional}' of '{a.name}' must be a number, true/false or a name",
                        a.args[0].span)
            return None
        options.append((None if positional is True else positional, v))
    for k in a.kwargs:
        if k.name in (name for name, _ in options):
            diags.error(f"option '{k.name}' of '{a.name}' is given twice", k.value.span)
            return None
        v = _literal(k.value)
        if v is None:
            diags.error(f"option '{k.name}' of '{a.name}' must be a number, true/false or a name",
                        k.value.span)
            return None
        if isinstance(v, int) and not isinstance(v, bool) and not -I32_MAX - 1 <= v <= I32_MAX:
            diags.error(f"option '{k.name}' of '{a.name}': integer {v} does not fit in i32",
                        k.value.span)
            return None
        options.append((k.name, v))
    return Annotation(a.name, tuple(options), a.span)


def _literal(e: ast.Expr) -> bool | int | float | str | None:
    if isinstance(e, (ast.IntLit, ast.FloatLit, ast.BoolLit)):
        return e.value
    if isinstance(e, ast.Unary) and e.op == "neg" and isinstance(e.operand, (ast.IntLit, ast.FloatLit)):
        return -e.operand.value
    if isinstance(e, ast.Name):
        return e.id
    return None


SCOPES = ("expect", "logmeanexp")
"""Monte Carlo scopes: the mean of N draws of a value, or the log of the mean of their exp."""


def _scope(e: ast.Expr) -> str | None:
    """The scope a call opens (`expect(...)`, `logmeanexp(...)`), or None."""
    if isinstance(e, ast.Call) and isinstance(e.func, ast.Name) and e.func.id in SCOPES:
        return e.func.id
    return None


def _samples_option(call: ast.Call, diags: Diagnostics) -> int | None:
    """The N of `expect(..., samples=N)` (a positive integer literal); None after an error."""
    what = call.func.id  # type: ignore[attr-defined]
    opts = {k.name: k for k in call.kwargs}
    for k in call.kwargs:
        if k.name != "samples":
            diags.error(f"unknown option '{k.name}' for {what}; expected samples=N", k.span)
            return None
    if "samples" not in opts:
        diags.error(f"{what} needs samples=N: the number of Monte Carlo draws", call.span)
        return None
    v = opts["samples"].value
    if not (isinstance(v, ast.IntLit) and 1 <= v.value <= I32_MAX):
        diags.error(f"samples must be a positive integer literal (at most {I32_MAX})", v.span)
        return None
    return v.value


def qualify(unit: str, name: str) -> str:
    return f"{unit}.{name}" if unit else name


def type_from_ast(t: ast.TypeExpr) -> Type:
    if isinstance(t, ast.ScalarTypeExpr):
        return TensorType(DType(t.dtype))
    if isinstance(t, ast.TensorTypeExpr):
        return TensorType(DType(t.dtype), t.dims)
    if isinstance(t, ast.NamedTypeExpr):
        return NamedType(t.name, t.bindings)
    assert isinstance(t, ast.TupleTypeExpr)
    return TupleType(tuple(type_from_ast(e) for e in t.elems))


@dataclass
class UnitIR:
    structs: list[StructDef] = field(default_factory=list)
    functions: list[Function] = field(default_factory=list)
    exports: list[Export] = field(default_factory=list)


def build_unit(program: ast.Program, unit: str, diags: Diagnostics) -> UnitIR:
    """IR for every struct, function and export declared in `program`."""
    out = UnitIR()
    seen: dict[str, Span] = {}

    def declare(name: str, span: Span) -> bool:
        if name in seen:
            diags.error(f"'{name}' is already defined at line {seen[name].line}", span)
            return False
        seen[name] = span
        return True

    for decl in program.decls:
        if isinstance(decl, ast.StructDecl) and declare(decl.name, decl.span):
            names = [f.name for f in decl.fields]
            for i, f in enumerate(decl.fields):
                if names.index(f.name) != i:
                    diags.error(f"duplicate field '{f.name}' in struct '{decl.name}'", f.span)
            fields = tuple((f.name, type_from_ast(f.type)) for f in decl.fields)
            out.structs.append(StructDef(qualify(unit, decl.name), unit, fields, decl.span))
        elif isinstance(decl, ast.FnDecl) and declare(decl.name, decl.name_span):
            out.functions.append(_FunctionBuilder(unit, diags).build(decl))
        elif isinstance(decl, ast.ExternDecl) and declare(decl.name, decl.span):
            out.functions.append(_extern(decl, unit, diags))
        elif isinstance(decl, ast.JaxDecl) and declare(decl.name, decl.span):
            out.functions.append(_jax_fn(decl, unit))
    exported: dict[str, Span] = {}
    for decl in program.decls:
        if isinstance(decl, ast.ExportDecl):
            if decl.name in exported:
                diags.error(f"export '{decl.name}' is already defined at line "
                            f"{exported[decl.name].line}", decl.span)
                continue
            exported[decl.name] = decl.span
            if decl.name in MODULE_ATTRIBUTES or decl.name.startswith("_"):
                taken = ("a name starting with '_' is kept for the compiled module's own "
                         "attributes" if decl.name.startswith("_") else
                         f"the compiled module's attribute m.{decl.name} would hide it (its "
                         f"attributes: {', '.join(MODULE_ATTRIBUTES)})")
                diags.error(f"export '{decl.name}' needs another name: {taken}", decl.name_span)
            export = _build_export(decl, unit, diags)
            if export is not None:
                out.exports.append(export)
    return out


def _extern(decl: ast.ExternDecl, unit: str, diags: Diagnostics) -> Function:
    """`extern fn name(params) -> T`: a function whose body is one `host_call` into the Python
    function bound to `name` at compile or load time. Its types are tensors or tuples of them
    (what a host callback exchanges)."""
    params = tuple(Param(p.name, Value(type_from_ast(p.type), p.name), p.span) for p in decl.params)
    result = type_from_ast(decl.result)
    ok = True
    for p in params:
        if not isinstance(p.value.type, TensorType):
            diags.error(f"parameter '{p.name}' of extern '{decl.name}' must be a tensor (a host "
                        f"callback exchanges arrays), got {p.value.type}", p.span)
            ok = False
    if not _tensors_only(result):
        diags.error(f"the result of extern '{decl.name}' must be a tensor or a tuple of tensors "
                    f"(a host callback exchanges arrays), got {result}", decl.result.span)
        ok = False
    value = Value(result, "")
    call = (Op("host_call", tuple(p.value for p in params), (value,),
               HostParams(qualify(unit, decl.name), result), (), decl.span) if ok
            else Op("error", (), (value,), NoParams(), (), decl.span))
    return Function(qualify(unit, decl.name), unit, params, result, Region((), (call,), (value,)),
                    decl.span, decl.result.span)


def _jax_fn(decl: ast.JaxDecl, unit: str) -> Function:
    """`jax fn name(params) -> T`: a function whose body is one `call_jax` of the JAX function
    bound to `name` when compiling, traced inline into the exports. Its types are any the
    language has: the JAX function gets arrays, structs as dicts and tuples."""
    params = tuple(Param(p.name, Value(type_from_ast(p.type), p.name), p.span) for p in decl.params)
    result = type_from_ast(decl.result)
    value = Value(result, "")
    call = Op("call_jax", tuple(p.value for p in params), (value,),
              NameParams(qualify(unit, decl.name)), (), decl.span)
    return Function(qualify(unit, decl.name), unit, params, result, Region((), (call,), (value,)),
                    decl.span, decl.result.span)


def _tensors_only(t) -> bool:
    if isinstance(t, TupleType):
        return all(_tensors_only(e) for e in t.elems)
    return isinstance(t, TensorType)


def _objective(e: ast.Expr, unit: str, diags: Diagnostics
               ) -> tuple[ast.Name, int, str, Composition | None] | None:
    """`f` (or `nn.f`), `expect(f, samples=N)`, `logmeanexp(f, samples=N)` or `compose(h,
    expect(f, samples=N), by=...)`: the function's name, N (0 without a scope), the scope and
    the composition."""
    name = _dotted(e)
    if name is not None:
        return ast.Name(e.span, name), 0, "expect", None
    if isinstance(e, ast.Call) and isinstance(e.func, ast.Name) and e.func.id == "compose":
        return _composition(e, unit, diags)
    scope = _scope(e)
    if scope is not None:
        name = _dotted(e.args[0]) if len(e.args) == 1 else None
        if name is None:
            diags.error(f"{scope} in an export takes one function name, e.g. {scope}(f, "
                        f"samples=8)", e.span)
            return None
        n = _samples_option(e, diags)
        return None if n is None else (ast.Name(e.args[0].span, name), n, scope, None)
    return None


def _composition(call: ast.Call, unit: str, diags: Diagnostics
                 ) -> tuple[ast.Name, int, str, Composition] | None:
    """`compose(f, expect(g, samples=N), by=scgd(beta=B) | plugin)`: f of g's expectation
    (the compose pass checks the functions and the estimator)."""
    if len(call.args) != 2:
        diags.error("compose takes the outer function and the inner expectation, e.g. "
                    "compose(f, expect(g, samples=16), by=scgd(beta=0.1))", call.span)
        return None
    outer = _dotted(call.args[0])
    if outer is None:
        diags.error("compose's first argument names the outer function f, applied to the inner "
                    "expectation, e.g. compose(f, expect(g, samples=16))", call.args[0].span)
        return None
    inner = call.args[1]
    if _scope(inner) != "expect":
        diags.error("compose's second argument is the inner expectation expect(g, samples=N): "
                    "f is applied to the mean of g's draws", inner.span)
        return None
    found = _objective(inner, unit, diags)
    if found is None:
        return None
    by = None
    for k in call.kwargs:
        if k.name != "by":
            diags.error(f"unknown option '{k.name}' for compose; expected by=scgd(beta=...) or "
                        f"by=plugin", k.span)
            return None
        if isinstance(k.value, ast.Name):
            by = Annotation(k.value.id, (), k.value.span)
        elif isinstance(k.value, ast.Call) and isinstance(k.value.func, ast.Name):
            v = k.value
            by = annotation_from_ast(ast.Annotation(v.func.id, v.args, v.kwargs, v.span), diags)
            if by is None:
                return None
        else:
            diags.error("by= names the estimator of the composition: scgd(beta=...) or plugin",
                        k.value.span)
            return None
    g, n, _, _ = found
    return g, n, "expect", Composition(qualify(unit, outer), by, call.span, call.args[0].span,
                                       inner.span)


def _build_export(decl: ast.ExportDecl, unit: str, diags: Diagnostics) -> Export | None:
    value = decl.value
    if _scope(value) is not None or (isinstance(value, ast.Call) and _dotted(value.func) == "compose"):
        found = _objective(value, unit, diags)
        if found is None:
            return None
        fn, n, scope, composition = found
        return Export(decl.name, Transform("fn", qualify(unit, fn.id), samples=n, scope=scope,
                                           compose=composition), decl.span, fn.span)
    if _dotted(value) is not None:
        return Export(decl.name, Transform("fn", qualify(unit, _dotted(value))), decl.span,
                      value.span)
    usage = ("an export must name a function or be grad(f, wrt=[...]), value_and_grad(f, "
             "wrt=[...]), descend(f, wrt=[...], lr=...), minimize([f1, f2], wrt=[...], by=RULE), "
             "expect(f, samples=N), logmeanexp(f, samples=N) or compose(f, expect(g, samples=N))")
    if not (isinstance(value, ast.Call) and isinstance(value.func, ast.Name)
            and value.func.id in TRANSFORMS):
        diags.error(usage, value.span)
        return None
    kind = value.func.id
    if kind == "minimize":
        return _build_minimize(decl, value, unit, diags)
    inner = value.args[0] if len(value.args) == 1 else None
    if kind == "descend" and isinstance(inner, ast.Call) and _dotted(inner.func) == "minimize":
        return _descend_minimize(decl, value, inner, unit, diags)
    objective = _objective(inner, unit, diags) if inner is not None else None
    of_grad = None
    if isinstance(inner, ast.Call) and _dotted(inner.func) in GRADIENTS:
        found = _of_grad(inner, kind, diags)
        if found is None:
            return None
        objective, of_grad = found
    if objective is None:
        if not diags.has_errors or len(value.args) != 1:
            diags.error(f"{kind} takes one function name (or expect(f, samples=N), "
                        f"logmeanexp(f, samples=N)) as its positional argument", value.span)
        return None
    by, lr, has_aux = None, None, False
    for k in value.kwargs:
        if k.name == "has_aux":
            has_aux = _literal(k.value)
            if not isinstance(has_aux, bool):
                diags.error("has_aux must be true or false", k.value.span)
                has_aux = False
        elif k.name == "by":
            by = _estimator_option(k.value, diags)
            if by is None:
                return None
        elif k.name == "lr" and kind == "descend":
            lr = _step_size(k.value, diags)
            if lr is None:
                return None
        elif k.name != "wrt":
            lr_text = ", lr=..." if kind == "descend" else ""
            diags.error(f"unknown option '{k.name}' for {kind}; expected wrt=[...]{lr_text} and "
                        f"optionally by=ESTIMATOR and has_aux=true", k.span)
    wrt = _wrt(value, kind, diags)
    if wrt is None:
        return None
    fn, n, scope, composition = objective
    return Export(decl.name, Transform(kind, qualify(unit, fn.id), *wrt, n, by,
                                       None if lr is None else float(lr), scope,
                                       compose=composition, has_aux=has_aux, of_grad=of_grad),
                  decl.span, fn.span)


def _of_grad(inner: ast.Call, kind: str, diags: Diagnostics
             ) -> tuple[tuple[ast.Name, int, str, None], str] | None:
    """`grad(f, wrt=[x])` as the function of an export: f and x (a float scalar parameter, so
    that the derivative is a scalar objective); None after an error."""
    usage = (f"{kind}(grad(f, wrt=[x]), wrt=[...]) differentiates f's derivative with respect "
             f"to one float scalar parameter x; for others, write the gradient in a function "
             f"returning a float scalar, e.g. sum(grad(f, wrt=[w])(w, x) * v), and differentiate "
             f"that")
    name = _dotted(inner.args[0]) if len(inner.args) == 1 else None
    if _dotted(inner.func) != "grad" or name is None or [k.name for k in inner.kwargs] != ["wrt"]:
        diags.error(usage, inner.span)
        return None
    wrt = _wrt(inner, "grad", diags)
    if wrt is None:
        return None
    if len(wrt[0]) != 1:
        diags.error(usage, inner.span)
        return None
    return (ast.Name(inner.args[0].span, name), 0, "expect", None), wrt[0][0]


def _descend_minimize(decl: ast.ExportDecl, value: ast.Call, inner: ast.Call, unit: str,
                      diags: Diagnostics) -> Export | None:
    """`descend(minimize([...], wrt=[...], by=RULE), lr=...)`: the minimize export, stepping
    its parameters by the combined direction (without lr=, the step size is an argument)."""
    lr = None
    for k in value.kwargs:
        if k.name != "lr":
            diags.error(f"unknown option '{k.name}' for descend of minimize; it takes lr= (wrt= "
                        f"and by= go inside minimize(...))", k.span)
            return None
        lr = _step_size(k.value, diags)
        if lr is None:
            return None
    export = _build_minimize(decl, inner, unit, diags)
    if export is None:
        return None
    t = replace(export.transform, descend=True, lr=None if lr is None else float(lr))
    return replace(export, transform=t)


def _step_size(e: ast.Expr, diags: Diagnostics) -> int | float | None:
    """`lr=` of `descend`: a positive number literal in float32's range; None after an error."""
    lr = _literal(e)
    problem = number_problem(lr, "positive")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0:
        diags.error("lr must be a positive number literal, e.g. lr=0.001", e.span)
        return None
    if problem is not None:
        diags.error(f"lr must be {problem}, got {e.span.text}", e.span)
        return None
    return lr


def _wrt(value: ast.Call, kind: str, diags: Diagnostics) -> tuple[tuple[str, ...], tuple[Span, ...]] | None:
    """The names in `wrt=[a, b]` and their spans; None after an error."""
    wrt = [k for k in value.kwargs if k.name == "wrt"]
    if not wrt:
        diags.error(f"{kind} needs wrt=[...]: the parameters to differentiate with respect to",
                    value.span)
        return None
    targets = wrt[0].value
    if not (isinstance(targets, ast.ListLit) and targets.elems
            and all(isinstance(e, ast.Name) for e in targets.elems)):
        diags.error("wrt must be a non-empty list of parameter names, e.g. wrt=[w, b]", targets.span)
        return None
    return (tuple(e.id for e in targets.elems),  # type: ignore[attr-defined]
            tuple(e.span for e in targets.elems))


def _build_minimize(decl: ast.ExportDecl, value: ast.Call, unit: str,
                    diags: Diagnostics) -> Export | None:
    """`minimize([f1, expect(f2, samples=N), ...], wrt=[...], by=RULE)`."""
    listed = value.args[0] if len(value.args) == 1 else None
    if not isinstance(listed, ast.ListLit):
        diags.error("minimize takes one list of objectives, e.g. minimize([f1, f2], wrt=[theta], "
                    "by=mgda)", value.span)
        return None
    if len(listed.elems) < 2:
        diags.error("minimize needs two objectives or more; for one, use value_and_grad(f, "
                    "wrt=[...])", listed.span)
        return None
    objectives = []
    for e in listed.elems:
        errors = len(diags.errors)
        by = None
        if isinstance(e, ast.With):
            by = annotation_from_ast(e.annotation, diags)
            if by is None:
                return None
            if by.name == PRIVATE:
                diags.error("by=dp applies to a whole export (its examples and noise), not to one "
                            "objective of minimize", by.span)
                return None
            e = e.value
        found = _objective(e, unit, diags)
        if found is not None and found[3] is not None:
            diags.error("an objective of minimize cannot be a composition: compose(...) keeps "
                        "its own state; export it with value_and_grad(compose(...), wrt=[...])",
                        e.span)
            return None
        if found is None:
            if len(diags.errors) == errors:
                diags.error("an objective of minimize is a function name, expect(f, samples=N) "
                            "or logmeanexp(f, samples=N), optionally followed by a black-box "
                            "estimator of its gradient, e.g. f with spsa(eps=0.001)", e.span)
            return None
        fn, n, scope, _ = found
        objectives.append(Objective(qualify(unit, fn.id), fn.span, n, scope, by))
    rule = None
    for k in value.kwargs:
        if k.name == "by":
            rule = _combination(k.value, diags)
            if rule is None:
                return None
        elif k.name != "wrt":
            diags.error(f"unknown option '{k.name}' for minimize; expected wrt=[...] and "
                        f"by=RULE", k.span)
    wrt = _wrt(value, "minimize", diags)
    if wrt is None:
        return None
    if rule is None:
        diags.error("minimize needs by=RULE: how to combine the objectives' gradients (mgda, "
                    "pcgrad, weights(w1, w2, ...) or dynamic(temperature=2))", value.span)
        return None
    return Export(decl.name, Transform("minimize", "", *wrt, objectives=tuple(objectives),
                                       rule=rule), decl.span, listed.span)


def _combination(e: ast.Expr, diags: Diagnostics) -> Combination | None:
    """`by=mgda`, `by=weights(0.3, 0.7)` or `by=dynamic(temperature=2)` as a Combination:
    positional number literals (the weights) and named literal options; None after an error."""
    if isinstance(e, ast.Name):
        return Combination(e.id, span=e.span)
    if not (isinstance(e, ast.Call) and isinstance(e.func, ast.Name)):
        diags.error("by= names how minimize combines the gradients: mgda, pcgrad, weights(w1, "
                    "w2, ...) or dynamic(temperature=2)", e.span)
        return None
    weights = []
    for a in e.args:
        w = _literal(a)
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            diags.error(f"the values of '{e.func.id}(...)' must be number literals", a.span)
            return None
        weights.append(float(w))
    options = annotation_from_ast(ast.Annotation(e.func.id, (), e.kwargs, e.span), diags)
    if options is None:
        return None
    return Combination(e.func.id, tuple(weights), options.options, e.span)


def _estimator_option(e: ast.Expr, diags: Diagnostics) -> Annotation | None:
    """`by=es(sigma=0.1, pop=64)` (or `by=es`, `by=dp(clip=1.0, noise=1.1)`) as an Annotation;
    None after an error."""
    if isinstance(e, ast.Name):
        return Annotation(e.id, (), e.span)
    if isinstance(e, ast.Call) and isinstance(e.func, ast.Name):
        return annotation_from_ast(ast.Annotation(e.func.id, e.args, e.kwargs, e.span), diags)
    diags.error("by= names a gradient estimator, e.g. by=spsa(eps=0.001), by=es(sigma=0.1, "
                "pop=64), by=eggroll(sigma=0.1, pop=64, rank=1) or by=dp(clip=1.0, noise=1.0)",
                e.span)
    return None


class _Block:
    """Ops being collected for one region, with the names visible in it."""

    def __init__(self, scope: dict[str, Value]):
        self.ops: list[Op] = []
        self.scope = dict(scope)


class _FunctionBuilder:
    def __init__(self, unit: str, diags: Diagnostics):
        self.unit = unit
        self.diags = diags
        self.block = _Block({})
        self.arity: dict[Value, int] = {}
        """The number of elements of the values built by tuple literals."""

    # ---- helpers
    def emit(self, name: str, operands: tuple[Value, ...], params: object, span: Span,
             nresults: int = 1, regions: tuple[Region, ...] = (),
             arg_spans: tuple[tuple[str, Span], ...] = ()) -> Op:
        op = Op(name, operands, tuple(Value() for _ in range(nresults)), params, regions, span,
                arg_spans)
        self.block.ops.append(op)
        return op

    def error_value(self, message: str, span: Span) -> Value:
        self.diags.error(message, span)
        return self.emit("error", (), NoParams(), span).result

    def bind(self, name: str, value: Value) -> None:
        """Bind a local name; names the value after it when it was just computed."""
        last = self.block.ops[-1] if self.block.ops else None
        if last is not None and last.results == (value,) and not value.hint:
            named = Value(value.type, name)
            self.block.ops[-1] = replace(last, results=(named,))
            if value in self.arity:
                self.arity[named] = self.arity[value]
            value = named
        self.block.scope[name] = value

    def region(self, args: dict[str, Value], build) -> Region:
        """Build a nested region: `build()` returns the yielded values."""
        outer = self.block
        self.block = _Block(outer.scope | args)
        try:
            results = build()
            return Region(tuple(args.values()), tuple(self.block.ops), tuple(results))
        finally:
            self.block = outer

    # ---- functions
    def build(self, decl: ast.FnDecl) -> Function:
        params = []
        for p in decl.params:
            if p.name in self.block.scope:
                self.diags.error(f"duplicate parameter '{p.name}'", p.span)
                continue
            value = Value(type_from_ast(p.type), p.name)
            self.block.scope[p.name] = value
            params.append(Param(p.name, value, p.span))
        results = self.statements(decl.body, decl, allow_return=True)
        body = Region((), tuple(self.block.ops), results)
        return Function(qualify(self.unit, decl.name), self.unit, tuple(params),
                        type_from_ast(decl.result), body, decl.span, decl.result.span)

    def statements(self, stmts: tuple[ast.Stmt, ...], decl: ast.FnDecl,
                   allow_return: bool) -> tuple[Value, ...]:
        for i, stmt in enumerate(stmts):
            if isinstance(stmt, ast.Let):
                self.let_stmt(stmt)
            elif isinstance(stmt, ast.Sample):
                self.sample(stmt)
            elif isinstance(stmt, ast.Return):
                value = self.expr(stmt.value)
                if i != len(stmts) - 1:
                    self.diags.error("unreachable code after return", stmts[i + 1].span)
                return (value,)
        end = Span(decl.span.source, decl.span.end_line, decl.span.end_col - 1,
                   decl.span.end_line, decl.span.end_col)
        self.diags.error(f"function '{decl.name}' does not end with a return statement", end)
        return (self.emit("error", (), NoParams(), end).result,)

    def sample(self, stmt: ast.Sample) -> None:
        dist = self.expr(stmt.dist)
        annotation = None
        if stmt.annotation is not None:
            annotation = annotation_from_ast(stmt.annotation, self.diags)
        op = self.emit("sample", (dist,), SampleParams(stmt.name, annotation), stmt.span)
        self.bind(stmt.name, op.result)

    def let_stmt(self, stmt: ast.Let) -> None:
        """A `let`. `argmin ... as (solution, report)` names the op's two results themselves
        (no tuple in between: the solution may be a tree, which no tuple holds)."""
        if not isinstance(stmt.value, ast.Report):
            self.let(stmt.pattern, self.expr(stmt.value))
            return
        assert isinstance(stmt.pattern, ast.PTuple)
        names = [p.name for p in stmt.pattern.elems if isinstance(p, ast.PName)]
        if not isinstance(stmt.value.value, ast.Argmin):
            error = self.error_value("'as (solution, report)' follows an inner problem (argmin "
                                     "or argmax)", stmt.value.span)
            self.block.scope.update(dict.fromkeys(names, error))
            return
        op = self.argmin(stmt.value.value, report=True)
        if op.name == "error":
            values = op.results * len(names)
        else:
            values = tuple(Value(v.type, name) for v, name in zip(op.results, names))
            self.block.ops[-1] = replace(op, results=values)
        self.block.scope.update(zip(names, values))

    def let(self, pattern: ast.Pattern, value: Value) -> None:
        if isinstance(pattern, ast.PName):
            self.bind(pattern.name, value)
            return
        assert isinstance(pattern, ast.PTuple)
        n = self.arity.get(value)
        if n is not None and n != len(pattern.elems):  # known now: say it before type checking
            self.diags.error(f"cannot destructure a tuple of {n} elements into "
                             f"{len(pattern.elems)} names", pattern.span)
            for sub in pattern.elems:
                self.let(sub, self.emit("error", (), NoParams(), sub.span).result)
            return
        for i, sub in enumerate(pattern.elems):
            # The span of the whole pattern: an arity error is about it, and is then reported
            # once (identical diagnostics are merged) instead of once per name.
            elem = self.emit("get", (value,), GetParams(i, len(pattern.elems)), pattern.span).result
            self.let(sub, elem)

    # ---- expressions
    def expr(self, e: ast.Expr) -> Value:
        method = getattr(self, "expr_" + type(e).__name__)
        return method(e)

    def expr_Name(self, e: ast.Name) -> Value:
        if e.id in self.block.scope:
            return self.block.scope[e.id]
        return self.emit("ref", (), NameParams(e.id), e.span).result

    def expr_IntLit(self, e: ast.IntLit, negate: bool = False, span: Span | None = None) -> Value:
        value = -e.value if negate else e.value
        span = span or e.span
        if not -I32_MAX - 1 <= value <= I32_MAX:
            return self.error_value(f"integer literal {value} does not fit in i32 (from "
                                    f"{-I32_MAX - 1} to {I32_MAX})", span)
        return self.emit("const", (), ConstParams(value, DType.I32), span).result

    def expr_FloatLit(self, e: ast.FloatLit, negate: bool = False) -> Value:
        return self.emit("const", (), ConstParams(-e.value if negate else e.value, DType.F32),
                         e.span).result

    def expr_BoolLit(self, e: ast.BoolLit) -> Value:
        return self.emit("const", (), ConstParams(e.value, DType.BOOL), e.span).result

    def expr_StrLit(self, e: ast.StrLit) -> Value:
        return self.emit("str", (), NameParams(e.value), e.span).result

    def expr_TupleLit(self, e: ast.TupleLit) -> Value:
        value = self.emit("tuple", tuple(self.expr(x) for x in e.elems), NoParams(), e.span).result
        self.arity[value] = len(e.elems)
        return value

    def expr_ListLit(self, e: ast.ListLit) -> Value:
        return self.emit("list", tuple(self.expr(x) for x in e.elems), NoParams(), e.span).result

    def expr_Unary(self, e: ast.Unary) -> Value:
        if e.op == "neg" and isinstance(e.operand, ast.IntLit):
            return self.expr_IntLit(e.operand, negate=True, span=e.span)
        if e.op == "neg" and isinstance(e.operand, ast.FloatLit):
            return self.expr_FloatLit(e.operand, negate=True)
        return self.emit(e.op, (self.expr(e.operand),), NoParams(), e.span).result

    def expr_Binary(self, e: ast.Binary) -> Value:
        chain = []  # `a + b + c` nests on the left: built in a loop, however long
        while isinstance(e, ast.Binary):
            chain.append(e)
            e = e.lhs
        value = self.expr(e)
        for b in reversed(chain):
            value = self.emit(b.op, (value, self.expr(b.rhs)), NoParams(), b.span).result
        return value

    def expr_Call(self, e: ast.Call) -> Value:
        if isinstance(e.func, ast.Call) and _dotted(e.func.func) in GRADIENTS:
            return self.gradient(e)
        callee = _dotted(e.func)
        if callee is not None and callee.split(".")[0] in self.block.scope:
            local = callee.split(".")[0]
            what = "a local value" if callee == local else f"a field of the local value '{local}'"
            return self.error_value(f"'{callee}' is {what}, not a function; only functions, "
                                    f"builtins and structs can be called", e.func.span)
        if callee is None:
            return self.error_value("only functions can be called, by name (e.g. f(x))",
                                    e.func.span)
        if callee in GRADIENTS:
            return self.error_value(f"{callee}(f, wrt=[...]) in a function body is applied to "
                                    f"arguments, e.g. {callee}(f, wrt=[w])(w, x)", e.span)
        if callee == "compose":
            return self.composed(e)
        if callee in TRANSFORMS:
            return self.error_value(f"{callee}(...) can only be used in an export", e.span)
        if callee in SCOPES:
            return self.expect(e)
        operands, kwnames, spans = self.call_args(e)
        return self.emit("call", operands, CallParams(callee, kwnames), e.span,
                         arg_spans=spans).result

    def call_args(self, e: ast.Call) -> tuple[tuple[Value, ...], tuple[str, ...],
                                              tuple[tuple[str, Span], ...]]:
        """A call's operands (positional, then keyword), keyword names and argument spans."""
        seen: set[str] = set()
        for k in e.kwargs:
            if k.name in seen:
                self.diags.error(f"keyword argument '{k.name}' given twice", k.span)
            seen.add(k.name)
        operands = tuple(self.expr(a) for a in e.args) + tuple(self.expr(k.value) for k in e.kwargs)
        spans = (tuple(("", a.span) for a in e.args)
                 + tuple((k.name, k.value.span) for k in e.kwargs))
        return operands, tuple(k.name for k in e.kwargs), spans

    def gradient(self, e: ast.Call) -> Value:
        """`grad(f, wrt=[w])(args)` / `value_and_grad(...)(args)`, f perhaps `expect(f,
        samples=N)`: a `grad` op whose region calls f on its arguments (resolve finds the
        wrt parameters among them)."""
        g: ast.Call = e.func  # type: ignore[assignment]
        kind = _dotted(g.func)
        target = g.args[0] if len(g.args) == 1 else None
        scope = _scope(target) if target is not None else None
        inner = target.args[0] if scope == "expect" and len(target.args) == 1 else target
        name = _dotted(inner) if inner is not None else None
        if name is None:
            return self.error_value(f"{kind} takes one function name (or expect(f, samples=N)) "
                                    f"and wrt=[...], then the arguments: {kind}(f, wrt=[w])(w, x)",
                                    g.span)
        for k in g.kwargs:
            if k.name != "wrt":
                return self.error_value(f"unknown option '{k.name}' for {kind} in a function "
                                        f"body; it takes wrt=[...] only", k.span)
        wrt = _wrt(g, kind, self.diags)
        n = _samples_option(target, self.diags) if scope is not None else 1
        operands, kwnames, spans = self.call_args(e)
        if wrt is None or n is None:
            return self.emit("error", operands, NoParams(), e.span).result
        if len(set(wrt[0])) != len(wrt[0]):
            return self.error_value("a parameter is named twice in wrt", g.span)
        args = {f"{i}@": Value(hint=f"arg{i}") for i in range(len(operands))}

        def call() -> tuple[Value, ...]:
            params = CallParams(name, kwnames)
            return (self.emit("call", tuple(args.values()), params, e.span,
                              arg_spans=spans).result,)

        region = self.region(args, call)
        params = GradParams(name, wrt[0], value=kind == GRADIENTS[1], samples=n)
        return self.emit("grad", operands, params, e.span, regions=(region,),
                         arg_spans=spans).result

    def composed(self, e: ast.Call) -> Value:
        """`compose(f, expect(x, samples=N), by=plugin)` in a body: f of the expectation, as
        `f(expect(x, samples=N))` (by=scgd keeps state across calls: exports only)."""
        by = next((k.value for k in e.kwargs if k.name == "by"), None)
        outer = _dotted(e.args[0]) if len(e.args) == 2 else None
        if not (isinstance(by, ast.Name) and by.id == "plugin" and outer is not None
                and _scope(e.args[1]) == "expect" and len(e.kwargs) == 1):
            return self.error_value("in a function body, compose takes by=plugin: compose(f, "
                                    "expect(g(x), samples=N), by=plugin), f of the mean of the "
                                    "draws; by=scgd keeps a running estimate of the inner "
                                    "expectation across calls, which only an export threads",
                                    e.span)
        return self.expr(ast.Call(e.span, e.args[0], (e.args[1],), ()))

    def expect(self, e: ast.Call) -> Value:
        """`expect(expr, samples=N)` / `logmeanexp(expr, samples=N)`: expr is evaluated N
        times, in a region, on fresh draws."""
        scope = e.func.id  # type: ignore[attr-defined]
        if len(e.args) != 1:
            return self.error_value(f"{scope} takes one expression and samples=N, e.g. "
                                    f"{scope}(f(x), samples=8)", e.span)
        n = _samples_option(e, self.diags)
        region = self.region({}, lambda: (self.expr(e.args[0]),))
        if n is None:
            return self.emit("error", (), NoParams(), e.span).result
        return self.emit("expect", (), ExpectParams(n, kind=scope), e.span, regions=(region,)).result

    def expr_With(self, e: ast.With) -> Value:
        """`f(...) with rule(...)`: the rule rides on the call until resolve checks it. (The
        parser gives `argmin ... with method(...)` to the inner problem.)"""
        value = self.expr(e.value)
        last = self.block.ops[-1] if self.block.ops else None
        if last is not None and last.results == (value,) and last.name == "error":
            return value  # already reported
        if last is not None and last.results == (value,) and last.name == "argmin":
            return self.error_value("this inner problem already has a hypergradient method",
                                    e.annotation.span)
        loop = self.loop_of(value)
        if loop is not None:
            return self.truncated(loop, value, e.annotation)
        if last is not None and last.results == (value,) and last.name == "matmul":
            return self.sampled(last, e.annotation)
        if last is None or last.results != (value,) or last.name != "call":
            return self.error_value("'with' gives a backward rule to a call of a non-smooth "
                                    "builtin, e.g. sign(w) with ste, an estimator to a draw, "
                                    "z ~ Normal(m, s) with reparam, truncated(k=K) to a loop, or "
                                    "wta_crs(keep=K) to a matmul",
                                    e.annotation.span)
        positional = {"control_variate": "kind", "wta_crs": "keep"}.get(e.annotation.name, False)
        rule = annotation_from_ast(e.annotation, self.diags, positional)
        self.block.ops[-1] = replace(last, params=replace(last.params, annotation=rule))
        return value

    def loop_of(self, value: Value) -> int | None:
        """The index in the block of the `for` op whose results are `value` (directly, or
        through the tuple of a multi-carry loop), or None."""
        ops = self.block.ops
        for i in (len(ops) - 1, len(ops) - 2):
            if i >= 0 and ops[i].name == "for" and (
                    ops[i].results == (value,) or (i == len(ops) - 2 and ops[-1].name == "tuple"
                                                   and ops[-1].results == (value,)
                                                   and ops[-1].operands == ops[i].results)):
                return i
        return None

    def sampled(self, op: Op, annotation: ast.Annotation) -> Value:
        """`(x @ w) with wta_crs(keep=K)`: the product whose backward samples K rows of x."""
        rule = annotation_from_ast(annotation, self.diags, positional="keep")
        if rule is None:
            return op.result
        keep = rule.option("keep")
        if rule.name != "wta_crs" or set(dict(rule.options)) != {"keep"}:
            return self.error_value("a matmul takes 'with wta_crs(keep=K)': its backward for the "
                                    "right operand from K sampled rows of the left one",
                                    annotation.span)
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 2:
            return self.error_value(f"wta_crs(keep=...) needs an integer of at least 2, got {keep}",
                                    annotation.span)
        self.block.ops[-1] = replace(op, name="sampled_matmul", params=SampledParams(keep))
        return op.result

    def truncated(self, index: int, value: Value, annotation: ast.Annotation) -> Value:
        """`for ... { } with truncated(k=K)`: truncated backpropagation through the loop."""
        rule = annotation_from_ast(annotation, self.diags, positional="k")
        if rule is None:
            return value
        k = rule.option("k")
        if rule.name != "truncated" or set(dict(rule.options)) != {"k"}:
            return self.error_value("a loop takes 'with truncated(k=K)': reverse mode through "
                                    "its last K iterations only", annotation.span)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            return self.error_value(f"truncated(k=...) needs a positive integer, got {k}",
                                    annotation.span)
        op = self.block.ops[index]
        self.block.ops[index] = replace(op, params=replace(op.params, truncate=k), span=op.span)
        return value

    def expr_FieldAccess(self, e: ast.FieldAccess) -> Value:
        dotted = _dotted(e)
        if dotted is not None and dotted.split(".")[0] not in self.block.scope:
            return self.emit("ref", (), NameParams(dotted), e.span).result
        return self.emit("getfield", (self.expr(e.base),), NameParams(e.field), e.span).result

    def expr_Index(self, e: ast.Index) -> Value:
        base = self.expr(e.base)
        items: list[IndexItem] = []
        dynamic: list[Value] = []
        spans: list[tuple[str, Span]] = []  # the dynamic subscripts', named index0, index1, ...
        for sub in e.subscripts:
            if isinstance(sub, ast.Slice):
                bounds = [_static_int(b) if b is not None else None
                          for b in (sub.start, sub.stop, sub.step)]
                bad = [b for b, v in zip((sub.start, sub.stop, sub.step), bounds)
                       if b is not None and v is None]
                if bad:
                    return self.error_value("slice bounds must be integer literals", bad[0].span)
                if bounds[2] is not None and bounds[2] <= 0:
                    return self.error_value("slice step must be positive", sub.step.span)
                items.append(IndexItem("slice", start=bounds[0], stop=bounds[1], step=bounds[2]))
            elif (k := _static_int(sub)) is not None:
                items.append(IndexItem("int", index=k))
            else:
                items.append(IndexItem("dynamic"))
                spans.append((f"index{len(dynamic)}", sub.span))
                dynamic.append(self.expr(sub))
        return self.emit("index", (base, *dynamic), IndexParams(tuple(items)), e.span,
                         arg_spans=tuple(spans)).result

    def expr_If(self, e: ast.If) -> Value:
        cond = self.expr(e.cond)
        then = self.region({}, lambda: (self.expr(e.then),))
        orelse = self.region({}, lambda: (self.expr(e.orelse),))
        return self.emit("if", (cond,), NoParams(), e.span, regions=(then, orelse)).result

    def expr_Cast(self, e: ast.Cast) -> Value:
        return self.emit("cast", (self.expr(e.operand),), CastParams(DType(e.dtype)), e.span).result

    def expr_For(self, e: ast.For) -> Value:
        names = [c.name for c in e.carries]
        for i, c in enumerate(e.carries):
            if names.index(c.name) != i:
                return self.error_value(f"carry '{c.name}' is declared twice", c.span)
            if c.name == e.var:
                return self.error_value(f"carry '{c.name}' has the name of the loop variable; "
                                        f"rename one of them", c.span)
        start = self.expr(e.start) if e.start is not None else self.emit(
            "const", (), ConstParams(0, DType.I32), e.span).result
        stop = self.expr(e.stop)
        inits = tuple(self.expr(c.init) for c in e.carries)
        args = {e.var: Value(hint=e.var)} | {c.name: Value(hint=c.name) for c in e.carries}

        def body() -> tuple[Value, ...]:
            self.block_statements(e.body, "a loop body; the body's last expression is the next carry")
            if len(names) == 1:
                return (self.expr(e.result),)
            if isinstance(e.result, ast.TupleLit) and len(e.result.elems) == len(names):
                return tuple(self.expr(x) for x in e.result.elems)
            if isinstance(e.result, ast.TupleLit):
                n = len(e.result.elems)
                self.diags.error(f"the loop body ends with {n} value{'s' * (n != 1)} but the "
                                 f"loop has {len(names)} carries ({', '.join(names)})",
                                 e.result.span)
                return tuple(self.emit("error", (), NoParams(), e.result.span).result
                             for _ in names)
            value = self.expr(e.result)
            return tuple(self.emit("get", (value,), GetParams(i, len(names)), e.result.span).result
                         for i in range(len(names)))

        region = self.region(args, body)
        op = self.emit("for", (start, stop, *inits), ForParams(tuple(names)), e.span,
                       nresults=len(names), regions=(region,))
        if len(names) == 1:
            return op.result
        return self.emit("tuple", op.results, NoParams(), e.span).result

    def block_statements(self, stmts: tuple[ast.Stmt, ...], where: str) -> None:
        """The `let` and sampling statements of a block (a loop body, a checkpoint)."""
        for stmt in stmts:
            if isinstance(stmt, ast.Return):
                self.diags.error(f"return is not allowed inside {where}", stmt.span)
            elif isinstance(stmt, ast.Sample):
                self.sample(stmt)
            else:
                self.let_stmt(stmt)

    def expr_Checkpoint(self, e: ast.Checkpoint) -> Value:
        def body() -> tuple[Value, ...]:
            self.block_statements(e.body, "a checkpoint block; its last expression is its value")
            return (self.expr(e.result),)

        return self.emit("checkpoint", (), NoParams(), e.span, regions=(self.region({}, body),)).result

    def expr_Argmin(self, e: ast.Argmin) -> Value:
        return self.argmin(e).result

    def argmin(self, e: ast.Argmin, report: bool = False) -> Op:
        """An `argmin` op: its objective region, a constraint region when `subject to` is
        given, and a second result (the solver's report) when `report`; an `error` op when its
        annotations are bad."""
        init = self.expr(e.init)
        solver = annotation_from_ast(e.solver, self.diags)
        hyper = None if e.hyper is None else annotation_from_ast(e.hyper, self.diags, True)
        arg = Value(type_from_ast(e.type), e.var)

        def body() -> tuple[Value, ...]:
            for stmt in e.body:
                if isinstance(stmt, ast.Return):
                    self.diags.error("return is not allowed inside an argmin body; its last "
                                     "expression is the objective", stmt.span)
                elif isinstance(stmt, ast.Sample):
                    self.sample(stmt)
                else:
                    self.let_stmt(stmt)
            return (self.expr(e.objective),)

        regions = [self.region({e.var: arg}, body)]
        if e.constraints:
            regions.append(self.region({e.var: Value(arg.type, e.var)},
                                       lambda: tuple(self.expr(c) for c in e.constraints)))
        if solver is None or (e.hyper is not None and hyper is None):
            return self.emit("error", (init,), NoParams(), e.span)
        return self.emit("argmin", (init,), ArgminParams(solver, hyper, e.maximize), e.span,
                         nresults=2 if report else 1, regions=tuple(regions))

    def expr_Slice(self, e: ast.Slice) -> Value:
        return self.error_value("a slice can only appear inside [...]", e.span)


def _dotted(e: ast.Expr) -> str | None:
    """`a.b.c` for a chain of names, else None."""
    if isinstance(e, ast.Name):
        return e.id
    if isinstance(e, ast.FieldAccess):
        base = _dotted(e.base)
        return None if base is None else f"{base}.{e.field}"
    return None


def _static_int(e: ast.Expr) -> int | None:
    if isinstance(e, ast.IntLit):
        return e.value
    if isinstance(e, ast.Unary) and e.op == "neg" and isinstance(e.operand, ast.IntLit):
        return -e.operand.value
    return None
