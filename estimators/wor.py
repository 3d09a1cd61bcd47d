"""Estimators that evaluate the objective at k distinct values of a categorical draw, sampled
without replacement (branched estimators).

The k values are the top k of the perturbed log-probabilities G = log p + Gumbel noise (the
Gumbel-top-k trick: a sample of k categories without replacement, in order); kappa, the
(k+1)-th largest G (-inf when k is the number of categories), is the draw's auxiliary value.

- `swor` (Kool, van Hoof & Welling 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!",
  sampling without replacement): each sampled s gets the Horvitz-Thompson weight w_s = p(s) /
  q(s), q(s) = P(G_s > kappa) = 1 - exp(-exp(log p(s) - kappa)) (priority sampling: unbiased
  for sums over all categories). Value sum_s w_s f(s), gradient sum_s w_s f(s) d log p(s) (the
  paper's eq. 9): unbiased. With `baseline=builtin` (eq. 10), each sample's baseline is b_s =
  p(s) f(s) + sum_{s' != s} w_s' f(s'), built from the other samples: the gradient is sum_s w_s
  (f(s) - b_s) d log p(s), still unbiased because priority sampling's weights of distinct
  categories are uncorrelated (E[w_s w_s' 1[s, s' in S]] = p(s) p(s')), so the baseline terms'
  mean, sum_s p(s) f(s) d p(s) - sum_s' p(s') f(s') d p(s'), is zero. With
  `baseline=normalized` (eq. 11), the weights are normalized, W = sum_s w_s, and the gradient
  is sum_s (w_s / W) (f(s) - B) d log p(s), B = sum_s (w_s / W) f(s): lower variance, biased by
  design (as the self-normalized estimator of the paper).
- `unordered` (Kool, van Hoof & Welling 2020, "Estimating Gradients for Discrete Random
  Variables by Sampling without Replacement"): the unordered set estimator with its built-in
  baseline. With p(S) the probability of drawing the set S (in any order), R(S, s) =
  p_{D \\ s}(S \\ {s}) / p(S): value sum_s p(s) R(S, s) f(s); gradient
  sum_s p(s) R(S, s) d log p(s) (f(s) - b_s), b_s = p(s) f(s) + sum_{s' != s} p(s')
  R_{D \\ s}(S \\ {s}, s') f(s'), an estimate of E f whose mean given that s was drawn first
  is E f for every s. Unbiased. Set probabilities sum over the orderings of a set, so k is at
  most 5 (120 orderings).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from gradlang.distributions import DistSpec
from gradlang.ops import Annotation
from gradlang.options import option

from .base import Branched, BranchedEstimator, listed

WOR_BASELINES = ("none", "normalized", "builtin")
MAX_UNORDERED = 5
"""The largest k of the unordered set estimator (its set probabilities sum k! orderings)."""

def _top_k(key, logits, k: int):
    """The indices of the top k of log p + Gumbel (in order) and kappa, the next value."""
    logp = jax.nn.log_softmax(logits)
    g = logp + jax.random.gumbel(key, logp.shape, logp.dtype)
    top = jnp.argsort(-g)
    kappa = g[top[k]] if k < logp.shape[-1] else jnp.array(-jnp.inf, logp.dtype)
    return top[:k], kappa


def _branches(onehot: bool):
    """The draw's k values: category indices, or one-hot vectors (shaped as the draw, whose
    batch has one element)."""
    def branches(key, opts, logits):
        batch, c = logits.shape[:-1], logits.shape[-1]
        index, kappa = _top_k(key, logits.reshape(c), opts["k"])
        kappa = kappa.reshape(batch)
        if onehot:
            return jax.nn.one_hot(index, c, dtype=logits.dtype).reshape((-1,) + batch + (c,)), kappa
        return index.reshape((-1,) + batch), kappa
    return branches


def flat(f):
    """A branched estimator's function of (f [n, k], z, aux, opts, logits) on the draw's values
    and logits flattened to [n, k] category indices and [n, C] (their batch has one element;
    aux, if any, one value per sample). Shared with `rao_blackwell`."""
    def flat(values, z, aux, opts, logits):
        n, c = logits.shape[0], logits.shape[-1]
        index = z.reshape(n, -1, c).argmax(-1) if z.size == values.size * c else z.reshape(n, -1)
        out = f(values, index, None if aux is None else aux.reshape(n), opts, logits.reshape(n, c))
        return tuple(o.reshape(logits.shape) for o in out) if isinstance(out, tuple) else out
    return flat


def log_p_of(logits, index):
    """log p of each sampled category [n, k], and d log p(s) / d logits [n, k, C] (shared with
    `rao_blackwell`)."""
    logp = jax.nn.log_softmax(logits)
    picked = jnp.take_along_axis(logp, index, -1)
    return picked, jax.nn.one_hot(index, logp.shape[-1], dtype=logp.dtype) - jnp.exp(logp)[:, None]


def _ht_weights(f, z, kappa, opts, logits):
    """w_s = p(s) / q_kappa(s), normalized to sum to 1 with `baseline=normalized`."""
    picked = log_p_of(logits, z)[0]
    w = jnp.exp(picked - jnp.log(-jnp.expm1(-jnp.exp(picked - kappa[:, None]))))
    return w / jnp.sum(w, 1, keepdims=True) if opts.get("baseline") == "normalized" else w


def _swor_coefficients(f, z, kappa, opts, logits):
    w = _ht_weights(f, z, kappa, opts, logits)
    signal = f
    if opts.get("baseline") == "normalized":
        signal = f - jnp.sum(w * f, 1, keepdims=True)
    elif opts.get("baseline") == "builtin":  # f(s) - b_s, b_s = p(s) f(s) + sum_{s' != s} w_s' f(s')
        p = jnp.exp(log_p_of(logits, z)[0])
        signal = f * (1 - p + w) - jnp.sum(w * f, 1, keepdims=True)
    return (jnp.sum((w * signal)[..., None] * log_p_of(logits, z)[1], 1),)


def _log_set_probability(logp, excluded):
    """log P(drawing the categories with log-probabilities `logp` [..., m], in any order,
    without replacement, when the categories with log-probabilities `excluded` [..., e] are
    out of the draw): the sum over orderings of prod_i p_i / (1 - p(excluded) - sum_{j<i} p_j)."""
    m = logp.shape[-1]
    if m == 0:
        return jnp.zeros(logp.shape[:-1], logp.dtype)
    gone = jnp.sum(jnp.exp(excluded), -1, keepdims=True) if excluded.shape[-1] else 0.0
    terms = []
    for order in itertools.permutations(range(m)):
        lp = logp[..., list(order)]
        before = gone + jnp.cumsum(jnp.exp(lp), -1) - jnp.exp(lp)
        terms.append(jnp.sum(lp - jnp.log1p(-before), -1))
    return jax.nn.logsumexp(jnp.stack(terms), 0)


def _unordered_parts(z, logits):
    """Per sample: p(s) R(S, s) [n, k] and, for each first element s, the weights of
    b_s = p(s) f(s) + sum_{s' != s} p(s') R_{D \\ s}(S, s') f(s') [n, k, k]: an unbiased
    estimate of E f given that s was drawn first (its conditional mean is E f whatever s is,
    which is what makes it a baseline)."""
    picked = log_p_of(logits, z)[0]
    k = picked.shape[-1]
    whole = _log_set_probability(picked, picked[..., :0])
    first = []
    second = []
    for i in range(k):
        rest = [j for j in range(k) if j != i]
        without = _log_set_probability(picked[..., rest], picked[..., [i]])
        first.append(picked[..., i] + without - whole)
        row = []
        for j in range(k):
            if j == i:
                row.append(jnp.exp(picked[..., i]))
                continue
            others = [r for r in rest if r != j]
            lp = picked[..., j] + _log_set_probability(picked[..., others], picked[..., [i, j]]) - without
            row.append(jnp.exp(lp))
        second.append(jnp.stack(row, -1))
    return jnp.exp(jnp.stack(first, -1)), jnp.stack(second, -2)


def _unordered_weights(f, z, kappa, opts, logits):
    return _unordered_parts(z, logits)[0]


def _unordered_coefficients(f, z, kappa, opts, logits):
    weight, given_first = _unordered_parts(z, logits)
    baseline = jnp.sum(given_first * f[:, None, :], -1)
    return (jnp.sum((weight * (f - baseline))[..., None] * log_p_of(logits, z)[1], 1),)


@dataclass(frozen=True)
class SworOptions:
    k: int = option(4)
    baseline: str = option("none", choices=WOR_BASELINES)


class WithoutReplacement(BranchedEstimator):
    """k categories drawn without replacement (Gumbel-top-k); kappa is the auxiliary value."""

    aux = ()
    static_support = True

    def problem(self, spec: DistSpec) -> str | None:
        if spec.name in self.families:
            return None
        return (f"'{self.name}' draws categories without replacement: it is for "
                f"{listed(self.families)} draws, not {spec.name}; use score")

    def size(self, e: Annotation, spec: DistSpec, support: int | None) -> int | None:
        return e.option("k")

    def fits(self, e: Annotation, support: int | None) -> str | None:
        k = e.option("k")
        if k < 2 or k > support:
            return f"{self.name}(k={k}) needs 2 <= k <= {support} (the number of categories)"
        return None


class Swor(WithoutReplacement):
    name = "swor"
    label = "score function without replacement"
    Options = SworOptions

    def bias(self, e: Annotation, where: str) -> str | None:
        if e.option("baseline") != "normalized":
            return None
        return (f"swor's normalized weights at {where} (self-normalized importance sampling) "
                f"shrink the gradient")
    families = {family: Branched(None, (), _branches(family == "OneHotCategorical"),
                                 flat(_swor_coefficients), weights=flat(_ht_weights))
                for family in ("Categorical", "OneHotCategorical")}


@dataclass(frozen=True)
class UnorderedOptions:
    k: int = option(4)


class Unordered(WithoutReplacement):
    name = "unordered"
    label = "unordered set estimator"
    Options = UnorderedOptions

    def fits(self, e: Annotation, support: int | None) -> str | None:
        k = e.option("k")
        if k > MAX_UNORDERED and super().fits(e, support) is None:
            return (f"unordered(k={k}): the unordered set estimator sums over the k! orderings "
                    f"of its sample, so k is at most {MAX_UNORDERED}; use swor for larger k")
        return super().fits(e, support)
    families = {family: Branched(None, (), _branches(family == "OneHotCategorical"),
                                 flat(_unordered_coefficients), weights=flat(_unordered_weights))
                for family in ("Categorical", "OneHotCategorical")}
