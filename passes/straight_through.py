"""Straight-through: give annotated non-smooth ops their backward rule as a custom-gradient op.

Each non-smooth op with a rule (`sign(w) with reste(power=3)`, or the file's `pragma backward
...`) becomes a `straight_through` op whose forward value is exactly the original op and whose
backward is the rule (lowered as a `jax.custom_jvp`). Rules that do not apply to the op, unknown
rules and bad options are errors at the annotation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from gradlang.diagnostics import Diagnostics
from gradlang.ir import Module, Op
from gradlang.ops import OPS, Annotation, STParams
from gradlang.options import OptionError, chosen, option, rendered

from .rewrite import map_ops

SIGNS = ("sign", "binarize")
ELEMENTWISE = ("sign", "binarize", "round", "floor", "ceil", "step")
QUANTIZERS = ("quantize", "quest")

# Backward rules: each one's options, the ops it applies to (`ops`) and, in its docstring, what
# its backward computes.


@dataclass(frozen=True)
class Ste:
    """Identity (clip=c: zero where |x| > c, hardtanh-style; clip=0: no clipping)."""

    name: ClassVar[str] = "ste"
    ops: ClassVar[tuple[str, ...]] = ELEMENTWISE + QUANTIZERS + ("argmax", "topk")
    clip: float = option(0.0, "non-negative")


@dataclass(frozen=True)
class Reste:
    """ReSTE: the derivative of sign(x)|x|^(1/power), capped at max_grad, zero where |x| > clip."""

    name: ClassVar[str] = "reste"
    ops: ClassVar[tuple[str, ...]] = SIGNS
    power: float = option(3.0, least=1)
    clip: float = option(1.0)
    max_grad: float = option(10.0)


@dataclass(frozen=True)
class ApproxSign:
    """Larq's ApproxSign: 2 - 2|x| on |x| <= 1, else 0."""

    name: ClassVar[str] = "approx_sign"
    ops: ClassVar[tuple[str, ...]] = SIGNS


@dataclass(frozen=True)
class SwishSign:
    """Larq's SwishSign: the derivative of 2 sigmoid(beta x)(1 + beta x (1 - sigmoid(beta x)))
    - 1."""

    name: ClassVar[str] = "swish_sign"
    ops: ClassVar[tuple[str, ...]] = SIGNS
    beta: float = option(5.0)


@dataclass(frozen=True)
class StGumbel:
    """Straight-through softmax: the Jacobian of softmax(x / tau)."""

    name: ClassVar[str] = "st_gumbel"
    ops: ClassVar[tuple[str, ...]] = ("argmax",)
    tau: float = option(1.0)


@dataclass(frozen=True)
class Trust:
    """QuEST's trust estimator: identity where the quantization error is at most bound
    half-steps, else 0 (for quest, in the Hadamard-rotated space)."""

    name: ClassVar[str] = "trust"
    ops: ClassVar[tuple[str, ...]] = QUANTIZERS
    bound: float = option(1.0)


RULES: dict[str, type] = {r.name: r for r in (Ste, Reste, ApproxSign, SwishSign, StGumbel, Trust)}
"""Backward rules by name."""


def _options(rule: Annotation):
    """The rule's options, checked (raises OptionError)."""
    return chosen(RULES, rule.name, rule.options, "backward rule", f"rule '{rule.name}'",
                  "rules")


def rule_problem(rule: Annotation, op: str | None) -> str | None:
    """Why `rule` cannot be the backward rule of `op` (None when it can; with `op` None, why
    it is not a known rule with valid options)."""
    try:
        _options(rule)
    except OptionError as exc:
        return str(exc)
    if op is not None and op not in RULES[rule.name].ops:
        return (f"rule '{rule.name}' does not apply to {op}; rules for {op}: "
                f"{', '.join(backward_rule_names(op))}")
    return None


def complete(rule: Annotation) -> Annotation:
    """The rule with every option given (defaults filled in, as floats)."""
    return replace(rule, options=tuple((k, float(v)) for k, v in rendered(_options(rule))))


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


def backward_rule_names(op: str) -> list[str]:
    """The rules that apply to a non-smooth op, for messages."""
    return [name for name, rule in RULES.items() if op in rule.ops]
