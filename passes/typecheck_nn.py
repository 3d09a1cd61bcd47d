"""Type rules of the neural-network layer ops: einsum, convolutions and pools,
normalizations, gathers along an axis and segment sums (lookups `table[ids]` are the `index`
op's)."""

from __future__ import annotations

from gradlang.shapes import ShapeError, add_dims, broadcast, normalize_axis, show, sub_dims
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


def sampled_einsum(ctx, op, args) -> TensorType:
    """An einsum projection of float x by a float weight w (its second operand)."""
    if len(args) != 2 or not op.params.projects(1):
        raise ShapeError(f"wta_crs samples rows of x for the gradient of the weight it "
                         f"projects by: einsum(\"...\", x, w) with w's contracted letters "
                         f"leading its term and its others in the output, e.g. "
                         f"\"btd,dnk->btnk\", got \"{op.params.subscripts}\"", "subscripts")
    for name, a in zip(("x", "y"), args):
        if not (isinstance(a.type, TensorType) and a.type.dtype.is_float):
            raise ShapeError(f"wta_crs needs float operands, got {a.type}", name)
    return einsum(ctx, op, args)


def _per_axis(value, n: int, what: str, name: str) -> tuple[int, ...]:
    values = (value,) * n if isinstance(value, int) else tuple(value)
    if len(values) == 1:
        values *= n
    if len(values) != n or any(v < 1 for v in values):
        raise ShapeError(f"the {what} of {name} must be a positive integer or {n} of them (one "
                         f"per spatial axis), got {list(values)}", what)
    return values


def _windowed(name: str, x: TensorType, k: tuple[Dim, ...], stride, dilation, padding
              ) -> tuple[Dim, ...]:
    """The spatial sizes after a window of size k (dilated) slides with the stride."""
    pads = _pads(name, padding, len(k))
    out: list[Dim] = []
    for n, kk, s, d, pad in zip(x.shape[1:-1], k, stride, dilation, pads):
        if padding == "SAME" and s == 1:
            out.append(n)
            continue
        span = (kk - 1) * d + 1 if isinstance(kk, int) else None
        if s == 1 and span is not None and pad is not None:
            size = _shifted(n, sum(pad) - span + 1)
        elif isinstance(n, int) and span is not None:
            size = -(-n // s) if padding == "SAME" else (n + sum(pad or (0, 0)) - span) // s + 1
        else:
            raise ShapeError(f"{name} with {_show_padding(padding)} padding and stride {s} needs "
                             f"static spatial sizes and windows, got {x} and a window {show(k)}",
                             "x")
        if isinstance(size, int) and size < 1:
            raise ShapeError(f"{name}: a window of {span}{' (dilated)' * (d > 1)} does not "
                             f"fit in {n} with {_show_padding(padding)} padding ({x})", "x")
        out.append(size)
    return tuple(out)


def _pads(name: str, padding, n: int) -> tuple[tuple[int, int] | None, ...]:
    """The (low, high) zeros per spatial axis (VALID: none), or None per axis for SAME."""
    if padding == "SAME":
        return (None,) * n
    if padding == "VALID":
        return ((0, 0),) * n
    if isinstance(padding, str):
        raise ShapeError(f"the padding of {name} must be \"SAME\", \"VALID\" or (low, high) "
                         f"pairs, got \"{padding}\"", "padding")
    if len(padding) != n:
        raise ShapeError(f"the padding of {name} needs one (low, high) pair per spatial axis "
                         f"({n}), got {len(padding)}", "padding")
    return padding


def _show_padding(padding) -> str:
    return padding if isinstance(padding, str) else str(list(padding))


def _shifted(n: Dim, delta: int) -> Dim:
    return add_dims(n, delta) if delta > 0 else sub_dims(n, -delta)


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


def conv_transpose(ctx, op, args) -> TensorType:
    """x [B, ..., C] and w [..., C, O] as jax.lax.conv_transpose: x dilated by the stride,
    padded (SAME: to size n * stride; VALID: by K - 1 each side, less what overlaps), then
    convolved with stride 1."""
    x = _channels_last(args[0].type, "conv_transpose")
    w = _tensor(args[1].type, "the kernel of conv_transpose", 0, "w")
    layout = "[K, C, O]" if x.rank == 3 else "[KH, KW, C, O]"
    if w.rank != x.rank or w.shape[-2] != x.shape[-1]:
        raise ShapeError(f"conv_transpose of {x} needs a kernel {layout} with C = "
                         f"{x.shape[-1]}, got {w}", "w")
    p, n = op.params, x.rank - 2
    stride = _per_axis(p.stride, n, "stride", "conv_transpose")
    dilation = _per_axis(p.dilation, n, "dilation", "conv_transpose")
    pads = _pads("conv_transpose", p.padding, n)
    spatial: list[Dim] = []
    for size, k, s, d, pad in zip(x.shape[1:-1], w.shape[:n], stride, dilation, pads):
        span = (k - 1) * d + 1 if isinstance(k, int) else None
        if s == 1 and p.padding == "SAME":
            spatial.append(size)
        elif isinstance(size, int) and span is not None:
            if p.padding == "SAME":
                spatial.append(size * s)
            elif p.padding == "VALID":
                spatial.append(size * s + max(span - s, 0))
            else:
                spatial.append((size - 1) * s + 1 + sum(pad) - span + 1)
        elif s == 1 and span is not None:
            spatial.append(_shifted(size, span - 1 if p.padding == "VALID"
                                    else sum(pad) - span + 1))
        else:
            raise ShapeError(f"conv_transpose with stride {s} needs static spatial sizes and "
                             f"kernels, got {x} and {w}", "x")
        if isinstance(spatial[-1], int) and spatial[-1] < 1:
            raise ShapeError(f"conv_transpose: the padding {_show_padding(p.padding)} leaves "
                             f"no output of {x}", "padding")
    return TensorType(_float(x, "the input of conv_transpose").dtype,
                      (x.shape[0], *spatial, w.shape[-1]))


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


RULES = {"einsum": einsum, "sampled_einsum": sampled_einsum, "dot_product_attention": attention,
         "group_norm": group_norm,
         "leaky_relu": leaky_relu, "dropout": dropout, "conv": conv,
         "conv_transpose": conv_transpose, "avg_pool": pool, "max_pool": pool,
         "layer_norm": norm, "rms_norm": norm, "take_along_axis": take_along_axis,
         "segment_sum": segment_sum}
