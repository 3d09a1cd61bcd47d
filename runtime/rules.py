"""Lowering rules: one per IR op, IR op -> jax / lax call, kept in the `LOWERINGS` table.

A rule takes the lowering context, the op and its operands' JAX values, and returns the
result value (or a tuple of values for multi-result ops). Ops with regions (`if`, `for`)
lower their regions through `ctx.region`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from gradlang import ops as O
from gradlang.ir import Op, free_values
from gradlang.types import TensorType

from .numerics import softplus
from .jax_functions import call_jax
from .rules_argmin import ARGMIN_LOWERINGS
from .rules_nonsmooth import NONSMOOTH_LOWERINGS, as_result_dtype
from .dtypes import JNP_DTYPES
from .rules_nn import NN_LOWERINGS
from .rules_random import RANDOM_LOWERINGS
from .ot import sliced_wasserstein
from .compose import compose_rule
from .sampled import wta_crs_matmul
from .perturbed import Factored, dense, take


Rule = Callable[..., Any]


def _elementwise(fn: Callable) -> Rule:
    return lambda ctx, op, *xs: fn(*xs)


def _float_elementwise(fn: Callable) -> Rule:
    """An elementwise op with a floating-point result: integer operands are promoted first
    (some jax functions, e.g. jax.nn.sigmoid, reject integer inputs)."""
    return lambda ctx, op, x: fn(as_result_dtype(op, x))


def _reduce(fn: Callable) -> Rule:
    def rule(ctx, op: Op, x):
        p: O.ReduceParams = op.params
        return fn(as_result_dtype(op, x), axis=p.axis, keepdims=p.keepdims)

    return rule


def _shape(ctx, op: Op) -> tuple:
    return tuple(ctx.dim(d) for d in op.params.shape)


def _filled(fill: Callable) -> Rule:
    return lambda ctx, op: fill(_shape(ctx, op), jnp.float32)


def _full(ctx, op, value):
    return jnp.full(_shape(ctx, op), value, JNP_DTYPES[op.result.type.dtype])


def _arange(ctx, op):
    p: O.ArangeParams = op.params
    if p.stop is None:
        return jnp.arange(ctx.dim(p.start), dtype=jnp.int32)
    return jnp.arange(ctx.dim(p.start), ctx.dim(p.stop), dtype=jnp.int32)


def _cross_entropy(ctx, op, logits, labels):
    logp = jax.nn.log_softmax(logits, axis=-1)
    if jnp.issubdtype(labels.dtype, jnp.integer):
        picked = jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
        return -jnp.mean(picked)
    return -jnp.mean(jnp.sum(labels * logp, axis=-1))


def _index(ctx, op: Op, x, *dynamic):
    dyn = iter(dynamic)
    key = []
    for item in op.params.items:
        if item.kind == "int":
            key.append(item.index)
        elif item.kind == "dynamic":
            key.append(next(dyn))
        else:
            key.append(slice(item.start, item.stop, item.step))
    ids = next((k for k in key if getattr(k, "ndim", 0)), None)
    if isinstance(x, Factored) and ids is not None and len(key) == 1:
        return x.take(ids)  # a ghost-clipped table records its lookups
    x = dense(x)
    if ids is not None:  # a lookup, table[ids]: the other subscripts are slices
        axis = next(a for a, k in enumerate(key) if k is ids)
        return take(x[tuple(slice(None) if k is ids else k for k in key)], ids, axis)
    return x[tuple(key)]


def _if(ctx, op: Op, cond):
    """Both branches' results, selected by `cond`: elementwise for a tensor condition, else
    `lax.cond` (results after the first are the score terms of draws in the branches)."""
    then, orelse = op.regions
    types = [r.type for r in op.results]
    if getattr(cond, "ndim", 0) > 0:
        out = tuple(jnp.where(cond, a, b) for a, b in zip(ctx.region(then, ()), ctx.region(orelse, ())))
        return out if len(out) > 1 else out[0]

    shapes = [ctx.shape(t) if isinstance(t, TensorType) else None for t in types]
    if any(isinstance(t, TensorType) and s is None for t, s in zip(types, shapes)):
        # A type has derived dims (e.g. `B-1` from a slice): trace the branches for the
        # shapes that the results broadcast them to.
        traced = [jax.eval_shape(lambda r=r: ctx.region(r, ())) for r in (then, orelse)]
        shapes = [jnp.broadcast_shapes(a.shape, b.shape) if isinstance(t, TensorType) else None
                  for t, a, b in zip(types, *traced)]

    def branch(region):
        def run():
            out = []
            for x, t, shape in zip(ctx.region(region, ()), types, shapes):
                x = ctx.coerce(x, t)
                out.append(jnp.broadcast_to(x, shape) if isinstance(t, TensorType) else x)
            return tuple(out)

        return run

    out = lax.cond(cond, branch(then), branch(orelse))
    return out if len(out) > 1 else out[0]


def _inline(ctx, op: Op, *args):
    (body,) = op.regions
    key = ctx.next_key() if ctx.lowering.draws(body) else None
    out = ctx.lowering.inline(op.params.callee, body, args, key)
    return out if len(out) > 1 else out[0]


def _grad(ctx, op: Op, *args):
    """`jax.value_and_grad` of the region's objective with respect to its arguments at
    `argnums`, at the operands; the other arguments and the values the region captures are
    constants of it, and its draws take one key of the enclosing scope. The region's other
    results (its draws' score terms) follow, as they are.

    A drawing region ends in its expectation's `surrogate`, whose magic boxes and baselines
    hold the region's values fixed. Held with `stop_gradient`, an enclosing derivative of the
    gradient would also differentiate the magic boxes (DiCE's linearized credit of the draws,
    which the enclosing expectation already credits in full); so they are held at their
    values at the arguments, computed first with the same key: the gradient is then the
    per-sample estimate as an ordinary function of the arguments."""
    p: O.GradParams = op.params
    (body,) = op.regions
    args = tuple(ctx.coerce(x, a.type) for x, a in zip(args, body.args))
    key = ctx.next_key() if ctx.lowering.key_uses(body) else None
    surrogates = [o for o in body.ops if o.name == "surrogate"]
    held = dict(ctx.lowering.held)
    if surrogates:  # its expectation's surrogate, computed at the arguments (the same draws)
        with ctx.scope(key, body):
            ctx.region(body, args)
        held |= {id(o): tuple(ctx.env[v] for v in o.operands) for o in surrogates}

    def objective(*wrt):
        full = list(args)
        for i, x in zip(p.argnums, wrt):
            full[i] = x
        with ctx.scope(key, body):
            value, *terms = ctx.region(body, tuple(full))
        return value, terms

    saved, ctx.lowering.held = ctx.lowering.held, held
    try:
        (value, terms), grads = jax.value_and_grad(
            objective, argnums=tuple(range(len(p.argnums))), has_aux=True)(
                *(args[i] for i in p.argnums))
    finally:
        ctx.lowering.held = saved
    grad = grads[0] if len(grads) == 1 else grads
    first = (value, grad) if p.value else grad
    return (first, *terms) if terms else first


def _for(ctx, op: Op, *inits):
    """The loop; with `truncate=K`, the iterations before the last K run on values that carry
    no gradient (truncated backpropagation: nothing of them is stored for the backward pass)."""
    p: O.ForParams = op.params
    (body,) = op.regions
    # a loop's carry is plain arrays: a perturbed matrix (`runtime.perturbed`) entering or
    # leaving it is materialized, as the loop's pytree structure cannot change
    init = tuple(dense(ctx.coerce(x, r.type)) for x, r in zip(inits, op.results))

    loop_key = ctx.next_key() if ctx.key is not None and ctx.lowering.key_uses(body) else None

    def step(i, carry):
        with ctx.scope(None if loop_key is None else jax.random.fold_in(loop_key, i), body):
            out = ctx.region(body, (i, *carry))
        return tuple(dense(ctx.coerce(x, r.type)) for x, r in zip(out, op.results))

    start, stop = ctx.dim(p.start), ctx.dim(p.stop)
    if not any(jax.export.is_symbolic_dim(b) for b in (start, stop)):
        if p.truncate:
            cut = max(start, stop - p.truncate)
            init = lax.stop_gradient(lax.fori_loop(start, cut, step, lax.stop_gradient(init)))
            start = cut
        out = lax.fori_loop(start, stop, step, init)
    else:
        # a symbolic trip count: fori_loop would be a while loop, which reverse mode cannot
        # differentiate. A scan over indices of a length JAX can prove non-negative (stop, or
        # the last K), skipping those before `start`
        if p.truncate:
            cut = stop - p.truncate
            init = lax.stop_gradient(lax.fori_loop(start, cut, step, lax.stop_gradient(init)))
            indices = cut + lax.iota(jnp.int32, p.truncate)
        else:
            indices = lax.iota(jnp.int32, stop)
        every = not p.truncate and isinstance(start, int) and start == 0

        def from_start(c, i):
            return (step(i, c) if every else lax.cond(i >= start, step, lambda i, c: c, i, c)), None

        out = lax.scan(from_start, init, indices)[0]
    return out if len(out) > 1 else out[0]


def _checkpoint(ctx, op: Op):
    """The region under `jax.checkpoint`: its values are recomputed in the backward pass. The
    values it captures and its key are explicit arguments of the checkpointed function."""
    (body,) = op.regions
    captured = free_values(body)
    key = ctx.next_key() if ctx.lowering.draws(body) else None

    def run(key, *xs):
        saved = {v: ctx.env[v] for v in captured}
        ctx.env.update(zip(captured, xs))
        try:
            with ctx.scope(key, body):
                return ctx.region(body, ())
        finally:
            ctx.env.update(saved)

    out = jax.checkpoint(run)(key, *(ctx.env[v] for v in captured))
    return out if len(out) > 1 else out[0]


def _sum_squares(ctx, op: Op, t):
    """The sum of squares of the entries of every leaf (all float: the type checker's), each
    leaf accumulated in the result's dtype."""
    dtype = JNP_DTYPES[op.result.type.dtype]
    return sum((jnp.sum(jnp.square(jnp.asarray(x, dtype))) for x in jax.tree.leaves(t)),
               jnp.zeros((), dtype))


def _map_leaves(ctx, op: Op, t):
    """The callee on each float leaf of its parameter's rank, its result cast back to the
    leaf's dtype; other leaves as they are."""
    rank = ctx.lowering.module.function(op.params.callee).params[0].value.type.rank

    def leaf(x):
        if jnp.ndim(x) != rank or not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            return x
        return jnp.asarray(ctx.call(op.params.callee, (x,)), jnp.result_type(x))

    return jax.tree.map(leaf, t)


def _matmul(ctx, op, a, b):
    """a @ b; a perturbed matrix (`runtime.perturbed`) stays factored."""
    if isinstance(b, Factored):
        return b.rmatmul(a.dense() if isinstance(a, Factored) else a)
    if isinstance(a, Factored):
        return a.matmul(b)
    return jnp.matmul(a, b)


def _host_call(ctx, op, *args):
    from .host import host_call  # host imports this module's dtype table

    return host_call(ctx, op, *args)


LOWERINGS: dict[str, Rule] = {
    **ARGMIN_LOWERINGS,
    "host_call": _host_call,
    "call_jax": call_jax,
    **RANDOM_LOWERINGS,
    **NN_LOWERINGS,
    **NONSMOOTH_LOWERINGS,
    "const": lambda ctx, op: op.params.value,
    "dim": lambda ctx, op: jnp.asarray(ctx.dim(op.params.name), jnp.int32),
    "tuple": lambda ctx, op, *xs: tuple(xs),
    "get": lambda ctx, op, t: t[op.params.index],
    "struct_new": lambda ctx, op, *xs: dict(zip(op.params.fields, xs)),
    "getfield": lambda ctx, op, s: s[op.params.name],
    "call_fn": lambda ctx, op, *xs: ctx.call(op.params.callee, xs),
    "map_leaves": _map_leaves,
    "sum_squares": _sum_squares,
    "global_norm": lambda ctx, op, t: jnp.sqrt(_sum_squares(ctx, op, t)),
    "inline": _inline,
    "grad": _grad,
    "exp": _float_elementwise(jnp.exp),
    "log": _float_elementwise(jnp.log),
    "log1p": _float_elementwise(jnp.log1p),
    "expm1": _float_elementwise(jnp.expm1),
    "sqrt": _float_elementwise(jnp.sqrt),
    "tanh": _float_elementwise(jnp.tanh),
    "sigmoid": _float_elementwise(jax.nn.sigmoid),
    "gelu": _float_elementwise(jax.nn.gelu),
    "silu": _float_elementwise(jax.nn.silu),
    "softplus": _float_elementwise(softplus),
    "relu": _float_elementwise(jax.nn.relu),
    "sin": _float_elementwise(jnp.sin),
    "cos": _float_elementwise(jnp.cos),
    "neg": _elementwise(jnp.negative),
    "abs": _elementwise(jnp.abs),
    "not": _elementwise(jnp.logical_not),
    "add": _elementwise(jnp.add),
    "sub": _elementwise(jnp.subtract),
    "mul": _elementwise(jnp.multiply),
    "div": _elementwise(jnp.true_divide),
    "pow": _elementwise(jnp.power),
    "maximum": _elementwise(jnp.maximum),
    "minimum": _elementwise(jnp.minimum),
    "eq": _elementwise(jnp.equal),
    "ne": _elementwise(jnp.not_equal),
    "lt": _elementwise(jnp.less),
    "le": _elementwise(jnp.less_equal),
    "gt": _elementwise(jnp.greater),
    "ge": _elementwise(jnp.greater_equal),
    "and": _elementwise(jnp.logical_and),
    "or": _elementwise(jnp.logical_or),
    "where": _elementwise(jnp.where),
    "clip": _elementwise(lambda x, lo, hi: jnp.minimum(jnp.maximum(x, lo), hi)),
    "stop_gradient": _elementwise(lax.stop_gradient),
    "cast": lambda ctx, op, x: jnp.asarray(x, JNP_DTYPES[op.params.dtype]),
    "sum": _reduce(jnp.sum),
    "mean": _reduce(jnp.mean),
    "max": _reduce(jnp.max),
    "min": _reduce(jnp.min),
    "logsumexp": _reduce(jax.nn.logsumexp),
    "var": _reduce(jnp.var),
    "matmul": _matmul,
    "sampled_matmul": lambda ctx, op, x, w: wta_crs_matmul(x, w, ctx.next_key(), op.params.keep),
    "sliced_wasserstein": lambda ctx, op, x, y: sliced_wasserstein(
        ctx.next_key(), x, y, ctx.dim(op.params.projections), ctx.dim(op.params.p),
        op.params.control.option("kind") if op.params.control else "none"),
    "dot": _elementwise(jnp.dot),
    "outer": _elementwise(jnp.outer),
    "solve": _elementwise(jnp.linalg.solve),
    "cholesky": _elementwise(jnp.linalg.cholesky),
    "reshape": lambda ctx, op, x: jnp.reshape(x, _shape(ctx, op)),
    "broadcast_to": lambda ctx, op, x: jnp.broadcast_to(x, _shape(ctx, op)),
    "transpose": lambda ctx, op, x: jnp.transpose(x, op.params.axes),
    "concat": lambda ctx, op, *xs: jnp.concatenate(xs, axis=op.params.axis),
    "stack": lambda ctx, op, *xs: jnp.stack(xs, axis=op.params.axis),
    "zeros": _filled(jnp.zeros),
    "ones": _filled(jnp.ones),
    "full": _full,
    "arange": _arange,
    "eye": lambda ctx, op: jnp.eye(ctx.dim(op.params.n), dtype=jnp.float32),
    "softmax": lambda ctx, op, x: jax.nn.softmax(as_result_dtype(op, x), axis=op.params.axis),
    "log_softmax": lambda ctx, op, x: jax.nn.log_softmax(as_result_dtype(op, x),
                                                         axis=op.params.axis),
    "one_hot": lambda ctx, op, y: jax.nn.one_hot(y, ctx.dim(op.params.num_classes),
                                                 dtype=jnp.float32),
    "cross_entropy": _cross_entropy,
    "mse": lambda ctx, op, a, b: jnp.mean(jnp.square(a - b)),
    "index": _index,
    "if": _if,
    "for": _for,
    "checkpoint": _checkpoint,
    "compose": compose_rule,
}
