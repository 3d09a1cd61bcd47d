"""JAX functions bound to `jax fn` declarations: checked against their declared types when
bound, and traced inline into the exports that call them.

`jax fn net(w: f32[D, C], x: f32[B, D]) -> f32[B, C]` is bound from Python
(`gradlang.compile_file(path, functions={"net": fn})`). A call lowers to `fn(*args)` on the
traced values (structs as dicts, tuples as tuples), so JAX differentiates (reverse and forward
mode), batches and exports through it as through any op, and an artifact holds the traced
computation: it runs without the binding. A declaration whose parameters have only static
dims is checked when bound, with `jax.eval_shape`; one with symbolic dims or a tree parameter
when it is first traced, once the export's arguments size them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradlang.diagnostics import Diagnostics
from gradlang.ir import Function, Module, bound_names
from gradlang.options import unknown
from gradlang.types import (StructType, TensorType, TreeType, TupleType, Type, substitute_dims,
                            type_dims)

from .dtypes import JNP_DTYPES
from .perturbed import call
from .signature import ArgumentError, spec
from .symbolic import SymbolicDimError


class JaxFunctionError(ArgumentError):
    """A bound JAX function fails to trace, or returns other than its declaration, on the
    arguments of a call (found once the arguments fix its symbolic dims)."""


def declared(module: Module) -> list[Function]:
    """The module's `jax fn` declarations (functions whose body is a `call_jax`)."""
    return [fn for fn in module.functions if any(op.name == "call_jax" for op in fn.body.ops)]


def _first_line(exc: Exception) -> str:
    """`Type: message` of an exception, its first line (JAX's messages go on with hints)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def check_bindings(module: Module, functions: Mapping[str, object],
                   externs: Mapping[str, object]) -> Diagnostics:
    """Every `jax fn` has a callable binding that, where its parameters' dims are all static,
    traces on its declared argument types to its declared result; every binding names a `jax
    fn`. Problems are errors at the declaration (at none for a name the module lacks)."""
    diags = Diagnostics()
    fns = declared(module)
    names = [fn.name for fn in fns]
    externs_declared = bound_names(module, "host_call")
    for name in functions:
        if name in externs_declared:
            diags.error(f"functions={{'{name}': ...}}: '{name}' is an extern fn, called through a "
                        f"host callback: bind it with externs={{'{name}': fn}}", None)
        elif name not in names:
            diags.error(f"functions={{'{name}': ...}}: " + (
                unknown("jax fn", name, names, listing="jax fns") if names
                else f"the module declares no jax fn '{name}'"), None)
    for name in externs:
        if name in names:
            diags.error(f"externs={{'{name}': ...}}: '{name}' is a jax fn, traced inline: bind "
                        f"it with functions={{'{name}': fn}}", None)
    for fn in fns:
        if fn.name not in functions:
            diags.error(f"jax fn '{fn.name}' is not bound: pass functions={{'{fn.name}': fn}} "
                        f"to gradlang.compile_file / compile_source", fn.span)
        elif not callable(functions[fn.name]):
            diags.error(f"functions['{fn.name}'] is not callable (got "
                        f"{type(functions[fn.name]).__name__})", fn.span)
        elif not any(type_dims(p.value.type) or isinstance(p.value.type, TreeType)
                     for p in fn.params):
            _check_shapes(fn, functions[fn.name], diags)
    return diags


def _check_shapes(fn: Function, binding: Callable, diags: Diagnostics) -> None:
    """Trace the binding abstractly on the declared (static) argument types."""
    args = [spec(p.value.type, {}) for p in fn.params]
    try:
        out = jax.eval_shape(binding, *args)
    except Exception as exc:  # noqa: BLE001 - any failure is the binding's, reported as such
        diags.error(f"jax fn '{fn.name}' failed to trace on its declared argument types "
                    f"({_params(fn)}): {_first_line(exc)}", fn.span)
        return
    problem = mismatch(fn.result_type, out, {})
    if problem is not None:
        diags.error(f"jax fn '{fn.name}' {problem}", fn.result_span)


def _params(fn: Function) -> str:
    return ", ".join(f"{p.name}: {p.value.type}" for p in fn.params)


_DTYPES = {np.dtype(v): k for k, v in JNP_DTYPES.items()}


def _shown(x: Any) -> str:
    """A returned value's type as the language writes it (other dtypes by NumPy's name)."""
    if isinstance(x, Mapping):
        return "{" + ", ".join(f"{k}: {_shown(v)}" for k, v in x.items()) + "}"
    if isinstance(x, (tuple, list)):
        return "(" + ", ".join(_shown(v) for v in x) + ")"
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        return type(x).__name__
    dtype = _DTYPES.get(np.dtype(x.dtype))
    name = dtype.value if dtype is not None else np.dtype(x.dtype).name
    return f"{name}[{', '.join(map(str, x.shape))}]" if x.shape else name


def _sized(t: Type, dims: Mapping[str, Any]) -> str:
    """`t`, then its shape with the sizes `dims` gives its dims (when that reads otherwise)."""
    sized = substitute_dims(t, {d: dims[d] for d in type_dims(t) if d in dims})
    text = str(t) if str(sized) == str(t) else f"{t}, i.e. {sized} for these arguments"
    if isinstance(sized, StructType):
        text += f" (a dict {{{', '.join(f'{n}: {f}' for n, f in sized.fields)}}})"
    return text


def mismatch(t: Type, x: Any, dims: Mapping[str, Any]) -> str | None:
    """None when `x` (arrays or their abstract values; structs as mappings, tuples as
    sequences) has type `t` with `dims`, else "returns X, declared T"."""
    if _fits(t, x, dims):
        return None
    return f"returns {_shown(x)}, declared {_sized(t, dims)}"


def _fits(t: Type, x: Any, dims: Mapping[str, Any]) -> bool:
    if isinstance(t, TreeType):
        return all(hasattr(v, "dtype") and jnp.issubdtype(v.dtype, jnp.floating)
                   for v in jax.tree.leaves(x))
    if isinstance(t, TensorType):
        if not (hasattr(x, "shape") and hasattr(x, "dtype")):
            return False
        if _DTYPES.get(np.dtype(x.dtype)) is not t.dtype or len(x.shape) != t.rank:
            return False
        want = [dims.get(d) if isinstance(d, str) else d for d in t.shape]
        return all(w is None or n == w for n, w in zip(x.shape, want))
    if isinstance(t, StructType):
        return (isinstance(x, Mapping) and set(x) == {n for n, _ in t.fields}
                and all(_fits(f, x[n], dims) for n, f in t.fields))
    assert isinstance(t, TupleType)
    return (isinstance(x, (tuple, list)) and len(x) == len(t.elems)
            and all(_fits(e, v, dims) for e, v in zip(t.elems, x)))


def _as_declared(t: Type, x: Any) -> Any:
    """The result as the lowering holds values: arrays, structs as dicts, tuples as tuples."""
    if isinstance(t, TensorType):
        return jnp.asarray(x) if isinstance(x, (bool, int, float)) else x
    if isinstance(t, StructType):
        return {n: _as_declared(f, x[n]) for n, f in t.fields} if isinstance(x, Mapping) else x
    if isinstance(t, TupleType) and isinstance(x, (tuple, list)) and len(x) == len(t.elems):
        return tuple(_as_declared(e, v) for e, v in zip(t.elems, x))
    return x


def call_jax(ctx, op, *args) -> Any:
    """The lowering rule of `call_jax`: the binding called on the traced arguments (a
    black-box estimator's perturbed matrices kept factored inside it, `perturbed.call`), its
    result checked against the declaration with the dims the arguments fix."""
    name = op.params.name
    binding = ctx.lowering.bindings.get(name)
    if binding is None:
        raise JaxFunctionError(f"jax fn '{name}' is not bound: pass functions={{'{name}': fn}} "
                               f"to gradlang.compile_file / compile_source")
    try:
        out = call(binding, args)
    except (SymbolicDimError, jax.errors.InconclusiveDimensionOperation):
        raise  # a dim that must be fixed to lower: reported as for any op
    except Exception as exc:  # noqa: BLE001 - any failure is the binding's, reported as such
        shown = ", ".join(_shown(a) for a in args)
        raise JaxFunctionError(f"jax fn '{name}' failed to trace on arguments ({shown}): "
                               f"{_first_line(exc)}") from None
    t = op.results[0].type
    out = _as_declared(t, out)
    problem = mismatch(t, out, ctx.dims)
    if problem is not None:
        raise JaxFunctionError(f"jax fn '{name}' {problem}")
    return out
