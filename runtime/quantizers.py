"""The quantizers' arithmetic, shared by the lowerings of `quantize`, `quest` and `hadamard`
(`runtime.rules_nonsmooth`) and by QuEST's trust rule (`estimators.backward.Trust`): the
Hadamard transform, symmetric and zero-point quantization levels, and QuEST's Gaussian-clipped
quantizer in the rotated basis. A leaf module: it imports nothing of gradlang.
"""

from __future__ import annotations

from functools import cache

import jax.numpy as jnp
import numpy as np
from jax import lax


def hadamard(x):
    """Orthonormal Walsh-Hadamard transform of the last axis (size n = 2^k) in O(n log n): k
    butterfly stages, each pairing the two halves of blocks of width 2h; no n x n matrix.
    Symmetric and its own inverse."""
    n = x.shape[-1]
    y, h = x, 1
    while h < n:
        y = y.reshape(x.shape[:-1] + (n // (2 * h), 2, h))
        a, b = y[..., 0, :], y[..., 1, :]
        y = jnp.stack([a + b, a - b], axis=-2).reshape(x.shape)
        h *= 2
    return y * np.float32(1 / np.sqrt(n))


def _reduce_axes(x, axis: tuple[int, ...] | None) -> tuple[int, ...]:
    """The axes a data-derived scale is computed over: all, or all but the channel axes."""
    if axis is None:
        return tuple(range(x.ndim))
    keep = {a % x.ndim for a in axis}
    return tuple(i for i in range(x.ndim) if i not in keep)


def quantize_levels(x, p, scale=None):
    """(q, step, error bound): symmetric b-bit quantization to integers in [-n, n] times the
    scale (n = 2^(b-1) - 1; 1 bit: +-scale), or with a zero point to [0, 2^b - 1]. A scale
    computed from x carries no gradient."""
    red = _reduce_axes(x, p.axis)

    def data_scale(s):
        return lax.stop_gradient(jnp.where(s > 0, s, 1.0))

    if p.bits == 1:
        s = scale if scale is not None else data_scale(jnp.mean(jnp.abs(x), red, keepdims=True))
        return s * jnp.where(x >= 0, 1.0, -1.0).astype(x.dtype), 2 * s
    if p.symmetric:
        n = 2 ** (p.bits - 1) - 1
        s = scale if scale is not None else data_scale(jnp.max(jnp.abs(x), red, keepdims=True) / n)
        return jnp.clip(jnp.round(x / s), -n, n) * s, s
    top = 2 ** p.bits - 1
    lo = jnp.min(x, red, keepdims=True)
    s = scale if scale is not None else data_scale((jnp.max(x, red, keepdims=True) - lo) / top)
    zero = lax.stop_gradient(jnp.round(-lo / s))
    return (jnp.clip(jnp.round(x / s) + zero, 0, top) - zero) * s, s


@cache
def gaussian_clip(bits: int) -> float:
    """The clipping level c (in standard deviations) of the uniform midrise quantizer with
    2^bits levels on [-c, c] that minimizes E[(y - Q(y))^2] for y ~ N(0, 1), found numerically
    (1 bit: levels +-c/2 = +-sqrt(2/pi))."""
    y = np.linspace(-8, 8, 16001)
    w = np.exp(-y * y / 2)
    w /= w.sum()
    levels = 2 ** bits

    def mse(c):
        step = 2 * c / levels
        q = np.clip((np.floor(y / step) + 0.5) * step, -c + step / 2, c - step / 2)
        return float(np.sum(w * (y - q) ** 2))

    lo, hi = 0.1, 8.0
    for _ in range(100):  # golden-section search (mse is unimodal in c)
        a, b = hi - 0.618 * (hi - lo), lo + 0.618 * (hi - lo)
        lo, hi = (lo, b) if mse(a) < mse(b) else (a, hi)
    return (lo + hi) / 2


def quest_rotated(y, bits: int):
    """(q, step) of QuEST's quantizer on Hadamard-rotated rows y: midrise levels on
    [-c sigma, c sigma], sigma the row's RMS, c the Gaussian MSE-optimal clip."""
    sigma = lax.stop_gradient(jnp.sqrt(jnp.mean(y * y, -1, keepdims=True)) + 1e-12)
    c = gaussian_clip(bits) * sigma
    step = 2 * c / 2 ** bits
    return jnp.clip((jnp.floor(y / step) + 0.5) * step, -c + step / 2, c - step / 2), step
