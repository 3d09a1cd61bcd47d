"""Type rules of the random-choice ops: distributions, draws, densities and expectations."""

from __future__ import annotations

from gradlang.distributions import DISTRIBUTIONS, KL_PAIRS
from gradlang.shapes import ShapeError, broadcast
from gradlang.types import DistType, DType, TensorType, Type

DIST_CONSUMERS = frozenset({"sample", "log_prob", "entropy", "kl", "dist_mean"})
"""The only ops that may take a distribution operand."""


def _float(t: Type, what: str) -> TensorType:
    if not isinstance(t, TensorType) or t.dtype is DType.BOOL:
        raise ShapeError(f"{what} must be a numeric tensor, got {t}")
    return t


def _dist(t: Type, what: str) -> DistType:
    if not isinstance(t, DistType):
        raise ShapeError(f"{what} must be a distribution, e.g. Normal(0.0, 1.0), got {t}")
    return t


def dist(ctx, op, args) -> DistType:
    spec = DISTRIBUTIONS[op.params.family]
    shapes, events = [], []
    dtype = DType.F32
    for name, a in zip(op.params.given, args):
        t = _float(a.type, f"parameter '{name}' of {spec.name}")
        if t.dtype is DType.F64:
            dtype = DType.F64
        if t.rank < spec.event:
            raise ShapeError(f"parameter '{name}' of {spec.name} needs a last axis of "
                             f"categories / components, got {t}")
        cut = t.rank - spec.event
        shapes.append(t.shape[:cut])
        events.append(t.shape[cut:])
    batch = broadcast(*shapes)
    event = broadcast(*events) if spec.event else ()
    if spec.event and event == (1,) and any(e != (1,) for e in events):
        raise ShapeError(f"the parameters of {spec.name} disagree on the number of components")
    value = TensorType(DType.I32 if spec.integer else dtype, batch + (event if spec.onehot else ()))
    return DistType(spec.name, batch, value, event)


def _categories(t: DistType) -> tuple:
    """The trailing event axes of a draw (the one-hot axis), as a shape."""
    return t.value.shape[len(t.batch):]


def sample(ctx, op, args) -> TensorType:
    return _dist(args[0].type, "the right side of '~'").value


def log_prob(ctx, op, args) -> TensorType:
    d = _dist(args[0].type, "the first argument of log_prob")
    x = _float(args[1].type, "the value of log_prob") if not (
        isinstance(args[1].type, TensorType) and args[1].type.dtype is DType.I32) else args[1].type
    event = _categories(d)
    if event and x.shape[len(x.shape) - len(event):] != event:
        raise ShapeError(f"a value of {d.family} ends with the category axis {list(event)}, "
                         f"got {x}")
    x_batch = x.shape[:len(x.shape) - len(event)]
    return TensorType(_real(d), broadcast(d.batch, x_batch))


def _real(d: DistType) -> DType:
    return DType.F64 if d.value.dtype is DType.F64 else DType.F32


def entropy(ctx, op, args) -> TensorType:
    d = _dist(args[0].type, "the argument of entropy")
    if d.family == "MixtureNormal":
        raise ShapeError("MixtureNormal has no closed-form entropy; estimate it with "
                         "-log_prob(d, x) of a draw x ~ d")
    return TensorType(_real(d), d.batch)


def kl(ctx, op, args) -> TensorType:
    p = _dist(args[0].type, "the first argument of kl")
    q = _dist(args[1].type, "the second argument of kl")
    if (p.family, q.family) not in KL_PAIRS:
        pairs = ", ".join(sorted({a for a, _ in KL_PAIRS}))
        raise ShapeError(f"no closed-form kl({p.family}, {q.family}); closed forms exist for "
                         f"two distributions of the same family among {pairs}")
    if p.event != q.event:
        raise ShapeError(f"kl of distributions over different category axes: "
                         f"{list(p.event)} and {list(q.event)}")
    return TensorType(_real(p), broadcast(p.batch, q.batch))


def dist_mean(ctx, op, args) -> TensorType:
    d = _dist(args[0].type, "the argument of mean")
    return TensorType(_real(d), d.value.shape)


def stacked(n: int, t: Type) -> TensorType:
    """The type of `t` evaluated on n draws, stacked on a new axis 0."""
    if not isinstance(t, TensorType) or not t.dtype.is_float:
        raise ShapeError(f"an expectation needs a float tensor value, got {t}")
    return t.with_shape((n,) + t.shape)


def surrogate(ctx, op, args) -> TensorType:
    t = args[0].type
    return t.with_shape(t.shape[1:])


RULES = {"dist": dist, "sample": sample, "log_prob": log_prob, "entropy": entropy, "kl": kl,
         "dist_mean": dist_mean, "surrogate": surrogate}
