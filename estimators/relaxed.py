"""Continuous relaxations of discrete draws (biased by design: they differentiate a relaxed
draw, not the expectation).

- `gumbel(tau)`: Gumbel-softmax / binary Concrete (Jang, Gu & Poole 2017; Maddison, Mnih & Teh
  2017): the draw is replaced by softmax((logits + Gumbel noise) / tau).
- `st_gumbel(tau)`: straight-through Gumbel: the hard draw forward, the relaxed draw's
  gradient backward.
"""

from __future__ import annotations

from dataclasses import dataclass

from gradlang.distributions import DistSpec
from gradlang.ops import Annotation, SampleParams
from gradlang.options import option
from gradlang.runtime.distributions import gumbel_softmax_sample, relaxed_bernoulli_sample

from .base import SiteEstimator


@dataclass(frozen=True)
class Temperature:
    tau: float = option(1.0)


class Gumbel(SiteEstimator):
    name = "gumbel"
    label = "Gumbel-softmax"
    Options = Temperature
    relaxed = True
    nested = ""  # the relaxation's derivatives, biased by design as its first one
    model_forward = False
    hard = False
    relaxation = "the Gumbel-softmax relaxation"

    def problem(self, spec: DistSpec) -> str | None:
        if spec.relaxable:
            return None
        hint = "; draw a OneHotCategorical instead" if spec.name == "Categorical" else ""
        return (f"'{self.name}' relaxes Bernoulli and OneHotCategorical draws, not "
                f"{spec.name}" + hint)

    def bias(self, e: Annotation, where: str) -> str | None:
        options = ", ".join(f"{k}={v}" for k, v in e.options)
        return f"{self.relaxation} at {where} ({options}) differentiates a relaxed draw"

    def cost(self, e: Annotation, size: int | None) -> str:
        return "1 relaxed draw"

    def sample(self, key, d, site: SampleParams, sampling):
        relaxed = relaxed_bernoulli_sample if d.family.name == "Bernoulli" else gumbel_softmax_sample
        return relaxed(key, d.params[0], site.estimator.option("tau"), self.hard)


class StraightThroughGumbel(Gumbel):
    name = "st_gumbel"
    label = "straight-through Gumbel"
    relaxation = "straight-through Gumbel"
    hard = True
    model_forward = True
