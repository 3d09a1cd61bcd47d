"""Type rules of the neural-network layer ops: normalizations, gathers along an axis and
segment sums (lookups `table[ids]` are the `index` op's)."""

from __future__ import annotations

from gradlang.shapes import ShapeError, broadcast, normalize_axis, show
from gradlang.types import DType, TensorType, Type


def _tensor(t: Type, what: str, rank: int = 0) -> TensorType:
    if not isinstance(t, TensorType) or t.dtype is DType.BOOL:
        raise ShapeError(f"{what} must be a numeric tensor, got {t}")
    if t.rank < rank:
        raise ShapeError(f"{what} needs a tensor of rank >= {rank}, got {t}")
    return t


def _ids(t: Type, what: str) -> TensorType:
    if not isinstance(t, TensorType) or not t.dtype.is_int:
        raise ShapeError(f"{what} must be an integer tensor, got {t}")
    return t


def norm(ctx, op, args) -> TensorType:
    """x [..., D] (float); a scale and an offset, when given, [D]."""
    x = _tensor(args[0].type, f"the input of {op.name}", 1)
    if not x.dtype.is_float:
        raise ShapeError(f"{op.name} normalizes a float tensor, got {x}")
    given = [n for n in ("scale", "offset") if getattr(op.params, n)]
    for name, a in zip(given, args[1:]):
        t = _tensor(a.type, f"the {name} of {op.name}")
        if t.shape != x.shape[-1:] or not t.dtype.is_float:
            raise ShapeError(f"the {name} of {op.name} must be a float vector of the last axis "
                             f"of {x}, {show(x.shape[-1:])}, got {t}")
    return x


def take_along_axis(ctx, op, args) -> TensorType:
    """x and integer indices of the same rank: the indices' size along the axis, the other
    axes broadcast."""
    x = _tensor(args[0].type, "the input of take_along_axis", 1)
    i = _ids(args[1].type, "the indices of take_along_axis")
    if i.rank != x.rank:
        raise ShapeError(f"take_along_axis needs indices of the rank of x ({x.rank}), got {i}")
    axis = normalize_axis(op.params.axis, x.rank)
    others = broadcast(*(tuple(t.shape[:axis] + t.shape[axis + 1:]) for t in (x, i)))
    return x.with_shape(others[:axis] + (i.shape[axis],) + others[axis:])


def segment_sum(ctx, op, args) -> TensorType:
    """data [N, ...] and ids [N]: [segments, ...]."""
    data = _tensor(args[0].type, "the data of segment_sum", 1)
    ids = _ids(args[1].type, "the segment ids of segment_sum")
    if ids.rank != 1 or ids.shape[0] != data.shape[0]:
        raise ShapeError(f"segment_sum needs one segment id per row of the data "
                         f"{show(data.shape[:1])}, got {ids}")
    return data.with_shape((op.params.segments,) + data.shape[1:])


RULES = {"layer_norm": norm, "rms_norm": norm, "take_along_axis": take_along_axis,
         "segment_sum": segment_sum}
