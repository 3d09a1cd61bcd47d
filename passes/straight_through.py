"""Straight-through: give annotated non-smooth ops their backward rule as a custom-gradient op.

Each non-smooth op with a rule (`sign(w) with reste(power=3)`, or the file's `pragma backward
...`) becomes a `straight_through` op whose forward value is exactly the original op and whose
backward is the rule (lowered as a `jax.custom_jvp`). Rules that do not apply to the op, unknown
rules and bad options are errors at the annotation. The rules themselves (options, ops, backward
computation) are `gradlang.estimators.backward.RULES`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from gradlang.diagnostics import Diagnostics
from gradlang.estimators.backward import rule_of, rules_for
from gradlang.ir import Module, Op
from gradlang.ops import OPS, Annotation, STParams
from gradlang.options import OptionError

from .rewrite import map_ops


def rule_problem(rule: Annotation, op: str | None) -> str | None:
    """Why `rule` cannot be the backward rule of `op` (None when it can; with `op` None, why
    it is not a known rule with valid options)."""
    try:
        typed = rule_of(rule)
    except OptionError as exc:
        return str(exc)
    if op is not None and op not in typed.ops:
        return (f"rule '{rule.name}' does not apply to {op}; rules for {op}: "
                f"{', '.join(r.name for r in rules_for(op))}")
    return None


def complete(rule: Annotation) -> Annotation:
    """The rule with every option given (defaults filled in, as floats)."""
    return rule_of(rule).annotation(rule.span)


@dataclass(frozen=True)
class StraightThrough:
    """The straight-through pass."""

    name: str = "straight_through"
    after_errors: bool = True
    """It reports bad rules together with the other checks (it only renames annotated ops)."""
    requires: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()

    def run(self, module: Module, diags: Diagnostics) -> Module:
        for unit in module.units:
            if unit.backward is not None:
                problem = rule_problem(unit.backward, None)
                if problem is not None:
                    diags.error(problem, unit.backward.span)
        functions = []
        for fn in module.functions:
            default = module.unit(fn.unit).backward
            functions.append(replace(fn, body=map_ops(fn.body, lambda op, d=default: _rewrite(
                op, d, diags) if "nonsmooth" in OPS[op.name].traits else op)))
        return replace(module, functions=tuple(functions))


def _rewrite(op: Op, default: Annotation | None, diags: Diagnostics) -> Op:
    rule = op.params.rule
    if rule is None and default is not None and rule_problem(default, op.name) is None:
        rule = default
    if rule is None:
        return op
    problem = rule_problem(rule, op.name)
    if problem is not None:
        diags.error(problem, rule.span or op.span)
        return op
    inner = replace(op.params, rule=None)
    return replace(op, name="straight_through", params=STParams(op.name, inner, complete(rule)))

