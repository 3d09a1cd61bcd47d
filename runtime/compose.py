"""Lowering of `compose`: f of a tracked inner estimate, differentiated as J^T grad f(u).

With ĝ the inner expectation's estimate of this call (its derivative is the inner estimators'
Jacobian J) and u the estimate f is evaluated at, f's argument is

    sg(u) + ĝ - sg(ĝ)

(sg: stop_gradient): its value is u, its derivative that of ĝ, so reverse mode gives
J^T grad f(u) (plus the derivative of f in its other arguments). `plugin` takes u = ĝ;
`scgd(beta=b)` the moving average u = (1 - b_n) u_prev + b_n ĝ with b_n = max(b, 1 / (n + 1))
after n earlier estimates (the first call takes u = ĝ), and returns (u, n + 1) as the new state.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax import lax

from gradlang.ir import Op


def tracked(beta: float, g_hat: Any, state: tuple[Any, Any]) -> tuple[Any, tuple[Any, Any]]:
    """The moving average after this call's estimate and the new state (u, n + 1); no
    gradient flows into it."""
    u_prev, n = state
    b = jnp.maximum(beta, 1.0 / (n + 1.0))
    u = lax.stop_gradient((1.0 - b) * u_prev + b * g_hat)
    return u, (u, n + 1.0)


def compose_rule(ctx, op: Op, g_hat: Any, *state: Any) -> Any:
    """The value f(u) with derivative J^T grad f(u); with scgd, also the new state."""
    (region,) = op.regions
    if op.params.by.name != "scgd":  # plugin: f(ĝ) as it is
        (value,) = ctx.region(region, ())
        return value
    u, new_state = tracked(op.params.by.option("beta"), g_hat, state[0])
    inner = op.operands[0]
    ctx.env[inner] = u + (g_hat - lax.stop_gradient(g_hat))
    try:
        (value,) = ctx.region(region, ())
    finally:
        ctx.env[inner] = g_hat
    return value, new_state
