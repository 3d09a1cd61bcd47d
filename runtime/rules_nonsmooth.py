"""Lowering rules of the non-smooth ops and of `straight_through` (their backward rules).

A non-smooth op without a rule lowers to its plain JAX function (JAX's derivative: zero almost
everywhere). `straight_through` computes exactly the same forward value and replaces the
derivative by its rule, through `jax.custom_jvp`.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cache
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gradlang.ir import Op
from gradlang.ops import OPS
from gradlang.shapes import is_power_of_two

from .dtypes import JNP_DTYPES
from .signature import ArgumentError


def as_result_dtype(op: Op, x):
    """x as an array of the dtype of op's result: a weak literal (lowered as a Python scalar)
    or an integer operand of a float-valued op."""
    return jnp.asarray(x, JNP_DTYPES[op.result.type.dtype])


def _on_array(rule):
    """`rule` with its first operand x given by `as_result_dtype` (these rules read x.shape,
    x.dtype, call x.astype: a scalar literal is a Python number)."""
    return lambda ctx, op, x, *rest: rule(ctx, op, as_result_dtype(op, x), *rest)


def _argmax(ctx, op: Op, x):
    axis = op.params.axis
    index = jnp.argmax(x, axis=axis)
    return jax.nn.one_hot(index, x.shape[axis], axis=axis, dtype=jnp.float32)


def _topk(ctx, op: Op, x):
    axis = op.params.axis
    moved = jnp.moveaxis(x, axis, -1)
    k, n = ctx.dim(op.params.k), moved.shape[-1]
    if isinstance(k, int) and isinstance(n, int) and not 1 <= k <= n:  # a dim the call bound
        span = op.span
        raise ArgumentError(f"topk at {Path(span.source.path).name}:{span.line}:{span.col} needs "
                            f"1 <= k <= the size of axis {axis}, but the arguments make k = {k} "
                            f"and that size {n}")
    _, index = lax.top_k(moved, k)
    mask = jnp.sum(jax.nn.one_hot(index, moved.shape[-1], dtype=jnp.float32), axis=-2)
    return jnp.moveaxis(mask, -1, axis)


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


def _quantize(ctx, op: Op, x, scale=None):
    return quantize_levels(x, op.params, scale)[0]


def _quest(ctx, op: Op, x):
    return hadamard(quest_rotated(hadamard(x), op.params.bits)[0])


def _stochastic_round(ctx, op: Op, x):
    u = jax.random.uniform(ctx.next_key(), x.shape, x.dtype)
    return x + lax.stop_gradient(jnp.floor(x + u) - x)


PRIMALS = {
    "sign": lambda ctx, op, x: jnp.sign(x),
    "round": lambda ctx, op, x: jnp.round(x),
    "floor": lambda ctx, op, x: jnp.floor(x),
    "ceil": lambda ctx, op, x: jnp.ceil(x),
    "step": lambda ctx, op, x: (x > 0).astype(jnp.result_type(x, jnp.float32)),
    "binarize": lambda ctx, op, x: jnp.where(x >= 0, 1, -1).astype(jnp.result_type(x, jnp.float32)),
    "argmax": _argmax,
    "topk": _topk,
    "quantize": _quantize,
    "quest": _quest,
}


def _tangent(rule, op: str, params, x, t, scale=None):
    """The derivative of the op in x under `rule` (options all given), applied to t. Every
    rule's Jacobian is symmetric (elementwise; H M H for QuEST's trust mask, H the Hadamard
    transform; softmax's for st_gumbel), so this is also the map of cotangents: the rule's
    backward pass."""
    o = dict(rule.options)
    if rule.name == "trust":
        if op == "quest":
            y = hadamard(x)
            q, step = quest_rotated(y, params.bits)
            return hadamard(hadamard(t) * (jnp.abs(y - q) <= o["bound"] * step / 2))
        q, step = quantize_levels(x, params, scale)
        return t * (jnp.abs(x - q) <= o["bound"] * step / 2)
    a = jnp.abs(x)
    if rule.name == "ste":
        return t if o["clip"] == 0 else t * (a <= o["clip"])
    if rule.name == "reste":
        p = o["power"]
        slope = jnp.minimum(jnp.power(jnp.maximum(a, 1e-12), 1 / p - 1) / p, o["max_grad"])
        return t * slope * (a <= o["clip"])
    if rule.name == "approx_sign":
        return t * (2 - 2 * a) * (a <= 1)
    if rule.name == "swish_sign":
        b = o["beta"]
        return t * b * (2 - b * x * jnp.tanh(b * x / 2)) / (1 + jnp.cosh(b * x))
    assert rule.name == "st_gumbel"
    return jax.jvp(lambda v: jax.nn.softmax(v / o["tau"], axis=params.axis), (x,), (t,))[1]


def _straight_through(ctx, op: Op, x, *rest):
    """x's derivative is the rule's; other operands (a quantizer's given scale) get the
    derivative of the op with its rounding held fixed (autodiff of the forward). A
    `jax.custom_jvp`: reverse mode transposes it, and forward mode (Hessian-vector products of
    an inner problem, `jax.jvp` of an export) goes through it too."""
    p = op.params
    primal = replace(op, name=p.op, params=p.params)

    @jax.custom_jvp
    def f(x, *rest):
        return PRIMALS[p.op](ctx, primal, x, *rest)

    @f.defjvp
    def f_jvp(primals, tangents):
        (x, *rest), (tx, *trest) = primals, tangents
        t = _tangent(p.rule, p.op, p.params, x, tx, *rest).astype(x.dtype)
        if rest:
            held = lax.stop_gradient(x)
            t = t + jax.jvp(lambda *r: PRIMALS[p.op](ctx, primal, held, *r), tuple(rest),
                            tuple(trest))[1]
        return f(x, *rest), t

    return f(x, *rest)


def _power_of_two_axis(rule):
    """`rule`, after checking the operand of a `power_of_two_axis` op (or of its straight-through
    form): its last axis is a symbolic dim the type checker could not check, which the call
    fixes to a size that must be a power of two."""

    def checked(ctx, op: Op, x, *rest):
        name = op.params.op if op.name == "straight_through" else op.name
        n = x.shape[-1] if "power_of_two_axis" in OPS[name].traits else 1
        if isinstance(n, int) and not is_power_of_two(n):
            span = op.span
            raise ArgumentError(f"{name} at {Path(span.source.path).name}:{span.line}:{span.col} "
                                f"transforms the last axis, whose size must be a power of two, "
                                f"but the arguments make {op.operands[0].type.shape[-1]} = {n}")
        return rule(ctx, op, x, *rest)

    return checked


NONSMOOTH_LOWERINGS = {name: _on_array(_power_of_two_axis(rule)) for name, rule in {
    **PRIMALS, "sort": lambda ctx, op, x: jnp.sort(x, axis=op.params.axis),
    "hadamard": lambda ctx, op, x: hadamard(x),
    "stochastic_round": _stochastic_round,
    "straight_through": _straight_through}.items()}
