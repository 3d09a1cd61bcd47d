"""Backward rules of the non-smooth ops, one frozen dataclass each.

A rule (`sign(w) with reste(power=3)`, or the file's `pragma backward ...`) is a
`BackwardRule` subclass whose fields are its options (`gradlang.options`); beside them it
declares the ops it applies to (`ops`), how messages suggest it (`example`) and its backward
computation (`tangent`: the derivative it stands in for, applied to a tangent). The
straight-through pass checks and completes rules through `RULES`; the lowering of
`straight_through` (`runtime.rules_nonsmooth`) builds the rule from the op's annotation
(`rule_of`) and calls its `tangent` inside a `jax.custom_jvp`; `explain` shows it as `shown()`.

Every rule's Jacobian is symmetric (elementwise; H M H for QuEST's trust mask, H the Hadamard
transform; softmax's for st_gumbel), so `tangent` is also the map of cotangents: the rule's
backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from gradlang.diagnostics import Span
from gradlang.ops import Annotation
from gradlang.options import chosen, option, rendered
from gradlang.runtime.quantizers import hadamard, quantize_levels, quest_rotated

SIGNS = ("sign", "binarize")
ELEMENTWISE = ("sign", "binarize", "round", "floor", "ceil", "step")
QUANTIZERS = ("quantize", "quest")


class BackwardRule:
    """What every backward rule declares. Subclasses are frozen dataclasses whose fields are
    the rule's options: an instance is a rule with its options."""

    name: ClassVar[str]
    ops: ClassVar[tuple[str, ...]]
    """The non-smooth ops it applies to."""
    example: ClassVar[str]
    """How a warning suggests it after `with`."""

    def tangent(self, op: str, params: object, x: jax.Array, t: jax.Array,
                scale: jax.Array | None = None) -> jax.Array:
        """The derivative of `op` (with its `params`; `scale`, a quantizer's given scale) at x
        under this rule, applied to the tangent t."""
        raise NotImplementedError(self.name)

    def annotation(self, span: Span | None = None) -> Annotation:
        """The rule with every option written, as floats (what a `straight_through` op holds)."""
        return Annotation(self.name, tuple((k, float(v)) for k, v in rendered(self)), span)

    def shown(self) -> str:
        """How `explain` names it."""
        return str(self.annotation())

    @property
    def identity(self) -> bool:
        """Its tangent is the incoming one itself (the op is the identity to reverse mode)."""
        return False

    def bias(self, op: str, line: int) -> str:
        """Why it is biased by design at `op` on `line` (for `verify`)."""
        return (f"the backward rule {self.name} of {op} (line {line}) stands in for its "
                f"derivative, which is zero almost everywhere")


@dataclass(frozen=True)
class Ste(BackwardRule):
    """Identity (clip=c: zero where |x| > c, hardtanh-style; clip=0: no clipping)."""

    name: ClassVar[str] = "ste"
    ops: ClassVar[tuple[str, ...]] = ELEMENTWISE + QUANTIZERS + ("argmax", "topk")
    example: ClassVar[str] = "ste | ste(clip=1.0)"
    clip: float = option(0.0, "non-negative")

    def tangent(self, op, params, x, t, scale=None):
        return t if self.clip == 0 else t * (jnp.abs(x) <= self.clip)

    def shown(self) -> str:
        return self.name if self.clip == 0 else super().shown()

    @property
    def identity(self) -> bool:
        return self.clip == 0


@dataclass(frozen=True)
class Reste(BackwardRule):
    """ReSTE: the derivative of sign(x)|x|^(1/power), capped at max_grad, zero where |x| > clip."""

    name: ClassVar[str] = "reste"
    ops: ClassVar[tuple[str, ...]] = SIGNS
    example: ClassVar[str] = "reste(power=3)"
    power: float = option(3.0, least=1)
    clip: float = option(1.0)
    max_grad: float = option(10.0)

    def tangent(self, op, params, x, t, scale=None):
        a, p = jnp.abs(x), self.power
        slope = jnp.minimum(jnp.power(jnp.maximum(a, 1e-12), 1 / p - 1) / p, self.max_grad)
        return t * slope * (a <= self.clip)


@dataclass(frozen=True)
class ApproxSign(BackwardRule):
    """Larq's ApproxSign: 2 - 2|x| on |x| <= 1, else 0."""

    name: ClassVar[str] = "approx_sign"
    ops: ClassVar[tuple[str, ...]] = SIGNS
    example: ClassVar[str] = "approx_sign"

    def tangent(self, op, params, x, t, scale=None):
        a = jnp.abs(x)
        return t * (2 - 2 * a) * (a <= 1)


@dataclass(frozen=True)
class SwishSign(BackwardRule):
    """Larq's SwishSign: the derivative of 2 sigmoid(beta x)(1 + beta x (1 - sigmoid(beta x)))
    - 1."""

    name: ClassVar[str] = "swish_sign"
    ops: ClassVar[tuple[str, ...]] = SIGNS
    example: ClassVar[str] = "swish_sign(beta=5.0)"
    beta: float = option(5.0)

    def tangent(self, op, params, x, t, scale=None):
        b = self.beta
        return t * b * (2 - b * x * jnp.tanh(b * x / 2)) / (1 + jnp.cosh(b * x))


@dataclass(frozen=True)
class StGumbel(BackwardRule):
    """Straight-through softmax: the Jacobian of softmax(x / tau)."""

    name: ClassVar[str] = "st_gumbel"
    ops: ClassVar[tuple[str, ...]] = ("argmax",)
    example: ClassVar[str] = "st_gumbel(tau=1.0)"
    tau: float = option(1.0)

    def tangent(self, op, params, x, t, scale=None):
        return jax.jvp(lambda v: jax.nn.softmax(v / self.tau, axis=params.axis), (x,), (t,))[1]


@dataclass(frozen=True)
class Trust(BackwardRule):
    """QuEST's trust estimator: identity where the quantization error is at most bound
    half-steps, else 0 (for quest, in the Hadamard-rotated space)."""

    name: ClassVar[str] = "trust"
    ops: ClassVar[tuple[str, ...]] = QUANTIZERS
    example: ClassVar[str] = "trust"
    bound: float = option(1.0)

    def tangent(self, op, params, x, t, scale=None):
        if op == "quest":
            y = hadamard(x)
            q, step = quest_rotated(y, params.bits)
            return hadamard(hadamard(t) * (jnp.abs(y - q) <= self.bound * step / 2))
        q, step = quantize_levels(x, params, scale)
        return t * (jnp.abs(x - q) <= self.bound * step / 2)


RULES: dict[str, type[BackwardRule]] = {r.name: r for r in (
    Ste, Reste, ApproxSign, SwishSign, StGumbel, Trust)}
"""Backward rules by name (in the order messages list them)."""


def rule_of(rule: Annotation) -> BackwardRule:
    """The rule an annotation names, with its options checked (raises OptionError)."""
    return chosen(RULES, rule.name, rule.options, "backward rule", f"rule '{rule.name}'",
                  "rules")


def rules_for(op: str) -> list[type[BackwardRule]]:
    """The rules that apply to a non-smooth op, for messages."""
    return [rule for rule in RULES.values() if op in rule.ops]
