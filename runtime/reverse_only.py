"""Derivatives known only in reverse mode, whose forward mode is a gradlang error.

A `jax.custom_vjp` function has no forward-mode derivative, and `jax.jvp` through one fails with
JAX's "can't apply forward-mode autodiff (jvp) to a custom_vjp function", naming nothing.
`reverse_only(fwd, bwd, error)` is such a function whose forward mode raises `error` instead
(a `ForwardModeError` that names the construct and what to write instead), with reverse mode
exactly a custom_vjp's: `fwd` runs where the custom_vjp's would (at the primal, differentiated
by any outer transformation), and `bwd` is the transpose of its linearization.

How: a `jax.custom_jvp` whose tangent is one `reverse_only` primitive applied to the tangents,
with the residuals of `fwd` as operands. The primitive is declared by its transpose (`bwd`)
and its batching (`bwd` under vmap); evaluating or lowering it (what `jax.jvp` does, and
`jax.jit` of it) raises. Reverse mode (`jax.grad`, `jax.vjp`, `jax.linearize` followed by
`jax.linear_transpose`) never evaluates it: it transposes it. This is JAX's own `custom_lin`
(`jax/_src/interpreters/ad.py`) with the error its impl raises given per use.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir


class ForwardModeError(TypeError):
    """jax.jvp (or jax.jacfwd, jax.linearize's evaluation) through a derivative that gradlang
    has only in reverse mode; the message names where and what to write instead."""


reverse_only_p = Primitive("reverse_only")
"""The tangents of a `reverse_only` function: operands are `fwd`'s residuals (n_res) then the
tangents of the first argument's leaves; results the tangents of the float result leaves.
Params: `backward(residuals, cotangents) -> the first argument's cotangent leaves`, the
results' avals, the error to raise on evaluation."""
reverse_only_p.multiple_results = True


def _refuse(*args, error: ForwardModeError, **params):
    raise error


def _abstract_eval(*args, n_res: int, backward: Callable, out_avals: tuple, error):
    return out_avals


def _transpose(cts, *args, n_res: int, backward: Callable, out_avals: tuple, error):
    """The first argument's cotangent is `backward` of the residuals and the results'
    cotangents (zeros where none flows)."""
    cts = [ad.instantiate_zeros(ct) if type(ct) is ad.Zero else ct for ct in cts]
    bars = backward(list(args[:n_res]), cts)
    return [None] * n_res + [b if ad.is_undefined_primal(t) else None
                             for b, t in zip(bars, args[n_res:])]


def _batch(args, dims, *, n_res: int, backward: Callable, out_avals: tuple, error):
    """Every operand moved (or broadcast) to a leading batch axis, `backward` vmapped."""
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    args = [jnp.broadcast_to(a, (size,) + a.shape) if d is None
            else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims)]
    out = reverse_only_p.bind(
        *args, n_res=n_res, backward=jax.vmap(backward),
        out_avals=tuple(a.update(shape=(size,) + a.shape) for a in out_avals), error=error)
    return out, [0] * len(out)


reverse_only_p.def_impl(_refuse)
reverse_only_p.def_abstract_eval(_abstract_eval)
ad.primitive_transposes[reverse_only_p] = _transpose
batching.primitive_batchers[reverse_only_p] = _batch
mlir.register_lowering(reverse_only_p, _refuse)


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def reverse_only(fwd: Callable, bwd: Callable, error: ForwardModeError) -> Callable:
    """f(first, *rest) = fwd(first, *rest)[0], differentiable in `first` (a pytree of float
    arrays) in reverse mode only: `fwd(first, *rest) -> (out, residuals)` and
    `bwd(residuals, out_cotangent) -> first's cotangent`, as for `jax.custom_vjp`; `rest` has
    no derivative. Forward mode through f raises `error`. The results' integer leaves have no
    derivative (their cotangents reach `bwd` as float0 zeros)."""
    @jax.custom_jvp
    def f(first, *rest):
        return fwd(first, *rest)[0]

    @f.defjvp
    def jvp(primals, tangents):
        out, residuals = fwd(*primals)
        res, res_tree = jax.tree.flatten(residuals)
        outs, out_tree = jax.tree.flatten(out)
        floats = [_is_float(o) for o in outs]
        shapes = [jnp.shape(o) for o in outs]
        t_first, first_tree = jax.tree.flatten(tangents[0])

        def backward(res, cts):
            cts = iter(cts)
            ct = [next(cts) if fl else np.zeros(shape, jax.dtypes.float0)
                  for shape, fl in zip(shapes, floats)]
            bar = bwd(jax.tree.unflatten(res_tree, res), jax.tree.unflatten(out_tree, ct))
            return first_tree.flatten_up_to(bar)

        avals = tuple(jax.core.ShapedArray(jnp.shape(o), jnp.result_type(o))
                      for o, fl in zip(outs, floats) if fl)
        t_floats = iter(reverse_only_p.bind(*res, *t_first, n_res=len(res), backward=backward,
                                            out_avals=avals, error=error))
        t_out = [next(t_floats) if fl else np.zeros(jnp.shape(o), jax.dtypes.float0)
                 for o, fl in zip(outs, floats)]
        return out, jax.tree.unflatten(out_tree, t_out)

    return f
