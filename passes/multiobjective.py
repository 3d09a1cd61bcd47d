"""Multi-objective gradients: check and complete each `minimize` export's combination rule.

`minimize([f1, f2, ...], wrt=[...], by=RULE)` takes the gradient of every objective with
respect to the same parameters and combines them into one update direction:

- `mgda(solver=auto, iters=100)`: the min-norm element of the convex hull of the gradients
  (MGDA, Desideri 2012; Sener & Koltun 2018), a common descent direction; `exact` (closed form
  for two objectives, every face of the simplex up to 8) or `iters` steps of `frank_wolfe`;
  `auto` is exact up to 8 objectives;
- `pcgrad(shuffle=true)`: gradient surgery (Yu et al. 2020), each gradient projected onto the
  normal plane of the others it conflicts with, in a random order from the key;
- `weights(w1, w2, ...)`: the gradient of the weighted sum, one non-negative weight per objective;
- `dynamic(temperature=2)`: Dynamic Weight Average (Liu, Johns & Davison 2019), weights from the
  ratio of each objective's last two values, threaded through calls as the state `history`.

Every objective takes the same parameters (the export passes the same arguments to each). The
runtime (`runtime.multiobjective`) builds the combination; this pass records the completed rule
in the export and in the `multiobjective` fact (export name -> rule).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace

from gradlang.diagnostics import Diagnostics
from gradlang.ir import HISTORY, Combination, Export, Module

from gradlang.options import number_problem

RULES: dict[str, dict[str, object]] = {
    "mgda": {"solver": "auto", "iters": 100},
    "pcgrad": {"shuffle": True},
    "weights": {},
    "dynamic": {"temperature": 2.0},
}
SOLVERS = ("auto", "exact", "frank_wolfe")
EXACT_MAX = 8
"""MGDA's `exact` solver enumerates the 2^k - 1 faces of the simplex (closed form for k = 2):
at most this many objectives; `auto` picks it up to there and Frank-Wolfe above."""


def _problem(rule: Combination, k: int) -> str | None:
    """What is wrong with `rule` for k objectives, or None."""
    if rule.name not in RULES:
        close = difflib.get_close_matches(rule.name, RULES, n=1)
        return (f"unknown combination rule '{rule.name}'" + (f"; did you mean '{close[0]}'?"
                if close else f" (rules: {', '.join(RULES)})"))
    if rule.name == "weights":
        if len(rule.weights) != k:
            return (f"weights(...) needs one weight per objective: {k} values, got "
                    f"{len(rule.weights)}")
        if min(rule.weights) < 0 or max(rule.weights) == 0:
            return "the weights must be non-negative and not all zero"
        for w in rule.weights:
            want = number_problem(w, "non-negative")
            if want is not None:
                return f"each weight must be {want}, got {w}"
    elif rule.weights:
        return f"'{rule.name}' takes options by name, e.g. {rule.name}(option=value)"
    table = RULES[rule.name]
    for key, v in rule.options:
        if key not in table:
            return (f"'{rule.name}' has no option '{key}'"
                    + (f" (options: {', '.join(table)})" if table else " (it takes none)"))
        default = table[key]
        if isinstance(default, str):
            if v not in SOLVERS:
                return f"option '{key}' of '{rule.name}' is one of {', '.join(SOLVERS)}, got {v}"
            if v == "exact" and k > EXACT_MAX:
                return (f"exact MGDA enumerates the 2^k - 1 faces of the simplex: at most "
                        f"{EXACT_MAX} objectives, got {k}; use solver=frank_wolfe")
        elif isinstance(default, bool):
            if not isinstance(v, bool):
                return f"option '{key}' of '{rule.name}' must be true or false, got {v}"
        else:
            want = number_problem(v, "count" if isinstance(default, int) else "positive")
            if want is not None:
                return f"option '{key}' of '{rule.name}' must be {want}, got {v}"
    return None


def _signature_problems(module: Module, export: Export, diags: Diagnostics) -> bool:
    """Reports each objective whose parameters differ from the first's; True if any does."""
    parts = export.parts()
    first = module.function(parts[0].transform.fn)
    expected = [(p.name, p.value.type) for p in first.params]
    bad = False
    for part in parts[1:]:
        fn = module.function(part.transform.fn)
        found = [(p.name, p.value.type) for p in fn.params]
        if found != expected:
            diags.error(f"every objective of minimize takes the same parameters (the export "
                        f"passes the same arguments to each): '{fn.name}' takes "
                        f"{_params_text(found)}, '{first.name}' takes {_params_text(expected)}",
                        part.fn_span)
            bad = True
    return bad


def _params_text(params: list) -> str:
    return "(" + ", ".join(f"{n}: {t}" for n, t in params) + ")"


@dataclass(frozen=True)
class Multiobjective:
    """The multi-objective pass (checks `minimize` exports, completes their rules)."""

    name: str = "multiobjective"
    checks_only: bool = True

    def run(self, module: Module, diags: Diagnostics) -> Module:
        exports, chosen = [], {}
        for export in module.exports:
            t = export.transform
            if t.kind != "minimize" or any(module.function(o.fn) is None for o in t.objectives):
                exports.append(export)
                continue
            problem = _problem(t.rule, len(t.objectives))
            if problem is not None:
                diags.error(problem, t.rule.span)
            if _signature_problems(module, export, diags) or problem is not None:
                exports.append(export)
                continue
            first = module.function(t.objectives[0].fn)
            if t.rule.name == "dynamic" and first.param(HISTORY) is not None:
                diags.error(f"dynamic(...) adds a parameter '{HISTORY}' (the objectives' previous "
                            f"values) to the export, but '{first.name}' already has one; rename "
                            f"it", first.param(HISTORY).span)
            done = RULES[t.rule.name] | dict(t.rule.options)
            if done.get("solver") == "auto":
                done["solver"] = "exact" if len(t.objectives) <= EXACT_MAX else "frank_wolfe"
            rule = replace(t.rule, options=tuple(done.items()))
            exports.append(replace(export, transform=replace(t, rule=rule)))
            chosen[export.name] = rule
        return replace(module, exports=tuple(exports),
                       facts=module.facts | {"multiobjective": chosen})
