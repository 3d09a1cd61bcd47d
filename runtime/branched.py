"""Branched estimators: the objective is evaluated at several values of one draw (its
branches, on axis 1 of the `samples` region's results), and the draw's gradient is a weighted
difference of those evaluations, added to the surrogate as sum (p - stop(p)) * coefficient
for each parameter p of the draw's distribution.

Each estimator gives `branches(key, opts, *params) -> (values [size, *batch], aux)`, the draw's
value in every branch (all from the draw's own key, so every branch sees the same noise), and
`coefficients(f, z, aux, opts, *params) -> one array per parameter` from the objective's values
f [n, size], the draw's values z [n, size, *batch] and the auxiliary noise (per sample); `opts`
are the estimator's options. The value's estimate averages the branches listed in `draws`
(each is a draw of the distribution). Branches of `live` estimators carry the gradient of the
parameters (their relaxed values are differentiated), and `pathwise(f, opts)` adds a term of
those values (minus its stopped value).

- `mvd` (measure-valued derivatives, first order): Normal(loc, scale): the draw, loc +/- scale
  Rayleigh (the positive and negative parts of d/dloc, each of mass 1 / (scale sqrt(2 pi))),
  loc + scale * double-sided Maxwell (the positive part of d/dscale, mass 1 / scale; its
  negative part is the Normal itself). Bernoulli(logits): the draw, 1 and 0 (d/dp = f(1) -
  f(0), times dp/dlogits = p (1 - p)).
- `arm` (Yin & Zhou 2019, "ARM: Augment-REINFORCE-Merge"): u ~ U(0, 1) per entry, the
  antithetic draws 1[u > sigmoid(-logits)] and 1[u < sigmoid(logits)]; the gradient
  (f(z1) - f(z2)) (u - 1/2) per entry.
- `disarm` (Dong, Mnih & Tucker 2020, "DisARM"): b = 1[u < sigmoid(logits)] and
  b' = 1[1 - u < sigmoid(logits)]; the gradient 1/2 (f(b) - f(b')) (-1)^b' 1[b != b']
  sigmoid(|logits|) per entry (ARM with u integrated out given (b, b')).
- `rebar` (Tucker et al. 2017, "REBAR"): z = logits + logit(u), b = 1[z > 0], and z~ drawn
  from b's conditional (from v); the objective at b, sigmoid(z / tau) and sigmoid(z~ / tau);
  the gradient [f(b) - eta f(s~)] d log p(b) + eta d f(s) - eta d f(s~), the last two
  pathwise through the relaxations. `relax` (Grathwohl et al. 2018, "RELAX") replaces eta f by
  c(s) = eta f(s) + r(psi, s) with a learned r (`runtime.relax`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax


@dataclass(frozen=True)
class Branched:
    size: int | None
    """Evaluations per sample (None: the estimator's option `k`)."""
    draws: tuple[int, ...]
    branches: Callable
    coefficients: Callable
    aux: bool = False
    """The draw also yields auxiliary noise (the sample op has a second result)."""
    live: bool = False
    """The branches are differentiable functions of the parameters (relaxations)."""
    pathwise: Callable | None = None
    weights: Callable | None = None
    """`weights(f, z, aux, opts, *params) -> [n, size]`: how the branches' values make the
    value's estimate (None: the mean of the `draws` branches)."""

    def weighting(self, f, z, aux, opts: dict, params) -> jax.Array:
        """The weight of each branch in the value's estimate, per sample (no gradient)."""
        if self.weights is not None:
            return lax.stop_gradient(self.weights(*lax.stop_gradient((f, z, aux)), opts, *params))
        w = jnp.zeros(f.shape[1], f.dtype).at[jnp.array(self.draws)].set(1 / len(self.draws))
        return jnp.broadcast_to(w, f.shape[:2])


def per_entry(x, like):
    """Per-sample values [n] broadcast against per-entry values [n, *batch]."""
    return x.reshape(x.shape + (1,) * (like.ndim - x.ndim))


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


def _antithetic(key, logits):
    """u ~ U(0, 1) per entry and the two antithetic draws 1[u < p] (= 1[u > 1 - p] for ARM's
    first) as ARM writes them."""
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


def _rebar_branches(key, opts, logits):
    eps = jnp.finfo(logits.dtype).eps
    u, v = jax.random.uniform(key, (2,) + jnp.shape(logits), logits.dtype, eps, 1 - eps)
    return jnp.stack(relaxations(logits, u, v, opts["tau"])), jnp.stack([u, v])


def _rebar_coefficients(f, z, aux, opts, logits):
    b = z[:, 0]
    return (per_entry(f[:, 0] - opts["eta"] * f[:, 2], b) * (b - jax.nn.sigmoid(logits)),)


def _rebar_pathwise(f, opts):
    return opts["eta"] * (f[:, 1] - f[:, 2])


BRANCHED: dict[tuple[str, str], Branched] = {
    ("mvd", "Normal"): Branched(4, (0,), _normal_branches, _normal_coefficients),
    ("mvd", "Bernoulli"): Branched(3, (0,), _bernoulli_branches, _bernoulli_coefficients),
    ("arm", "Bernoulli"): Branched(2, (0, 1), _arm_branches, _arm_coefficients, aux=True),
    ("disarm", "Bernoulli"): Branched(2, (0, 1), _disarm_branches, _disarm_coefficients),
    ("rebar", "Bernoulli"): Branched(3, (0,), _rebar_branches, _rebar_coefficients, aux=True,
                                     live=True, pathwise=_rebar_pathwise),
    ("relax", "Bernoulli"): Branched(3, (0,), _rebar_branches, _rebar_coefficients, aux=True,
                                     live=True),
}
"""Per (estimator, family): how the draw branches and how its gradient is formed."""


def weak_derivative(f, z, aux, params: list, est: Branched, opts: dict):
    """Per sample, the sum over the draw's parameters p (and their entries) of (p - stop(p))
    * coefficient, plus the estimator's pathwise term minus its value: its value is 0, its
    derivative the estimator (first order)."""
    coefs = est.coefficients(*lax.stop_gradient((f, z, aux)), opts,
                             *(lax.stop_gradient(p) for p in params))
    out = 0
    for p, c in zip(params, coefs):
        out = out + entries_sum((p - lax.stop_gradient(p)) * c)
    if est.pathwise is not None:
        term = est.pathwise(f, opts)
        out = out + term - lax.stop_gradient(term)
    return out


def entries_sum(x):
    """Per sample (axis 0), the sum over the other axes."""
    return jnp.sum(x.reshape(x.shape[0], -1), -1)
