"""Lowering of `compose`: f of the inner expectation's estimate, by the op's estimator
(`estimators.compose`), differentiated as J^T grad f(u) for the estimate u it evaluates f at."""

from __future__ import annotations

from typing import Any

from gradlang.estimators.compose import estimator_of
from gradlang.ir import Op


def compose_rule(ctx, op: Op, g_hat: Any, *state: Any) -> Any:
    """The value f(u) with derivative J^T grad f(u); with a stateful estimator, also the new
    state."""
    (region,) = op.regions
    inner = op.operands[0]

    def outer(u: Any) -> Any:
        """f with `u` as the inner expectation."""
        ctx.env[inner] = u
        try:
            (value,) = ctx.region(region, ())
        finally:
            ctx.env[inner] = g_hat
        return value

    return estimator_of(op.params.by).estimate(outer, g_hat, *state)
