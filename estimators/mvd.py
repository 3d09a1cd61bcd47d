"""Measure-valued derivatives, first order (Pflug 1989; Mohamed et al. 2020, "Monte Carlo
Gradient Estimation in Machine Learning", section 6): each parameter's derivative of the
density is written as c (p+ - p-), a difference of two distributions, and the objective is
evaluated at a draw of each.

- Normal(loc, scale): the draw, loc +/- scale Rayleigh (the positive and negative parts of
  d/dloc, each of mass 1 / (scale sqrt(2 pi))), loc + scale * double-sided Maxwell (the
  positive part of d/dscale, mass 1 / scale; its negative part is the Normal itself).
- Bernoulli(logits): the draw, 1 and 0 (d/dp = f(1) - f(0), times dp/dlogits = p (1 - p)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gradlang.distributions import DistSpec

from .base import Branched, BranchedEstimator, listed


def _normal_branches(key, opts, loc, scale):
    k_eps, k_ray, k_max, k_sign = jax.random.split(key, 4)
    shape = jnp.broadcast_shapes(jnp.shape(loc), jnp.shape(scale))
    dtype = jnp.result_type(loc, scale)
    eps = jax.random.normal(k_eps, shape, dtype)
    rayleigh = jnp.sqrt(-2 * jnp.log(jax.random.uniform(k_ray, shape, dtype,
                                                         minval=jnp.finfo(dtype).tiny)))
    maxwell = jnp.linalg.norm(jax.random.normal(k_max, (3,) + shape, dtype), axis=0)
    sign = jnp.where(jax.random.bernoulli(k_sign, 0.5, shape), 1.0, -1.0).astype(dtype)
    return jnp.stack([loc + scale * eps, loc + scale * rayleigh, loc - scale * rayleigh,
                      loc + scale * sign * maxwell]), None


def _normal_coefficients(f, z, aux, opts, loc, scale):
    return (f[:, 1] - f[:, 2]) / (scale * jnp.sqrt(2 * jnp.pi)), (f[:, 3] - f[:, 0]) / scale


def _bernoulli_branches(key, opts, logits):
    u = jax.random.uniform(key, jnp.shape(logits), logits.dtype)
    z = (u < jax.nn.sigmoid(logits)).astype(logits.dtype)
    return jnp.stack([z, jnp.ones_like(z), jnp.zeros_like(z)]), None


def _bernoulli_coefficients(f, z, aux, opts, logits):
    p = jax.nn.sigmoid(logits)
    return (p * (1 - p) * (f[:, 1] - f[:, 2]),)


class MeasureValued(BranchedEstimator):
    name = "mvd"
    label = "measure-valued derivative"
    model_forward = False
    families = {"Normal": Branched(4, (0,), _normal_branches, _normal_coefficients),
                "Bernoulli": Branched(3, (0,), _bernoulli_branches, _bernoulli_coefficients)}

    def problem(self, spec: DistSpec) -> str | None:
        if spec.name in self.families:
            return None
        return (f"measure-valued derivatives are implemented for {listed(self.families)}, not "
                f"{spec.name}; use score" + (" or reparam" if spec.reparam else ""))
