"""RELAX (Grathwohl et al. 2018) for a Bernoulli draw: REBAR's estimator with the control
variate c(s) = eta f(s) + r(psi, s), r a user function of learned parameters psi and the
relaxed draw s, and one gradient step on psi per call that lowers the variance of the
estimate.

With b the draw, s = sigmoid(z / tau) and s~ = sigmoid(z~ / tau) its relaxations
(`runtime.branched.relaxations`) and p = sigmoid(logits), the estimate of d/dlogits is

    g = [f(b) - c(s~)] (b - p) + d c(s) / dlogits - d c(s~) / dlogits,

unbiased for any psi. Its surrogate adds sum (logits - stop) * stop([f(b) - c(s~)] (b - p)) +
c(s) - c(s~) - stop(c(s) - c(s~)) to the value f(b). psi then takes one step of size lr
against d/dpsi mean_samples sum_entries g^2 (the estimate's second moment, whose psi-dependent
part is its variance); d f / dlogits through the relaxations comes from the `samples` op
(the region differentiated against a zero shift of the logits).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from .branched import entries_sum, per_entry, relaxations


def relax(control: Callable, psi, f, z, aux, logits, df, opts: dict):
    """The surrogate's RELAX term per sample and psi after one variance step. f [n, 3] are the
    objective's values at (b, s, s~), z [n, 3, *batch] the draw's values there (s and s~
    differentiable in the logits), aux [n, 2, *batch] the uniforms (u, v), df [n, 3, *batch]
    d f / dlogits in each branch, `control(psi, s)` the user's r."""
    eta, tau, lr = opts["eta"], opts["tau"], opts["lr"]
    r = jax.vmap(control, in_axes=(None, 0))
    b = lax.stop_gradient(z[:, 0])
    p = jax.nn.sigmoid(lax.stop_gradient(logits))
    fixed = lax.stop_gradient(psi)
    c1 = eta * f[:, 1] + r(fixed, z[:, 1])
    c2 = eta * f[:, 2] + r(fixed, z[:, 2])
    score = per_entry(lax.stop_gradient(f[:, 0] - c2), b) * (b - p)
    term = (entries_sum((logits - lax.stop_gradient(logits)) * score)
            + c1 - c2 - lax.stop_gradient(c1 - c2))

    f, df, u, v, lg = lax.stop_gradient((f, df, aux[:, 0], aux[:, 1], logits))

    def estimate(psi):
        """g, d/dlogits per entry and sample, as a function of psi."""
        def r_difference(lg):
            """sum r(psi, s) - r(psi, s~), and r(psi, s~) per sample."""
            _, s, s_tilde = relaxations(lg, u, v, tau)
            r_tilde = r(psi, s_tilde)
            return jnp.sum(r(psi, s) - r_tilde), r_tilde

        d_r, r_tilde = jax.grad(r_difference, has_aux=True)(lg)
        c_tilde = eta * f[:, 2] + r_tilde
        return per_entry(f[:, 0] - c_tilde, b) * (b - p) + eta * (df[:, 1] - df[:, 2]) + d_r

    step = jax.grad(lambda psi: jnp.mean(entries_sum(estimate(psi) ** 2)))(fixed)
    return term, jax.tree.map(lambda a, g: a - lr * g, fixed, step)
