"""The Rao-Blackwellized score function (Liu, Regier, Tripuraneni, Jordan & McAuliffe 2019,
"Rao-Blackwellized Stochastic Gradients for Discrete Distributions"; Storchastic's
`RaoBlackwellSF`) for a categorical draw (a branched estimator).

The k most probable categories C (at the current parameters, no noise) are summed exactly and
one category z is drawn from the others:

    E f = sum_{c in C} p(c) f(c) + (1 - P) E[f(z) | z not in C],   P = p(C),

so the estimate sum_c p(c) f(c) + (1 - P) f(z) has the expectation's value, with the top
categories' share exact. Its gradient with respect to the logits,

    sum_{c in C} p(c) (f(c) - b) d log p(c) + (1 - P) (f(z) - b) d log p(z),

follows from d(1 - P) = -sum_c p(c) d log p(c) and d log p(z | z not in C) = d log p(z) -
d log(1 - P); the b terms have mean zero (E[(1 - P) d log p(z) | not C] = d(1 - P)), so it is
unbiased for any b independent of z. `baseline=auto` takes the mean of the other samples' f(z)
when the expectation has two or more (`expect(..., samples=N)`); `none` takes b = 0. k + 1
evaluations per sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from gradlang.distributions import DistSpec
from gradlang.ops import Annotation
from gradlang.options import option

from .base import Branched, BranchedEstimator, listed
from .wor import flat, log_p_of

BASELINES = ("auto", "none")


def _branches(onehot: bool):
    """The k most probable categories, then one drawn from the others (shaped as the draw,
    whose batch has one element)."""
    def branches(key, opts, logits):
        batch, c = logits.shape[:-1], logits.shape[-1]
        flat = logits.reshape(c)
        top = jnp.argsort(-flat)[:opts["k"]]
        rest = jnp.where(jnp.zeros(c, bool).at[top].set(True), -jnp.inf, flat)
        index = jnp.concatenate([top, jax.random.categorical(key, rest)[None]])
        if onehot:
            return jax.nn.one_hot(index, c, dtype=logits.dtype).reshape((-1,) + batch + (c,)), None
        return index.reshape((-1,) + batch), None
    return branches


def _weights(f, index, aux, opts, logits):
    """p(c) for each top category, 1 - P for the drawn one."""
    top = jnp.exp(log_p_of(logits, index[:, :-1])[0])
    return jnp.concatenate([top, 1 - jnp.sum(top, 1, keepdims=True)], 1)


def _coefficients(f, index, aux, opts, logits):
    w = _weights(f, index, aux, opts, logits)
    b = 0.0
    if opts.get("baseline") == "auto" and f.shape[0] > 1:
        drawn = f[:, -1]
        b = ((jnp.sum(drawn) - drawn) / (drawn.shape[0] - 1))[:, None]
    return (jnp.sum((w * (f - b))[..., None] * log_p_of(logits, index)[1], 1),)


@dataclass(frozen=True)
class RaoBlackwellOptions:
    k: int = option(4)
    baseline: str = option("auto", choices=BASELINES)
    """auto: leave-one-out over the expectation's samples when it has two or more."""


class RaoBlackwell(BranchedEstimator):
    name = "rao_blackwell"
    label = "Rao-Blackwellized score function"
    Options = RaoBlackwellOptions
    static_support = True
    families = {family: Branched(None, (), _branches(family == "OneHotCategorical"),
                                 flat(_coefficients), weights=flat(_weights))
                for family in ("Categorical", "OneHotCategorical")}

    def problem(self, spec: DistSpec) -> str | None:
        if spec.name in self.families:
            return None
        return (f"'{self.name}' sums a categorical draw's most probable categories: it is for "
                f"{listed(self.families)} draws, not {spec.name}; use score")

    def size(self, e: Annotation, spec: DistSpec, support: int | None) -> int | None:
        return e.option("k") + 1

    def fits(self, e: Annotation, support: int | None) -> str | None:
        k = e.option("k")
        if k < 1 or k >= support:
            return (f"{self.name}(k={k}) sums k categories and draws one of the others: it needs "
                    f"1 <= k < {support} (the number of categories; enum sums them all)")
        return None

    def cost(self, e: Annotation, size: int | None) -> str:
        return f"x{size} evaluations ({size - 1} exact + 1 draw)"
