"""Lowering rules of the neural-network layer ops, each to the `jax.lax` / `jax.nn` / `jnp` /
`jax.ops` function XLA fuses well (lookups `table[ids]` are the `index` op's, in `rules`)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from gradlang.ir import Op

from .rules_nonsmooth import as_result_dtype

LAYER_NORM_EPS = 1e-5
"""As Flax's `nn.LayerNorm` and PyTorch's."""
RMS_NORM_EPS = 1e-6
"""As Flax's `nn.RMSNorm`."""


def _norm(ctx, op: Op, x, *affine):
    """layer_norm: (x - mean) / sqrt(var + eps); rms_norm: x / sqrt(mean(x^2) + eps); over
    the last axis, in float32 at least, then times the scale (plus the offset)."""
    compute = jnp.promote_types(x.dtype, jnp.float32)
    y = x.astype(compute)
    if op.name == "layer_norm":
        y = y - jnp.mean(y, axis=-1, keepdims=True)
        eps = LAYER_NORM_EPS
    else:
        eps = RMS_NORM_EPS
    y = y * jax.lax.rsqrt(jnp.mean(jnp.square(y), axis=-1, keepdims=True) + eps)
    given = iter(affine)
    if op.params.scale:
        y = y * next(given)
    if op.params.offset:
        y = y + next(given)
    return y.astype(x.dtype)


def _einsum(ctx, op: Op, *xs):
    return jnp.einsum(op.params.subscripts, *(as_result_dtype(op, x) for x in xs))


def _spatial(value, n: int) -> tuple[int, ...]:
    values = (value,) * n if isinstance(value, int) else tuple(value)
    return values * n if len(values) == 1 else values


_LAYOUTS = {3: ("NWC", "WIO", "NWC"), 4: ("NHWC", "HWIO", "NHWC")}


def _conv(ctx, op: Op, x, w):
    p, n = op.params, x.ndim - 2
    x, w = as_result_dtype(op, x), as_result_dtype(op, w)
    return jax.lax.conv_general_dilated(
        x, w, _spatial(p.stride, n), p.padding, rhs_dilation=_spatial(p.dilation, n),
        dimension_numbers=_LAYOUTS[x.ndim], feature_group_count=ctx.dim(p.groups))


def _pool(ctx, op: Op, x):
    """lax.reduce_window over the spatial axes: the max, or the sum over the window's size
    (padded zeros counted, as Flax's avg_pool)."""
    p, n = op.params, x.ndim - 2
    window = _spatial(p.window, n)
    stride = window if p.stride is None else _spatial(p.stride, n)
    dims, strides = (1, *window, 1), (1, *stride, 1)
    x = as_result_dtype(op, x)
    # the initial values are NumPy scalars: lax then picks its differentiable max / sum
    # window reductions (a traced initial value takes the generic, non-differentiable one)
    if op.name == "max_pool":
        floating = jnp.issubdtype(x.dtype, jnp.floating)
        init = x.dtype.type(-np.inf if floating else jnp.iinfo(x.dtype).min)
        return jax.lax.reduce_window(x, init, jax.lax.max, dims, strides, p.padding)
    total = jax.lax.reduce_window(x, x.dtype.type(0), jax.lax.add, dims, strides, p.padding)
    return total / math.prod(window)


def _take_along_axis(ctx, op: Op, x, indices):
    return jnp.take_along_axis(x, indices, axis=op.params.axis, mode="fill")


def _segment_sum(ctx, op: Op, data, ids):
    return jax.ops.segment_sum(data, ids, num_segments=ctx.dim(op.params.segments))


def lookup(x, key: tuple, axis: int, ids):
    """x[key] with the integer tensor `ids` at `axis` (the other subscripts slices): rows out
    of range read NaN (float x), negative ids count from the end, as jnp.take's fill mode."""
    return jnp.take(x[key], ids, axis=axis, mode="fill")


NN_LOWERINGS = {"einsum": _einsum, "conv": _conv, "avg_pool": _pool, "max_pool": _pool,
                "layer_norm": _norm, "rms_norm": _norm,
                "take_along_axis": _take_along_axis, "segment_sum": _segment_sum}
