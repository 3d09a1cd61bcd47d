"""The compose pass: checks `compose(f, expect(g, samples=N), by=...)` exports, picks their
estimator and builds the function they compute, f of g's expectation through a `compose` op:

    fn f@compose(g)@step(<g's params>, <f's other params>, inner: (T, f32)) -> (f32, (T, f32)) {
      %e = expect {samples=N} { %r = call_fn @g(...); yield %r }
      %v, %s = compose {by=scgd(beta=0.1)} %e, %inner { %y = call_fn @f(%e, ...); yield %y }
      %t = tuple %v, %s
      return %t
    }

The estimator (`estimators.compose`: `scgd` or `plugin`) says whether the export threads a
state, as the parameter `inner` and the last result (`scgd`: the moving average u of the inner
estimates and the number n of estimates averaged, from zeros and 0). The inner `expect` keeps
its random choices' estimators (chosen by later passes).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from gradlang.builtins import BUILTINS
from gradlang.diagnostics import Diagnostics, Span
from gradlang.facts import ComposeFact
from gradlang.estimators.compose import STATE, CompositionEstimator, Scgd, estimator_of
from gradlang.ir import Composition, Export, Function, Module, Op, Param, Region, Value
from gradlang.ops import CalleeParams, ComposeParams, Annotation, ExpectParams, NoParams
from gradlang.options import OptionError, rendered
from gradlang.types import TensorType, TupleType, is_float_tree

from .callgraph import random_functions

DEFAULT = Annotation(Scgd.name, rendered(Scgd()))
"""The estimator of a composition whose `by=` is not written."""


def _estimator(by: Annotation | None, diags: Diagnostics) -> Annotation | None:
    """`by=` checked and completed with its defaults (None after an error)."""
    if by is None:
        return DEFAULT
    try:
        how = estimator_of(by)
    except OptionError as exc:
        diags.error(str(exc), by.span)
        return None
    # as floats: beta=1 is 1.0
    return replace(by, options=tuple((k, float(v)) for k, v in rendered(how)))


class _Checker:
    """The checks of one compose export against f's and g's signatures."""

    def __init__(self, module: Module, export: Export, random: set[str], diags: Diagnostics):
        self.module, self.export, self.random, self.diags = module, export, random, diags
        self.t = export.transform
        self.c: Composition = export.transform.compose

    def error(self, message: str, span: Span) -> None:
        self.diags.error(message, span)

    def outer(self) -> Function | None:
        c = self.c
        f = self.module.function(c.outer)
        if f is None:
            hint = (f" ('{c.outer}' is a builtin; compose takes a function of yours: wrap it, "
                    f"e.g. fn f(u: f32) -> f32 {{ return {c.outer}(u) }})" if c.outer in BUILTINS
                    else "")
            self.error(f"unknown function '{c.outer}'{hint}", c.outer_span)
            return None
        r = f.result_type
        if not (isinstance(r, TensorType) and r.rank == 0 and r.dtype.is_float):
            self.error(f"compose needs an outer function that returns a float scalar; '{f.name}' "
                       f"returns {r}", c.outer_span)
            return None
        if not f.params:
            self.error(f"the outer function '{f.name}' of compose takes the inner expectation as "
                       f"its first parameter, but it has none", c.outer_span)
            return None
        if f.name in self.random:
            self.error(f"the outer function '{f.name}' of compose draws: it must be deterministic "
                       f"(only the inner expectation is estimated)", c.outer_span)
            return None
        return f

    def inner(self, f: Function) -> Function | None:
        g = self.module.function(self.t.fn)
        r, u = g.result_type, f.params[0]
        if not (isinstance(r, TensorType) and r.dtype.is_float):
            self.error(f"the inner function '{g.name}' of compose must return a float tensor (its "
                       f"expectation is averaged); it returns {r}", self.c.inner_span)
            return None
        if u.value.type != r:
            self.error(f"'{g.name}' returns {r} but the first parameter '{u.name}' of "
                       f"'{f.name}' is {u.value.type}: compose passes the inner expectation "
                       f"to it", self.c.inner_span)
            return None
        return g

    def params(self, f: Function, g: Function,
               by: CompositionEstimator) -> list[Param] | None:
        """g's parameters, then f's others not among them, then the state of a stateful `by`."""
        out = [Param(p.name, Value(p.value.type, p.name), p.span) for p in g.params]
        for p in f.params[1:]:
            same = next((q for q in g.params if q.name == p.name), None)
            if same is None:
                out.append(Param(p.name, Value(p.value.type, p.name), p.span))
            elif same.value.type != p.value.type:
                self.error(f"'{p.name}' is a parameter of '{f.name}' ({p.value.type}) and of "
                           f"'{g.name}' ({same.value.type}): compose passes one argument to "
                           f"both, so the types must agree", self.c.outer_span)
                return None
        if by.stateful:
            owner = next((h for h in (g, f) if h.param(STATE) is not None), None)
            if owner is not None:
                self.error(f"compose with {by.name} adds a parameter '{STATE}' (the moving "
                           f"average and its count) to the export, but '{owner.name}' already "
                           f"has one; rename it", self.c.span)
                return None
            out.append(Param(STATE, Value(by.state_type(g.result_type), STATE), self.c.span))
        return out

    def wrt(self, params: list[Param], by: CompositionEstimator) -> bool:
        ok = True
        names = [p.name for p in params]
        for name, span in zip(self.t.wrt, self.t.wrt_spans):
            p = next((p for p in params if p.name == name and p.name != STATE), None)
            if p is None:
                self.error(f"'{name}' is not a parameter of the composition (parameters: "
                           f"{', '.join(n for n in names if n != STATE)})", span)
                ok = False
            elif not is_float_tree(p.value.type):
                self.error(f"cannot differentiate with respect to '{name}' of type "
                           f"{p.value.type}: only float tensors (or structs of them) have "
                           f"gradients", span)
                ok = False
        if self.t.by is not None and by.stateful:
            self.error("a black-box estimator (by=) cannot carry compose's moving average; use "
                       "compose(..., by=plugin) or reverse mode", self.t.by.span)
            ok = False
        return ok


def _build(export: Export, f: Function, g: Function, params: list[Param], by: Annotation,
           stateful: bool) -> Function:
    """The function computing the composition (see the module docstring)."""
    c, t = export.transform.compose, export.transform
    env = {p.name: p.value for p in params}
    r = Value(g.result_type)
    call_g = Op("call_fn", tuple(env[p.name] for p in g.params), (r,), CalleeParams(g.name), (),
                export.fn_span)
    e = Value(g.result_type, "inner_estimate")
    expect = Op("expect", (), (e,), ExpectParams(t.samples), (Region((), (call_g,), (r,)),),
                c.inner_span)
    y = Value(f.result_type)
    call_f = Op("call_fn", (e,) + tuple(env[p.name] for p in f.params[1:]), (y,),
                CalleeParams(f.name), (), c.outer_span)
    results = (Value(f.result_type),) + ((Value(env[STATE].type),) if stateful else ())
    op = Op("compose", (e,) + ((env[STATE],) if stateful else ()), results, ComposeParams(by),
            (Region((), (call_f,), (y,)),), c.span)
    ops, result, rtype = [expect, op], results[0], f.result_type
    if stateful:
        rtype = TupleType((f.result_type, env[STATE].type))
        result = Value(rtype)
        ops.append(Op("tuple", results, (result,), NoParams(), (), c.span))
    return Function(f"{f.name}@compose({g.name})@{export.name}", g.unit, tuple(params), rtype,
                    Region((), tuple(ops), (result,)), c.span, c.outer_span)


@dataclass(frozen=True)
class Compose:
    """The composition pass (checks `compose(...)` exports and builds what they compute)."""

    name: str = "compose"
    after_errors: bool = True
    """Its checks run after earlier errors too; it builds functions only without errors."""
    requires: tuple[str, ...] = ()
    provides: tuple[str, ...] = ("compose", "stateful")

    def run(self, module: Module, diags: Diagnostics) -> Module:
        random = random_functions(module)
        clean = not diags.has_errors
        exports, built, facts = [], [], {}
        stateful = set(module.facts.stateful)
        for export in module.exports:
            t = export.transform
            if t.compose is None:
                exports.append(export)
                continue
            if module.function(t.fn) is None:  # reported by resolve
                continue
            checker = _Checker(module, export, random, diags)
            by = _estimator(t.compose.by, diags)
            how = by and estimator_of(by)
            f = checker.outer()
            g = f and checker.inner(f)
            params = how and g and checker.params(f, g, how)
            if not (params and checker.wrt(params, how)) or not clean:
                continue
            fn = _build(export, f, g, params, by, how.stateful)
            built.append(fn)
            if how.stateful:
                stateful.add(fn.name)
            facts[export.name] = ComposeFact(f.name, g.name, t.samples, by, t.compose.by is None)
            exports.append(replace(export, transform=replace(
                t, fn=fn.name, samples=0, compose=replace(t.compose, by=by))))
        if diags.has_errors:
            exports, built = [e for e in exports if e.transform.compose is None], []
        return replace(module, functions=module.functions + tuple(built), exports=tuple(exports),
                       facts=replace(module.facts, compose=facts, stateful=frozenset(stateful)))
