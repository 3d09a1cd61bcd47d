"""Lowering rules of the non-smooth ops and of `straight_through` (their backward rules).

A non-smooth op without a rule lowers to its plain JAX function (JAX's derivative: zero almost
everywhere). `straight_through` computes exactly the same forward value and replaces the
derivative by its rule's (`gradlang.estimators.backward`), through `jax.custom_jvp`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax

from gradlang.estimators.backward import rule_of
from gradlang.ir import Op
from gradlang.ops import OPS
from gradlang.shapes import is_power_of_two

from .dtypes import JNP_DTYPES
from .perturbed import Factored
from .quantizers import hadamard, quantize_levels, quest_rotated
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


def _straight_through(ctx, op: Op, x, *rest):
    """x's derivative is the rule's; other operands (a quantizer's given scale) get the
    derivative of the op with its rounding held fixed (autodiff of the forward). A
    `jax.custom_jvp`: reverse mode transposes it, and forward mode (Hessian-vector products of
    an inner problem, `jax.jvp` of an export) goes through it too."""
    p = op.params
    primal = replace(op, name=p.op, params=p.params)
    rule = rule_of(p.rule)

    @jax.custom_jvp
    def f(x, *rest):
        return PRIMALS[p.op](ctx, primal, x, *rest)

    @f.defjvp
    def f_jvp(primals, tangents):
        (x, *rest), (tx, *trest) = primals, tangents
        t = rule.tangent(p.op, p.params, x, tx, *rest).astype(x.dtype)
        if rest:
            held = lax.stop_gradient(x)
            t = t + jax.jvp(lambda *r: PRIMALS[p.op](ctx, primal, held, *r), tuple(rest),
                            tuple(trest))[1]
        return f(x, *rest), t

    return f(x, *rest)


def _through_factored(rule):
    """`rule` on a factored matrix (`runtime.perturbed`: a perturbed or ghost-tapped weight)
    through `Factored.through`, which materializes it unless it is a tapped weight."""
    def lowered(ctx, op: Op, x, *rest):
        if isinstance(x, Factored):
            return x.through(lambda w: rule(ctx, op, w, *rest))
        return rule(ctx, op, x, *rest)

    return lowered


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


def _lowered(rule):
    return _on_array(_power_of_two_axis(rule))


NONSMOOTH_LOWERINGS = {
    **{name: _lowered(rule) for name, rule in {
        **PRIMALS, "sort": lambda ctx, op, x: jnp.sort(x, axis=op.params.axis),
        "hadamard": lambda ctx, op, x: hadamard(x),
        "stochastic_round": _stochastic_round}.items()},
    "straight_through": _through_factored(_lowered(_straight_through))}
