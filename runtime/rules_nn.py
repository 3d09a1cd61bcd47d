"""Lowering rules of the neural-network layer ops, each to the `jax.lax` / `jax.nn` / `jnp` /
`jax.ops` function XLA fuses well (lookups `table[ids]` are the `index` op's, in `rules`)."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from gradlang.ir import Op

from .perturbed import Factored, call, dense
from .rules_nonsmooth import as_result_dtype
from .sampled import wta_crs_matmul

LAYER_NORM_EPS = 1e-5
"""As Flax's `nn.LayerNorm` and PyTorch's."""
RMS_NORM_EPS = 1e-6
"""As Flax's `nn.RMSNorm`."""
GROUP_NORM_EPS = 1e-5
"""As Flax's `nn.GroupNorm`."""


def _normalize(x, axes: tuple[int, ...], center: bool, eps: float):
    """x in float32 at least, centered (when `center`) and scaled to unit root mean square
    over `axes`."""
    y = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if center:
        y = y - jnp.mean(y, axis=axes, keepdims=True)
    return y * jax.lax.rsqrt(jnp.mean(jnp.square(y), axis=axes, keepdims=True) + eps)


def _affine(op: Op, y, affine: tuple, dtype):
    """y times the scale (plus the offset) the op was given, in `dtype`."""
    given = iter(affine)
    if op.params.scale:
        y = y * next(given)
    if op.params.offset:
        y = y + next(given)
    return y.astype(dtype)


def _norm(ctx, op: Op, x, *affine):
    """layer_norm: (x - mean) / sqrt(var + eps); rms_norm: x / sqrt(mean(x^2) + eps); over
    the last axis."""
    layer = op.name == "layer_norm"
    y = _normalize(x, (-1,), layer, LAYER_NORM_EPS if layer else RMS_NORM_EPS)
    return _affine(op, y, affine, x.dtype)


def _einsum(ctx, op: Op, *xs):
    """jnp.einsum; a black-box estimator's perturbed matrix stays factored through it (its
    dot_general computed from the factors, `perturbed.call`)."""
    xs = tuple(x if isinstance(x, Factored) else as_result_dtype(op, x) for x in xs)
    return call(lambda *ys: jnp.einsum(op.params.subscripts, *ys), xs)


def _sampled_einsum(ctx, op: Op, x, w):
    """A projection einsum as x's rows (its contracted dims last, flattened) times w flattened
    to [contracted, free] through `wta_crs_matmul`, then its dims put in the output's order."""
    (xt, wt), output = op.params.terms()
    x, w = as_result_dtype(op, x), as_result_dtype(op, w)
    k = sum(c in xt for c in wt)  # w's contracted letters lead its term
    contracted, free_w = wt[:k], wt[k:]
    free_x = "".join(c for c in xt if c not in contracted)
    rows = jnp.einsum(f"{xt}->{free_x}{contracted}", x)
    rows = rows.reshape(*rows.shape[:len(free_x)], -1)
    flat = w.reshape(rows.shape[-1], -1)
    y = wta_crs_matmul(rows, flat, ctx.next_key(), op.params.keep)
    y = y.reshape(*rows.shape[:-1], *w.shape[k:])
    return jnp.einsum(f"{free_x}{free_w}->{output}", y)


def _spatial(value, n: int) -> tuple[int, ...]:
    values = (value,) * n if isinstance(value, int) else tuple(value)
    return values * n if len(values) == 1 else values


_LAYOUTS = {3: ("NWC", "WIO", "NWC"), 4: ("NHWC", "HWIO", "NHWC")}


def _conv(ctx, op: Op, x, w):
    """lax.conv_general_dilated; a factored kernel that asks for it (a ghost-clipped one)
    multiplies the input's patches instead (`Factored.convolve`)."""
    p, n = op.params, x.ndim - 2
    x = as_result_dtype(op, dense(x))
    stride, dilation = _spatial(p.stride, n), _spatial(p.dilation, n)
    if isinstance(w, Factored):
        out = None
        if ctx.dim(p.groups) == 1:
            out = w.convolve(lambda: patches(x, w.shape[:n], stride, p.padding, dilation), n + 1)
        if out is not None:
            return out
        w = dense(w)
    return jax.lax.conv_general_dilated(
        x, as_result_dtype(op, w), stride, p.padding, rhs_dilation=dilation,
        dimension_numbers=_LAYOUTS[x.ndim], feature_group_count=ctx.dim(p.groups))


def patches(x, window: tuple[int, ...], stride: tuple[int, ...], padding,
            dilation: tuple[int, ...]):
    """x's windows as rows (im2col): [B, W', K C] or [B, H', W', KH KW C], a row's entries in
    a kernel's row-major order without O (HWIO), so that conv(x, w) = patches @
    w.reshape(-1, O). Strided slices of the padded x, one per kernel offset: data movement
    only (lax.conv_general_dilated_patches convolves with a one-hot kernel, K C times the
    convolution's own work)."""
    spatial = x.shape[1:-1]
    span = tuple((k - 1) * d + 1 for k, d in zip(window, dilation))
    pads = (jax.lax.padtype_to_pads(spatial, span, stride, padding)
            if isinstance(padding, str) else padding)
    x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    out = tuple((n + lo + hi - sp) // s + 1
                for n, (lo, hi), sp, s in zip(spatial, pads, span, stride))
    views = []
    for offset in itertools.product(*(range(k) for k in window)):  # row-major, as HWIO
        start = (0, *(o * d for o, d in zip(offset, dilation)), 0)
        limit = (x.shape[0], *(st + (m - 1) * s + 1 for st, m, s in zip(start[1:], out, stride)),
                 x.shape[-1])
        views.append(jax.lax.slice(x, start, limit, (1, *stride, 1)))
    rows = jnp.stack(views, axis=-2)  # [B, ..., K, C]
    return rows.reshape(*rows.shape[:-2], -1)


def _conv_transpose(ctx, op: Op, x, w):
    p, n = op.params, x.ndim - 2
    x, w = as_result_dtype(op, x), as_result_dtype(op, w)
    return jax.lax.conv_transpose(x, w, _spatial(p.stride, n), p.padding,
                                  rhs_dilation=_spatial(p.dilation, n),
                                  dimension_numbers=_LAYOUTS[x.ndim])


def _pool(ctx, op: Op, x):
    """lax.reduce_window over the spatial axes: the max, or the sum over the window's size
    (padded zeros counted, as Flax's avg_pool)."""
    p, n = op.params, x.ndim - 2
    window = _spatial(p.window, n)
    stride = window if p.stride is None else _spatial(p.stride, n)
    dims, strides = (1, *window, 1), (1, *stride, 1)
    padding = p.padding if isinstance(p.padding, str) else ((0, 0), *p.padding, (0, 0))
    x = as_result_dtype(op, x)
    # the initial values are NumPy scalars: lax then picks its differentiable max / sum
    # window reductions (a traced initial value takes the generic, non-differentiable one)
    if op.name == "max_pool":
        floating = jnp.issubdtype(x.dtype, jnp.floating)
        init = x.dtype.type(-np.inf if floating else jnp.iinfo(x.dtype).min)
        return jax.lax.reduce_window(x, init, jax.lax.max, dims, strides, padding)
    total = jax.lax.reduce_window(x, x.dtype.type(0), jax.lax.add, dims, strides, padding)
    return total / math.prod(window)


def _attention(ctx, op: Op, q, k, v, *mask):
    """jax.nn.dot_product_attention; a key-padding mask [B, S] as [B, 1, 1, S]."""
    m = mask[0] if mask else None
    if m is not None and m.ndim == 2:
        m = m[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=m, is_causal=op.params.causal)


def _group_norm(ctx, op: Op, x, *affine):
    """Statistics over the non-batch axes within each group of channels, as Flax's
    GroupNorm."""
    groups = ctx.dim(op.params.groups)
    grouped = x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)
    axes = tuple(range(1, grouped.ndim - 2)) + (grouped.ndim - 1,)
    y = _normalize(grouped, axes, True, GROUP_NORM_EPS).reshape(x.shape)
    return _affine(op, y, affine, x.dtype)


def _dropout(ctx, op: Op, x, rate):
    """x / (1 - rate) where a Bernoulli(1 - rate) keeps it, else 0: the mask is drawn, so
    the gradient flows through the kept entries only."""
    x = as_result_dtype(op, x)
    kept = jnp.asarray(1 - rate, x.dtype)
    keep = jax.random.bernoulli(ctx.next_key(), kept, x.shape)
    return jnp.where(keep, x / kept, jnp.zeros((), x.dtype))


def _take_along_axis(ctx, op: Op, x, indices):
    return jnp.take_along_axis(x, indices, axis=op.params.axis, mode="fill")


def _segment_sum(ctx, op: Op, data, ids):
    return jax.ops.segment_sum(data, ids, num_segments=ctx.dim(op.params.segments))


NN_LOWERINGS = {"dot_product_attention": _attention, "group_norm": _group_norm,
                "leaky_relu": lambda ctx, op, x, s: jax.nn.leaky_relu(as_result_dtype(op, x), s),
                "dropout": _dropout,
                "einsum": _einsum, "sampled_einsum": _sampled_einsum, "conv": _conv,
                "conv_transpose": _conv_transpose, "avg_pool": _pool, "max_pool": _pool,
                "layer_norm": _norm, "rms_norm": _norm,
                "take_along_axis": _take_along_axis, "segment_sum": _segment_sum}
