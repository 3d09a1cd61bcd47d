"""Lowering rules of the neural-network layer ops, each to the `jax.nn` / `jnp` / `jax.ops`
function XLA fuses well (lookups `table[ids]` are the `index` op's, in `rules`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gradlang.ir import Op

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


def _take_along_axis(ctx, op: Op, x, indices):
    return jnp.take_along_axis(x, indices, axis=op.params.axis, mode="fill")


def _segment_sum(ctx, op: Op, data, ids):
    return jax.ops.segment_sum(data, ids, num_segments=ctx.dim(op.params.segments))


def lookup(x, key: tuple, axis: int, ids):
    """x[key] with the integer tensor `ids` at `axis` (the other subscripts slices): rows out
    of range read NaN (float x), negative ids count from the end, as jnp.take's fill mode."""
    return jnp.take(x[key], ids, axis=axis, mode="fill")


NN_LOWERINGS = {"layer_norm": _norm, "rms_norm": _norm,
              "take_along_axis": _take_along_axis, "segment_sum": _segment_sum}
