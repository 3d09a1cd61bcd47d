"""Export signatures and the Python-facing callable: argument binding, checking, JAX specs."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import jax
import numpy as np

from gradlang.types import (KEY, DType, StructType, TensorType, TreeLayout, TreeType, TupleType,
                            Type, type_dims, type_from_json, type_to_json)

from .dtypes import JNP_DTYPES


class ArgumentError(TypeError):
    """A compiled function was called with arguments that do not match its declared types."""


@dataclass(frozen=True)
class Signature:
    """What an export takes and returns; stored in artifact headers as JSON."""

    name: str
    kind: str  # "fn" | "grad" | "value_and_grad" | "descend"
    function: str
    params: tuple[tuple[str, Type], ...]
    result: Type
    wrt: tuple[str, ...] = ()
    stateful: bool = False
    """The function's last parameter is a state (a moving-average baseline) and the export
    also returns its update, last."""
    externs: tuple[str, ...] = ()
    """The extern functions it calls (their Python bindings are needed to run it)."""
    jax_functions: tuple[str, ...] = ()
    """The jax functions it calls: traced into it, so it runs without their bindings."""
    aux: Type | None = None
    """`has_aux=true`: the type of the auxiliary values it returns after the gradient (before
    the state)."""

    @property
    def donated(self) -> tuple[int, ...]:
        """Positions of the arguments a call consumes: a `descend` export writes the updated
        parameters over its `wrt` arguments' buffers (in place, as MeZO does)."""
        if self.kind != "descend":
            return ()
        names = [n for n, _ in self.params]
        return tuple(names.index(w) for w in self.wrt)

    @property
    def state(self) -> str | None:
        """The parameter carrying state from call to call, whose update the export returns
        last (a moving-average `baseline`, a learned `control`, compose's `inner`, dynamic
        weights' `history`, a `minimize` export's objectives' `state`): the last before the key
        and a `descend` export's runtime `lr`."""
        if not self.stateful:
            return None
        names = [n for n, t in self.params if t is not KEY]
        if self.kind == "descend" and names[-1] == "lr":
            names.pop()
        return names[-1]

    @property
    def dims(self) -> list[str]:
        out: list[str] = []
        for _, t in self.params:
            out += [d for d in type_dims(t) if d not in out]
        return out

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "function": self.function,
                "params": [{"name": n, "type": type_to_json(t)} for n, t in self.params],
                "result": type_to_json(self.result), "wrt": list(self.wrt),
                "stateful": self.stateful, "externs": list(self.externs),
                "jax_functions": list(self.jax_functions),
                **({"aux": type_to_json(self.aux)} if self.aux is not None else {})}

    @staticmethod
    def from_json(j: dict) -> Signature:
        return Signature(j["name"], j["kind"], j["function"],
                         tuple((p["name"], type_from_json(p["type"])) for p in j["params"]),
                         type_from_json(j["result"]), tuple(j["wrt"]), j.get("stateful", False),
                         tuple(j.get("externs", ())), tuple(j.get("jax_functions", ())),
                         type_from_json(j["aux"]) if "aux" in j else None)

    def describe(self) -> str:
        params = ", ".join(f"{n}: {t}" for n, t in self.params)
        return f"{self.name}({params})"

    def specs(self, concrete: Mapping[str, int] | None = None) -> tuple:
        """Abstract arguments for lowering / export; dims not in `concrete` stay symbolic.
        A tree parameter needs its layout (`with_layouts`), else ArgumentError."""
        unsized = [n for n, t in self.params if isinstance(t, TreeType) and t.layout is None]
        if unsized:
            raise ArgumentError(f"export '{self.name}' takes the tree '{unsized[0]}', whose "
                                f"structure is known only from a value: pass an example, "
                                f"example_args={{'{unsized[0]}': value}}, to save or "
                                f"stablehlo from Python (the command line has none)")
        concrete = dict(concrete or {})
        symbolic = [d for d in self.dims if d not in concrete]
        syms = dict(zip(symbolic, jax.export.symbolic_shape(", ".join(symbolic)))) if symbolic else {}
        env = {**syms, **concrete}
        return tuple(spec(t, env) for _, t in self.params)

    def with_layouts(self, examples: Mapping[str, Any]) -> Signature:
        """The signature with each tree parameter given the layout of its example (by name),
        for an artifact; ArgumentError when one is missing or cannot be recorded."""
        params = []
        for n, t in self.params:
            if isinstance(t, TreeType) and t.layout is None and n in examples:
                t = TreeType(layout_of(examples[n], f"example_args['{n}']"))
            params.append((n, t))
        return replace(self, params=tuple(params))


def zeros(t: Type, dims: Mapping[str, int]) -> Any:
    """Zeros of a declared tensor, tuple or struct type (a struct as a dict), its symbolic dims
    sized by `dims`; an ArgumentError names the dims `dims` lacks."""
    unknown = [d for d in type_dims(t) if d not in dims]
    if unknown:
        raise ArgumentError(f"no argument sizes {', '.join(unknown)} of {t}")
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), spec(t, dims))


def layout_of(x: Any, where: str) -> TreeLayout:
    """The layout of a tree an artifact can record (dicts with string keys, lists, tuples,
    None, float arrays); ArgumentError naming the first node it cannot."""

    def visit(x: Any, path: str) -> TreeLayout:
        if type(x) is dict:
            bad = next((k for k in x if not isinstance(k, str)), None)
            if bad is not None:
                raise ArgumentError(f"{where}: a saved tree's dict keys must be strings; "
                                    f"{path or 'the tree'} has the key {bad!r}")
            return ("dict", tuple((k, visit(v, f"{path}[{k!r}]")) for k, v in sorted(x.items())))
        if type(x) in (list, tuple):
            return (type(x).__name__, tuple(visit(v, f"{path}[{i}]") for i, v in enumerate(x)))
        if x is None:
            return ("none",)
        if not (hasattr(x, "shape") and hasattr(x, "dtype")):
            raise ArgumentError(f"{where}: an artifact records trees of dicts, lists, tuples, "
                                f"None and float arrays only; {path or 'the tree'} is a "
                                f"{type(x).__name__}")
        _check_leaf(x, path, where)
        return ("leaf", np.dtype(x.dtype).name, tuple(int(d) for d in x.shape))

    return visit(x, "")


def _check_leaf(x: Any, path: str, where: str) -> None:
    """A tree's leaf (at `path`, keystr form) is a float array, or an ArgumentError naming it."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        if jax.numpy.issubdtype(x.dtype, jax.numpy.floating):
            return
        got = f"an array of dtype {x.dtype}"
    else:
        got = f"a {type(x).__name__}"
    leaf = f"its leaf {path} is" if path else "it is"
    raise ArgumentError(f"{where}: a tree's leaves must be float arrays; {leaf} {got}")


def _check_tree(t: TreeType, x: Any, where: str) -> None:
    """Every leaf a float array; with a layout (a loaded artifact's), the saved structure
    and leaf shapes."""
    paths, leaves = _flat(x)
    for p, leaf in zip(paths, leaves):
        _check_leaf(leaf, p, where)
    if t.layout is None:
        return
    want = spec(t, {})
    want_paths, want_leaves = _flat(want)
    if jax.tree.structure(x) != jax.tree.structure(want):
        missing = [p for p in want_paths if p not in paths]
        extra = [p for p in paths if p not in want_paths]
        detail = (f"it has no leaf {missing[0]}" if missing else f"it has a leaf {extra[0]}, "
                  f"which the saved tree does not" if extra else
                  f"its nodes differ: saved {jax.tree.structure(want)}, got "
                  f"{jax.tree.structure(x)}")
        raise ArgumentError(f"{where}: not the tree structure the artifact was saved for "
                            f"({len(want_paths)} leaves); {detail}")
    for p, a, b in zip(paths, leaves, want_leaves):
        if tuple(a.shape) != tuple(b.shape):
            raise ArgumentError(f"{where}: leaf {p} has shape {list(a.shape)}, but the "
                                f"artifact was saved for {list(b.shape)}")


def _flat(x: Any) -> tuple[list[str], list]:
    """A tree's leaf paths (`['w'][0]`, as `jax.tree_util.keystr` writes them) and leaves."""
    flat = jax.tree_util.tree_flatten_with_path(x)[0]
    return [jax.tree_util.keystr(p) for p, _ in flat], [v for _, v in flat]


def spec(t: Type, env: Mapping[str, Any]) -> Any:
    """The abstract value of type `t` (ShapeDtypeStructs; structs as dicts), its symbolic dims
    sized by `env` (ints or `jax.export` symbolic dims); a tree's from its layout."""
    if t is KEY:
        return jax.eval_shape(lambda: jax.random.key(0))
    if isinstance(t, TreeType):
        assert t.layout is not None, "a tree without a layout has no abstract value"
        return _layout_spec(t.layout)
    if isinstance(t, TensorType):
        shape = tuple(env[d] if isinstance(d, str) else d for d in t.shape)
        return jax.ShapeDtypeStruct(shape, JNP_DTYPES[t.dtype])
    if isinstance(t, StructType):
        return {n: spec(f, env) for n, f in t.fields}
    assert isinstance(t, TupleType)
    return tuple(spec(e, env) for e in t.elems)


def _layout_spec(layout: TreeLayout) -> Any:
    kind = layout[0]
    if kind == "leaf":
        return jax.ShapeDtypeStruct(layout[2], jax.numpy.dtype(layout[1]))
    if kind == "dict":
        return {k: _layout_spec(v) for k, v in layout[1]}
    if kind == "none":
        return None
    return (list if kind == "list" else tuple)(_layout_spec(v) for v in layout[1])


def _is_key(x: Any) -> bool:
    """A typed JAX key (`jax.random.key`) or raw key data (`jax.random.PRNGKey`: uint32[2])."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return False
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return tuple(x.shape) == ()
    return np.dtype(dtype) == np.uint32 and tuple(x.shape) == (2,)


Ranged = list[tuple[tuple, TensorType, str]]
"""The integer leaves of a call whose values, not just their types, decide whether they fit:
(path from the argument list, declared type, the argument's name in messages)."""


def _describe(x: bool | int | float) -> str:
    return f"{type(x).__name__} {x}"


def _check_scalar(t: TensorType, x: bool | int | float, where: str) -> None:
    """A Python scalar for a scalar parameter: a bool for `bool`, an int for `i32`, an int or a
    float for `f32` / `f64`; anything else would be silently converted (2.7 -> 2, nan -> 0)."""
    if t.dtype is DType.BOOL:
        ok = isinstance(x, bool)
    elif isinstance(x, bool):
        ok = False
    else:
        ok = isinstance(x, int) or t.dtype is not DType.I32
    if not ok:
        raise ArgumentError(f"{where}: expected {t}, got {_describe(x)}")


def _is_wide_int(dtype: Any) -> bool:
    """Integer dtypes whose values need not fit in i32 (int64, uint32, uint64)."""
    return any(dtype == d for d in (np.int64, np.uint32, np.uint64))


def _check_range(t: TensorType, x: Any, where: str) -> None:
    """The integers in `x` fit: in i32 for an `i32` parameter; for a float parameter given a
    Python int, in JAX's default integer type (int32 unless 64-bit mode), which parses it."""
    if isinstance(x, jax.core.Tracer) or not np.size(x):
        return
    lo, hi = (x, x) if isinstance(x, int) else (int(x.min()), int(x.max()))
    limits = np.iinfo(np.int32 if t.dtype is DType.I32 else jax.dtypes.canonicalize_dtype(np.int64))
    if limits.min <= lo and hi <= limits.max:
        return
    if t.dtype is not DType.I32:
        raise ArgumentError(f"{where}: expected {t}, got {_describe(x)}, which JAX reads as "
                            f"{limits.dtype} and cannot hold; pass a float")
    got = _describe(x) if isinstance(x, int) else \
        f"an array of dtype {x.dtype} holding {hi if hi > limits.max else lo}"
    raise ArgumentError(f"{where}: expected {t}, got {got}, outside the i32 range "
                        f"[{limits.min}, {limits.max}]")


def _check(t: Type, x: Any, dims: dict[str, int], where: str, path: tuple,
           ranged: Ranged) -> None:
    """Raise ArgumentError unless `x` has type `t` (dims bound in `dims`). Integer leaves whose
    range must be checked on every call are added to `ranged` (at `path`) after checking."""
    if t is KEY:
        if not _is_key(x):
            raise ArgumentError(f"{where}: expected a random key, jax.random.key(seed) (or "
                                f"jax.random.PRNGKey(seed)), got {type(x).__name__}"
                                + (f" of shape {list(x.shape)}" if hasattr(x, "shape") else ""))
        return
    if isinstance(t, TreeType):
        _check_tree(t, x, where)
        return
    if isinstance(t, TensorType):
        if isinstance(x, (bool, int, float)) and not t.shape:
            _check_scalar(t, x, where)
            if isinstance(x, int) and not isinstance(x, bool):
                _check_range(t, x, where)
                ranged.append((path, t, where))
            return
        if not (hasattr(x, "shape") and hasattr(x, "dtype")):
            raise ArgumentError(f"{where}: expected a {t} array, got {type(x).__name__}")
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            raise ArgumentError(f"{where}: expected {t}, got a random key")
        kind = np.dtype(x.dtype).kind
        ok = {DType.BOOL: "b", DType.I32: "iu", DType.F32: "fiu", DType.F64: "fiu"}[t.dtype]
        if kind not in ok:
            raise ArgumentError(f"{where}: expected {t}, got an array of dtype {x.dtype}")
        shape = tuple(x.shape)
        if len(shape) != len(t.shape):
            raise ArgumentError(f"{where}: expected {t}, got shape {list(shape)} (rank {len(shape)})")
        for d, n in zip(t.shape, shape):
            if isinstance(d, int) and d != n:
                raise ArgumentError(f"{where}: expected {t}, got shape {list(shape)}")
            if isinstance(d, str):
                if d in dims and dims[d] != n and not isinstance(n, jax.core.Tracer):
                    raise ArgumentError(f"{where}: expected {t} with {d} = {dims[d]} (from an "
                                        f"earlier argument), got shape {list(shape)}")
                dims.setdefault(d, n)
        if t.dtype is DType.I32 and _is_wide_int(x.dtype):
            _check_range(t, x, where)
            ranged.append((path, t, where))
    elif isinstance(t, StructType):
        fields = _fields(x)
        if fields is None:
            raise ArgumentError(f"{where}: expected a dict for struct {t.name} (or a NamedTuple "
                                f"or dataclass with its fields), got {type(x).__name__}")
        names = [n for n, _ in t.fields]
        missing = [n for n in names if n not in fields]
        extra = [k for k in fields if k not in names]
        if missing or extra:
            what = "keys" if isinstance(x, Mapping) else f"fields (a {type(x).__name__})"
            raise ArgumentError(f"{where}: struct {t.name} needs {what} {names}; "
                                + (f"missing {missing}" if missing else f"unexpected {extra}"))
        for n, f in t.fields:
            _check(f, fields[n], dims, f"{where}.{n}", (*path, n), ranged)
    elif isinstance(t, TupleType):
        if not isinstance(x, Sequence) or len(x) != len(t.elems):
            raise ArgumentError(f"{where}: expected a tuple of {len(t.elems)} values")
        for i, (e, v) in enumerate(zip(t.elems, x)):
            _check(e, v, dims, f"{where}[{i}]", (*path, i), ranged)


def _fields(x: Any) -> Mapping[str, Any] | None:
    """A struct argument's fields by name: a mapping's items, a NamedTuple's or a dataclass's
    fields (a Flax struct, an Equinox module, a `jax.tree_util.register_dataclass`); None for
    anything else."""
    if isinstance(x, Mapping):
        return x
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return x._asdict()
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: getattr(x, f.name) for f in dataclasses.fields(x)}
    return None


def _item(x: Any, k: str | int) -> Any:
    """x's field `k` (a struct's, see `_fields`) or element `k`."""
    return _fields(x)[k] if isinstance(k, str) else x[k]


def _cast(t: Type, x: Any) -> Any:
    if t is KEY:
        typed = jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
        return x if typed else jax.random.wrap_key_data(x)
    if isinstance(t, TensorType):
        return jax.numpy.asarray(x, JNP_DTYPES[t.dtype])
    if isinstance(t, TreeType):  # leaves keep their dtype, or take the saved one
        if t.layout is None:
            return jax.tree.map(jax.numpy.asarray, x)
        return jax.tree.map(lambda a, s: jax.numpy.asarray(a, s.dtype), x, spec(t, {}))
    if isinstance(t, StructType):  # a dict, whatever holds the fields
        fields = _fields(x)
        return {n: _cast(f, fields[n]) for n, f in t.fields}
    return tuple(_cast(e, v) for e, v in zip(t.elems, x))


def casting(signature: Signature, fn: Callable) -> Callable:
    """`fn` with each argument first cast to its declared dtype (free inside jit)."""
    types = [t for _, t in signature.params]

    def cast_then_call(*args):
        return fn(*(_cast(t, a) for t, a in zip(types, args)))

    cast_then_call.__name__ = signature.name
    return cast_then_call


def _layout(args: tuple) -> tuple | None:
    """A hashable description of positional arguments that decides whether they type-check:
    the tree structure (dict keys included), each array leaf's shape and dtype, each Python
    scalar's type. None when some leaf is neither (those calls are always checked)."""
    leaves, tree = jax.tree.flatten(args)
    try:
        key = tree, tuple(type(x) if isinstance(x, (bool, int, float)) else (tuple(x.shape), x.dtype)
                          for x in leaves)
        hash(key)
    except (AttributeError, TypeError):
        return None
    return key


def without_derivatives(fn: Callable, error: Exception) -> Callable:
    """`fn` whose derivative (jax.jvp's, so also jax.grad's) raises `error`; calls, jit and
    vmap are unchanged."""
    @jax.custom_jvp
    def call(*args):
        return fn(*args)

    @call.defjvp
    def refuse(primals, tangents):
        raise error

    return call


class CompiledFunction:
    """A compiled export: call it with positional or keyword arguments (structs as dicts, or
    NamedTuples or dataclasses with the struct's fields).

    A `grad` export returns a dict of gradients keyed by the `wrt` names; `value_and_grad`
    returns `(value, grads)`; `descend` returns the updated `wrt` parameters in the same dict
    and consumes (donates) the arrays passed for them. A struct in a result is a dict (a tree
    keeps its structure). Composes with `jax.jit` and `jax.vmap`.
    """

    def __init__(self, signature: Signature, fn: Callable):
        self.signature = signature
        self._fn = fn
        self._checked: dict = {}
        """Layouts (tree structure, shapes, dtypes) of positional calls already checked, each
        with the integer leaves whose range is checked again on every call."""
        self.__name__ = signature.name
        self.__doc__ = f"gradlang export {signature.describe()} ({signature.kind})"

    def bind(self, args: tuple, kwargs: dict) -> list:
        """The arguments in parameter order, checked against the declared types."""
        return self._bind(args, kwargs)[0]

    def _bind(self, args: tuple, kwargs: dict) -> tuple[list, Ranged]:
        names = [n for n, _ in self.signature.params]
        if len(args) > len(names):
            raise ArgumentError(f"{self.signature.name}() takes {len(names)} arguments but "
                                f"{len(args)} were given")
        bound = dict(zip(names, args))
        for k, v in kwargs.items():
            if k not in names:
                raise ArgumentError(f"{self.signature.name}() has no parameter '{k}' "
                                    f"(parameters: {', '.join(names)})")
            if k in bound:
                raise ArgumentError(f"{self.signature.name}() got two values for '{k}'")
            bound[k] = v
        missing = [n for n in names if n not in bound]
        if missing:
            raise ArgumentError(f"{self.signature.name}() is missing {', '.join(map(repr, missing))}")
        dims: dict[str, int] = {}
        ranged: Ranged = []
        for i, (n, t) in enumerate(self.signature.params):
            _check(t, bound[n], dims, f"{self.signature.name}(): argument '{n}'", (i,), ranged)
        return [bound[n] for n in names], ranged

    def __call__(self, *args, **kwargs):
        if not kwargs:
            key = _layout(args)
            ranged = self._checked.get(key)
            if ranged is None:
                args, ranged = self._bind(args, {})
                if key is not None:
                    self._checked[key] = ranged
            else:
                for path, t, where in ranged:
                    _check_range(t, functools.reduce(_item, path, args), where)
            return self._fn(*args)
        return self._fn(*self.bind(args, kwargs))

    def __repr__(self) -> str:
        return f"<gradlang {self.signature.kind} export {self.signature.describe()}>"
