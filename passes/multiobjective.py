"""Multi-objective gradients: check and complete each `minimize` export's combination rule.

`minimize([f1, f2, ...], wrt=[...], by=RULE)` takes the gradient of every objective with
respect to the same parameters and combines them into one update direction by one of the rules
of `estimators.combine` (`mgda`, `pcgrad`, `weights`, `dynamic`). The export takes the union of
the objectives' parameters (by name; one name, one type) and passes each objective its own; an
objective that does not take a `wrt` parameter contributes a zero gradient to it. An objective
may have its own black-box estimator (`f with spsa(...)`, completed by the zeroth-order pass),
or carry state (a moving-average baseline, a learned control variate: the surrogate pass makes
its wrapper, and the export threads it in its parameter `state`). The runtime
(`runtime.multiobjective`) builds the combination; this pass records the completed rule in the
export.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from gradlang.diagnostics import Diagnostics
from gradlang.estimators.combine import combination_rule
from gradlang.ir import HISTORY, STATE, Combination, Export, Module
from gradlang.options import OptionError, rendered


def complete(rule: Combination, k: int) -> Combination:
    """`rule` checked for k objectives, with its defaults filled in and its options resolved
    for k (`mgda`'s `solver=auto`); raises OptionError."""
    return replace(rule, options=rendered(combination_rule(rule).fit(rule.weights, k)))


def _signature_problems(module: Module, export: Export, diags: Diagnostics) -> bool:
    """Reports each objective parameter whose type differs from an earlier objective's
    parameter of the same name (the export takes the union of their parameters, and passes
    each objective the ones it takes); True if any does."""
    seen: dict[str, tuple[str, object]] = {}
    bad = False
    for part in export.parts():
        fn = module.function(part.transform.fn)
        for p in fn.params:
            first, t = seen.setdefault(p.name, (fn.name, p.value.type))
            if t != p.value.type:
                diags.error(f"the objectives of minimize share their parameters by name: '{p.name}' "
                            f"is {p.value.type} in '{fn.name}' but {t} in '{first}'", p.span)
                bad = True
    return bad


def state_name_free(module: Module, export: Export, diags: Diagnostics) -> None:
    """Reports an objective parameter named `state` of a `minimize` export some of whose
    objectives carry state, which adds that parameter (the surrogate pass, which finds those
    objectives, calls this)."""
    for o in export.transform.objectives:
        fn = module.function(o.fn)
        if fn.param(STATE) is not None:
            diags.error(f"an objective of minimize carries state (a moving-average baseline or a "
                        f"learned control variate), which adds a parameter '{STATE}' (the "
                        f"objectives' states) to the export, but '{fn.name}' already has one; "
                        f"rename it", fn.param(STATE).span)


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
            if combination_rule(rule).stateful and first.param(HISTORY) is not None:
                diags.error(f"{rule.name}(...) adds a parameter '{HISTORY}' (the objectives' "
                            f"previous values) to the export, but '{first.name}' already has "
                            f"one; rename it", first.param(HISTORY).span)
            exports.append(replace(export, transform=replace(t, rule=rule)))
        return replace(module, exports=tuple(exports))
