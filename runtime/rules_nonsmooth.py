"""Lowering rules of the non-smooth ops and of `straight_through` (their backward rules).

A non-smooth op without a rule lowers to its plain JAX function (JAX's derivative: zero almost
everywhere). `straight_through` computes exactly the same forward value and replaces the
backward by its rule, through `jax.custom_vjp`.
"""

from __future__ import annotations

from dataclasses import replace

import jax
import jax.numpy as jnp
from jax import lax

from gradlang.ir import Op


def _argmax(ctx, op: Op, x):
    axis = op.params.axis
    index = jnp.argmax(x, axis=axis)
    return jax.nn.one_hot(index, x.shape[axis], axis=axis, dtype=jnp.float32)


def _topk(ctx, op: Op, x):
    axis = op.params.axis
    moved = jnp.moveaxis(x, axis, -1)
    _, index = lax.top_k(moved, ctx.dim(op.params.k))
    mask = jnp.sum(jax.nn.one_hot(index, moved.shape[-1], dtype=jnp.float32), axis=-2)
    return jnp.moveaxis(mask, -1, axis)


PRIMALS = {
    "sign": lambda ctx, op, x: jnp.sign(x),
    "round": lambda ctx, op, x: jnp.round(x),
    "floor": lambda ctx, op, x: jnp.floor(x),
    "ceil": lambda ctx, op, x: jnp.ceil(x),
    "step": lambda ctx, op, x: (x > 0).astype(jnp.result_type(x, jnp.float32)),
    "binarize": lambda ctx, op, x: jnp.where(x >= 0, 1, -1).astype(jnp.result_type(x, jnp.float32)),
    "argmax": _argmax,
    "topk": _topk,
}


def _backward(rule, params, x, g):
    """The cotangent of x under `rule` (options all given) for upstream cotangent g."""
    o = dict(rule.options)
    a = jnp.abs(x)
    if rule.name == "ste":
        return g if o["clip"] == 0 else g * (a <= o["clip"])
    if rule.name == "reste":
        p = o["power"]
        slope = jnp.minimum(jnp.power(jnp.maximum(a, 1e-12), 1 / p - 1) / p, o["max_grad"])
        return g * slope * (a <= o["clip"])
    if rule.name == "approx_sign":
        return g * (2 - 2 * a) * (a <= 1)
    if rule.name == "swish_sign":
        b = o["beta"]
        return g * b * (2 - b * x * jnp.tanh(b * x / 2)) / (1 + jnp.cosh(b * x))
    assert rule.name == "st_gumbel"
    _, vjp = jax.vjp(lambda v: jax.nn.softmax(v / o["tau"], axis=params.axis), x)
    return vjp(g)[0]


def _straight_through(ctx, op: Op, x):
    p = op.params
    primal = replace(op, name=p.op, params=p.params)

    @jax.custom_vjp
    def f(x):
        return PRIMALS[p.op](ctx, primal, x)

    def fwd(x):
        return f(x), x

    def bwd(x, g):
        return (_backward(p.rule, p.params, x, g).astype(x.dtype),)

    f.defvjp(fwd, bwd)
    return f(x)


NONSMOOTH_LOWERINGS = {**PRIMALS, "sort": lambda ctx, op, x: jnp.sort(x, axis=op.params.axis),
                       "straight_through": _straight_through}
