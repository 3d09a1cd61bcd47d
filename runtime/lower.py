"""Lower IR functions to JAX-traceable Python functions, one registered rule per op.

The lowering never decides anything: it runs each op's rule from `LOWERINGS` and coerces
results to the dtypes the type checker assigned. Each op is lowered inside a JAX name scope
`file.grad:line:col`, so StableHLO locations point back at the source. An op that JAX cannot
trace while a dim stays symbolic raises `SymbolicDimError` with the spans of the ops it is in.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from gradlang.ir import Function, Module, Op, Region, Value, walk
from gradlang.ops import OPS
from gradlang.types import StructType, TensorType, TupleType, Type

from .dtypes import JNP_DTYPES
from .rules import LOWERINGS
from .perturbed import Factored, dense
from .signature import ArgumentError
from .symbolic import SymbolicDimError, inconclusive


_FACTORED = frozenset({"matmul", "get", "getfield", "tuple", "struct_new", "call_fn", "inline",
                        "call_jax", "einsum", "index", "conv", "straight_through"})
"""Ops that take a factored perturbed matrix (`runtime.perturbed`) as it is; others get it
materialized."""


class LoweringError(Exception):
    """An op has no lowering rule (a compiler bug)."""


def bind_dims(t: Type, value: Any, dims: dict[str, Any]) -> None:
    """Record the runtime size of each symbolic dim of `t` found in `value`'s shape."""
    if isinstance(t, TensorType):
        for d, n in zip(t.shape, value.shape if hasattr(value, "shape") else jnp.shape(value)):
            if isinstance(d, str):
                dims.setdefault(d, n)
    elif isinstance(t, StructType):
        for name, f in t.fields:
            bind_dims(f, value[name], dims)
    elif isinstance(t, TupleType):
        for e, v in zip(t.elems, value):
            bind_dims(e, v, dims)


class _Ctx:
    def __init__(self, lowering: Lowering, fn: Function, dims: dict[str, Any], key: Any = None,
                 body: Region | None = None):
        self.lowering = lowering
        self.fn = fn
        self.dims = dims
        self.env: dict[Value, Any] = {}
        self.file = Path(fn.span.source.path).name
        self.key = key
        self.draws = 0
        """How many keys this scope has handed out (each random op folds in its number)."""
        self.single = key is not None and lowering.key_uses(body or fn.body) == 1
        """The scope has one random op: it gets the scope's key itself (no fold_in)."""

    def next_key(self) -> Any:
        """A fresh key for the next random op of the current scope."""
        if self.key is None:
            raise LoweringError(f"@{self.fn.name} draws but was lowered without a key")
        self.draws += 1
        return self.key if self.single else jax.random.fold_in(self.key, self.draws)

    @contextmanager
    def scope(self, key: Any, region: Region):
        """Lower `region` (a loop iteration, one Monte Carlo draw) under its own key."""
        saved = self.key, self.draws, self.single
        self.key, self.draws = key, 0
        self.single = key is not None and self.lowering.key_uses(region) == 1
        try:
            yield
        finally:
            self.key, self.draws, self.single = saved

    def is_random(self, fn_name: str) -> bool:
        return fn_name in self.lowering.random

    def dim(self, d):
        return self.dims[d] if isinstance(d, str) else d

    def shape(self, t: TensorType) -> tuple | None:
        """The runtime shape of `t`, or None when it has derived dims (e.g. `B+D`)."""
        if all(isinstance(d, int) or d in self.dims for d in t.shape):
            return tuple(self.dim(d) for d in t.shape)
        return None

    def coerce(self, x: Any, t: Type) -> Any:
        """Give a value the dtypes of `t` (weak literals and promoted results)."""
        if isinstance(x, Factored):
            return x
        if isinstance(t, TensorType):
            dtype = JNP_DTYPES[t.dtype]
            if not hasattr(x, "dtype") or x.dtype != dtype:
                x = jnp.asarray(x, dtype)
        elif isinstance(t, StructType):
            x = {n: self.coerce(x[n], f) for n, f in t.fields}
        elif isinstance(t, TupleType):
            x = tuple(self.coerce(v, e) for v, e in zip(x, t.elems))
        return x

    def call(self, name: str, args: tuple) -> Any:
        return self.lowering.call(name, args, self.next_key() if self.is_random(name) else None)

    def region(self, region: Region, args: tuple) -> tuple:
        for v, x in zip(region.args, args):
            self.env[v] = x
        for op in region.ops:
            self.op(op)
        return tuple(self.env[v] for v in region.results)

    def op(self, op: Op) -> None:
        rule = LOWERINGS.get(op.name)
        if rule is None:
            raise LoweringError(f"no lowering rule for op '{op.name}'")
        args = [self.env[v] for v in op.operands]
        if op.name not in _FACTORED:
            args = [dense(a) for a in args]
        scope = f"{self.file}:{op.span.line}:{op.span.col}" if op.span else op.name
        with jax.named_scope(scope):
            try:
                out = rule(self, op, *args)
            except jax.errors.InconclusiveDimensionOperation as exc:
                raise inconclusive(exc).within(op.span) from None
            except SymbolicDimError as exc:
                raise exc.within(op.span) from None
        outs = out if len(op.results) > 1 else (out,)
        for v, x in zip(op.results, outs):
            if op.name != "const":
                x = self.coerce(x, v.type)
                if op.name == "call_fn":
                    self.bind_result_dims(op, x, v.type)
                self.check_shape(op, x, v.type)
            self.env[v] = x

    def bind_result_dims(self, op: Op, x: Any, t: Type) -> None:
        """A call's result may have dims no argument fixes (a jax fn's, fixed by a tree it
        takes): the first result sizes them, each later one must agree."""
        found: dict[str, Any] = {}
        bind_dims(t, x, found)
        for d, n in found.items():
            known = self.dims.setdefault(d, n)
            try:
                same = bool(known == n)
            except jax.errors.InconclusiveDimensionOperation:
                same = True  # symbolic dims the type checker matched
            if not same:
                span = op.span
                raise ArgumentError(f"'{op.params.callee}' at {self.file}:{span.line}:{span.col} "
                                    f"returns {t} with {d} = {n}, but {d} = {known} here (from an "
                                    f"argument or an earlier result)")

    def check_shape(self, op: Op, x: Any, t: Type) -> None:
        """The type checker predicted every shape; a mismatch is a compiler bug."""
        if isinstance(t, TensorType):
            shape = self.shape(t)
            if shape is not None and tuple(x.shape) != shape:
                raise LoweringError(f"op '{op.name}' at {op.span}: type checker predicted {t} "
                                    f"but lowering produced shape {tuple(x.shape)}")


@dataclass(frozen=True)
class Sampling:
    """What a `samples` op tells the draws of its region while it is lowered."""

    enum_index: Any = None
    """Enumerating: the value index of each enumerated draw (by slot) in the combination
    being traced."""
    shifts: tuple = ()
    """With shifted draws (DReG, RELAX, LAX): the zero shift of each (by its `shift`), which
    the region is differentiated against."""


class Lowering:
    """Turns the functions of one typed module into JAX-traceable callables."""

    def __init__(self, module: Module, bindings: Mapping[str, object] | None = None):
        self.module = module
        self.bindings = dict(bindings or {})
        """Python bindings by name: of extern functions (host callbacks) and of jax functions
        (traced inline)."""
        self.random: frozenset[str] = module.facts.random
        """Functions that draw (they take a key)."""
        self._key_uses: dict[Region, int] = {}
        self.sampling = Sampling()
        """What the `samples` op being lowered tells the draws of its region (`sampling_as`)."""
        self.held: dict[int, tuple] = {}
        """The operands of `surrogate` ops (by id) as a `grad` op's region computed them at its
        arguments: what those surrogates hold fixed while the region is differentiated (no
        derivative for the `grad`, every other one kept)."""

    @contextmanager
    def sampling_as(self, **changes):
        """Lower with `sampling` changed, restored afterwards (a nested `samples` op, the
        next combination, the caller)."""
        saved = self.sampling
        self.sampling = replace(saved, **changes)
        try:
            yield self.sampling
        finally:
            self.sampling = saved

    def key_uses(self, region: Region) -> int:
        """How many keys the ops of a scope take: each random op, loop and call of a drawing
        function takes one; `if` branches share their scope's keys. Counted once per region."""
        if region in self._key_uses:
            return self._key_uses[region]
        n = 0
        for op in region.ops:
            if op.name == "if":
                n += sum(self.key_uses(r) for r in op.regions)
            elif op.name == "for":
                n += min(1, self.key_uses(op.regions[0]))
            elif op.name in ("argmin", "grad"):  # one key per solve / per gradient
                n += min(1, sum(self.key_uses(r) for r in op.regions))
            elif ("random" in OPS[op.name].traits
                  or (op.name == "call_fn" and op.params.callee in self.random)
                  or (op.name in ("inline", "checkpoint") and self.draws(op.regions[0]))):
                n += 1
        self._key_uses[region] = n
        return n

    def draws(self, region: Region) -> bool:
        """Does the region draw (a random op anywhere in it, or a call of a drawing function,
        as an inner problem's body may make)? Then, as a call of a drawing function, it takes
        a key."""
        return any("random" in OPS[op.name].traits
                   or (op.name == "call_fn" and op.params.callee in self.random)
                   for op in walk(region))

    def call(self, name: str, args: tuple, key: Any = None) -> Any:
        fn = self.module.function(name)
        dims: dict[str, Any] = {}
        for p, a in zip(fn.params, args):
            bind_dims(p.value.type, a, dims)
        ctx = _Ctx(self, fn, dims, key)
        for p, a in zip(fn.params, args):
            ctx.env[p.value] = ctx.coerce(a, p.value.type)
        (result,) = ctx.region(fn.body, ())
        return ctx.coerce(result, fn.result_type)

    def inline(self, name: str, body: Region, args: tuple, key: Any = None) -> tuple:
        """The results of an `inline` op: its region (a copy of `name`'s body, its arguments
        the parameters) lowered as the call would be, in a scope of its own (dims, key)."""
        dims: dict[str, Any] = {}
        for v, a in zip(body.args, args):
            bind_dims(v.type, a, dims)
        ctx = _Ctx(self, self.module.function(name), dims, key, body)
        return ctx.region(body, tuple(ctx.coerce(a, v.type) for v, a in zip(body.args, args)))

    def function(self, name: str):
        """`f(*args)` computing function `name` on JAX values (structs are dicts); a function
        that draws takes its key as one more, last, argument."""

        def f(*args):
            if name in self.random:
                return self.call(name, args[:-1], args[-1])
            return self.call(name, args)

        f.__name__ = name.replace(".", "_")
        return f
