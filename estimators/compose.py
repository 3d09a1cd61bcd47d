"""Estimators of a composition `compose(f, expect(g, samples=N), by=...)`, f of an inner
expectation, one frozen dataclass each (its fields are its options, `gradlang.options`);
`ESTIMATORS` maps each name to its class. The compose pass, the lowering of the `compose` op
(`runtime.compose`), `explain` and `verify` read these classes.

With g_hat the inner expectation's estimate of this call (its derivative is the inner
estimators' Jacobian J) and u the estimate f is evaluated at, f's argument is

    sg(u) + g_hat - sg(g_hat)

(sg: stop_gradient): its value is u, its derivative that of g_hat, so reverse mode gives
J^T grad f(u) (plus the derivative of f in its other arguments).

- `plugin` takes u = g_hat (f of this call's estimate, no state);
- `scgd(beta=b)` (stochastic compositional gradient descent, Wang, Fang & Liu 2017) takes the
  moving average u = (1 - b_n) u_prev + b_n g_hat with b_n = max(b, 1 / (n + 1)) after n earlier
  estimates (the first call takes u = g_hat), threaded through calls as the state (u, n).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import jax.numpy as jnp
from jax import lax

from gradlang.ops import Annotation
from gradlang.options import OptionError, option, parse
from gradlang.types import DType, TupleType, Type, scalar

from .base import listed

STATE = "inner"
"""The parameter (and last result) through which a stateful composition's export threads its
state."""


class CompositionEstimator:
    """An estimator of f(E g) and of its gradient."""

    name: ClassVar[str]
    hint: ClassVar[str]
    """How the message for an unknown estimator offers it."""
    stateful: ClassVar[bool] = False
    """It threads a state through calls: the `compose` op's second operand and second result,
    the export's parameter `STATE` (typed by `state_type`)."""

    def state_type(self, inner: Type) -> Type:
        """Its state's type, for an inner expectation of type `inner` (`stateful` only)."""
        raise NotImplementedError(f"{self.name} keeps no state")

    def warmup(self, horizons: float) -> int:
        """The calls after which its state has forgotten its start `horizons` times over
        (for `verify`); 0 without state."""
        return 0

    def describe(self, outer: str, inner: str, samples: int, default: bool) -> list[str]:
        """What it computes for `compose(outer, expect(inner, samples=...))` (`explain`;
        `default`: by= was not written)."""
        raise NotImplementedError

    def bias(self, outer: str, samples: int) -> str:
        """Why it is biased by design (for `verify`)."""
        raise NotImplementedError

    def estimate(self, f: Callable[[Any], Any], g_hat: Any, *state: Any) -> Any:
        """The value f(u) with derivative J^T grad f(u) and, when `stateful`, the new state;
        `f(x)` evaluates the outer function with x as the inner expectation."""
        raise NotImplementedError


@dataclass(frozen=True)
class Plugin(CompositionEstimator):
    """f of this call's estimate."""

    name = "plugin"
    hint = "plugin"

    def describe(self, outer: str, inner: str, samples: int, default: bool) -> list[str]:
        return [f"compose: plug-in {outer}(g_hat), g_hat = the mean of {samples} draws of "
                f"{inner}, no state; gradient J^T grad {outer}(g_hat): biased for a nonlinear "
                f"{outer} (E {outer}(g_hat) != {outer}(E g_hat)); by=scgd(beta=0.1) tracks the "
                f"inner expectation instead"]

    def bias(self, outer: str, samples: int) -> str:
        return (f"the plug-in {outer}(g_hat) of {samples} inner samples: E f(g_hat) != f(E g) "
                f"(Jensen), a bias O(1/N)")

    def estimate(self, f: Callable[[Any], Any], g_hat: Any, *state: Any) -> Any:
        return f(g_hat)


@dataclass(frozen=True)
class Scgd(CompositionEstimator):
    """f of a moving average of the inner estimates."""

    name = "scgd"
    hint = "scgd(beta=...) (a moving average of the inner expectation)"
    stateful = True
    beta: float = option(0.1, most=1)
    """The moving average's step, in (0, 1]."""

    def state_type(self, inner: Type) -> TupleType:
        """(u, n): the moving average, typed as g's result, and how many estimates it
        averages."""
        return TupleType((inner, scalar(DType.F32)))

    def warmup(self, horizons: float) -> int:
        """The moving average forgets its start in about 1 / beta calls."""
        return math.ceil(horizons / self.beta)

    def describe(self, outer: str, inner: str, samples: int, default: bool) -> list[str]:
        why = " (the default; by=plugin for the plug-in)" if default else ""
        return [f"compose: moving-average inner estimate u <- (1 - b) u + b g_hat, g_hat = the "
                f"mean of {samples} draws of {inner}, b = max(beta={self.beta:g}, 1/n) at the "
                f"n-th call{why}",
                f"  state '{STATE}' = (u, n): an argument and the last result (start from zeros "
                f"and 0); gradient J^T grad {outer}(u) (SCGD): biased at finite beta, the "
                f"iterates converge"]

    def bias(self, outer: str, samples: int) -> str:
        return (f"scgd(beta={self.beta}) differentiates {outer} at a moving average u of the "
                f"inner estimates: grad f(u) != grad f(E g) for a random u (O(beta Var g_hat)), "
                f"and u holds this call's g_hat, correlated with its Jacobian (O(beta / N))")

    def tracked(self, g_hat: Any, state: tuple[Any, Any]) -> tuple[Any, tuple[Any, Any]]:
        """The moving average after this call's estimate and the new state (u, n + 1); no
        gradient flows into it."""
        u_prev, n = state
        b = jnp.maximum(self.beta, 1.0 / (n + 1.0))
        u = lax.stop_gradient((1.0 - b) * u_prev + b * g_hat)
        return u, (u, n + 1.0)

    def estimate(self, f: Callable[[Any], Any], g_hat: Any, *state: Any) -> Any:
        u, new_state = self.tracked(g_hat, state[0])
        return f(u + (g_hat - lax.stop_gradient(g_hat))), new_state


ESTIMATORS: dict[str, type[CompositionEstimator]] = {e.name: e for e in (Scgd, Plugin)}
"""Estimators of a composition by name."""


def estimator_of(by: Annotation) -> CompositionEstimator:
    """The estimator `by=` names, with its options (an unknown name or bad options raise
    OptionError)."""
    if by.name not in ESTIMATORS:
        raise OptionError(f"unknown estimator '{by.name}' for compose; expected "
                          f"{listed([e.hint for e in ESTIMATORS.values()], 'or')}")
    return parse(ESTIMATORS[by.name], by.options, f"estimator '{by.name}'", by.name)
