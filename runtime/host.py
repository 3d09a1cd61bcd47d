"""Extern functions: Python callables bound by name, called from compiled code through
`jax.pure_callback` with the declared result types.

Under `jax.vmap` (an ES population, a per-example map) the callback is called with every
argument broadcast to the batch's leading axes. A plain Python function is then called once
per batch element, in a loop on the host, so it always sees the shapes it declared; a function
wrapped in `batched(fn)` is called once with the leading axes and must return them too
(NumPy-vectorized code does, and is much faster).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from gradlang.binding import batched
from gradlang.types import TensorType, TupleType, Type

from .dtypes import JNP_DTYPES


class ExternError(RuntimeError):
    """An extern function is not bound, or returned something other than its declared type."""


def _leaves(t: Type) -> list[TensorType]:
    return [e for x in t.elems for e in _leaves(x)] if isinstance(t, TupleType) else [t]


def _shape(t: TensorType, dims: dict) -> tuple[int, ...]:
    return tuple(dims[d] if isinstance(d, str) else d for d in t.shape)


def result_shapes(params: tuple[TensorType, ...], result: Type, shapes: list[tuple]) -> list[tuple]:
    """The result's leaf shapes, its dims bound from the arguments' shapes (minus any leading
    batch axes)."""
    dims: dict = {}
    for t, shape in zip(params, shapes):
        for d, n in zip(t.shape, shape[len(shape) - t.rank:]):
            if isinstance(d, str):
                dims.setdefault(d, n)
    try:
        return [_shape(t, dims) for t in _leaves(result)]
    except KeyError as exc:
        raise ExternError(f"the result type {result} has a dim ({exc}) that no argument fixes") from None


@dataclass(frozen=True)
class HostFunction:
    """The host side of an extern call: runs the binding, checks its results."""

    name: str
    binding: object  # a callable, `batched(callable)` or None (unbound)
    params: tuple[TensorType, ...]
    result: Type

    def __call__(self, *args):
        if self.binding is None:
            raise ExternError(f"extern '{self.name}' is not bound: pass externs={{'{self.name}': "
                              f"fn}} to gradlang.compile_file / compile_source / load")
        args = [np.asarray(a) for a in args]
        shapes = result_shapes(self.params, self.result, [a.shape for a in args])
        lead = args[0].shape[:args[0].ndim - self.params[0].rank] if args else ()
        if isinstance(self.binding, batched) or not lead:
            fn = self.binding.fn if isinstance(self.binding, batched) else self.binding
            return self._pack(self._leaves(fn(*args), lead, shapes))
        outs = [self._leaves(self.binding(*(a[i] for a in args)), (), shapes)
                for i in np.ndindex(*lead)]
        return self._pack([np.stack([o[k] for o in outs]).reshape(lead + shape)
                           for k, shape in enumerate(shapes)])

    def _pack(self, leaves: list):
        return tuple(leaves) if isinstance(self.result, TupleType) else leaves[0]

    def _leaves(self, out, lead: tuple[int, ...], shapes: list[tuple]) -> list[np.ndarray]:
        """The binding's result as arrays of the declared dtypes, shapes checked."""
        leaves = _leaves(self.result)
        got = list(out) if isinstance(self.result, TupleType) else [out]
        if len(got) != len(leaves):
            raise ExternError(f"extern '{self.name}' returned {len(got)} values, declared "
                              f"{self.result}")
        checked = []
        for t, shape, x in zip(leaves, shapes, got):
            x = np.asarray(x, JNP_DTYPES[t.dtype])
            if x.shape != lead + shape:
                raise ExternError(f"extern '{self.name}' returned shape {list(x.shape)}, declared "
                                  f"{t} = {list(lead + shape)}")
            checked.append(x)
        return checked

    def specs(self, args) -> object:
        """The callback's result ShapeDtypeStructs for these (traced) arguments, with their
        leading batch axes (a replayed artifact calls a batched callback directly)."""
        import jax

        shapes = result_shapes(self.params, self.result, [tuple(a.shape) for a in args])
        lead = tuple(args[0].shape[:args[0].ndim - self.params[0].rank]) if args else ()
        specs = [jax.ShapeDtypeStruct(lead + s, JNP_DTYPES[t.dtype])
                 for s, t in zip(shapes, _leaves(self.result))]
        return self._pack(specs)

    def call(self, *args):
        """The traced call: a `jax.pure_callback`, batched under vmap (see the module doc)."""
        import jax

        return jax.pure_callback(self, self.specs(args), *args, vmap_method="broadcast_all")


def host_call(ctx, op, *args):
    """The lowering rule of `host_call`."""
    host = HostFunction(op.params.name, ctx.lowering.bindings.get(op.params.name),
                        tuple(p.value.type for p in ctx.fn.params), op.params.result)
    return host.call(*args)


def check_bindings(externs: Mapping[str, object], declared: set[str]) -> None:
    """Every binding names a declared extern and is callable."""
    for name, fn in externs.items():
        if name not in declared:
            raise ExternError(f"externs={{'{name}': ...}}: the module declares no extern "
                              f"'{name}'" + (f" (externs: {', '.join(sorted(declared))})"
                                             if declared else ""))
        if not callable(fn.fn if isinstance(fn, batched) else fn):
            raise ExternError(f"externs['{name}'] is not callable")
