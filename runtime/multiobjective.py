"""Multi-objective gradients: a `minimize` export's objectives, their gradients and the rule
that combines them (`estimators.combine`) into d = sum_i c_i g_i. A rule that knows c before
differentiating (`linear`) takes one backward pass of sum_i c_i f_i and never holds the k
gradients; the others take one backward pass per objective and c from the Gram matrix. The
export threads one state from call to call (`carried`): the rule's history, the objectives'
own states (moving-average baselines, learned control variates), or both in one tuple.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from gradlang.estimators.combine import combination_rule
from gradlang.ir import HISTORY, STATE, Combination
from gradlang.ops import Annotation
from gradlang.types import DType, TensorType, TupleType, Type

from .zeroth_order import black_box


def gram_matrix(grads) -> jax.Array:
    """G_ij = <g_i, g_j> over every leaf of a tree of stacked gradients [k, ...]."""
    leaves = [g.reshape(g.shape[0], -1) for g in jax.tree.leaves(grads)]
    return sum(g @ g.T for g in leaves)


def takes_key(rule: Combination, draws: Sequence[bool]) -> bool:
    """Whether a `minimize` export takes a key: an objective draws, or the rule does."""
    return any(draws) or combination_rule(rule).stochastic


def carried(rule: Combination, states: Sequence[Type | None]) -> tuple[str, Type] | None:
    """The state parameter of a `minimize` export whose objectives carry `states` (None where
    one carries none), None when it has none: `history` (f32[2, k], a `stateful` rule's) when
    no objective carries state, else `state`, a tuple of the objectives' states in order, then
    the history."""
    own = [t for t in states if t is not None]
    history = [TensorType(DType.F32, (2, len(states)))] if combination_rule(rule).stateful else []
    if not own:
        return (HISTORY, history[0]) if history else None
    return STATE, TupleType(tuple(own + history))


@dataclass(frozen=True)
class Objective:
    """One objective of a `minimize` export as the runtime calls it."""

    fn: Callable
    """Its lowered function: its parameters, then its state when it carries one, then its key
    when it draws; one with a state returns (value, the state after this call)."""
    params: tuple[str, ...]
    draws: bool
    by: Annotation | None = None
    """A black-box estimator of its gradient (None: reverse mode)."""
    state: Type | None = None
    """The type of the state it carries from call to call (None: none)."""


def minimize(objectives: Sequence[Objective], names: Sequence[str], wrt: Sequence[str],
             rule: Combination) -> Callable:
    """The JAX function of a `minimize` export. Arguments: the objectives' parameters
    (`names`, their union), then its state (`carried`), then the key (`takes_key`); objective
    i draws (or, with a black-box estimator, perturbs) with `fold_in(key, i)`, a stochastic
    rule with `fold_in(key, k)`. An objective's gradient with respect to a `wrt` parameter it
    does not take is zero. Returns (values f32[k], direction {wrt name: d}, weights f32[k])
    and, with a state, the state after this call, last."""
    k = len(objectives)
    draws = [o.draws or o.by is not None for o in objectives]
    keyed = takes_key(rule, draws)
    how = combination_rule(rule)
    estimated = any(o.by is not None for o in objectives)
    owners = [i for i, o in enumerate(objectives) if o.state is not None]
    stateful = carried(rule, [o.state for o in objectives]) is not None

    def step(*args):
        named, key = dict(zip(names, args)), args[-1] if keyed else None
        state = args[len(names)] if stateful else None
        own = dict(zip(owners, state)) if owners else {}
        history = (state[len(owners)] if owners else state) if how.stateful else None
        theta = [named[w] for w in wrt]

        def objective(i: int) -> Callable:
            """Objective i as a function of every wrt parameter (those it does not take are
            unused), returning its value and its state after this call (None: it has none)."""
            o = objectives[i]

            def f(*theta):
                full = {**named, **dict(zip(wrt, theta))}
                out = o.fn(*(full[n] for n in o.params), *((own[i],) if i in own else ()),
                           *((jax.random.fold_in(key, i),) if o.draws else ()))
                return out if i in own else (out, None)
            return f

        def value_and_grad(i: int):
            o = objectives[i]
            if o.by is None:
                (value, after), grads = jax.value_and_grad(
                    objective(i), argnums=tuple(range(len(theta))), has_aux=True)(*theta)
                return value, grads, after
            # as the export `grad(f, wrt=[...], by=...)` of this objective alone would, at its key
            mine = tuple(w for w in wrt if w in o.params)
            value, grads = black_box(o.fn, list(o.params), mine, o.by, o.draws, True)(
                *(named[n] for n in o.params), jax.random.fold_in(key, i))
            return value, tuple(grads.get(w, jnp.zeros_like(t)) for w, t in zip(wrt, theta)), None

        def stacked(*theta):
            outs = [objective(i)(*theta) for i in range(k)]
            return jnp.stack([v for v, _ in outs]), [after for _, after in outs]

        if how.linear and not estimated:
            values, pullback, after = jax.vjp(stacked, *theta, has_aux=True)
            c = jnp.asarray(how.weighting(rule.weights, history), values.dtype)
            direction = pullback(c)
        else:
            triples = [value_and_grad(i) for i in range(k)]
            values = jnp.stack([v for v, _, _ in triples])
            after = [a for _, _, a in triples]
            grads = jax.tree.map(lambda *g: jnp.stack(g), *[g for _, g, _ in triples])
            if how.linear:
                c = jnp.asarray(how.weighting(rule.weights, history), values.dtype)
            else:
                c = how.combine(gram_matrix(grads), jax.random.fold_in(key, k) if how.stochastic
                                else None)
            direction = jax.tree.map(lambda g: jnp.tensordot(c.astype(g.dtype), g, axes=1), grads)
        out = (values, dict(zip(wrt, direction)), c)
        if not stateful:
            return out
        history = (jnp.stack([values, history[0]]),) if how.stateful else ()
        if not owners:
            return out + history
        return out + (tuple(after[i] for i in owners) + history,)

    return step
