"""Sharding exports over a device mesh from the dims their signatures name.

`compile_file(path, mesh=mesh, shard={"B": "data", "H": "model"})` maps dim names to mesh
axes. Every argument's leaf is placed with a `NamedSharding` whose `PartitionSpec` reads its
declared dims: `x: f32[B, D]` gets `P("data", None)`, a parameter `w: f32[D, H]` gets
`P(None, "model")` (FSDP / tensor-parallel style when its dims are mapped; replicated when
none is), the key and tree parameters (whose leaves have no declared dims) are replicated.
The export is jit-compiled once with those `in_shardings`; XLA's SPMD partitioner inserts
the communication (for data parallelism, the all-reduce of the gradient) and chooses the
output shardings. The key `pop` maps the population of `by=es / eggroll` to a mesh axis.

This is JAX's own machinery (`jax.sharding.Mesh`, `NamedSharding`, `jax.jit`'s
`in_shardings`); nothing here partitions by hand. Everything about placing an export on a
mesh lives in this module: validating the mapping against the exports' dims and the mesh,
the specs of each parameter, and the call that places the arguments.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from gradlang.types import StructType, TensorType, TreeType, TupleType, Type

from .signature import Signature, _fields

POPULATION = "pop"
"""The key of `shard=` that maps a black-box population (`by=es / eggroll`) to a mesh axis."""


class ShardingError(ValueError):
    """`shard=` does not fit the module or the mesh (an unknown dim or mesh axis), or an
    argument's dim is not divisible by the devices along its mesh axis."""


@dataclass(frozen=True)
class Sharding:
    """A mesh and the mesh axes each dim name is split over (in `shard=` order)."""

    mesh: Mesh
    axes: tuple[tuple[str, tuple[str, ...]], ...]

    @property
    def dims(self) -> dict[str, tuple[str, ...]]:
        return dict(self.axes)

    def size(self, dim: str) -> int:
        """The number of devices `dim` is split over (1 when it is not mapped)."""
        return math.prod(self.mesh.shape[a] for a in self.dims.get(dim, ()))

    @property
    def population(self) -> tuple[Mesh, tuple[str, ...]] | None:
        """What the black-box estimators take as `mesh`: the mesh and the axes `pop` maps
        to, or None (the population left to XLA)."""
        axes = self.dims.get(POPULATION)
        return (self.mesh, axes) if axes and isinstance(self.mesh, Mesh) else None

    def spec(self, t: TensorType) -> PartitionSpec:
        """The PartitionSpec of a tensor of type `t`: each named dim split over its axes, a
        mesh axis used once per array (a later dim mapped to an axis already used, as the
        second H of `f32[H, H]`, stays whole), every other dim whole."""
        used: set[str] = set()
        entries: list[Any] = []
        for d in t.shape:
            axes = self.dims.get(d, ()) if isinstance(d, str) else ()
            if not axes or used & set(axes):
                entries.append(None)
                continue
            used |= set(axes)
            entries.append(axes[0] if len(axes) == 1 else axes)
        while entries and entries[-1] is None:
            entries.pop()
        return PartitionSpec(*entries)

    def shardings(self, t: Type) -> Any:
        """The NamedShardings of an argument of type `t`, a tree prefix of its value as
        `canonical` returns it: per leaf by its dims; a key or a tree parameter replicated."""
        if isinstance(t, TensorType):
            return NamedSharding(self.mesh, self.spec(t))
        if isinstance(t, StructType):
            return {n: self.shardings(f) for n, f in t.fields}
        if isinstance(t, TupleType):
            return tuple(self.shardings(e) for e in t.elems)
        return NamedSharding(self.mesh, PartitionSpec())

    def replicated(self, t: Type) -> bool:
        """Whether no leaf of `t` is split."""
        return all(s.spec == PartitionSpec() for s in jax.tree.leaves(self.shardings(t)))


def plan(mesh: Mesh | None, shard: Mapping[str, str | Sequence[str]],
         signatures: Sequence[Signature], populations: Mapping[str, int]) -> Sharding:
    """The checked Sharding of `shard=` over `mesh` for a module whose exports have
    `signatures`; `populations` gives the population size split by each export with a
    black-box population (by name: the draws of `es` / `eggroll`). Raises ShardingError for
    a missing mesh, a dim no export declares, an unknown mesh axis, or a population the axis
    does not divide. An `AbstractMesh` (axis names and sizes, no devices: `gradlang compile
    --mesh`) gives a module that records the mapping in its artifact but cannot run. Several
    dims may share an axis (FSDP: `{"B": "data", "H": "data"}`
    splits the batch and the parameters over the same devices); an array holding two of
    them is split along the first only."""
    if mesh is None:
        raise ShardingError("shard= maps dims to mesh axes: pass the mesh too, "
                            "mesh=jax.sharding.Mesh(devices, axis_names)")
    if not isinstance(mesh, (Mesh, AbstractMesh)):
        raise ShardingError(f"mesh= must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if not isinstance(shard, Mapping):
        raise ShardingError(f"shard= must map dim names to mesh axis names, e.g. "
                            f"{{'B': 'data'}}, got {type(shard).__name__}")
    declared = list(dict.fromkeys(d for s in signatures for d in s.dims))
    axes = tuple((dim, _axes(dim, value, mesh)) for dim, value in shard.items())
    for dim, _ in axes:
        _check_dim(dim, declared, populations)
    out = Sharding(mesh, axes)
    _check_populations(out, populations)
    return out


def _axes(dim: Any, value: Any, mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes of one `shard=` entry (an axis name or a tuple of them)."""
    if not isinstance(dim, str):
        raise ShardingError(f"shard= keys are dim names (strings), got {dim!r}")
    names = (value,) if isinstance(value, str) else value
    if not isinstance(names, (tuple, list)) or not names or \
            not all(isinstance(a, str) for a in names):
        raise ShardingError(f"shard['{dim}'] must be a mesh axis name or a tuple of them, "
                            f"got {value!r}")
    for a in names:
        if a not in mesh.axis_names:
            raise ShardingError(f"shard['{dim}'] = {value!r}: the mesh has no axis '{a}' "
                                f"(its axes: {', '.join(mesh.axis_names)})")
    return tuple(names)


def _check_dim(dim: str, declared: list[str], populations: Mapping[str, int]) -> None:
    if dim in declared:
        return
    if dim == POPULATION:
        if populations:
            return
        raise ShardingError("shard['pop'] maps a black-box population, but no export of this "
                            "module has one (by=es(...) or by=eggroll(...))")
    dims = ", ".join(declared) if declared else "none"
    raise ShardingError(f"shard= names the dim '{dim}', which no export's parameters declare "
                        f"(their dims: {dims}; 'pop' for a black-box population)")


def _check_populations(sharding: Sharding, populations: Mapping[str, int]) -> None:
    k = sharding.size(POPULATION)
    for name, draws in populations.items():
        if POPULATION in sharding.dims and draws % k:
            axes = ", ".join(f"'{a}'" for a in sharding.dims[POPULATION])
            raise ShardingError(f"export '{name}': its population of {draws} noise draws "
                                f"cannot be split over mesh axis {axes} of {k} devices "
                                f"(choose pop so that its draws divide evenly)")


# ---- artifacts: the mapping and the mesh's shape, recorded beside unpartitioned exports


def to_json(sharding: Sharding) -> dict:
    """What an artifact's header records of a sharded module: the mesh's axes with their
    sizes, in order, and the mapping. The exports are saved unpartitioned (as `jax.export`
    serializations for one device), so XLA partitions them where they are loaded onto a mesh,
    and they still load on one device; except those whose population `pop` maps to mesh
    axes, a placement that is part of their computation: their blobs are for the mesh."""
    return {"mesh": [[a, int(sharding.mesh.shape[a])] for a in sharding.mesh.axis_names],
            "shard": {d: list(axes) for d, axes in sharding.axes}}


def devices(j: dict | None) -> int:
    """The number of devices a header's `sharding` (as `to_json` writes it) spans."""
    return 1 if j is None else math.prod(n for _, n in j["mesh"])


def json_problem(j: Any) -> str | None:
    """What is wrong with a header's `sharding` (as `to_json` writes it), or None."""
    if not isinstance(j, dict) or set(j) != {"mesh", "shard"}:
        return f"expected an object with 'mesh' and 'shard', got {j!r}"
    mesh, shard = j["mesh"], j["shard"]
    if not isinstance(mesh, list) or not all(
            isinstance(a, list) and len(a) == 2 and isinstance(a[0], str)
            and type(a[1]) is int and a[1] > 0 for a in mesh):
        return f"'mesh' must be a list of [axis name, size] pairs, got {mesh!r}"
    names = [a for a, _ in mesh]
    if len(set(names)) != len(names):
        return f"'mesh' names an axis twice: {names}"
    if not isinstance(shard, dict) or not all(
            isinstance(d, str) and isinstance(v, list) and v and
            all(isinstance(a, str) and a in names for a in v) for d, v in shard.items()):
        return f"'shard' must map dim names to lists of the mesh's axes, got {shard!r}"
    return None


def loaded(saved: dict | None, mesh: Mesh | None, shard: Mapping | None,
           signatures: Sequence[Signature], where: str) -> Sharding | None:
    """The Sharding of a module loaded from an artifact (`where`, in messages): `shard=` as
    given, or the mapping the artifact recorded, on `mesh`, which must then have the axes and
    sizes it was saved for; None without a mesh (the exports run on one device). An artifact
    saved with its population on the mesh (`pop`, whose placement is part of the saved
    computation) needs a mesh of that shape, whatever `shard=` maps."""
    population = saved is not None and POPULATION in saved["shard"]
    if population and not isinstance(mesh, Mesh):
        raise ShardingError(f"{where} was saved with its population split over a mesh "
                            f"{_mesh_text(saved['mesh'])}, which is part of its computation: "
                            f"load it with mesh=jax.sharding.Mesh(devices, axis_names) of that "
                            f"shape")
    if mesh is None and shard is None:
        return None
    if shard is None and saved is None:
        raise ShardingError(f"{where} was saved without shard=: pass the mapping, "
                            f"gradlang.load(path, mesh=mesh, shard={{'B': 'data'}})")
    if (shard is None or population) and isinstance(mesh, Mesh):
        want = [(a, n) for a, n in saved["mesh"]]
        got = [(a, int(mesh.shape[a])) for a in mesh.axis_names]
        if got != want:
            other = "" if population else ", or pass shard= for this one"
            raise ShardingError(f"{where} was saved for a mesh {_mesh_text(want)}, got "
                                f"{_mesh_text(got)}: load it onto a mesh of that shape{other}")
    if shard is None:
        shard = {d: tuple(axes) for d, axes in saved["shard"].items()}
    # the population's placement is in the saved blobs, not in the arguments'
    return plan(mesh, {d: a for d, a in shard.items() if d != POPULATION}, signatures, {})


def _mesh_text(axes: list[tuple[str, int]]) -> str:
    return "(" + ", ".join(f"'{a}': {n}" for a, n in axes) + ")"


def populations(module) -> dict[str, int]:
    """The exports with a black-box population (`by=es / eggroll`), with the number of noise
    draws the population axis splits (pop / 2 for antithetic pairs)."""
    from gradlang.estimators.black_box import Population as Estimator, estimator

    out: dict[str, int] = {}
    for e in module.exports:
        t = e.transform
        if getattr(t, "by", None) is None or getattr(t, "private", None) is not None:
            continue
        est = estimator(t.by)
        if isinstance(est, Estimator):
            out[e.name] = est.draws
    return out


def canonical(t: Type, x: Any) -> Any:
    """An argument as a value with the structure of its shardings: a struct as a dict (also
    from a NamedTuple or a dataclass), a tuple as a tuple."""
    if isinstance(t, StructType):
        fields = _fields(x)
        return {n: canonical(f, fields[n]) for n, f in t.fields}
    if isinstance(t, TupleType):
        return tuple(canonical(e, v) for e, v in zip(t.elems, x))
    return x


@dataclass(frozen=True)
class Split:
    """A split dim of one argument's leaf: where it is (the path from the argument, as
    `canonical` lays it out, and its name in messages), its axis, and its devices."""

    path: tuple
    where: str
    axis: int
    dim: str
    devices: int
    mesh_axes: tuple[str, ...]

    def check(self, x: Any) -> None:
        """The dim's size in argument `x` divisible by its devices, or ShardingError."""
        for k in self.path:
            x = x[k]
        n = x.shape[self.axis]
        if n % self.devices:
            names = ", ".join(f"'{a}'" for a in self.mesh_axes)
            raise ShardingError(f"{self.where} has {self.dim} = {n}, which mesh axis {names} of "
                                f"{self.devices} devices does not divide: pad it to a multiple "
                                f"of {self.devices} or map {self.dim} to a smaller axis")


def splits(sharding: Sharding, t: Type, where: str, path: tuple = ()) -> list[Split]:
    """The split dims of an argument of type `t` (named `where`), with more than one device."""
    if isinstance(t, StructType):
        return [s for n, f in t.fields for s in splits(sharding, f, f"{where}.{n}", (*path, n))]
    if isinstance(t, TupleType):
        return [s for i, e in enumerate(t.elems)
                for s in splits(sharding, e, f"{where}[{i}]", (*path, i))]
    if not isinstance(t, TensorType):
        return []
    return [Split(path, where, i, d, sharding.size(d), sharding.dims[d])
            for i, (d, axes) in enumerate(zip(t.shape, sharding.spec(t)))
            if axes is not None and sharding.size(d) > 1]


def _placed(x: Any, s: Any) -> bool:
    """Whether every leaf of `x` is an array already laid out by `s` (a tree prefix)."""
    if isinstance(s, NamedSharding):
        return all(isinstance(v, jax.Array) and not isinstance(v, jax.core.Tracer)
                   and v.sharding == s for v in jax.tree.leaves(x))
    if isinstance(s, dict):
        return all(_placed(x[k], v) for k, v in s.items())
    return all(_placed(a, b) for a, b in zip(x, s))


def _put(x: Any, s: Any) -> Any:
    """`x` placed by `s`: moved by `jax.device_put` unless it is there already; a traced value
    (inside jit or vmap) left as it is, for the jit's in_shardings to constrain."""
    if _placed(x, s) or any(isinstance(v, jax.core.Tracer) for v in jax.tree.leaves(x)):
        return x
    return jax.device_put(jax.tree.map(_host, x), s)


def _host(v: Any) -> Any:
    """A host value (a Python scalar, a NumPy array) in the dtype JAX will hold it in (f64 as
    f32 unless in 64-bit mode): with several processes, device_put checks that every process
    passes the same value by comparing what it gathered, already converted, with the value as
    given, and JAX 0.10 finds a float64 0.001 unequal to its float32 copy."""
    if isinstance(v, jax.Array):
        return v
    v = np.asarray(v)
    return v.astype(jax.dtypes.canonicalize_dtype(v.dtype), copy=False)


GRADIENT_AT = {"grad": 0, "descend": 0, "value_and_grad": 1, "minimize": 1}
"""Where a gradient export's result holds the dict {wrt name: gradient} (or, for `descend`,
the updated parameters; for `minimize`, the direction) when the result is a tuple."""


def placing_gradients(signature: Signature, fn: Callable, sharding: Sharding) -> Callable:
    """`fn` whose gradients (updated parameters, direction) are laid out as their `wrt`
    parameters: replicated for replicated parameters, split like them for split ones (FSDP:
    XLA then reduce-scatters instead of all-reducing). A tree parameter's are left to XLA."""
    at = GRADIENT_AT.get(signature.kind)
    types = dict(signature.params)
    placed = {w: sharding.shardings(types[w]) for w in signature.wrt
              if not isinstance(types[w], TreeType)}
    if at is None or not placed:
        return fn

    def constrain(grads: dict) -> dict:
        return {w: jax.lax.with_sharding_constraint(g, placed[w]) if w in placed else g
                for w, g in grads.items()}

    def with_placed_gradients(*args):
        out = fn(*args)
        if isinstance(out, dict):
            return constrain(out)
        return (*out[:at], constrain(out[at]), *out[at + 1:])

    with_placed_gradients.__name__ = signature.name
    return with_placed_gradients


def sharded(signature: Signature, fn: Callable, sharding: Sharding) -> Callable:
    """`fn` (an export's function of positional arguments) jit-compiled with its arguments'
    NamedShardings as `in_shardings` (the arrays passed for a `descend` export's `wrt`
    parameters donated, as unsharded); each call checks the split dims' divisibility and
    places concrete arguments on the mesh (`jax.device_put` of those not there already).
    Gradients are laid out as their parameters (`placing_gradients`), the other results as
    XLA chooses. Inside another jit or a vmap, the shardings act as constraints. The call
    carries `lower`, `place` and `shardings` (by parameter name: `placement`)."""
    if isinstance(sharding.mesh, AbstractMesh):
        return _deviceless(signature, sharding.mesh)
    types = [t for _, t in signature.params]
    shardings = tuple(sharding.shardings(t) for t in types)
    checks = [(i, c) for i, (n, t) in enumerate(signature.params)
              for c in splits(sharding, t, f"{signature.name}(): argument '{n}'")]
    jitted = jax.jit(placing_gradients(signature, fn, sharding), in_shardings=shardings,
                     donate_argnums=signature.donated)

    def checked(args: tuple) -> tuple:
        args = tuple(canonical(t, a) for t, a in zip(types, args))
        for i, c in checks:
            c.check(args[i])
        return args

    def call(*args):
        return jitted(*(_put(a, s) for a, s in zip(checked(args), shardings)))

    call.__name__ = signature.name
    # the jit's lowering at given arguments (.compile().as_text(), .memory_analysis()), and
    # the arguments placed as a call places them
    call.lower = lambda *args: jitted.lower(*checked(args))
    call.place = lambda *args: tuple(_put(a, s) for a, s in zip(checked(args), shardings))
    call.shardings = {n: s for (n, _), s in zip(signature.params, shardings)}
    return call


def _deviceless(signature: Signature, mesh: AbstractMesh) -> Callable:
    """An export compiled for a mesh without devices, which only records its sharding."""
    def refuse(*args):
        raise ShardingError(f"export '{signature.name}' was compiled for an abstract mesh "
                            f"({', '.join(f'{a}: {n}' for a, n in mesh.shape.items())}), to "
                            f"record its sharding in an artifact; to run it, compile or load "
                            f"it with mesh=jax.sharding.Mesh(devices, axis_names)")

    refuse.__name__ = signature.name
    refuse.lower = refuse
    refuse.place = refuse
    return refuse


def lower(export, *args, **kwargs):
    """The lowering of a compiled export (`m.NAME`) at these arguments, checked and bound as
    a call: `.compile().as_text()` for its HLO (`collectives`), `.compile()
    .memory_analysis()` for its per-device memory; sharded or not."""
    return export._fn.lower(*export.bind(args, kwargs))


def placement(export) -> dict[str, Any] | None:
    """The NamedShardings of a sharded export's parameters by name (tree prefixes of their
    values as `canonical` lays them out), or None for an export compiled without `shard=`."""
    return getattr(export._fn, "shardings", None)


def place(export, *args, **kwargs) -> tuple:
    """The arguments of a sharded export (`m.NAME` compiled with `shard=`) in parameter order,
    placed on its mesh as a call places them: calling it with them moves nothing (what a
    training loop keeps between steps, and what a timing should pass)."""
    return export._fn.place(*export.bind(args, kwargs))


# ---- what the partitioned program communicates

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-broadcast")
"""XLA's collective ops, as compiled HLO text names them."""

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_COLLECTIVE = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.*?)\s*"
                         rf"\b(?P<op>{'|'.join(COLLECTIVES)})(?P<start>-start)?\(")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


@dataclass(frozen=True)
class Collective:
    """One collective op of a compiled program: its kind and the bytes of its result per
    device (an all-reduce's: the reduced values; an all-gather's: the gathered array; a
    tuple result's: all its arrays)."""

    op: str
    bytes: int


def collectives(hlo: str) -> list[Collective]:
    """The collective ops in compiled HLO text (`jax.jit(f).lower(...).compile().as_text()`),
    in program order; each op once as written (one inside a loop body runs once per
    iteration). An async pair counts at its `-start`, whose result tuple holds the operand
    too (not counted)."""
    out = []
    for line in hlo.splitlines():
        m = _COLLECTIVE.match(line)
        if m is None:
            continue
        arrays = _ARRAY.findall(m.group("shape"))
        if m.group("start") and len(arrays) > 1:
            arrays = arrays[len(arrays) // 2:]
        size = sum(_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
                   for dtype, dims in arrays)
        out.append(Collective(m.group("op"), size))
    return out
