"""The aux pass: an export with `has_aux=true` differentiates its function's first result and
returns the others beside the gradient (metrics, as `jax.value_and_grad(..., has_aux=True)`).

For `value_and_grad(f, wrt=[p], has_aux=true)` with `f` returning `(loss, a, b)`, the pass adds
two copies of `f`: `f@value` returning `loss`, which the export differentiates (every
later pass sees a scalar objective, as without aux), and `f@aux` returning `(a, b)` (or `a`
alone), which the export evaluates once at the same arguments (with its key, when `f` draws:
the auxiliary values of one sample, not a Monte Carlo mean) and returns as they are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from gradlang.diagnostics import Diagnostics
from gradlang.ir import Export, Function, Module, Op, Param, Region, Value
from gradlang.ops import GetParams, NoParams
from gradlang.types import TensorType, TupleType, Type

from .rewrite import dce_function, inline_body


_COPY = re.compile(r"@(value|aux)@\w+")
_DERIVATIVE = re.compile(r"(.+)@grad\((\w+)\)")


def derivative(fn: str, wrt: str) -> str:
    """The name of the function resolve writes for `grad(grad(fn, wrt=[wrt]), ...)`."""
    return f"{fn}@grad({wrt})"


def written(fn: str) -> str:
    """A function's name as the source writes it: without the `@value@EXPORT` (`@aux@EXPORT`)
    of the copies this pass makes (`loss@value@step@expect4` -> `loss@expect4`); a derivative
    as the gradient it is (`f@grad(x)` -> `grad(f, wrt=[x])`)."""
    fn = _COPY.sub("", fn)
    d = _DERIVATIVE.fullmatch(fn)
    return f"grad({d[1]}, wrt=[{d[2]}])" if d else fn


def _float_scalar(t: Type) -> bool:
    return isinstance(t, TensorType) and t.rank == 0 and t.dtype.is_float


def result_problem(kind: str, has_aux: bool, fn: str, r: Type) -> str | None:
    """What is wrong with `r` as the result of a differentiated export's function `fn`."""
    if has_aux:
        if isinstance(r, TupleType) and len(r.elems) >= 2 and _float_scalar(r.elems[0]):
            return None
        return (f"has_aux=true needs a function that returns a tuple (loss, aux...) whose "
                f"first element is a float scalar; '{fn}' returns {r}")
    if _float_scalar(r):
        return None
    hint = (" (to return auxiliary values beside the loss: has_aux=true)"
            if isinstance(r, TupleType) and r.elems and _float_scalar(r.elems[0]) else "")
    return f"{kind} needs a function that returns a float scalar; '{fn}' returns {r}{hint}"


def _projected(f: Function, name: str, indices: tuple[int, ...]) -> Function:
    """A copy of f returning its results at `indices` (one, or a tuple). A result that f's
    body builds with a tuple op is taken from it, so later analyses (credit per element) see
    the objective as they would without aux."""
    assert isinstance(f.result_type, TupleType)
    body = inline_body(f)
    ops = list(body.ops)
    (whole,) = body.results
    built = ops[-1].operands if ops and ops[-1].name == "tuple" and ops[-1].results == (whole,) else None
    picked = []
    for i in indices:
        if built is not None:
            picked.append(built[i])
            continue
        v = Value(f.result_type.elems[i])
        ops.append(Op("get", (whole,), (v,), GetParams(i, len(f.result_type.elems)), (), f.span))
        picked.append(v)
    result, rtype = picked[0], f.result_type.elems[indices[0]]
    if len(picked) > 1:
        rtype = TupleType(tuple(f.result_type.elems[i] for i in indices))
        result = Value(rtype)
        ops.append(Op("tuple", tuple(picked), (result,), NoParams(), (), f.span))
    params = tuple(Param(p.name, a, p.span) for p, a in zip(f.params, body.args))
    return dce_function(Function(name, f.unit, params, rtype, Region((), tuple(ops), (result,)),
                                 f.span, f.result_span))


def split(module: Module, export: Export) -> tuple[Export, tuple[Function, Function]]:
    """The export differentiating `f@value` and returning `f@aux`, and those two functions."""
    t = export.transform
    f = module.function(t.fn)
    assert f is not None and isinstance(f.result_type, TupleType)
    rest = tuple(range(1, len(f.result_type.elems)))
    value = _projected(f, f"{f.name}@value@{export.name}", (0,))
    aux = _projected(f, f"{f.name}@aux@{export.name}", rest)
    return replace(export, transform=replace(t, fn=value.name, aux=aux.name)), (value, aux)


@dataclass(frozen=True)
class Aux:
    """Splits each `has_aux=true` export's function into its objective and its aux values."""

    name: str = "aux"
    after_errors: bool = False
    requires: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()

    def run(self, module: Module, diags: Diagnostics) -> Module:
        exports, added = [], []
        for export in module.exports:
            if export.transform.has_aux and export.transform.aux is None:
                export, functions = split(module, export)
                added += functions
            exports.append(export)
        return replace(module, exports=tuple(exports), functions=module.functions + tuple(added))
