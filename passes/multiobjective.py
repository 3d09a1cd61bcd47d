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
in the export.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from gradlang.diagnostics import Diagnostics
from gradlang.ir import HISTORY, Combination, Export, Module
from gradlang.options import OptionError, chosen, number_problem, option, rendered

SOLVERS = ("auto", "exact", "frank_wolfe")
EXACT_MAX = 8
"""MGDA's `exact` solver enumerates the 2^k - 1 faces of the simplex (closed form for k = 2):
at most this many objectives; `auto` picks it up to there and Frank-Wolfe above."""


@dataclass(frozen=True)
class Mgda:
    """The min-norm element of the gradients' convex hull."""

    name: ClassVar[str] = "mgda"
    solver: str = option("auto", choices=SOLVERS)
    iters: int = option(100)
    """Frank-Wolfe's steps."""


@dataclass(frozen=True)
class Pcgrad:
    """Gradient surgery."""

    name: ClassVar[str] = "pcgrad"
    shuffle: bool = option(True)


@dataclass(frozen=True)
class Weights:
    """Its weights are positional (`Combination.weights`), one per objective."""

    name: ClassVar[str] = "weights"


@dataclass(frozen=True)
class Dynamic:
    """Dynamic Weight Average."""

    name: ClassVar[str] = "dynamic"
    temperature: float = option(2.0)


RULES: dict[str, type] = {r.name: r for r in (Mgda, Pcgrad, Weights, Dynamic)}
"""Combination rules by name."""


def _weights_problem(rule: Combination, k: int) -> str | None:
    """What is wrong with the positional weights of `rule` for k objectives, or None."""
    if rule.name != "weights":
        return (f"'{rule.name}' takes options by name, e.g. {rule.name}(option=value)"
                if rule.weights else None)
    if len(rule.weights) != k:
        return f"weights(...) needs one weight per objective: {k} values, got {len(rule.weights)}"
    if min(rule.weights) < 0 or max(rule.weights) == 0:
        return "the weights must be non-negative and not all zero"
    for w in rule.weights:
        want = number_problem(w, "non-negative")
        if want is not None:
            return f"each weight must be {want}, got {w}"
    return None


def complete(rule: Combination, k: int) -> Combination:
    """`rule` checked for k objectives, with its defaults filled in and `solver=auto`
    resolved; raises OptionError."""
    options = chosen(RULES, rule.name, rule.options, "combination rule", f"rule '{rule.name}'",
                     "rules")
    problem = _weights_problem(rule, k)
    if problem is not None:
        raise OptionError(problem)
    if isinstance(options, Mgda) and options.solver == "exact" and k > EXACT_MAX:
        raise OptionError(f"exact MGDA enumerates the 2^k - 1 faces of the simplex: at most "
                          f"{EXACT_MAX} objectives, got {k}; use solver=frank_wolfe")
    if isinstance(options, Mgda) and options.solver == "auto":
        options = replace(options, solver="exact" if k <= EXACT_MAX else "frank_wolfe")
    return replace(rule, options=rendered(options))


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
    after_errors: bool = True
    requires: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()

    def run(self, module: Module, diags: Diagnostics) -> Module:
        exports = []
        for export in module.exports:
            t = export.transform
            if t.kind != "minimize" or any(module.function(o.fn) is None for o in t.objectives):
                exports.append(export)
                continue
            try:
                rule = complete(t.rule, len(t.objectives))
            except OptionError as exc:
                diags.error(str(exc), t.rule.span)
                rule = None
            if _signature_problems(module, export, diags) or rule is None:
                exports.append(export)
                continue
            first = module.function(t.objectives[0].fn)
            if t.rule.name == "dynamic" and first.param(HISTORY) is not None:
                diags.error(f"dynamic(...) adds a parameter '{HISTORY}' (the objectives' previous "
                            f"values) to the export, but '{first.name}' already has one; rename "
                            f"it", first.param(HISTORY).span)
            exports.append(replace(export, transform=replace(t, rule=rule)))
        return replace(module, exports=tuple(exports))
