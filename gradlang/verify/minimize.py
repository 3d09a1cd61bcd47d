"""`verify` of a `minimize([f1, f2, ...], wrt=[...], by=RULE)` export: each objective's
gradient verified as its own export `name[i]` (as the export computes it), then the export's
direction checked against the rule applied in NumPy (`combination.py`):

- exactly, call by call: the objectives' gradients at the keys the export gives them
  (`fold_in(key, i)`; PCGrad's orders from `fold_in(key, k)`), combined by the rule, against
  the direction of that call (float32 tolerance `TOLERANCE`);
- statistically: the direction's mean against the rule applied to the objectives' references
  (every coordinate: MGDA and PCGrad need whole gradients). MGDA and PCGrad are nonlinear in
  the gradients, so on estimates of random objectives they are biased by design; `weights` and
  `dynamic` (weights fixed before differentiating) stay unbiased.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import jax
import numpy as np

from gradlang.estimators.combine import CombinationRule, combination_rule, pcgrad_orders
from gradlang.ir import HISTORY, STATE

from .combination import coefficients, random_orders
from .measure import sample
from .program import Program, load
from .reference import Reference
from .report import CombinationCheck, CostReport, ExportReport, Settings
from .stats import BIASED, BY_DESIGN, CONSISTENT, leaf_stats

TOLERANCE = 1e-3
"""The combination's largest error, relative to the largest gradient's norm, that float32
allows (Gram matrix and k x k solves in float32)."""
CALLS = 64
"""Calls checked exactly when the export draws."""
ORDERS = 256
"""PCGrad's random orders averaged in the reference of a shuffling export."""


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.asarray(x, np.float64).reshape(x.shape[0], -1)
                           for x in jax.tree.leaves(tree)], axis=1)


def _every_wrt(wrt: tuple[str, ...], grads: dict, like: dict) -> dict:
    """An objective's gradient over every `wrt` name: zeros (shaped as `like`'s) for those it
    does not take."""
    return {w: grads[w] if w in grads else jax.tree.map(jax.numpy.zeros_like, like[w])
            for w in wrt}


def _leaves(report: ExportReport, names: list[str], shapes: list) -> list[np.ndarray]:
    """An objective's reference values, errors and bounds flat over the export's gradient
    leaves (`names`, `shapes`), zero at the leaves of parameters it does not take (its
    gradient there is exactly 0)."""
    own = {leaf.name: j for j, leaf in enumerate(report.leaves)}
    ref = report.reference
    return [np.concatenate([np.ravel(a[own[n]]) if n in own else np.zeros(int(np.prod(shape)))
                            for n, shape in zip(names, shapes)])
            for a in (ref.values, ref.errors, ref.bounds)]


def objective_arguments(parts: list[Program], named: Mapping) -> list[dict]:
    """Each objective's arguments by name from the export's: its parameters, and the state it
    carries from the export's `state` tuple (the objectives' states in order, then the
    history)."""
    states = iter(named.get(STATE, ()))
    return [{n: next(states) if n == p.state else named[n] for n, _ in p.params} for p in parts]


def _history(typed: CombinationRule, named: Mapping) -> np.ndarray | None:
    """A stateful rule's history: the export's `history`, or the last of its `state`."""
    if not typed.stateful:
        return None
    return np.asarray(named[STATE][-1] if STATE in named else named[HISTORY])


def check(program: Program, parts: list[Program], named: Mapping, seed: int) -> CombinationCheck:
    """The export's direction against the rule applied to its objectives' gradients at the
    same keys (see the module docstring)."""
    t = program.export.transform
    rule, k = t.rule, len(parts)
    typed = combination_rule(rule)
    args = program.arguments(named)
    pargs = [p.arguments(a) for p, a in zip(parts, objective_arguments(parts, named))]
    n = CALLS if program.draws else 1
    keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), 3), n)

    def call(key):
        out = program.gradient(*args, key) if program.draws else program.gradient(*args)
        grads = [_every_wrt(t.wrt, p.estimate(a, jax.random.fold_in(key, i) if p.draws else None),
                            out[1])
                 for i, (p, a) in enumerate(zip(parts, pargs))]
        orders = pcgrad_orders(jax.random.fold_in(key, k), k) if typed.stochastic else None
        return out[1], grads, orders

    direction, grads, orders = jax.jit(jax.vmap(call))(keys)
    d = _flat(direction)
    g = np.stack([_flat(x) for x in grads], 1)  # [n, k, size]
    history = _history(typed, named)
    worst = 0.0
    for j in range(n):
        order = np.asarray(orders[j]) if orders is not None else np.tile(np.arange(k), (k, 1))
        c = coefficients(rule, g[j], history, order)
        scale = max(np.linalg.norm(g[j], axis=1).max(), np.finfo(np.float64).tiny)
        worst = max(worst, float(np.linalg.norm(d[j] - c @ g[j]) / scale))
    verdict = CONSISTENT if worst <= TOLERANCE else BY_DESIGN if typed.approximate else BIASED
    return CombinationCheck(str(rule), f"by={rule} against {typed.reference(rule.weights)}", n,
                            worst, TOLERANCE, verdict)


def _reference(program: Program, reports: list[ExportReport], named: Mapping, seed: int,
               names: list[str], shapes: list) -> Reference:
    """The rule applied to the objectives' references (flat over the gradient's leaves
    `names`), its standard error and bound propagated with the coefficients held fixed."""
    rule = program.export.transform.rule
    k = len(reports)
    values, errors, bounds = (np.stack(a) for a in zip(*(_leaves(r, names, shapes)
                                                         for r in reports)))
    typed = combination_rule(rule)
    history = _history(typed, named)
    if typed.stochastic:
        rng = np.random.default_rng(seed)
        cs = np.stack([coefficients(rule, values, None, random_orders(rng, k))
                       for _ in range(ORDERS)])
        spread = (cs @ values).std(0, ddof=1) / np.sqrt(ORDERS)
        c, how = cs.mean(0), f"averaged over {ORDERS} random orders"
    else:
        order = np.tile(np.arange(k), (k, 1))
        c, spread, how = coefficients(rule, values, history, order), 0.0, ""
    error = np.sqrt((c[:, None] ** 2 * errors ** 2).sum(0) + spread ** 2)
    bound = np.abs(c) @ bounds
    methods = ", ".join(sorted({r.reference.method for r in reports}))
    return Reference(f"by={rule} of the references", f"the rule applied to each objective's "
                    f"reference ({methods}){' ' + how if how else ''}, coefficients "
                    f"{', '.join(f'{x:.3g}' for x in c)}", [c @ values], [error], [bound],
                    [None], sum(r.reference.samples for r in reports),
                    sum(r.reference.evaluations for r in reports),
                    sum(r.reference.seconds for r in reports))


def verify_minimize(origin, module, program: Program, named: Mapping, settings: Settings,
                    verify_part) -> ExportReport:
    """The report of the `minimize` export `program` (loaded from `module`) at the arguments
    `named`; `verify_part(name, args, settings)` verifies one objective's gradient."""
    name = program.export.name
    t = program.export.transform
    k = len(t.objectives)
    parts = [load(module, f"{name}[{i}]", origin.externs, origin.mesh) for i in range(k)]
    own = objective_arguments(parts, named)
    whole = replace(settings, coordinates=max(max(int(np.size(x)) for x in
                                                  jax.tree.leaves(p.arguments(a)))
                                              for p, a in zip(parts, own)))
    reports = [verify_part(p.export.name, a, whole) for p, a in zip(parts, own)]
    combination = check(program, parts, named, settings.seed)
    sampled = sample(program, named, settings)
    ref = _reference(program, reports, named, settings.seed, sampled.names, sampled.shapes)
    draws = any(p.draws for p in parts)
    why = [f"{r.export}: {r.biased_by_design}" for r in reports if r.biased_by_design]
    bias = combination_rule(t.rule).bias
    if draws and bias is not None:
        why.append(bias)
    cuts = np.cumsum([int(np.prod(s, dtype=int)) for s in sampled.shapes])[:-1]
    leaves = [leaf_stats(nm, shape, x, v, e, b, None, bool(why), settings.z)
              for nm, shape, x, v, e, b in zip(
                  sampled.names, sampled.shapes, sampled.samples,
                  *(np.split(a[0], cuts) for a in (ref.values, ref.errors, ref.bounds)))]
    objectives = [module.facts.objectives.get(p.export.name, (p.export.transform.fn,))[0]
                  for p in parts]
    notes = [] if not draws else [f"objective i draws with fold_in(key, i); the direction's "
                                  f"statistics are over {sampled.samples[0].shape[0]} calls"]
    cost = CostReport(sum(r.cost.forward for r in reports), sum(r.cost.backward for r in reports),
                      f"the {k} objectives' gradients and the rule", sampled.seconds,
                      sampled.memory)
    return ExportReport(name, t.call(f"[{', '.join(objectives)}]"), "minimize", f"by={t.rule}",
                        "; ".join(why) or None, notes, sampled.samples[0].shape[0],
                        settings.seed, ref, leaves, cost, None, reports, combination)
