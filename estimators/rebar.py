"""REBAR and RELAX for Bernoulli draws: the score function with a control variate built from
continuous relaxations of the draw, corrected so that the estimate stays unbiased.

- `rebar(eta, tau)` (Tucker et al. 2017, "REBAR"): z = logits + logit(u), b = 1[z > 0], and
  z~ drawn from b's conditional (from v); the objective at b, sigmoid(z / tau) and
  sigmoid(z~ / tau); the gradient [f(b) - eta f(s~)] d log p(b) + eta d f(s) - eta d f(s~),
  the last two pathwise through the relaxations.
- `relax(control, eta, tau, lr)` (Grathwohl et al. 2018, "RELAX"): REBAR with the control
  variate c(s) = eta f(s) + r(psi, s), r a user function `control` of learned parameters psi
  (state) and the relaxed draw s, and one gradient step of size lr on psi per call that
  lowers the variance of the estimate (`relax_term`). With p = sigmoid(logits), the estimate
  of d/dlogits is

      g = [f(b) - c(s~)] (b - p) + d c(s) / dlogits - d c(s~) / dlogits,

  unbiased for any psi. Its surrogate adds sum (logits - stop) * stop([f(b) - c(s~)] (b - p))
  + c(s) - c(s~) - stop(c(s) - c(s~)) to the value f(b); psi steps against d/dpsi
  mean_samples sum_entries g^2 (the estimate's second moment, whose psi-dependent part is its
  variance). d f / dlogits through the relaxations comes from the `samples` op (the region
  differentiated against a zero shift of the logits).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax

from gradlang.options import option

from .base import Branched, BranchedEstimator, entries_sum, per_entry


def relaxations(logits, u, v, tau):
    """REBAR's draw from two uniforms: b = 1[z > 0] for z = logits + logit(u) (b ~
    Bernoulli(sigmoid(logits))), and the relaxations sigmoid(z / tau) and sigmoid(z~ / tau),
    z~ = logits + logit(u~) with u~ the conditional of u given b drawn from v (uniform on
    (1 - p, 1) when b = 1, on (0, 1 - p) when b = 0). Differentiable in the logits but for b."""
    p = jax.nn.sigmoid(logits)
    b = lax.stop_gradient((u > 1 - p).astype(logits.dtype))
    eps = jnp.finfo(logits.dtype).eps
    ut = jnp.clip(b * (1 - p + v * p) + (1 - b) * v * (1 - p), eps, 1 - eps)
    z = logits + jnp.log(u) - jnp.log1p(-u)
    zt = logits + jnp.log(ut) - jnp.log1p(-ut)
    return b, jax.nn.sigmoid(z / tau), jax.nn.sigmoid(zt / tau)


def _branches(key, opts, logits):
    eps = jnp.finfo(logits.dtype).eps
    u, v = jax.random.uniform(key, (2,) + jnp.shape(logits), logits.dtype, eps, 1 - eps)
    return jnp.stack(relaxations(logits, u, v, opts["tau"])), jnp.stack([u, v])


def _coefficients(f, z, aux, opts, logits):
    b = z[:, 0]
    return (per_entry(f[:, 0] - opts["eta"] * f[:, 2], b) * (b - jax.nn.sigmoid(logits)),)


def _pathwise(f, opts):
    return opts["eta"] * (f[:, 1] - f[:, 2])


@dataclass(frozen=True)
class RebarOptions:
    eta: float = option(1.0)
    tau: float = option(0.5)


class Rebar(BranchedEstimator):
    name = "rebar"
    label = "REBAR"
    Options = RebarOptions
    families = {"Bernoulli": Branched(3, (0,), _branches, _coefficients, live=True,
                                      pathwise=_pathwise)}
    batched = True
    aux = (2,)
    """The uniforms (u, v)."""


@dataclass(frozen=True)
class RelaxOptions:
    control: str = option("", "name")
    """The function r(psi, s) of the learned control variate."""
    eta: float = option(1.0)
    tau: float = option(0.5)
    lr: float = option(0.01)
    """The step size of psi's variance-reducing step."""


class Relax(Rebar):
    name = "relax"
    label = "RELAX (learned control variate)"
    Options = RelaxOptions
    families = {"Bernoulli": Branched(3, (0,), _branches, _coefficients, live=True)}
    shifted = True
    control = True
    stateless = "rebar"

    def control_term(self, family, control, psi, f, z, aux, params, df, opts):
        return relax_term(control, psi, f, z, aux, params[0], df, opts)


def relax_term(control: Callable, psi, f, z, aux, logits, df, opts: dict):
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
