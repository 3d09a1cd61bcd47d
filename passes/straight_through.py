"""Straight-through: give annotated non-smooth ops their backward rule as a custom-gradient op.

Each non-smooth op with a rule (`sign(w) with reste(power=3)`, or the file's `pragma backward
...`) becomes a `straight_through` op whose forward value is exactly the original op and whose
backward is the rule (lowered as a `jax.custom_jvp`). Rules that do not apply to the op, unknown
rules and bad options are errors at the annotation.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace

from gradlang.diagnostics import Diagnostics
from gradlang.ir import Module, Op, Region
from gradlang.ops import OPS, Estimator, STParams

from gradlang.options import number_problem

SIGNS = ("sign", "binarize")
ELEMENTWISE = ("sign", "binarize", "round", "floor", "ceil", "step")
QUANTIZERS = ("quantize", "quest")

RULES: dict[str, tuple[dict[str, float], tuple[str, ...], str]] = {
    "ste": ({"clip": 0.0}, ELEMENTWISE + QUANTIZERS + ("argmax", "topk"),
            "identity (clip=c: zero where |x| > c, hardtanh-style)"),
    "reste": ({"power": 3.0, "clip": 1.0, "max_grad": 10.0}, SIGNS,
              "ReSTE: derivative of sign(x)|x|^(1/power), capped at max_grad, zero where |x| > clip"),
    "approx_sign": ({}, SIGNS, "Larq's ApproxSign: 2 - 2|x| on |x| <= 1, else 0"),
    "swish_sign": ({"beta": 5.0}, SIGNS, "Larq's SwishSign: derivative of 2 sigmoid(beta x)(1 + beta x (1 - sigmoid(beta x))) - 1"),
    "st_gumbel": ({"tau": 1.0}, ("argmax",), "straight-through softmax: the Jacobian of softmax(x / tau)"),
    "trust": ({"bound": 1.0}, QUANTIZERS,
              "QuEST's trust estimator: identity where the quantization error is at most bound "
              "half-steps, else 0 (for quest, in the Hadamard-rotated space)"),
}
"""Backward rules: their options with defaults (clip=0: no clipping), the ops they apply to, and
what their backward computes."""


def rule_problem(rule: Estimator, op: str) -> str | None:
    """Why `rule` cannot be the backward rule of `op` (None when it can)."""
    if rule.name not in RULES:
        close = difflib.get_close_matches(rule.name, RULES, n=1)
        return (f"unknown backward rule '{rule.name}'" + (f"; did you mean '{close[0]}'?" if close
                                                          else f" (rules: {', '.join(RULES)})"))
    defaults, ops, _ = RULES[rule.name]
    for k, v in rule.options:
        if k not in defaults:
            return (f"rule '{rule.name}' has no option '{k}'"
                    + (f" (options: {', '.join(defaults)})" if defaults else " (it takes none)"))
        want = number_problem(v, "positive")
        if want is not None:
            return f"option '{k}' of '{rule.name}' must be {want}, got {v}"
    if rule.name == "reste" and rule.option("power", 3.0) < 1:
        return "option 'power' of 'reste' must be at least 1"
    if op not in ops:
        fits = [r for r, (_, o, _) in RULES.items() if op in o]
        return f"rule '{rule.name}' does not apply to {op}; rules for {op}: {', '.join(fits)}"
    return None


def complete(rule: Estimator) -> Estimator:
    """The rule with every option given (defaults filled in)."""
    given = dict(rule.options)
    return replace(rule, options=tuple((k, float(given.get(k, v))) for k, v in RULES[rule.name][0].items()))


@dataclass(frozen=True)
class StraightThrough:
    """The straight-through pass."""

    name: str = "straight_through"
    checks_only: bool = True
    """It reports bad rules together with the other checks (it only renames annotated ops)."""

    def run(self, module: Module, diags: Diagnostics) -> Module:
        for unit in module.units:
            if unit.backward is not None:
                ops = RULES.get(unit.backward.name, ((), ("sign",)))[1]
                problem = rule_problem(unit.backward, ops[0])
                if problem is not None:
                    diags.error(problem, unit.backward.span)
        functions = []
        for fn in module.functions:
            default = module.unit(fn.unit).backward
            functions.append(replace(fn, body=_region(fn.body, default, diags)))
        return replace(module, functions=tuple(functions))


def _region(region: Region, default: Estimator | None, diags: Diagnostics) -> Region:
    ops = []
    for op in region.ops:
        if op.regions:
            op = replace(op, regions=tuple(_region(r, default, diags) for r in op.regions))
        if "nonsmooth" in OPS[op.name].traits:
            op = _rewrite(op, default, diags)
        ops.append(op)
    return replace(region, ops=tuple(ops))


def _rewrite(op: Op, default: Estimator | None, diags: Diagnostics) -> Op:
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


def backward_rule_names(op: str) -> list[str]:
    """The rules that apply to a non-smooth op, for messages."""
    return [r for r, (_, ops, _) in RULES.items() if op in ops]
