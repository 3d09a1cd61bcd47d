"""`gradlang explain`: how each export's gradient is computed, per parameter and random choice."""

from __future__ import annotations

from .estimators import REGISTRY
from .estimators.backward import rule_of
from .estimators.combine import combination_rule
from .estimators.compose import estimator_of
from .estimators.black_box import estimator
from .diagnostics import Span
from .ir import STATE, Module, externs_of, jax_functions_of, reachable, walk
from .ops import OPS
from .passes.aux import written

_BASELINES = {"none": "none", "loo": "leave-one-out (RLOO)", "grpo": "group-normalized (GRPO, biased)",
              "ma": "moving average", "vimco": "VIMCO"}


def _resolved(site, export: str, resolved: dict) -> list[str]:
    """The control variates a score site got in this export's expectation and in the nested
    expectations it is drawn in, as "loo, samples=8"."""
    return sorted(resolved.get((export, site.span), set()) | resolved.get(("", site.span), set()))


def _credited(site, export: str, credit: dict) -> str:
    """The costs a score site is credited with, in this export's expectation and in the
    nested ones it is drawn in."""
    found = sorted(credit.get((export, site.span), set()) | credit.get(("", site.span), set()))
    return " | ".join(found) or "-"


def _control_variate(site, found: list[str]) -> str:
    if site.estimator.name != "score":
        return "-"
    auto = " (auto)" if site.estimator.option("baseline") == "auto" else ""
    if site.estimator.option("decay") is not None:
        auto = f" (decay={site.estimator.option('decay')})"
    return "; ".join(f"{_BASELINES[r.split(',')[0]]}{auto} [{r.split(', ')[1]}]" for r in found) or "-"


def _label(estimator) -> str:
    """The estimator's label with its options (a score function's are in the control variate
    column)."""
    est = REGISTRY[estimator.name]
    options = ", ".join(f"{k}={v}" for k, v in estimator.options) if est.role != "score" else ""
    return f"{est.label} {options}" if options else est.label


def _overrides(site, found: list[str], scope: str = "expect") -> str:
    """The other estimators the draw accepts (`SiteChoice.others`), as annotations, in the
    export's scope: a logmeanexp(...) bound takes dreg and vimco, and no branched estimator."""
    bound = scope == "logmeanexp"
    averaged = "vimco" if bound else "loo"
    options = []
    if site.estimator.name == "score":
        other = averaged if all(f.startswith("none") for f in found) else "none"
        options.append(f"with score(baseline={other})")
    for n in site.others:
        if (REGISTRY[n].branched and bound) or (REGISTRY[n].role == "dreg" and not bound):
            continue
        options.append(f"with score(baseline={averaged})" if n == "score" else f"with {n}")
    return ", ".join(options) or "-"


def _at(function: str, span: Span) -> str:
    """Where an op is, for a table: its function as written and its line."""
    return f"{written(function)}, line {span.line}"


def _nonsmooth(module: Module, functions: list[str]) -> list[list[str]]:
    """Rows (op, where, backward) for the non-smooth ops of these functions."""
    rows = []
    for name in functions:
        for op in walk(module.function(name).body):
            if op.name == "straight_through":
                rows.append([op.params.op, _at(name, op.span),
                             rule_of(op.params.rule).shown()])
            elif "nonsmooth" in OPS[op.name].traits:
                rows.append([op.name, _at(name, op.span),
                             "none: no gradient flows through it"])
    return rows


_PATHWISE_DRAWS = {
    "stochastic_round": ("floor(x + u), u ~ U[0, 1)",
                         "the identity (exact for the expectation)"),
    "dropout": ("a Bernoulli keep-mask, kept with probability 1 - rate",
                "through the kept entries, times 1 / (1 - rate) (unbiased: the mask does not "
                "depend on x)"),
}
"""The draws a builtin makes with no estimator: what is drawn, and its backward."""


def _pathwise_draws(module: Module, functions: list[str]) -> list[list[str]]:
    """Rows (op, where, draw, backward) for the builtins that draw without an estimator."""
    return [[op.name, _at(name, op.span), *_PATHWISE_DRAWS[op.name]]
            for name in functions for op in walk(module.function(name).body)
            if op.name in _PATHWISE_DRAWS]


def _memory(module: Module, functions: list[str]) -> list[list[str]]:
    """Rows (what, where, backward pass) for the checkpoint blocks, sampled matmuls and
    truncated loops."""
    rows = []
    for name in functions:
        for op in walk(module.function(name).body):
            if op.name == "checkpoint":
                rows.append(["checkpoint block", _at(name, op.span),
                             "recomputes the block's values instead of storing them (same gradient)"])
            elif op.name in ("sampled_matmul", "sampled_einsum"):
                what = ("matmul" if op.name == "sampled_matmul"
                        else f"einsum \"{op.params.subscripts}\"")
                rows.append([f"wta_crs(keep={op.params.keep}) {what}", _at(name, op.span),
                             f"the right operand's gradient from {op.params.keep} sampled rows of "
                             f"the left one, stored instead of all (unbiased)"])
            elif op.name == "for" and op.params.truncate:
                rows.append([f"truncated(k={op.params.truncate}) loop", _at(name, op.span),
                             f"differentiates the last {op.params.truncate} iterations only "
                             f"(biased by design; stores nothing of the earlier ones)"])
    return rows


def table(rows: list[list[str]], indent: str) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _black_box(module: Module, name: str, t, what: str, objective: str) -> list[str]:
    """The lines of an export whose gradient a black-box estimator (by=) computes."""
    est = estimator(t.black_box)
    evals = est.evaluations + (t.kind == "value_and_grad")
    externs = externs_of(module, objective)
    lines = [f"export {name} = {t.call(what)}", *_aux(module, t)]
    fn = module.function(t.fn)
    for w in t.wrt:
        lines.append(f"  {w}: black-box estimate by {est.description}; {est.target()}")
        how = est.perturbation(w, fn.param(w).value.type)
        lines += [f"    perturbed: {how}"] if how else []
    if externs:
        lines.append(f"  externs called: {', '.join(externs)} (Python, through host callbacks)")
    traced = _traced(module, objective)
    lines += traced + ([f"    {est.at_jax_fn}"] if traced and est.at_jax_fn else [])
    reach = reachable(module, objective)
    inner = [h for h in module.facts.hypergrad if h.function in reach]
    if inner:
        lines.append(f"  inner problems ({len(inner)}), solved in each forward evaluation:")
        rows = [["argmin", "solver", "hypergradient"]]
        rows += [[_at(h.function, h.span), str(h.solver),
                  f"not used ({t.black_box.name} differentiates no inner problem)"]
                 for h in inner]
        lines += table(rows, "    ")
    lines.append(f"  cost: {evals} forward evaluations, no backward pass")
    return lines + _descend(t)


def _traced(module: Module, objective: str) -> list[str]:
    """The line naming the jax functions called, which the analyses cannot see inside."""
    names = jax_functions_of(module, objective)
    if not names:
        return []
    return [f"  JAX functions called: {', '.join(names)} (traced inline, differentiated by "
            f"JAX; gradflow could not analyse them: each call's result is taken to depend "
            f"on all its arguments, differentiably)"]


def _reverse_mode(wrt: tuple[str, ...], zero: tuple[str, ...], sites: bool,
                  nonsmooth: list[list[str]], random: bool) -> list[str]:
    """How each wrt parameter's reverse-mode gradient is computed."""
    lines = []
    for name in wrt:
        if name in zero:
            lines.append(f"  {name}: gradient is identically zero (no differentiable path "
                         f"to the result)")
        elif sites:
            lines.append(f"  {name}: exact reverse mode through the surrogate, with the "
                         f"estimators of the random choices below")
        elif any(not r[2].startswith("none") for r in nonsmooth):
            lines.append(f"  {name}: reverse mode, with the backward rules of the "
                         f"non-smooth operations below")
        elif random:
            lines.append(f"  {name}: reverse mode of a Monte Carlo objective (its draws, below, "
                         f"carry no estimator: the estimate is differentiated as it is)")
        else:
            lines.append(f"  {name}: exact reverse-mode gradient; the program is smooth on "
                         f"every path from '{name}' to the result, so no estimator is needed")
    return lines


def _private(plan, samples: int) -> list[str]:
    """The lines of an export whose gradient is made private (by=dp): what is clipped, the
    noise, the examples, and how each leaf's per-example norm is computed."""
    shared = f"; shared by every example: {', '.join(plan.shared)}" if plan.shared else ""
    lines = [f"  {', '.join(dict.fromkeys(n.leaf.split('.')[0] for n in plan.leaves))}: "
             f"differentially private reverse mode (DP-SGD): the gradient of each example's "
             f"loss ('{written(plan.function)}' on that example alone), clipped to norm {plan.clip:g} "
             f"over all leaves together, summed, plus Gaussian noise of standard deviation "
             f"{plan.noise:g} x {plan.clip:g} = {plan.noise * plan.clip:g} per coordinate, "
             f"divided by the number of examples",
             f"  examples: {', '.join(plan.batched)} split along axis {plan.axis} (batch dim "
             f"{plan.batch_dim}){shared}",
             f"  per-example gradient norms ({len(plan.leaves)} leaves):"]
    rows = [["leaf", "norm", "why"]]
    rows += [[n.leaf, "ghost (linear layer)" if n.ghost else "per-example gradient", n.why]
             for n in plan.leaves]
    lines += table(rows, "    ")
    stored = [n.leaf for n in plan.leaves if not n.ghost]
    if not stored:
        what = "no per-example gradient is formed"
    elif len(stored) == len(plan.leaves):
        what = "per-example gradients are formed for every leaf"
    else:
        what = f"per-example gradients are formed for {', '.join(stored)} only"
    evals = "1 forward + 1 backward evaluation"
    evals = f"{samples} x ({evals})" if samples > 1 else evals
    return lines + [f"  cost: {evals} per example, vectorized over the {plan.batch_dim} "
                    f"examples; {what}"]


def _descend(t) -> list[str]:
    """The update line of a `descend` export."""
    if t.kind != "descend":
        return []
    descent = estimator(t.black_box).descent if t.black_box is not None else ""
    how = f"; {descent}" if descent else ""
    lr = "lr" if t.lr is None else f"{t.lr:g}"
    given = " (lr: an argument of the export, after the function's)" if t.lr is None else ""
    return [f"  update: p <- p - {lr} * grad p for p in {', '.join(t.wrt)}{given}, written over "
            f"the arrays passed for them (donated){how}"]


def _compose(c) -> list[str]:
    """The lines of a composition's estimator (a `passes.compose.ComposeFact`)."""
    how = estimator_of(c.by)
    return [f"  {line}" for line in how.describe(c.outer, c.inner, c.samples, c.default)]


def explain(module: Module) -> str:
    """The report printed by `gradlang explain`."""
    flow = {f.export: f for f in module.facts.gradflow}
    lines: list[str] = []
    for export in module.exports:
        if export.transform.kind == "minimize":
            lines += _minimize(module, export, flow)
        else:
            lines += _export(module, export, flow)
    return "\n".join(lines) + ("\n" if lines else "")


def _aux(module: Module, t) -> list[str]:
    """The line saying what a `has_aux=true` export returns beside its gradient."""
    if t.aux is None:
        return []
    aux = module.function(t.aux)
    one = (": with draws, one sample's, drawn with the export's key"
           if aux.name in module.facts.random else "")
    return [f"  aux: {aux.result_type}, the function's other results at the same arguments, "
            f"returned after the gradient{one}"]


def _objective(module: Module, export) -> tuple[str, int, str]:
    """The function an export (or an objective of `minimize`) differentiates, as written
    (before the surrogate pass wrapped it), its samples and its scope."""
    t = export.transform
    return module.facts.objectives.get(export.name, (t.fn, t.samples, t.scope))


def _written(fn: str, samples: int, scope: str) -> str:
    """An objective as written in an export: `fn` or `scope(fn, samples=N)`."""
    return f"{scope}({fn}, samples={samples})" if samples else fn


def _export(module: Module, export, flow: dict) -> list[str]:
    """The lines of one export (or one objective of `minimize`, its first line the header);
    `flow`: the gradflow facts by export name."""
    sites = module.facts.estimators
    t = export.transform
    fn, samples, scope = _objective(module, export)
    what = _written(written(fn), samples, scope)
    composed = module.facts.compose.get(export.name)
    if composed is not None:
        samples = composed.samples
        what = (f"compose({composed.outer}, expect({composed.inner}, samples={samples}), "
                f"by={composed.by})")
    reach = reachable(module, fn)
    here = [s for s in sites if s.function in reach]
    nonsmooth = _nonsmooth(module, reach) if t.kind != "fn" else []
    n = max(samples, 1)
    lines: list[str] = []
    if t.kind == "fn":
        lines.append(f"export {export.name} = {what}: no gradient requested")
        lines += _compose(composed) if composed is not None else []
    elif t.black_box is not None:
        return _black_box(module, export.name, t, what, fn)
    else:
        lines.append(f"export {export.name} = {t.call(what)}")
        lines += _aux(module, t)
        lines += _compose(composed) if composed is not None else []
        lines += (_private(module.facts.privacy[export.name], n) if t.private is not None
                  else _reverse_mode(t.wrt, flow[export.name].zero, bool(here), nonsmooth,
                                     t.fn in module.facts.random))
        lines += _traced(module, fn)
    if here:
        rows = [["site", "distribution", "estimator", "control variate", "cost per sample",
                 "override"]]
        for s in here:
            found = _resolved(s, export.name, module.facts.control_variates)
            rows.append([f"{s.site} ({_at(s.function, s.span)})", s.family,
                         _label(s.estimator),
                         _control_variate(s, found), REGISTRY[s.estimator.name].cost(s.estimator, s.size),
                         _overrides(s, found, scope)])
        lines.append(f"  random choices ({len(here)}), {n} sample{'s' * (n != 1)} of the "
                     f"objective per call:")
        lines += table(rows, "    ")
        lines.append("  why:")
        lines += [f"    {s.site}: {s.why}" for s in here]
        credit = module.facts.credit
        scored = [(s.site, _credited(s, export.name, credit)) for s in here
                  if s.estimator.name == "score"]
        if scored:
            lines.append("  credit (the costs each score-function draw's log-probability "
                         "multiplies; see docs/reference/random.md, Credit assignment):")
            lines += [f"    {site}: {what}" for site, what in scored]
    inner = [h for h in module.facts.hypergrad if h.function in reach]
    if inner and t.kind != "fn":
        lines.append(f"  inner problems ({len(inner)}):")
        rows = [["argmin", "solver", "hypergradient", "why"]]
        rows += [[_at(h.function, h.span), str(h.solver), str(h.method), h.why]
                 for h in inner]
        lines += table(rows, "    ")
        lines += [f"    {_at(h.function, h.span)} draws: {h.draws}" for h in inner if h.draws]
    if nonsmooth:
        lines.append(f"  non-smooth operations ({len(nonsmooth)}), with their backward rules:")
        lines += table([["op", "where", "backward rule"]] + nonsmooth, "    ")
    nested = {op.span: (name, op.params) for name in reach
              for op in walk(module.function(name).body) if op.name == "grad"}
    if nested and t.kind != "fn":
        lines.append(f"  gradients in the program ({len(nested)}), differentiated again by this "
                     f"export (reverse mode over reverse mode):")
        for span, (name, p) in nested.items():
            what = f"grad({p.fn}, wrt=[{', '.join(p.wrt)}])"
            where = f"the export, line {span.line}" if written(name) == what else _at(name, span)
            lines.append(f"    {what} at {where}")
    draws = _pathwise_draws(module, reach)
    if draws:
        lines.append(f"  draws without an estimator ({len(draws)}), differentiated as drawn:")
        lines += table([["op", "where", "draw", "backward"]] + draws, "    ")
    sliced = [c for c in module.facts.sliced if c.function in reach]
    if sliced:
        lines.append(f"  sliced Wasserstein estimates ({len(sliced)}):")
        rows = [["where", "directions", "p", "control variate", "why"]]
        rows += [[_at(c.function, c.span), str(c.projections), str(c.p), c.kind, c.why]
                 for c in sliced]
        lines += table(rows, "    ")
    memory = _memory(module, reach) if t.kind != "fn" else []
    if memory:
        lines.append(f"  memory ({len(memory)}):")
        lines += table([["what", "where", "backward pass"]] + memory, "    ")
    if t.kind != "fn" and t.private is None:
        lines.append(f"  cost: {n} x (1 forward + 1 backward evaluation)" if here or samples
                     else "  cost: 1 forward + 1 backward evaluation")
    if t.kind != "fn":
        lines += _descend(t)
    return lines


def _minimize(module: Module, export, flow: dict) -> list[str]:
    """The lines of a `minimize` export: its rule, what it guarantees, then each objective."""
    t = export.transform
    parts = export.parts()
    whats = [_written(*_objective(module, part)) for part in parts]
    k = len(parts)
    listed = [w + (f" with {p.transform.by}" if p.transform.by is not None else "")
              for w, p in zip(whats, parts)]
    lines = [f"export {export.name} = {t.call('[' + ', '.join(listed) + ']')}"]
    rule = combination_rule(t.rule)
    lines += [f"  {line}" for line in rule.describe(t.rule.weights, k)]
    own = any(o.fn in module.facts.stateful for o in t.objectives)
    state = f", {STATE} (objectives' states{', history' * rule.stateful})" if own else \
        ", history" if rule.stateful else ""
    if t.descend:
        lr = "lr" if t.lr is None else f"{t.lr:g}"
        given = " (lr: an argument of the export, after the parameters)" if t.lr is None else ""
        lines.append(f"  returns: (values f32[{k}], the parameters {{{', '.join(t.wrt)}}} after "
                     f"the step p <- p - {lr} * direction{given}, weights f32[{k}]{state}), "
                     f"direction = sum_i weights_i * grad f_i")
    else:
        lines.append(f"  returns: (values f32[{k}], direction {{{', '.join(t.wrt)}}}, weights "
                     f"f32[{k}]{state}), direction = sum_i weights_i * grad f_i; step with "
                     f"p - lr * direction")
    for i, (part, what) in enumerate(zip(parts, whats)):
        lines.append(f"  objective {i + 1}: {what}")
        lines += [f"  {line}" for line in _export(module, part, flow)[1:]]
    if rule.linear:
        lines.append(f"  cost: the objectives' forward and backward evaluations above, the "
                     f"backward passes seeded with the weights (one backward pass of the "
                     f"weighted sum; the {k} gradients are never held apart)")
    else:
        lines.append(f"  cost: the objectives' forward and backward evaluations above (one "
                     f"backward pass per objective, the {k} gradients held at once), their "
                     f"{k} x {k} Gram matrix and the combination")
    return lines
