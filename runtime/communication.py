"""What an export's ops cost in communication on a mesh, read from the IR's typed dims.

With `shard=`, a dim name is split over its mesh axes wherever it appears (as
`runtime.sharding.Sharding.spec` lays each array out). An op then communicates when:

- it reduces a dim that its operand holds split (`sum`, `mean`, `max`, `min`, `logsumexp`,
  `var`), or contracts one that both its operands hold split (`matmul`, `einsum`): each
  device computes a partial result, which XLA all-reduces. A reduction to a scalar (a loss's
  mean over the batch) is cheap and expected, and not reported;
- it normalizes along a split dim (`softmax`, `log_softmax`, `layer_norm`, `rms_norm`,
  `cross_entropy`'s classes): each of its statistics (a max, a sum, a mean) is all-reduced,
  the size of the array without that dim (as XLA partitions their lowerings on CPU);
- it calls an `extern fn`, whose Python callback XLA runs on one device: each argument
  with a split dim is all-gathered whole;
- it works along a split dim in a way XLA cannot partition (`sort`, `topk`, `argmax` along
  it): XLA makes that dim whole on every device, all-gathering the operand along it (the
  bytes reported), or, where it can move the split to another dim, by all-to-alls of the
  local array (fewer bytes; XLA on CPU does so for a 2-D `sort`).

Each such op gets a `Cost`: where it is (the op, or the call in the caller's own file that
leads into a library function), the dim, its axes, the collective and the array it moves,
per device. The dims of a called function are the caller's (`Dense[I=H, O=C]` binds I to H),
followed from each export's functions through its calls. The bytes need the dims' sizes:
`diagnostics(costs(module, sharding), dims={"B": 1024})` says them (`gradlang compile
--dim`), else they are a formula of the dims (the warnings of `compile_source`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from fractions import Fraction

import jax.numpy as jnp

from gradlang.diagnostics import Diagnostics, Span
from gradlang.ir import Module, Op, Region
from gradlang.ops import REDUCE
from gradlang.shapes import unify
from gradlang.types import DType, Dim, TensorType, substitute_dims

from .dtypes import JNP_DTYPES
from .sharding import Sharding

ITEM_BYTES = {d: jnp.dtype(t).itemsize for d, t in JNP_DTYPES.items()}
UNPARTITIONED = ("sort", "topk", "argmax")
"""Ops along an axis that XLA does not partition: it gathers that axis whole."""
NORMALIZING = {"softmax": ("max", "sum"), "log_softmax": ("max", "sum"),
               "layer_norm": ("mean", "variance"), "rms_norm": ("mean square",),
               "cross_entropy": ("max", "sum of exponentials", "label's logit")}
"""Ops that reduce along an axis (softmax's, the norms' and cross_entropy's last) inside an
elementwise result: each reduction an all-reduce of the array without that axis when it is
split (as XLA partitions their lowerings on CPU: the statistics named)."""


class ShardingWarning(UserWarning):
    """An op of a module compiled with `shard=` communicates (its message says what, where,
    and how many bytes per call)."""


@dataclass(frozen=True)
class Cost:
    """One op's communication: the op (and the library function it is in, "" for the caller's
    own file), where to point at, the split dim it reduces or works along, that dim's mesh
    axes and devices, the collective, and the array the collective returns on each device
    (`local`: each dim, and how many devices it is split over)."""

    op: str
    function: str
    span: Span | None
    dim: str
    axes: tuple[str, ...]
    devices: int
    collective: str
    dtype: DType
    local: tuple[tuple[Dim, int], ...]
    reductions: tuple[str, ...] = ()
    """For a normalizing op, the statistics it all-reduces (one all-reduce each)."""
    extern: bool = False
    """A call of an extern fn, whose callback gets this argument whole on one device."""

    def bytes(self, dims: Mapping[str, int]) -> int | None:
        """The collective's result bytes per device, or None when a dim's size is not known."""
        sizes = [d if isinstance(d, int) else dims.get(d) for d, _ in self.local]
        if any(s is None for s in sizes):
            return None
        return ITEM_BYTES[self.dtype] * math.prod(s // n for s, (_, n) in zip(sizes, self.local))

    def message(self, dims: Mapping[str, int]) -> str:
        shape = ", ".join(f"{d}/{n}" if n > 1 else str(d) for d, n in self.local)
        moved = f"{self.dtype.value}[{shape}]" if self.local else self.dtype.value
        size = self.bytes(dims)
        amount = _kib(size) if size is not None else self._formula()
        place = f"'{self.op}' in {self.function}" if self.function else f"'{self.op}'"
        split = (f"{self.dim}, split over {', '.join(repr(a) for a in self.axes)} "
                 f"({self.devices} devices)")
        if self.extern:
            return (f"extern '{self.op}' runs in Python on one device: each call all-gathers "
                    f"its argument {moved} ({amount} per device), whose {self.dim} is split "
                    f"over {', '.join(repr(a) for a in self.axes)} ({self.devices} devices)")
        if self.reductions:
            stats = [f"the {r}" for r in self.reductions]
            stats = ", ".join(stats[:-1]) + " and " + stats[-1] if len(stats) > 1 else stats[0]
            return (f"{place} reduces {split}: it all-reduces {moved} ({amount} per device) "
                    f"{_times(len(self.reductions))} per call, for {stats}")
        if self.collective == "all-reduce":
            what = "contracts" if self.op in ("matmul", "einsum") else "reduces"
            return (f"{place} {what} {split}: each device sums its part, then it all-reduces "
                    f"{moved} ({amount} per device) per call")
        return (f"{place} works along {split}, which XLA cannot partition: it makes "
                f"{self.dim} whole on every device per call, all-gathering {moved} ({amount} "
                f"per device), or moving the split to another dim by all-to-alls")

    def _formula(self) -> str:
        factor = Fraction(ITEM_BYTES[self.dtype], math.prod(n for _, n in self.local))
        for d, _ in self.local:
            if isinstance(d, int):
                factor *= d
        names = [str(d) for d, _ in self.local if not isinstance(d, int)]
        head = "·".join(([str(factor.numerator)] if factor.numerator != 1 or not names
                         else []) + names)
        return f"{head}{f'/{factor.denominator}' if factor.denominator != 1 else ''} bytes"


def _times(n: int) -> str:
    return {1: "once", 2: "twice"}.get(n, f"{n} times")


def _kib(n: int) -> str:
    return f"{n} bytes" if n < 1024 else f"{n / 1024:g} KiB"


def costs(module: Module, sharding: Sharding) -> list[Cost]:
    """The communicating ops of every export of `module` on `sharding`'s mesh, each (op,
    dims, place) once, in the order the exports reach them."""
    found: dict[tuple, Cost] = {}
    done: set[tuple] = set()
    for export in module.exports:
        t = export.transform
        for name in [t.fn, t.aux, *(o.fn for o in t.objectives)]:
            fn = module.function(name) if name else None
            if fn is not None:
                _visit(module, sharding, fn.body, {}, fn.name, fn.unit, None, found, done)
    return list(found.values())


def diagnostics(found: list[Cost], dims: Mapping[str, int] | None = None) -> Diagnostics:
    """`found` as warnings at their spans (with bytes for the dims `dims` sizes)."""
    out = Diagnostics()
    for c in found:
        out.warning(c.message(dims or {}), c.span)
    return out


def warn(module: Module, sharding: Sharding) -> None:
    """Each communicating op of `module` as a `ShardingWarning` (the rendered diagnostic)."""
    for d in diagnostics(costs(module, sharding)).items:
        warnings.warn(d.render(), ShardingWarning, stacklevel=4)


def _visit(module: Module, sharding: Sharding, region: Region, env: dict, where: str,
           unit: str, site: Span | None, found: dict, done: set) -> None:
    """The ops of `region` (in function `where` of `unit`, its dims bound by `env` to the
    export's), and of the functions they call. `site`: the call in the export's own file
    that led into a library function, which the costs point at."""
    key = (id(region), tuple(sorted(env.items())), site)
    if key in done:
        return
    done.add(key)
    for op in region.ops:
        cost = _cost(op, sharding, env)
        if cost is not None:
            library = where if site is not None else ""
            cost = replace(cost, function=library, span=site or op.span)
            found.setdefault((cost.span, cost.message({})), cost)
        if op.name in ("call_fn", "inline"):
            callee = module.function(op.params.callee)
            if any(o.name == "host_call" for o in callee.body.ops):
                for c in _gathered(op, callee.name, sharding, env):
                    c = replace(c, span=site or op.span)
                    found.setdefault((c.span, c.message({})), c)
            inner: dict = {}
            for p, a in zip(callee.params, op.operands):
                unify(p.value.type, substitute_dims(a.type, env), inner)
            inner_site = site if site is not None or callee.unit == unit else op.span
            body = callee.body if op.name == "call_fn" else op.regions[0]
            _visit(module, sharding, body, inner, callee.name, unit, inner_site, found, done)
            continue
        for r in op.regions:
            _visit(module, sharding, r, env, where, unit, site, found, done)


def _gathered(call: Op, name: str, sharding: Sharding, env: dict) -> list[Cost]:
    """A call of extern fn `name`: each argument with a split dim gathered whole."""
    out = []
    for v in call.operands:
        t = substitute_dims(v.type, env)
        if isinstance(t, TensorType):
            split = [d for d, n in _devices(sharding, t) if n > 1]
            if split:
                out.append(Cost(name, "", call.span, split[0], sharding.dims[split[0]],
                                sharding.size(split[0]), "all-gather", t.dtype,
                                tuple((d, 1) for d in t.shape), extern=True))
    return out


def _cost(op: Op, sharding: Sharding, env: dict) -> Cost | None:
    """The communication of one op, its types' dims bound by `env`, or None."""
    types = [substitute_dims(v.type, env) for v in op.operands]
    if not types or not all(isinstance(t, TensorType) for t in types) or not types[0].rank:
        return None
    result = substitute_dims(op.results[0].type, env) if op.results else None
    if op.name in REDUCE.split():
        (t, *_) = types
        axis = op.params.axis
        reduced = range(t.rank) if axis is None else [a % t.rank for a in axis]
        split = [i for i in reduced if _split(sharding, t, i)]
        return _reduce(op, sharding, t.shape[split[0]], result) if split else None
    if op.name == "matmul" and len(types) == 2 and types[0].rank and types[1].rank:
        a, b = types
        i, j = a.rank - 1, (0 if b.rank == 1 else b.rank - 2)
        if _split(sharding, a, i) and _split(sharding, b, j):
            return _reduce(op, sharding, a.shape[i], result)
        return None
    if op.name == "einsum" and op.params.y and len(types) == 2:
        (ta, tb), out = op.params.terms()
        for c in ta:
            if c in tb and c not in out and _split(sharding, types[0], ta.index(c)) and \
                    _split(sharding, types[1], tb.index(c)):
                return _reduce(op, sharding, types[0].shape[ta.index(c)], result)
        return None
    if op.name in NORMALIZING:
        (t, *_) = types
        axis = op.params.axis % t.rank if op.name.endswith("softmax") else t.rank - 1
        if not _split(sharding, t, axis):
            return None
        rest = t.with_shape(t.shape[:axis] + t.shape[axis + 1:])
        cost = _made(op, sharding, t.shape[axis], "all-reduce", t.dtype,
                     tuple(_devices(sharding, rest)))
        return replace(cost, reductions=NORMALIZING[op.name])
    if op.name in UNPARTITIONED:
        (t, *_) = types
        axis = op.params.axis % t.rank
        if not _split(sharding, t, axis):
            return None
        spec = _devices(sharding, t)
        local = tuple((d, 1 if i == axis else n) for i, (d, n) in enumerate(spec))
        return _made(op, sharding, t.shape[axis], "all-gather", t.dtype, local)
    return None


def _split(sharding: Sharding, t: TensorType, i: int) -> bool:
    """Whether axis i of an array of type `t` is split over more than one device."""
    return _devices(sharding, t)[i][1] > 1


def _devices(sharding: Sharding, t: TensorType) -> list[tuple[Dim, int]]:
    """Each dim of an array of type `t` with the devices it is split over (its spec's)."""
    spec = tuple(sharding.spec(t)) + (None,) * t.rank
    return [(d, sharding.size(d) if spec[i] is not None else 1) for i, d in enumerate(t.shape)]


def _reduce(op: Op, sharding: Sharding, dim: Dim, result) -> Cost | None:
    """An all-reduce of `result` (partial sums on each device), unless it is a scalar."""
    if not isinstance(result, TensorType) or not result.rank:
        return None
    return _made(op, sharding, dim, "all-reduce", result.dtype,
                 tuple(_devices(sharding, result)))


def _made(op: Op, sharding: Sharding, dim: Dim, collective: str, dtype: DType,
          local: tuple) -> Cost:
    assert isinstance(dim, str)
    return Cost(op.name, "", op.span, dim, sharding.dims[dim], sharding.size(dim), collective,
                dtype, local)
