"""Type rules of the neural-network layer ops: einsum, convolutions and pools,
normalizations, gathers along an axis and segment sums (lookups `table[ids]` are the `index`
op's)."""

from __future__ import annotations

from gradlang.shapes import ShapeError, broadcast, normalize_axis, show
from gradlang.types import Dim, DType, TensorType, Type


def _tensor(t: Type, what: str, rank: int = 0, arg: str | None = None) -> TensorType:
    if not isinstance(t, TensorType) or t.dtype is DType.BOOL:
        raise ShapeError(f"{what} must be a numeric tensor, got {t}", arg)
    if t.rank < rank:
        raise ShapeError(f"{what} needs a tensor of rank >= {rank}, got {t}", arg)
    return t


def _ids(t: Type, what: str, arg: str) -> TensorType:
    if not isinstance(t, TensorType) or not t.dtype.is_int:
        raise ShapeError(f"{what} must be an integer tensor, got {t}", arg)
    return t


def norm(ctx, op, args) -> TensorType:
    """x [..., D] (float); a scale and an offset, when given, [D]."""
    x = _tensor(args[0].type, f"the input of {op.name}", 1, "x")
    if not x.dtype.is_float:
        raise ShapeError(f"{op.name} normalizes a float tensor, got {x}", "x")
    _check_affine(op, args, x, f"the last axis of {x}")
    return x


def _check_affine(op, args, x: TensorType, what: str) -> None:
    """The scale and offset a normalization was given: float vectors of x's last axis."""
    given = [n for n in ("scale", "offset") if getattr(op.params, n)]
    for name, a in zip(given, args[1:]):
        t = _tensor(a.type, f"the {name} of {op.name}", 0, name)
        if t.shape != x.shape[-1:] or not t.dtype.is_float:
            raise ShapeError(f"the {name} of {op.name} must be a float vector of {what}, "
                             f"{show(x.shape[-1:])}, got {t}", name)


def take_along_axis(ctx, op, args) -> TensorType:
    """x and integer indices of the same rank: the indices' size along the axis, the other
    axes broadcast."""
    x = _tensor(args[0].type, "the input of take_along_axis", 1, "x")
    i = _ids(args[1].type, "the indices of take_along_axis", "indices")
    if i.rank != x.rank:
        raise ShapeError(f"take_along_axis needs indices of the rank of x ({x.rank}), got {i}",
                         "indices")
    axis = normalize_axis(op.params.axis, x.rank)
    others = broadcast(*(tuple(t.shape[:axis] + t.shape[axis + 1:]) for t in (x, i)))
    return x.with_shape(others[:axis] + (i.shape[axis],) + others[axis:])


def segment_sum(ctx, op, args) -> TensorType:
    """data [N, ...] and ids [N]: [segments, ...]."""
    data = _tensor(args[0].type, "the data of segment_sum", 1, "data")
    ids = _ids(args[1].type, "the segment ids of segment_sum", "segment_ids")
    if ids.rank != 1 or ids.shape[0] != data.shape[0]:
        raise ShapeError(f"segment_sum needs one segment id per row of the data "
                         f"{show(data.shape[:1])}, got {ids}", "segment_ids")
    return data.with_shape((op.params.segments,) + data.shape[1:])


def _float(t: Type, what: str, arg: str = "x") -> TensorType:
    t = _tensor(t, what, 0, arg)
    return t if t.dtype.is_float else t.with_dtype(DType.F32)


def einsum(ctx, op, args) -> TensorType:
    """The subscripts' inputs match the operands' ranks, a letter one size everywhere; the
    output's letters (explicit, or those used once in alphabetical order) give its shape."""
    spec = op.params.subscripts.replace(" ", "")
    terms, output = op.params.terms()
    if "." in spec or not all(c.isalpha() or c in ",->" for c in spec) or spec.count("->") > 1:
        raise ShapeError(f"einsum subscripts are letters, one term per operand separated by "
                         f"commas, then optionally -> and the output's letters (no ellipsis), "
                         f"got \"{op.params.subscripts}\"", "subscripts")
    if len(terms) != len(args):
        raise ShapeError(f"einsum subscripts \"{op.params.subscripts}\" name {len(terms)} "
                         f"operand{'s' * (len(terms) > 1)}, given {len(args)}", "subscripts")
    names = ("x", "y")
    ts = [_tensor(a.type, f"operand {i + 1} of einsum", 0, n)
          for i, (a, n) in enumerate(zip(args, names))]
    sizes: dict[str, Dim] = {}
    for term, t, name in zip(terms, ts, names):
        if len(term) != t.rank:
            raise ShapeError(f"einsum term \"{term}\" has {len(term)} letters for {t} of rank "
                             f"{t.rank}", name)
        for letter, d in zip(term, t.shape):
            if sizes.setdefault(letter, d) != d:
                raise ShapeError(f"einsum letter '{letter}' is {sizes[letter]} and {d} in "
                                 f"\"{op.params.subscripts}\"", name)
    unknown = [c for c in output if c not in sizes]
    if unknown or len(set(output)) != len(output):
        raise ShapeError(f"einsum output \"{output}\" must name each input letter at most once"
                         + (f"; '{unknown[0]}' is in no input" if unknown else ""), "subscripts")
    dtype = DType.F64 if any(t.dtype is DType.F64 for t in ts) else (
        ts[0].dtype if all(t.dtype is ts[0].dtype for t in ts) else DType.F32)
    return TensorType(dtype, tuple(sizes[c] for c in output))


def _per_axis(value, n: int, what: str, name: str) -> tuple[int, ...]:
    values = (value,) * n if isinstance(value, int) else tuple(value)
    if len(values) == 1:
        values *= n
    if len(values) != n or any(v < 1 for v in values):
        raise ShapeError(f"the {what} of {name} must be a positive integer or {n} of them (one "
                         f"per spatial axis), got {list(values)}", what)
    return values


def _windowed(name: str, x: TensorType, k: tuple[Dim, ...], stride, dilation, padding: str
              ) -> tuple[Dim, ...]:
    """The spatial sizes after a window of size k (dilated) slides with the stride."""
    if padding not in ("SAME", "VALID"):
        raise ShapeError(f"the padding of {name} must be \"SAME\" or \"VALID\", got "
                         f"\"{padding}\"", "padding")
    out: list[Dim] = []
    for n, kk, s, d in zip(x.shape[1:-1], k, stride, dilation):
        if padding == "SAME" and s == 1:
            out.append(n)
            continue
        if not (isinstance(n, int) and isinstance(kk, int)):
            raise ShapeError(f"{name} with {padding} padding and stride {s} needs static "
                             f"spatial sizes and windows, got {x} and a window {show(k)}", "x")
        if padding == "SAME":
            out.append(-(-n // s))
            continue
        span = (kk - 1) * d + 1
        if span > n:
            raise ShapeError(f"{name}: a window of {span}{' (dilated)' * (d > 1)} does not "
                             f"fit in {n} with VALID padding ({x})", "x")
        out.append((n - span) // s + 1)
    return tuple(out)


def _channels_last(t: Type, name: str) -> TensorType:
    x = _tensor(t, f"the input of {name}", 0, "x")
    if x.rank not in (3, 4):
        raise ShapeError(f"{name} takes x [B, W, C] (1-D) or [B, H, W, C] (2-D), got {x}", "x")
    return x


def conv(ctx, op, args) -> TensorType:
    x = _channels_last(args[0].type, "conv")
    w = _tensor(args[1].type, "the kernel of conv", 0, "w")
    layout = "[K, C / groups, O]" if x.rank == 3 else "[KH, KW, C / groups, O]"
    if w.rank != x.rank:
        raise ShapeError(f"conv of {x} needs a kernel {layout}, got {w}", "w")
    p, n = op.params, x.rank - 2
    groups = p.groups
    if not isinstance(groups, int) or groups < 1:
        raise ShapeError(f"the groups of conv must be a positive integer, got {groups}",
                         "groups")
    c, i, o = x.shape[-1], w.shape[-2], w.shape[-1]
    fits = c == i if groups == 1 else (isinstance(c, int) and isinstance(i, int)
                                      and c == i * groups)
    if not fits:
        raise ShapeError(f"conv of {x} with {groups} group{'s' * (groups > 1)} needs a kernel "
                         f"{layout} with C / groups = {c if groups == 1 else f'{c} / {groups}'} "
                         f"input channels, got {w}", "w")
    if groups > 1 and not (isinstance(o, int) and o % groups == 0):
        raise ShapeError(f"conv with {groups} groups needs output channels divisible by "
                         f"{groups}, got {w}", "w")
    stride = _per_axis(p.stride, n, "stride", "conv")
    dilation = _per_axis(p.dilation, n, "dilation", "conv")
    spatial = _windowed("conv", x, w.shape[:n], stride, dilation, p.padding)
    return TensorType(_float(x, "the input of conv").dtype, (x.shape[0],) + spatial + (o,))


def pool(ctx, op, args) -> TensorType:
    x = _channels_last(args[0].type, op.name)
    p, n = op.params, x.rank - 2
    window = _per_axis(p.window, n, "window", op.name)
    stride = window if p.stride is None else _per_axis(p.stride, n, "stride", op.name)
    spatial = _windowed(op.name, x, window, stride, (1,) * n, p.padding)
    t = x if op.name == "max_pool" else _float(x, f"the input of {op.name}")
    return t.with_shape((x.shape[0],) + spatial + (x.shape[-1],))


def attention(ctx, op, args) -> TensorType:
    """q [B, T, H, D], k and v [B, S, K, D], H a multiple of K; a bool mask [B, S] or
    broadcasting to [B, H, T, S]: [B, T, H, D]."""
    q, k, v = (_tensor(a.type, f"the {n} of dot_product_attention", 0, n[0])
               for n, a in zip(("queries", "keys", "values"), args))
    for name, t in zip("qkv", (q, k, v)):
        if t.rank != 4 or not t.dtype.is_float:
            raise ShapeError(f"dot_product_attention takes float q [B, T, H, D], k [B, S, K, D] "
                             f"and v [B, S, K, D], got {q}, {k} and {v}", name)
    (b, t, h, d), (bk, s, kh, dk), (bv, sv, vh, dv) = q.shape, k.shape, v.shape
    heads = kh == h or (isinstance(h, int) and isinstance(kh, int) and h % kh == 0)
    if not (b == bk == bv and d == dk == dv and s == sv and kh == vh and heads):
        raise ShapeError(f"dot_product_attention needs q [B, T, H, D], k and v [B, S, K, D] "
                         f"with H a multiple of K, got {q}, {k} and {v}",
                         "k" if b != bk or d != dk or not heads else "v")
    if op.params.mask:
        m = _tensor_or_bool(args[3].type)
        full = (b, h, t, s)
        fits = (m.shape == (b, s) if m.rank == 2 else
                m.rank == 4 and all(x in (1, y) for x, y in zip(m.shape, full)))
        if m.dtype is not DType.BOOL or not fits:
            raise ShapeError(f"the mask of dot_product_attention must be bool [B, S] = "
                             f"{show((b, s))} (key padding) or broadcast to [B, H, T, S] = "
                             f"{show(full)}, got {m}", "mask")
    return q


def _tensor_or_bool(t: Type) -> TensorType:
    if not isinstance(t, TensorType):
        raise ShapeError(f"a mask must be a bool tensor, got {t}", "mask")
    return t


def group_norm(ctx, op, args) -> TensorType:
    """x [B, ..., C] float, C a multiple of the groups; scale and offset [C]."""
    x = _tensor(args[0].type, "the input of group_norm", 2, "x")
    g, c = op.params.groups, x.shape[-1]
    if not x.dtype.is_float:
        raise ShapeError(f"group_norm normalizes a float tensor, got {x}", "x")
    if not (isinstance(g, int) and g >= 1 and (c == g or isinstance(c, int) and c % g == 0)):
        raise ShapeError(f"group_norm needs a channel count ({c}, the last axis of {x}) "
                         f"divisible by the groups ({g})", "groups")
    _check_affine(op, args, x, "the channels")
    return x


def leaky_relu(ctx, op, args) -> TensorType:
    x = _float(args[0].type, "the input of leaky_relu")
    slope = _tensor(args[1].type, "the slope of leaky_relu", 0, "slope")
    if slope.rank:
        raise ShapeError(f"the slope of leaky_relu must be a scalar, got {slope}", "slope")
    return x


def dropout(ctx, op, args) -> TensorType:
    x = _tensor(args[0].type, "the input of dropout", 0, "x")
    rate = _tensor(args[1].type, "the rate of dropout", 0, "rate")
    if not x.dtype.is_float or rate.rank:
        raise ShapeError(f"dropout takes a float tensor and a scalar rate, got {x} and {rate}",
                         "rate" if rate.rank else "x")
    return x


RULES = {"einsum": einsum, "dot_product_attention": attention, "group_norm": group_norm,
         "leaky_relu": leaky_relu, "dropout": dropout, "conv": conv, "avg_pool": pool, "max_pool": pool,
         "layer_norm": norm, "rms_norm": norm, "take_along_axis": take_along_axis,
         "segment_sum": segment_sum}
