"""Sparse continuous relaxations of discrete draws (biased by design, as `gumbel`): the draw is
replaced by a sparse map of its Gumbel-perturbed logits onto the simplex, which can put
exactly zero weight on categories (and exactly 0 or 1 on a Bernoulli draw), and its gradient
is pathwise through that relaxed draw.

- `gumbel_sparsemax(tau)`: sparsemax((logits + G) / tau), sparsemax(z) = argmin_p ||p - z||^2
  over the simplex, the Euclidean projection (Martins & Astudillo 2016); as a relaxation of a
  categorical draw, Paulus et al. 2020 ("Gradient Estimation with Stochastic Softmax Tricks",
  appendix), Storchastic's `GumbelSparseMax`.
- `gumbel_entmax(tau, alpha)`: alpha-entmax((logits + G) / tau), argmax_p <p, z> + H_alpha(p)
  with Tsallis' entropy H_alpha (Peters, Niculae & Martins 2019), Storchastic's
  `GumbelEntmax`: alpha -> 1 is softmax (`gumbel`), alpha = 2 is sparsemax; 1 < alpha <= 2.

G is Gumbel noise per category. A Bernoulli(logits) draw is the second category of the
two-category draw with logits [0, logits]: the relaxation's second coordinate at
[G1, logits + G2] / tau, that is at [0, logits + L] / tau with L = G2 - G1 logistic noise.
As tau -> 0 the relaxed draw tends to the one-hot argmax, a draw of the distribution (the bias
vanishes), and, unlike softmax's, reaches it at a positive tau: the Jacobian is then zero and
so is the gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
from jax import Array, lax

from gradlang.ops import Annotation, SampleParams
from gradlang.options import option

from .relaxed import Gumbel, Temperature

SPARSEMAX, ENTMAX15 = 2.0, 1.5
"""The alphas whose entmax has a closed form by sorting (the others bisect)."""


# ---- the maps onto the simplex (over the last axis)


@partial(jax.custom_jvp, nondiff_argnums=(1,))
def entmax(z: Array, alpha: float) -> Array:
    """alpha-entmax over the last axis, 1 < alpha <= 2: p_i = [(alpha - 1) z_i - t]_+^(1 /
    (alpha - 1)), the threshold t making p sum to 1; exact by sorting for alpha = 2
    (sparsemax) and 1.5, by bisection otherwise. Its Jacobian (Peters et al. 2019, Prop. 5) is
    diag(s) - s s^T / sum(s), s_i = p_i^(2 - alpha) on the support (p_i > 0), 0 off it.

    entmax(z + c) = entmax(z): z is shifted to a maximum of 0. As p_max <= 1, the threshold
    is t >= -1, so an entry at or below -1 / (alpha - 1) gets 0; entries are raised to one
    below that, which changes no result and keeps the sorting algorithms' cumulative sums
    finite (-inf or -3e38 entries from a tiny temperature would overflow them)."""
    z = jnp.maximum(z - jnp.max(z, -1, keepdims=True), -1 / (alpha - 1) - 1)
    if alpha == SPARSEMAX:
        return _sparsemax(z)
    if alpha == ENTMAX15:
        return _entmax15(z)
    return _entmax_bisect(z, alpha)


@entmax.defjvp
def _entmax_jvp(alpha: float, primals, tangents):
    (z,), (dz,) = primals, tangents
    p = entmax(z, alpha)
    inside = p > 0
    s = jnp.where(inside, jnp.where(inside, p, 1) ** (2 - alpha), 0)
    return p, s * dz - s * jnp.sum(s * dz, -1, keepdims=True) / jnp.sum(s, -1, keepdims=True)


def sparsemax(z: Array) -> Array:
    """The Euclidean projection of z onto the simplex (last axis): entmax with alpha = 2."""
    return entmax(z, SPARSEMAX)


def _sorted_support(x: Array, threshold) -> Array:
    """The threshold t of a sorting algorithm: `threshold(xs, k)` gives the candidate t_k for
    each support size k = 1..d from the entries sorted in decreasing order xs; the support is
    the k largest entries for the largest k with t_k < xs_k."""
    xs = -jnp.sort(-x, -1)
    k = jnp.arange(1, x.shape[-1] + 1, dtype=x.dtype)
    t = threshold(xs, k)
    size = jnp.max(jnp.where(t < xs, k, 1), -1, keepdims=True).astype(jnp.int32)
    return jnp.take_along_axis(t, size - 1, -1)


def _sparsemax(z: Array) -> Array:
    """Martins & Astudillo (2016), Algorithm 1: t_k = (sum of the k largest - 1) / k."""
    return jnp.maximum(z - _sorted_support(z, lambda zs, k: (jnp.cumsum(zs, -1) - 1) / k), 0)


def _entmax15(z: Array) -> Array:
    """Peters et al. (2019), Algorithm 2: with x = z / 2 and the k largest x_(j), mean m_k and
    mean square q_k, t_k = m_k - sqrt((1 - k (q_k - m_k^2)) / k); p = [x - t]_+^2. Candidates
    with a negative radicand are never below xs_k."""
    def threshold(xs, k):
        m = jnp.cumsum(xs, -1) / k
        q = jnp.cumsum(xs * xs, -1) / k
        radicand = (1 - k * (q - m * m)) / k
        return jnp.where(radicand >= 0, m - jnp.sqrt(jnp.maximum(radicand, 0)), jnp.inf)

    x = z / 2
    return jnp.maximum(x - _sorted_support(x, threshold), 0) ** 2


def _entmax_bisect(z: Array, alpha: float) -> Array:
    """alpha-entmax of z (max z = 0) by bisection on theta, the threshold written as
    t = (alpha - 1)(max z + theta) - 1, so that p_i = (1 + d (z_i - theta))_+^(1 / d), d =
    alpha - 1, computed as exp(log1p(d (z_i - theta)) / d): exact and stable as alpha -> 1
    (it tends to exp(z_i - theta), softmax). Sum p decreases in theta; it is >= 1 at 0 (p_max =
    1) and <= 1 at (1 - n^-d) / d (p_max <= 1 / n, n categories). Each step halves the bracket
    (of width <= log n), so the dtype's mantissa bits plus two steps reach its resolution;
    the result is normalized to sum to 1."""
    d = alpha - 1
    n = z.shape[-1]

    def p(theta):
        u = d * (z - theta)
        inside = u > -1
        return jnp.where(inside, jnp.exp(jnp.log1p(jnp.where(inside, u, 0)) / d), 0)

    def step(_, bracket):
        lo, hi = bracket
        mid = (lo + hi) / 2
        above = jnp.sum(p(mid), -1, keepdims=True) >= 1
        return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

    lo = jnp.zeros(z.shape[:-1] + (1,), z.dtype)
    hi = jnp.full_like(lo, -jnp.expm1(-d * jnp.log(n)) / d)
    lo, _ = lax.fori_loop(0, jnp.finfo(z.dtype).nmant + 2, step, (lo, hi))
    out = p(lo)
    return out / jnp.sum(out, -1, keepdims=True)


def relaxed_sample(key, logits, bernoulli: bool, tau: float, alpha: float) -> Array:
    """entmax((logits + Gumbel noise) / tau) over the last axis, or for Bernoulli logits the
    second coordinate at [0, logits + Logistic noise] / tau. The perturbed logits are shifted
    to a maximum of 0 before the division, so that a tiny tau makes large negative or -inf
    entries (which get weight 0), never inf - inf."""
    logits = jnp.asarray(logits, jnp.result_type(float, logits))
    if bernoulli:
        noise = jax.random.logistic(key, logits.shape, logits.dtype)
        u = jnp.stack([jnp.zeros_like(logits), logits + noise], -1)
    else:
        u = logits + jax.random.gumbel(key, logits.shape, logits.dtype)
    p = entmax((u - lax.stop_gradient(jnp.max(u, -1, keepdims=True))) / tau, alpha)
    return p[..., 1] if bernoulli else p


# ---- the estimators


@dataclass(frozen=True)
class EntmaxOptions:
    tau: float = option(1.0)
    alpha: float = option(ENTMAX15, most=SPARSEMAX)

    def check(self) -> str | None:
        """alpha > 1 (alpha = 1 is softmax: `gumbel`); alpha <= 2 (`most`): above 2 the
        Jacobian's p_i^(2 - alpha) is unbounded at the support's edge."""
        if self.alpha > 1:
            return None
        return (f"option 'alpha' of 'gumbel_entmax' must be above 1 (alpha = 1 is softmax: "
                f"use gumbel), got {self.alpha}")


class GumbelSparsemax(Gumbel):
    name = "gumbel_sparsemax"
    label = "Gumbel-sparsemax"
    Options = Temperature
    relaxation = "the Gumbel-sparsemax relaxation"

    def alpha(self, e: Annotation) -> float:
        return SPARSEMAX

    def sample(self, key, d, site: SampleParams, sampling):
        e = site.estimator
        return relaxed_sample(key, d.params[0], d.family.name == "Bernoulli",
                              self.options(e).tau, self.alpha(e))


class GumbelEntmax(GumbelSparsemax):
    name = "gumbel_entmax"
    label = "Gumbel-entmax"
    Options = EntmaxOptions
    relaxation = "the Gumbel-entmax relaxation"

    def alpha(self, e: Annotation) -> float:
        return self.options(e).alpha
