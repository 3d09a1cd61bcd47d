"""Lowering rules of the random-choice ops (one per op, merged into `rules.LOWERINGS`).

A distribution lowers to a `Dist` (its family and canonical parameters), a value that exists
only while lowering: distributions never cross a function, loop or branch boundary. Each
random op takes its key from `ctx.next_key()`. How a `sample` op draws is fixed by the
estimator the estimators pass wrote into it; the surrogate arithmetic follows its params.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from gradlang.estimators import REGISTRY
from gradlang.estimators.base import per_entry
from gradlang.ir import Op
from gradlang.ops import SurrogateOperands

from .branched import weak_derivative
from .distributions import FAMILIES, KL, Family, batch_shape
from .dtypes import JNP_DTYPES


@dataclass(frozen=True)
class Dist:
    family: Family
    params: tuple[Any, ...]

    @property
    def batch(self) -> tuple[int, ...]:
        return batch_shape(self.family, *self.params)


def _dist(ctx, op: Op, *args) -> Dist:
    family = FAMILIES[op.params.family]
    params = []
    for name, x in zip(op.params.given, args):
        x = jnp.asarray(x, jnp.result_type(x, jnp.float32))
        if name in family.aliases:
            x = family.aliases[name][1](x)
        params.append(x)
    return Dist(family, tuple(params))


def _sample(ctx, op: Op, d: Dist):
    """The draw, as the estimator the estimators pass chose draws it (`estimators`)."""
    return REGISTRY[op.params.estimator.name].sample(ctx.next_key(), d, op.params,
                                                     ctx.lowering.sampling)


def _samples(ctx, op: Op) -> Any:
    """Evaluate the region on `samples` independent keys, results stacked on axis 0; with
    enumerated draws, on every combination of their values too (stacked on axis 1, the same
    key for every combination)."""
    (region,) = op.regions
    keys = jax.random.split(ctx.next_key(), op.params.samples)
    sizes = op.params.enum

    def draw(key):
        with ctx.scope(key, region):
            return ctx.region(region, ())

    if sizes:
        combos = jnp.array(list(itertools.product(*(range(k) for k in sizes))), jnp.int32)

        def combination(key, index):
            with ctx.lowering.sampling_as(enum_index=index):
                if op.params.shifts:
                    return _with_draw_gradients(ctx, op, lambda: draw(key))
                return draw(key)

        out = jax.vmap(lambda k: jax.vmap(lambda c: combination(k, c))(combos))(keys)
    elif op.params.shifts:
        out = jax.vmap(lambda k: _with_draw_gradients(ctx, op, lambda: draw(k)))(keys)
    else:
        out = jax.vmap(draw)(keys)
    return out if len(out) > 1 else out[0]


def _with_draw_gradients(ctx, op: Op, draw) -> tuple:
    """One evaluation's results, then d value / d shift for each of its shifted draws: the
    region is differentiated with respect to a zero shift added to the draw (DReG) or to its
    parameters (a `shifted` branched estimator: RELAX) by `_sample`."""
    m = op.params.shifts
    lead = 1 + (1 if op.params.enum else 0)  # the samples axis, and the combinations axis
    types = [r.type for r in op.results[-m:]]
    zeros = [jnp.zeros(ctx.shape(t)[lead:], JNP_DTYPES[t.dtype]) for t in types]

    def run(*shifts):
        with ctx.lowering.sampling_as(shifts=shifts):
            return draw()

    out, pullback = jax.vjp(run, *zeros)
    grads = pullback((jnp.ones_like(out[0]),) + tuple(jnp.zeros_like(o) for o in out[1:]))
    return tuple(out) + tuple(grads)


def _magic(l, held):
    """DiCE's magic box: 1 in value, d magic(l) = magic(l) dl at every order (`held`: l with
    no derivative, or with none of the derivative being taken, `_surrogate`)."""
    return jnp.exp(l - held)


def _scored(v, costs: list, scores: list, baselines: list[str], credit: list, paired: list,
            causal: list, state, held: tuple):
    """sum_j magic(L_j) c_j + sum_i (1 - magic(l_i)) b_i per sample (axis 0), as `_surrogate`
    describes; without costs, v is the one cost. A score term and a cost paired entry by entry
    have one more (last) axis than v, the entries of a batched draw: those products are taken
    entry by entry, then summed. Paired step by step (`causal`), the last axis is a loop's
    iterations: cost t is credited with the score terms of steps up to t (their cumulative
    sum), so step t's score term gets the costs from t on (reward-to-go). `held`: (v, costs,
    scores) held fixed, for the magic boxes and the baselines."""
    n = v.shape[0]
    costs = costs or [v]
    hv, hcosts, hscores = held
    hcosts = hcosts or [hv]

    def dice(j, c, scores):
        return [l if j in pe else jnp.cumsum(l, -1) if j in ca else _total(l, v)
                for l, b, to, pe, ca in zip(scores, baselines, credit, paired, causal)
                if b != "grpo" and j in to]

    out = 0
    for j, c in enumerate(costs):
        ds, hs = dice(j, c, scores), dice(j, c, hscores)
        box = _magic(sum(per_entry(d, c) for d in ds), sum(per_entry(d, c) for d in hs))
        out = out + _total(per_entry(box, c) * c if ds else c, v)
    for l, hl, b, to, pe, ca in zip(scores, hscores, baselines, credit, paired, causal):
        r = _returns(hv, hcosts, hl, to, pe, ca)
        m = per_entry(_magic(l, hl), r)
        if b == "loo":
            out = out + _total((1 - m) * (jnp.sum(r, 0, keepdims=True) - r) / (n - 1), v)
        elif b == "grpo":
            out = out + _total((m - 1) * (r - jnp.mean(r, 0)) / (jnp.std(r, 0) + 1e-8), v)
        elif b == "ma":
            out = out + _total((1 - m) * lax.stop_gradient(state), v)
    return out


def _total(x, v):
    """A term of entries (one more axis than the value v) summed over them."""
    return jnp.sum(x, -1) if x.ndim > v.ndim else x


def _returns(v, costs: list, l, to, pe, ca):
    """R, what the score term l multiplies: the sum of its credited costs, entry by entry for
    those paired entry by entry, from each step on for those paired step by step (a cost to
    go), else whole; shaped to broadcast against l."""
    def to_go(c):
        return jnp.flip(jnp.cumsum(jnp.flip(c, -1), -1), -1)

    return sum(per_entry(costs[j] if j in pe else to_go(costs[j]) if j in ca else _total(costs[j], v), l)
               for j in to)


def _vimco_signal(v):
    """L - L_-k per sample k: L = log mean exp(v), L_-k the same with v_k replaced by the mean
    of the other samples' v (the geometric mean of their weights; Mnih & Rezende 2016)."""
    n = v.shape[0]
    others = (jnp.sum(v, 0, keepdims=True) - v) / (n - 1)
    eye = jnp.eye(n, dtype=bool).reshape((n, n) + (1,) * (v.ndim - 1))
    loo = jax.nn.logsumexp(jnp.where(eye, others[:, None], v[None]), axis=1)
    return jax.nn.logsumexp(v, 0) - loo


def _importance(o: SurrogateOperands, baselines):
    """log mean_k exp(v_k) over axis 0, with sum_k (magic(l_k) - 1) * signal_k for each score
    term (signal: VIMCO's L - L_-k, or L for none) and, for each DReG draw z with d v / d z
    = g, sum_k stop(w_k^2 - w_k) <stop(g_k), z_k - stop(z_k)> (w: the normalized weights), so
    that the pathwise derivative through z is weighted by w^2 instead of w (Tucker et al. 2018)."""
    v = o.value
    n = v.shape[0]
    value = jax.nn.logsumexp(v, 0) - jnp.log(n).astype(v.dtype)
    sv = lax.stop_gradient(v)
    out = value
    for l, b in zip(o.scores, baselines):
        signal = _vimco_signal(sv) if b == "vimco" else jnp.broadcast_to(lax.stop_gradient(value), sv.shape)
        m = (_magic(l, lax.stop_gradient(l)) - 1).reshape(l.shape + (1,) * (v.ndim - 1))
        out = out + jnp.sum(m * signal, 0)
    if o.dregs:
        w = jax.nn.softmax(sv, 0)
        c = lax.stop_gradient(w * w - w)
        for z, g in zip(o.dregs, o.dreg_grads):
            path = jnp.sum((lax.stop_gradient(g) * (z - lax.stop_gradient(z))).reshape(n, -1), -1)
            out = out + jnp.sum(c * path)
    return out


def _surrogate(ctx, op: Op, *operands):
    """mean_s[ sum_j magic(L_js) c_js + sum_i (1 - magic(l_is)) b_is ] over the samples axis.

    The costs c_j sum to the value v (without cost operands, v is the one cost); L_j sums the
    score terms credited with c_j whose baseline is none or loo (DiCE, correct at every order).
    Each score term l_i's control variate comes from R_i, the sum of its credited costs: loo's
    is the mean of the other samples' R_i (per enumerated combination); grpo adds the
    first-order term (magic(l) - 1) * A with the group-normalized advantage A = (R - mean) /
    std; ma's is the running average passed in as the last operand (from earlier calls, so
    independent of these draws), and the op also returns its update. Enumerated draws (the
    `enum` operand: log-probabilities of each combination) weight the combinations on axis 1,
    which are summed exactly. A branched draw (`runtime.branched`: its parameters, values and
    noise are the `params`, `draw` and `aux` operands) has its evaluations on axis 1: the
    value averages its draw branches, and its weak derivative is added.
    """
    p = op.params
    o = p.split(operands)
    if p.kind == "logmeanexp":
        return _importance(o, p.baselines)
    held = ctx.lowering.held.get(id(op))
    h = p.split(lax.stop_gradient(operands) if held is None else held)

    def averaged(costs):
        return [c / c.shape[-1] if j in p.averaged else c for j, c in enumerate(costs)]

    v, costs, scores = o.value, averaged(o.costs), list(o.scores)
    hv, hcosts, hscores = h.value, averaged(h.costs), list(h.scores)
    state = None if p.control else o.state  # a moving average's (psi is the control's)
    credit = list(p.credit) if costs else [(0,)] * len(scores)
    paired = list(p.paired) or [()] * len(scores)
    causal = list(p.causal) or [()] * len(scores)
    if p.branched is not None:
        family, *given = p.family
        est, opts = REGISTRY[p.branched.name].families[family], dict(p.branched.options)
        aliases = FAMILIES[family].aliases
        params = [aliases[g][1](x[:, 0]) if g in aliases else x[:, 0]
                  for g, x in zip(given, o.params)]
        (draw,) = o.draw
        aux = o.aux[0][:, 0] if o.aux else None
        weights = est.weighting(v, draw, aux, opts, params)
        f, v = v, jnp.sum(weights * v, 1)
        weighted = range(f.shape[1]) if est.weights is not None else est.draws  # the rest weigh 0
        out = sum(weights[:, b] * _scored(f[:, b], [c[:, b] for c in costs], [l[:, b] for l in scores],
                                          p.baselines, credit, paired, causal, state,
                                          (hv[:, b], [c[:, b] for c in hcosts],
                                           [l[:, b] for l in hscores]))
                  for b in weighted)
        if p.control:  # a learned control variate: the estimator's own term, and psi's step
            df = o.shift_grad[0] if o.shift_grad else None
            term, psi = REGISTRY[p.branched.name].control_term(
                family, lambda psi, s: ctx.call(p.control, (psi, s)), o.state, f, draw, aux,
                params, df, opts)
            return jnp.mean(out + term, 0), psi
        out = out + weak_derivative(f, draw, aux, params, est, opts)
    else:
        out = _scored(v, costs, scores, p.baselines, credit, paired, causal, state,
                      (hv, hcosts, hscores))
    if o.enum:  # exact sum over the enumerated combinations (axis 1)
        weights = jnp.exp(o.enum[0]).reshape(o.enum[0].shape + (1,) * (v.ndim - 2))
        out = jnp.sum(weights * out, 1)
        v = jnp.sum(weights * v, 1)
    if state is None:
        return jnp.mean(out, 0)
    tracked = jnp.mean(v)  # the value, or per entry what the moving average's draw multiplies
    if jnp.ndim(state):
        i = p.baselines.index("ma")
        tracked = jnp.mean(_returns(v, costs, scores[i], credit[i], paired[i], causal[i]), 0)
    return jnp.mean(out, 0), lax.stop_gradient(p.decay * state + (1 - p.decay) * tracked)


RANDOM_LOWERINGS = {
    "dist": _dist,
    "sample": _sample,
    "log_prob": lambda ctx, op, d, x: d.family.log_prob(x, *d.params),
    "entropy": lambda ctx, op, d: d.family.entropy(*d.params),
    "kl": lambda ctx, op, p, q: KL[(p.family.name, q.family.name)](p.params, q.params),
    "dist_mean": lambda ctx, op, d: d.family.mean(*d.params),
    "samples": _samples,
    "surrogate": _surrogate,
}
