"""Every IR op, declared once: its params dataclass, traits and a one-line description.

Traits read by passes:
- `elementwise`: broadcasts its tensor operands (NumPy rules) and works entry by entry.
- `zero_grad`: its derivative is zero almost everywhere or undefined, so no gradient flows
  through it (comparisons, logic, stop_gradient, integer-valued results).
- `unresolved`: only exists between the builder and the resolve pass.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .types import Dim, DType


# ---- params


@dataclass(frozen=True)
class NoParams:
    pass


@dataclass(frozen=True)
class ConstParams:
    value: bool | int | float
    dtype: DType


@dataclass(frozen=True)
class NameParams:
    name: str


@dataclass(frozen=True)
class CallParams:
    callee: str
    kwnames: tuple[str, ...] = ()
    """Names of the trailing keyword operands, in order."""


@dataclass(frozen=True)
class CalleeParams:
    callee: str


@dataclass(frozen=True)
class GetParams:
    index: int
    of: int
    """The arity of the destructured tuple, as the pattern expects it."""


@dataclass(frozen=True)
class StructParams:
    name: str
    fields: tuple[str, ...]


@dataclass(frozen=True)
class ReduceParams:
    axis: tuple[int, ...] | None = None
    keepdims: bool = False


@dataclass(frozen=True)
class AxisParams:
    axis: int = -1


@dataclass(frozen=True)
class ShapeParams:
    shape: tuple[Dim, ...]


@dataclass(frozen=True)
class PermParams:
    axes: tuple[int, ...] | None = None


@dataclass(frozen=True)
class OneHotParams:
    num_classes: Dim


@dataclass(frozen=True)
class ArangeParams:
    start: Dim
    stop: Dim | None = None


@dataclass(frozen=True)
class EyeParams:
    n: Dim


@dataclass(frozen=True)
class CastParams:
    dtype: DType


@dataclass(frozen=True)
class IndexItem:
    """One subscript: `kind` is "int" (static index), "dynamic" (an i32 operand) or "slice"."""

    kind: str
    index: int = 0
    start: int | None = None
    stop: int | None = None
    step: int | None = None

    def __str__(self) -> str:
        if self.kind == "int":
            return str(self.index)
        if self.kind == "dynamic":
            return "?"
        parts = ["" if v is None else str(v) for v in (self.start, self.stop)]
        return ":".join(parts) + ("" if self.step is None else f":{self.step}")


@dataclass(frozen=True)
class IndexParams:
    items: tuple[IndexItem, ...]


@dataclass(frozen=True)
class ForParams:
    carries: tuple[str, ...]
    start: Dim = 0
    stop: Dim = 0


# ---- op definitions


@dataclass(frozen=True)
class OpDef:
    name: str
    params: type = NoParams
    traits: frozenset[str] = frozenset()
    doc: str = ""

    def check_params(self, params: object) -> bool:
        return isinstance(params, self.params)


def _defs(names: str, params: type = NoParams, traits: str = "", doc: str = "") -> list[OpDef]:
    t = frozenset(traits.split())
    return [OpDef(n, params, t, doc) for n in names.split()]


UNARY_FLOAT = "exp log log1p expm1 sqrt tanh sigmoid softplus relu sin cos"
"""Elementwise ops whose result is floating point (integer inputs are promoted to f32)."""
UNARY_SAME = "neg abs"
BINARY_ARITH = "add sub mul div pow maximum minimum"
COMPARE = "eq ne lt le gt ge"
LOGIC = "and or"
REDUCE = "sum mean max min logsumexp var"

OPS: dict[str, OpDef] = {
    d.name: d
    for d in [
        *_defs("const", ConstParams, "", "a scalar literal"),
        *_defs("ref", NameParams, "unresolved", "a free name, before resolution"),
        *_defs("call", CallParams, "unresolved", "a call, before resolution"),
        *_defs("list", NoParams, "unresolved", "a list literal, before resolution"),
        *_defs("error", NoParams, "", "placeholder for an expression that has a diagnostic"),
        *_defs("dim", NameParams, "zero_grad", "the runtime size of a symbolic dim, as i32"),
        *_defs("call_fn", CalleeParams, "", "call of a user function"),
        *_defs("tuple", NoParams, "", "build a tuple"),
        *_defs("get", GetParams, "", "tuple element"),
        *_defs("struct_new", StructParams, "", "build a struct"),
        *_defs("getfield", NameParams, "", "struct field"),
        *_defs(UNARY_FLOAT, NoParams, "elementwise", "elementwise math"),
        *_defs(UNARY_SAME, NoParams, "elementwise", "elementwise math"),
        *_defs("not", NoParams, "elementwise zero_grad", "logical not"),
        *_defs(BINARY_ARITH, NoParams, "elementwise", "elementwise arithmetic"),
        *_defs(COMPARE, NoParams, "elementwise zero_grad", "elementwise comparison"),
        *_defs(LOGIC, NoParams, "elementwise zero_grad", "elementwise logic"),
        *_defs("where clip", NoParams, "elementwise", "elementwise select / clamp"),
        *_defs("stop_gradient", NoParams, "zero_grad", "identity with zero derivative"),
        *_defs("cast", CastParams, "", "dtype conversion"),
        *_defs(REDUCE, ReduceParams, "", "reduction over axes"),
        *_defs("matmul dot outer solve cholesky", NoParams, "", "linear algebra"),
        *_defs("reshape broadcast_to", ShapeParams, "", "shape op"),
        *_defs("transpose", PermParams, "", "axis permutation"),
        *_defs("concat stack", AxisParams, "", "join tensors along an axis"),
        *_defs("zeros ones full", ShapeParams, "", "constant tensor"),
        *_defs("arange", ArangeParams, "zero_grad", "integer range"),
        *_defs("eye", EyeParams, "", "identity matrix"),
        *_defs("softmax log_softmax", AxisParams, "", "normalization along an axis"),
        *_defs("one_hot", OneHotParams, "zero_grad", "one-hot encoding"),
        *_defs("cross_entropy mse", NoParams, "", "losses"),
        *_defs("index", IndexParams, "", "indexing and slicing"),
        *_defs("if", NoParams, "", "two-way conditional with a region per branch"),
        *_defs("for", ForParams, "", "bounded loop with carried state"),
    ]
}


def params_text(params: object) -> str:
    """Params as printed in the IR: `{axis=(1,), keepdims=False}`; empty for NoParams."""
    items = []
    for f in fields(params):  # type: ignore[arg-type]
        v = getattr(params, f.name)
        if isinstance(v, DType):
            v = v.value
        elif isinstance(v, tuple) and v and isinstance(v[0], IndexItem):
            v = "[" + ", ".join(str(i) for i in v) + "]"
        items.append(f"{f.name}={v}")
    return "{" + ", ".join(items) + "}" if items else ""
