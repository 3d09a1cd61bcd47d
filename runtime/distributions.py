"""Probability distribution families in pure JAX, used by the lowering rules.

Conventions:

* A family's parameters are positional, in the order of `Family.params`, and broadcast
  against each other like NumPy: one call describes a batch of distributions. The last
  `param_event_ranks[i]` axes of parameter i are component axes (the K classes of
  Categorical, the K components of MixtureNormal) and not part of the batch shape.
* `Family.aliases` maps alternative parameter names to (canonical name, conversion):
  `probs` becomes `logits`. Probabilities need not be normalized for Categorical,
  OneHotCategorical (logits are defined up to an additive constant).
* `sample(key, *params, shape=None)` draws one value per element of `shape` (default: the
  batch shape; it must broadcast against the batch shape) and returns `shape + event
  shape`. Gradients flow from the draw to the parameters exactly when `reparam` is set;
  the other samplers stop them.
* `log_prob(x, *params)` has the broadcast of x's batch part and the batch shape;
  `entropy(*params)` the batch shape, `mean(*params)` batch + event shape. Gamma, Beta
  and Dirichlet draws are clipped into the open support (no 0 or 1 from float underflow), so
  their log_prob stays finite. Outside the support, log_prob is -inf for
  continuous families and for Poisson (x < 0) and Categorical (index out of range); for
  Bernoulli, OneHotCategorical and non-integer Poisson counts it returns the natural
  extension of the formula (x * logits - softplus(logits), x . log_softmax(logits),
  the Gamma-function form) without checking.
* Sample dtypes: Categorical draws int32 class indices; every other family draws float
  values, including Bernoulli (0./1.), OneHotCategorical (one-hot vectors) and Poisson
  (integral counts as floats, so that gradient code can treat them uniformly).
* Categorical's mean is the expected class index. MixtureNormal(logits, locs, scales) is
  a mixture of K normals over the last axis: component weights softmax(logits), component
  k = Normal(locs[..., k], scales[..., k]); it has no closed-form entropy (None).
* `KL[(p, q)](p_params, q_params)` is the closed-form KL(p || q) over the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.special import betaln, digamma, gammaln, xlog1py, xlogy

from .numerics import softplus

Array = jax.Array
Shape = tuple[int, ...]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_EULER = 0.5772156649015329


@dataclass(frozen=True)
class Family:
    """One distribution family: its parameters, shape metadata and callables."""
    name: str
    params: tuple[str, ...]
    aliases: dict[str, tuple[str, Callable]]
    event_rank: int
    param_event_ranks: tuple[int, ...]
    sample_dtype: str
    reparam: bool
    discrete: bool
    support_size: Callable | None
    sample: Callable
    log_prob: Callable
    mean: Callable
    entropy: Callable | None
    enumerate_support: Callable | None = None


def batch_shape(family: Family, *params) -> Shape:
    """Broadcast of the parameters' shapes without their trailing component axes."""
    shapes = [jnp.shape(p)[:jnp.ndim(p) - r] for p, r in zip(params, family.param_event_ranks)]
    return jnp.broadcast_shapes(*shapes)


def _dtype(*params) -> jnp.dtype:
    return jnp.result_type(float, *params)


def _shape(family: Family, params, shape: Shape | None) -> Shape:
    return batch_shape(family, *params) if shape is None else tuple(shape)


def _support(inside, value) -> Array:
    return jnp.where(inside, value, -jnp.inf)


def _xlogp(p, logp) -> Array:
    """p * logp, 0 where p == 0 (also when logp = -inf), with finite gradients."""
    return p * jnp.where(p == 0, 0.0, logp)


def logit(p) -> Array:
    """log(p / (1 - p))."""
    return jnp.log(p) - jnp.log1p(-p)


def _normal_log_prob(x, loc, scale) -> Array:
    z = (x - loc) / scale
    return -0.5 * z * z - jnp.log(scale) - _HALF_LOG_2PI


def _normal_entropy(scale) -> Array:
    return 0.5 + _HALF_LOG_2PI + jnp.log(scale)


# -- continuous, reparameterized -------------------------------------------------------------

def _normal_sample(key, loc, scale, shape=None) -> Array:
    shape = _shape(NORMAL, (loc, scale), shape)
    return loc + scale * jax.random.normal(key, shape, _dtype(loc, scale))


def _lognormal_log_prob(x, loc, scale) -> Array:
    pos = x > 0
    safe = jnp.where(pos, x, 1.0)
    return _support(pos, _normal_log_prob(jnp.log(safe), loc, scale) - jnp.log(safe))


def _uniform_sample(key, low, high, shape=None) -> Array:
    shape = _shape(UNIFORM, (low, high), shape)
    return low + (high - low) * jax.random.uniform(key, shape, _dtype(low, high))


def _uniform_log_prob(x, low, high) -> Array:
    return _support((x >= low) & (x <= high), -jnp.log(high - low))


def _exponential_sample(key, rate, shape=None) -> Array:
    shape = _shape(EXPONENTIAL, (rate,), shape)
    return jax.random.exponential(key, shape, _dtype(rate)) / rate


def _exponential_log_prob(x, rate) -> Array:
    return _support(x >= 0, jnp.log(rate) - rate * x)


def _gamma_sample(key, concentration, rate, shape=None) -> Array:
    shape = _shape(GAMMA, (concentration, rate), shape)
    dtype = _dtype(concentration, rate)
    conc = jnp.broadcast_to(concentration, shape)
    return jnp.maximum(jax.random.gamma(key, conc, shape, dtype) / rate, jnp.finfo(dtype).tiny)


def _gamma_log_prob(x, concentration, rate) -> Array:
    lp = (xlogy(concentration, rate) + xlogy(concentration - 1, x) - rate * x
          - gammaln(concentration))
    return _support(x >= 0, lp)


def _gamma_entropy(concentration, rate) -> Array:
    a = concentration
    return a - jnp.log(rate) + gammaln(a) + (1 - a) * digamma(a)


def _beta_sample(key, concentration1, concentration0, shape=None) -> Array:
    shape = _shape(BETA, (concentration1, concentration0), shape)
    dtype = _dtype(concentration1, concentration0)
    k1, k0 = jax.random.split(key)
    # X = G1 / (G1 + G0) = sigmoid(log G1 - log G0), in log space: no 0 / 0
    lg1 = jax.random.loggamma(k1, jnp.broadcast_to(concentration1, shape), shape, dtype)
    lg0 = jax.random.loggamma(k0, jnp.broadcast_to(concentration0, shape), shape, dtype)
    finfo = jnp.finfo(dtype)
    return jnp.clip(jax.nn.sigmoid(lg1 - lg0), finfo.tiny, 1 - finfo.epsneg)


def _beta_log_prob(x, concentration1, concentration0) -> Array:
    a, b = concentration1, concentration0
    lp = xlogy(a - 1, x) + xlog1py(b - 1, -x) - betaln(a, b)
    return _support((x >= 0) & (x <= 1), lp)


def _beta_entropy(concentration1, concentration0) -> Array:
    a, b = concentration1, concentration0
    return (betaln(a, b) - (a - 1) * digamma(a) - (b - 1) * digamma(b)
            + (a + b - 2) * digamma(a + b))


def _dirichlet_sample(key, concentration, shape=None) -> Array:
    """Normalized Gamma draws, in log space (softmax of log-Gammas: no 0 / 0); gradients by
    implicit reparameterization of the Gammas (JAX's gamma sampler)."""
    shape = _shape(DIRICHLET, (concentration,), shape)
    k = jnp.shape(concentration)[-1]
    dtype = _dtype(concentration)
    conc = jnp.broadcast_to(concentration, shape + (k,))
    x = jax.nn.softmax(jax.random.loggamma(key, conc, shape + (k,), dtype), -1)
    return jnp.maximum(x, jnp.finfo(dtype).tiny)


def _dirichlet_log_prob(x, concentration) -> Array:
    a = concentration
    inside = jnp.all(x >= 0, -1)
    lp = jnp.sum(xlogy(a - 1, x), -1) + gammaln(jnp.sum(a, -1)) - jnp.sum(gammaln(a), -1)
    return _support(inside, lp)


def _dirichlet_entropy(concentration) -> Array:
    a = concentration
    a0 = jnp.sum(a, -1)
    k = jnp.shape(a)[-1]
    return (jnp.sum(gammaln(a), -1) - gammaln(a0) + (a0 - k) * digamma(a0)
            - jnp.sum((a - 1) * digamma(a), -1))


def _gumbel_sample(key, loc, scale, shape=None) -> Array:
    shape = _shape(GUMBEL, (loc, scale), shape)
    return loc + scale * jax.random.gumbel(key, shape, _dtype(loc, scale))


def _gumbel_log_prob(x, loc, scale) -> Array:
    z = (x - loc) / scale
    return -(z + jnp.exp(-z)) - jnp.log(scale)


# -- discrete -------------------------------------------------------------------------------

def _lead(values: Array, batch: Shape) -> Array:
    """Support values (n,) + event broadcast to (n,) + batch + event."""
    n, event = values.shape[0], values.shape[1:]
    values = values.reshape((n,) + (1,) * len(batch) + event)
    return jnp.broadcast_to(values, (n,) + batch + event)


def _bernoulli_sample(key, logits, shape=None) -> Array:
    shape = _shape(BERNOULLI, (logits,), shape)
    u = jax.random.uniform(key, shape, _dtype(logits))
    return (u < jax.nn.sigmoid(lax.stop_gradient(logits))).astype(_dtype(logits))


def _bernoulli_entropy(logits) -> Array:
    return softplus(logits) - logits * jax.nn.sigmoid(logits)


def _categorical_sample(key, logits, shape=None) -> Array:
    shape = _shape(CATEGORICAL, (logits,), shape)
    return jax.random.categorical(key, lax.stop_gradient(logits), shape=shape).astype(jnp.int32)


def _categorical_log_prob(x, logits) -> Array:
    lp = jax.nn.log_softmax(logits)
    k = lp.shape[-1]
    x = jnp.asarray(x).astype(jnp.int32)
    shape = jnp.broadcast_shapes(x.shape, lp.shape[:-1])
    x = jnp.broadcast_to(x, shape)
    inside = (x >= 0) & (x < k)
    idx = jnp.where(inside, x, 0)[..., None]
    picked = jnp.take_along_axis(jnp.broadcast_to(lp, shape + (k,)), idx, axis=-1)[..., 0]
    return _support(inside, picked)


def _categorical_mean(logits) -> Array:
    k = jnp.shape(logits)[-1]
    return jnp.sum(jax.nn.softmax(logits) * jnp.arange(k, dtype=_dtype(logits)), -1)


def _categorical_entropy(logits) -> Array:
    return -jnp.sum(_xlogp(jax.nn.softmax(logits), jax.nn.log_softmax(logits)), -1)


def _onehot_sample(key, logits, shape=None) -> Array:
    idx = _categorical_sample(key, logits, shape)
    return jax.nn.one_hot(idx, jnp.shape(logits)[-1], dtype=_dtype(logits))


def _onehot_log_prob(x, logits) -> Array:
    return jnp.sum(_xlogp(x, jax.nn.log_softmax(logits)), -1)


def _poisson_sample(key, rate, shape=None) -> Array:
    shape = _shape(POISSON, (rate,), shape)
    rate = jnp.broadcast_to(lax.stop_gradient(rate), shape)
    return jax.random.poisson(key, rate, shape).astype(_dtype(rate))


def _poisson_log_prob(x, rate) -> Array:
    return _support(x >= 0, xlogy(x, rate) - rate - gammaln(x + 1))


_POISSON_SWITCH = 20.0  # exact sum below, asymptotic expansion (error < 1e-6) above
_POISSON_TERMS = 80  # P(X >= 80) < 1e-18 for rate < 20


def _poisson_entropy(rate) -> Array:
    """-sum_k p_k log p_k summed over k < 80 for small rates; for large rates the expansion
    0.5 log(2 pi e rate) - 1/(12 rate) - 1/(24 rate^2) - 19/(360 rate^3)."""
    small = rate < _POISSON_SWITCH
    lam = jnp.where(small, rate, _POISSON_SWITCH)[..., None]
    k = jnp.arange(_POISSON_TERMS, dtype=_dtype(rate))
    lp = xlogy(k, lam) - lam - gammaln(k + 1)
    exact = -jnp.sum(_xlogp(jnp.exp(lp), lp), -1)
    big = jnp.where(small, _POISSON_SWITCH, rate)
    inv = 1 / big
    asym = (0.5 * jnp.log(2 * jnp.pi * jnp.e * big)
            - inv * (1 / 12 + inv * (1 / 24 + inv * 19 / 360)))
    return jnp.where(small, exact, asym)


def _mixture_sample(key, logits, locs, scales, shape=None) -> Array:
    shape = _shape(MIXTURE_NORMAL, (logits, locs, scales), shape)
    logits, locs, scales = (jnp.broadcast_to(lax.stop_gradient(p), shape + p.shape[-1:])
                            for p in jnp.broadcast_arrays(logits, locs, scales))
    kc, kn = jax.random.split(key)
    comp = jax.random.categorical(kc, logits, shape=shape)[..., None]
    loc = jnp.take_along_axis(locs, comp, axis=-1)[..., 0]
    scale = jnp.take_along_axis(scales, comp, axis=-1)[..., 0]
    return loc + scale * jax.random.normal(kn, shape, locs.dtype)


def _mixture_log_prob(x, logits, locs, scales) -> Array:
    x = jnp.asarray(x)[..., None]
    return jax.nn.logsumexp(jax.nn.log_softmax(logits) + _normal_log_prob(x, locs, scales), -1)


def _mixture_mean(logits, locs, scales) -> Array:
    weights, locs, _ = jnp.broadcast_arrays(jax.nn.softmax(logits), locs, scales)
    return jnp.sum(weights * locs, -1)


# -- the table ------------------------------------------------------------------------------

_PROBS_SOFTMAX = {"probs": ("logits", jnp.log)}
_PROBS_SIGMOID = {"probs": ("logits", logit)}

NORMAL = Family(
    "Normal", ("loc", "scale"), {}, 0, (0, 0), "f32", True, False, None, _normal_sample,
    _normal_log_prob, lambda loc, scale: jnp.broadcast_arrays(loc, scale)[0],
    lambda loc, scale: jnp.broadcast_arrays(_normal_entropy(scale), loc)[0])
LOGNORMAL = Family(
    "LogNormal", ("loc", "scale"), {}, 0, (0, 0), "f32", True, False, None,
    lambda key, loc, scale, shape=None: jnp.exp(_normal_sample(key, loc, scale, shape)),
    _lognormal_log_prob, lambda loc, scale: jnp.exp(loc + 0.5 * scale * scale),
    lambda loc, scale: loc + _normal_entropy(scale))
UNIFORM = Family(
    "Uniform", ("low", "high"), {}, 0, (0, 0), "f32", True, False, None, _uniform_sample,
    _uniform_log_prob, lambda low, high: 0.5 * (low + high),
    lambda low, high: jnp.log(high - low))
EXPONENTIAL = Family(
    "Exponential", ("rate",), {}, 0, (0,), "f32", True, False, None, _exponential_sample,
    _exponential_log_prob, lambda rate: 1 / rate, lambda rate: 1 - jnp.log(rate))
GAMMA = Family(
    "Gamma", ("concentration", "rate"), {}, 0, (0, 0), "f32", True, False, None,
    _gamma_sample, _gamma_log_prob, lambda concentration, rate: concentration / rate,
    _gamma_entropy)
BETA = Family(
    "Beta", ("concentration1", "concentration0"), {}, 0, (0, 0), "f32", True, False, None,
    _beta_sample, _beta_log_prob, lambda a, b: a / (a + b), _beta_entropy)
DIRICHLET = Family(
    "Dirichlet", ("concentration",), {}, 1, (1,), "f32", True, False, None, _dirichlet_sample,
    _dirichlet_log_prob, lambda a: a / jnp.sum(a, -1, keepdims=True), _dirichlet_entropy)
GUMBEL = Family(
    "Gumbel", ("loc", "scale"), {}, 0, (0, 0), "f32", True, False, None, _gumbel_sample,
    _gumbel_log_prob, lambda loc, scale: loc + _EULER * scale,
    lambda loc, scale: jnp.broadcast_arrays(jnp.log(scale) + _EULER + 1, loc)[0])
BERNOULLI = Family(
    "Bernoulli", ("logits",), _PROBS_SIGMOID, 0, (0,), "f32", False, True, lambda logits: 2,
    _bernoulli_sample, lambda x, logits: x * logits - softplus(logits),
    jax.nn.sigmoid, _bernoulli_entropy,
    lambda logits: _lead(jnp.array([0.0, 1.0], _dtype(logits)), jnp.shape(logits)))
CATEGORICAL = Family(
    "Categorical", ("logits",), _PROBS_SOFTMAX, 0, (1,), "i32", False, True,
    lambda logits: jnp.shape(logits)[-1], _categorical_sample, _categorical_log_prob,
    _categorical_mean, _categorical_entropy,
    lambda logits: _lead(jnp.arange(jnp.shape(logits)[-1], dtype=jnp.int32),
                         jnp.shape(logits)[:-1]))
ONEHOT_CATEGORICAL = Family(
    "OneHotCategorical", ("logits",), _PROBS_SOFTMAX, 1, (1,), "f32", False, True,
    lambda logits: jnp.shape(logits)[-1], _onehot_sample, _onehot_log_prob,
    jax.nn.softmax, _categorical_entropy,
    lambda logits: _lead(jnp.eye(jnp.shape(logits)[-1], dtype=_dtype(logits)),
                         jnp.shape(logits)[:-1]))
POISSON = Family(
    "Poisson", ("rate",), {}, 0, (0,), "f32", False, True, None, _poisson_sample,
    _poisson_log_prob, lambda rate: rate, _poisson_entropy)
MIXTURE_NORMAL = Family(
    "MixtureNormal", ("logits", "locs", "scales"), {}, 0, (1, 1, 1), "f32", False, False,
    None, _mixture_sample, _mixture_log_prob, _mixture_mean, None)

FAMILIES: dict[str, Family] = {f.name: f for f in (
    NORMAL, LOGNORMAL, UNIFORM, EXPONENTIAL, GAMMA, BETA, DIRICHLET, GUMBEL, BERNOULLI,
    CATEGORICAL, ONEHOT_CATEGORICAL, POISSON, MIXTURE_NORMAL)}


# -- KL divergences ---------------------------------------------------------------------------

def _kl_normal(p, q) -> Array:
    (m1, s1), (m2, s2) = p, q
    return jnp.log(s2 / s1) + (s1 * s1 + (m1 - m2) ** 2) / (2 * s2 * s2) - 0.5


def _kl_bernoulli(p, q) -> Array:
    (a,), (b,) = p, q
    return softplus(b) - softplus(a) + jax.nn.sigmoid(a) * (a - b)


def _kl_categorical(p, q) -> Array:
    (a,), (b,) = p, q
    lp, lq = jax.nn.log_softmax(a), jax.nn.log_softmax(b)
    pa = jax.nn.softmax(a)
    return jnp.sum(pa * jnp.where(pa == 0, 0.0, lp - lq), -1)


def _kl_exponential(p, q) -> Array:
    (a,), (b,) = p, q
    return jnp.log(a / b) + b / a - 1


def _kl_gamma(p, q) -> Array:
    (a1, b1), (a2, b2) = p, q
    return ((a1 - a2) * digamma(a1) - gammaln(a1) + gammaln(a2)
            + a2 * jnp.log(b1 / b2) + a1 * (b2 - b1) / b1)


def _kl_beta(p, q) -> Array:
    (a1, b1), (a2, b2) = p, q
    return (betaln(a2, b2) - betaln(a1, b1) + (a1 - a2) * digamma(a1)
            + (b1 - b2) * digamma(b1) + (a2 - a1 + b2 - b1) * digamma(a1 + b1))


def _kl_dirichlet(p, q) -> Array:
    (a,), (b,) = p, q
    a0 = jnp.sum(a, -1)
    return (gammaln(a0) - jnp.sum(gammaln(a), -1) - gammaln(jnp.sum(b, -1))
            + jnp.sum(gammaln(b), -1) + jnp.sum((a - b) * (digamma(a) - digamma(a0)[..., None]), -1))


def _kl_uniform(p, q) -> Array:
    (l1, h1), (l2, h2) = p, q
    return jnp.where((l2 <= l1) & (h1 <= h2), jnp.log((h2 - l2) / (h1 - l1)), jnp.inf)


def _kl_poisson(p, q) -> Array:
    (a,), (b,) = p, q
    return xlogy(a, a) - xlogy(a, b) - a + b


def _kl_gumbel(p, q) -> Array:
    (m1, s1), (m2, s2) = p, q
    t = s1 / s2
    return (jnp.log(s2 / s1) + _EULER * (t - 1) + (m1 - m2) / s2
            + jnp.exp((m2 - m1) / s2 + gammaln(1 + t)) - 1)


KL: dict[tuple[str, str], Callable] = {
    ("Normal", "Normal"): _kl_normal,
    ("LogNormal", "LogNormal"): _kl_normal,
    ("Bernoulli", "Bernoulli"): _kl_bernoulli,
    ("Categorical", "Categorical"): _kl_categorical,
    ("OneHotCategorical", "OneHotCategorical"): _kl_categorical,
    ("Exponential", "Exponential"): _kl_exponential,
    ("Gamma", "Gamma"): _kl_gamma,
    ("Beta", "Beta"): _kl_beta,
    ("Dirichlet", "Dirichlet"): _kl_dirichlet,
    ("Uniform", "Uniform"): _kl_uniform,
    ("Poisson", "Poisson"): _kl_poisson,
    ("Gumbel", "Gumbel"): _kl_gumbel,
}


# -- continuous relaxations -----------------------------------------------------------------

def _straight_through(hard: Array, soft: Array) -> Array:
    """Forward value exactly `hard`, gradient of `soft`."""
    return hard + (soft - lax.stop_gradient(soft))


def gumbel_softmax_sample(key, logits, tau, hard: bool) -> Array:
    """Relaxed one-hot sample softmax((logits + Gumbel noise) / tau) over the last axis;
    hard=True returns the one-hot argmax with the soft sample's (straight-through) gradient."""
    logits = jnp.asarray(logits)
    g = jax.random.gumbel(key, logits.shape, _dtype(logits))
    soft = jax.nn.softmax((logits + g) / tau, axis=-1)
    if not hard:
        return soft
    one_hot = jax.nn.one_hot(jnp.argmax(logits + g, -1), logits.shape[-1], dtype=soft.dtype)
    return _straight_through(one_hot, soft)


def relaxed_bernoulli_sample(key, logits, tau, hard: bool) -> Array:
    """Binary concrete sample sigmoid((logits + Logistic noise) / tau); hard=True returns
    the 0/1 threshold at 1/2 with the soft sample's (straight-through) gradient."""
    logits = jnp.asarray(logits)
    noise = jax.random.logistic(key, logits.shape, _dtype(logits))
    soft = jax.nn.sigmoid((logits + noise) / tau)
    if not hard:
        return soft
    return _straight_through((soft > 0.5).astype(soft.dtype), soft)
