"""Antithetic estimators for Bernoulli draws, from one uniform per entry.

- `arm` (Yin & Zhou 2019, "ARM: Augment-REINFORCE-Merge"): u ~ U(0, 1) per entry, the
  antithetic draws 1[u > sigmoid(-logits)] and 1[u < sigmoid(logits)]; the gradient
  (f(z1) - f(z2)) (u - 1/2) per entry.
- `disarm` (Dong, Mnih & Tucker 2020, "DisARM"): b = 1[u < sigmoid(logits)] and
  b' = 1[1 - u < sigmoid(logits)]; the gradient 1/2 (f(b) - f(b')) (-1)^b' 1[b != b']
  sigmoid(|logits|) per entry (ARM with u integrated out given (b, b')).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .base import Branched, BranchedEstimator, per_entry


def _antithetic(key, logits):
    """u ~ U(0, 1) per entry and p = sigmoid(logits): the antithetic draws are 1[u < p] and
    1[u > 1 - p] (ARM's first, as ARM writes it)."""
    u = jax.random.uniform(key, jnp.shape(logits), logits.dtype)
    return u, jax.nn.sigmoid(logits)


def _arm_branches(key, opts, logits):
    u, p = _antithetic(key, logits)
    return jnp.stack([(u > 1 - p).astype(u.dtype), (u < p).astype(u.dtype)]), u


def _arm_coefficients(f, z, u, opts, logits):
    return (per_entry(f[:, 0] - f[:, 1], u) * (u - 0.5),)


def _disarm_branches(key, opts, logits):
    u, p = _antithetic(key, logits)
    return jnp.stack([(u < p).astype(u.dtype), (1 - u < p).astype(u.dtype)]), None


def _disarm_coefficients(f, z, aux, opts, logits):
    b, b2 = z[:, 0], z[:, 1]
    sign = 1 - 2 * b2
    return (per_entry(0.5 * (f[:, 0] - f[:, 1]), b) * sign * (b != b2)
            * jax.nn.sigmoid(jnp.abs(logits)),)


class Arm(BranchedEstimator):
    name = "arm"
    label = "ARM (antithetic pair)"
    families = {"Bernoulli": Branched(2, (0, 1), _arm_branches, _arm_coefficients)}
    batched = True
    aux = ()
    """The uniforms u."""


class Disarm(BranchedEstimator):
    name = "disarm"
    label = "DisARM (antithetic pair)"
    families = {"Bernoulli": Branched(2, (0, 1), _disarm_branches, _disarm_coefficients)}
    batched = True
