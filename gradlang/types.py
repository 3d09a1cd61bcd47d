"""The type system: dtypes, tensors with integer or symbolic dims, structs, tuples, trees."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

Dim = int | str
"""A dimension: a static size, or a symbolic name such as `B` (also derived names like `B+D`)."""


class DType(Enum):
    BOOL = "bool"
    I32 = "i32"
    F32 = "f32"
    F64 = "f64"

    @property
    def is_float(self) -> bool:
        return self in (DType.F32, DType.F64)

    @property
    def is_int(self) -> bool:
        return self is DType.I32

    @property
    def rank(self) -> int:
        return _DTYPE_ORDER.index(self)


_DTYPE_ORDER = [DType.BOOL, DType.I32, DType.F32, DType.F64]


def promote(a: DType, b: DType) -> DType:
    """The dtype of a binary arithmetic op: the larger of the two in bool < i32 < f32 < f64."""
    return a if a.rank >= b.rank else b


class Type:
    """Base of all types."""


@dataclass(frozen=True)
class TensorType(Type):
    """A tensor; `shape == ()` is a scalar."""

    dtype: DType
    shape: tuple[Dim, ...] = ()

    def __str__(self) -> str:
        if not self.shape:
            return self.dtype.value
        return f"{self.dtype.value}[{', '.join(str(d) for d in self.shape)}]"

    @property
    def rank(self) -> int:
        return len(self.shape)

    def with_shape(self, shape: tuple[Dim, ...]) -> TensorType:
        return TensorType(self.dtype, tuple(shape))

    def with_dtype(self, dtype: DType) -> TensorType:
        return TensorType(dtype, self.shape)


@dataclass(frozen=True)
class StructType(Type):
    name: str
    fields: tuple[tuple[str, Type], ...]

    def __str__(self) -> str:
        return self.name

    def field(self, name: str) -> Type | None:
        return dict(self.fields).get(name)


@dataclass(frozen=True)
class TupleType(Type):
    elems: tuple[Type, ...]

    def __str__(self) -> str:
        return "(" + ", ".join(str(e) for e in self.elems) + ")"


TreeLayout = tuple
"""A tree's structure as an artifact records it, hashable: `("leaf", dtype, shape)` (a NumPy
float dtype name), `("dict", ((key, layout), ...))`, `("list", (layout, ...))`,
`("tuple", (layout, ...))` or `("none",)`."""


@dataclass(frozen=True)
class TreeType(Type):
    """A parameter tree: any JAX pytree of float arrays (a Flax `params` dict, nested dicts,
    lists, tuples, NamedTuples, registered dataclasses). The compiler does not know its
    structure: it is opaque, checked when an export is called. `layout` is the structure an
    artifact was saved for (None in the compiler)."""

    layout: TreeLayout | None = None

    def __str__(self) -> str:
        return "tree"


TREE = TreeType()
"""The type `tree` as written in source."""


@dataclass(frozen=True)
class NamedType(Type):
    """A reference to a struct by name, before name resolution."""

    name: str
    bindings: tuple[tuple[str, Dim], ...] = ()

    def __str__(self) -> str:
        if not self.bindings:
            return self.name
        return f"{self.name}[{', '.join(f'{k}={v}' for k, v in self.bindings)}]"


@dataclass(frozen=True)
class ListType(Type):
    """The type of a list literal (`[a, b]`); only builtins consume lists."""

    elems: tuple[Type, ...]

    def __str__(self) -> str:
        return "[" + ", ".join(str(e) for e in self.elems) + "]"


@dataclass(frozen=True)
class DistType(Type):
    """A distribution (a batch of them): its family, batch shape and the type of one draw of
    the whole batch, and its event axes (categories / components; a Categorical's draw, an
    index, has none of them). Distributions live inside function bodies only."""

    family: str
    batch: tuple[Dim, ...]
    value: TensorType
    event: tuple[Dim, ...] = ()

    def __str__(self) -> str:
        batch = f"[{', '.join(str(d) for d in self.batch)}]" if self.batch else ""
        return f"{self.family}{batch} -> {self.value}"


class _Special(Type):
    def __init__(self, text: str):
        self.text = text

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return self.text


UNKNOWN = _Special("?")
"""The type of a value before type checking."""

KEY = _Special("key")
"""A JAX random key: the implicit argument of functions that sample."""

ERROR = _Special("<error>")
"""The type of a value whose computation already produced a diagnostic (suppresses cascades)."""


def scalar(dtype: DType) -> TensorType:
    return TensorType(dtype, ())


SOLVER_REPORT = StructType("SolverReport", (("residual", scalar(DType.F32)),
                                            ("steps", scalar(DType.I32))))
"""What `argmin ... as (w, report)` binds: the solver's final residual and its step count."""


def type_dims(t: Type) -> list[str]:
    """Symbolic dim names appearing in a type, in order of first appearance."""
    out: list[str] = []

    def visit(x: Type) -> None:
        if isinstance(x, TensorType):
            for d in x.shape:
                if isinstance(d, str) and d not in out:
                    out.append(d)
        elif isinstance(x, StructType):
            for _, f in x.fields:
                visit(f)
        elif isinstance(x, (TupleType, ListType)):
            for e in x.elems:
                visit(e)

    visit(t)
    return out


def substitute_dims(t: Type, env: dict[str, Dim]) -> Type:
    """Replace symbolic dims by their bindings in `env`."""
    if isinstance(t, TensorType):
        return t.with_shape(tuple(env.get(d, d) if isinstance(d, str) else d for d in t.shape))
    if isinstance(t, StructType):
        return StructType(t.name, tuple((n, substitute_dims(f, env)) for n, f in t.fields))
    if isinstance(t, TupleType):
        return TupleType(tuple(substitute_dims(e, env) for e in t.elems))
    return t


def is_float_tree(t: Type) -> bool:
    """True when every leaf of `t` is a floating-point tensor (differentiable)."""
    if isinstance(t, TreeType):
        return True
    if isinstance(t, TensorType):
        return t.dtype.is_float
    if isinstance(t, StructType):
        return all(is_float_tree(f) for _, f in t.fields)
    if isinstance(t, TupleType):
        return all(is_float_tree(e) for e in t.elems)
    return False


def uses_f64(t: Type) -> bool:
    """Some leaf of `t` is an f64 tensor: running it needs JAX's 64-bit mode."""
    if isinstance(t, TensorType):
        return t.dtype is DType.F64
    if isinstance(t, StructType):
        return any(uses_f64(f) for _, f in t.fields)
    if isinstance(t, TupleType):
        return any(uses_f64(e) for e in t.elems)
    return False


def has_float_leaf(t: Type) -> bool:
    """True when some leaf of `t` is a floating-point tensor (it can carry a gradient)."""
    if isinstance(t, TensorType):
        return t.dtype.is_float
    if isinstance(t, (DistType, TreeType)):
        return True
    if isinstance(t, StructType):
        return any(has_float_leaf(f) for _, f in t.fields)
    if isinstance(t, TupleType):
        return any(has_float_leaf(e) for e in t.elems)
    return False


def type_to_json(t: Type) -> object:
    """A JSON-able description of a (resolved) type, used by artifact headers."""
    if isinstance(t, TensorType):
        return {"dtype": t.dtype.value, "shape": list(t.shape)}
    if isinstance(t, StructType):
        return {"struct": t.name, "fields": {n: type_to_json(f) for n, f in t.fields}}
    if isinstance(t, TupleType):
        return {"tuple": [type_to_json(e) for e in t.elems]}
    if isinstance(t, TreeType):
        return {"tree": None if t.layout is None else layout_to_json(t.layout)}
    if t is KEY:
        return "key"
    raise TypeError(f"type {t} has no JSON form")


def type_from_json(j: object) -> Type:
    """Inverse of `type_to_json`."""
    if j == "key":
        return KEY
    assert isinstance(j, dict)
    if "dtype" in j:
        return TensorType(DType(j["dtype"]), tuple(j["shape"]))
    if "struct" in j:
        return StructType(j["struct"], tuple((n, type_from_json(f)) for n, f in j["fields"].items()))
    if "tree" in j:
        return TreeType(None if j["tree"] is None else layout_from_json(j["tree"]))
    return TupleType(tuple(type_from_json(e) for e in j["tuple"]))


def layout_to_json(layout: TreeLayout) -> object:
    """A tree layout as JSON: leaves `{"dtype", "shape"}`, `{"dict": {...}}`, `{"list": [...]}`,
    `{"tuple": [...]}`, null."""
    kind = layout[0]
    if kind == "leaf":
        return {"dtype": layout[1], "shape": list(layout[2])}
    if kind == "dict":
        return {"dict": {k: layout_to_json(v) for k, v in layout[1]}}
    if kind == "none":
        return None
    return {kind: [layout_to_json(v) for v in layout[1]]}


def layout_from_json(j: object) -> TreeLayout:
    """Inverse of `layout_to_json` (on JSON an artifact's schema check accepted)."""
    if j is None:
        return ("none",)
    assert isinstance(j, dict)
    if "dtype" in j:
        return ("leaf", j["dtype"], tuple(j["shape"]))
    if "dict" in j:
        return ("dict", tuple((k, layout_from_json(v)) for k, v in j["dict"].items()))
    (kind, items), = j.items()
    return (kind, tuple(layout_from_json(v) for v in items))
