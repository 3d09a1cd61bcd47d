"""The score-function estimator (REINFORCE, Williams 1992): the draw carries no gradient; its
log-probability, times the costs it is credited with minus a baseline, does (the surrogate
pass and op). Baselines: `auto` (leave-one-out when the expectation has several samples),
`none`, `loo` (Kool et al. 2019, RLOO), `grpo` (group-normalized advantages, Shao et al. 2024;
biased), `ma` (a moving average of the value with `decay`, carried as state) and `vimco` (Mnih
& Rezende 2016, in logmeanexp scopes). `credit=whole` credits the draw with every cost
instead of those downstream of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from jax import lax

from gradlang.distributions import DistSpec
from gradlang.ops import Annotation, SampleParams
from gradlang.options import option

from .base import SiteEstimator

BASELINES = ("auto", "none", "loo", "grpo", "ma", "vimco")
CREDIT = ("downstream", "whole")
"""What a score-function draw is credited with: the costs that depend on it, or all of them."""


@dataclass(frozen=True)
class ScoreOptions:
    baseline: str = option("auto", choices=BASELINES)
    decay: float | None = option(None, "positive", below=1)
    """The moving average's decay (baseline=ma only; 0.9 by default)."""
    credit: str | None = option(None, "choice", choices=CREDIT, plural="credit")

    def __post_init__(self) -> None:
        if self.baseline == "ma" and self.decay is None:
            object.__setattr__(self, "decay", 0.9)

    def check(self) -> str | None:
        if self.decay is not None and self.baseline != "ma":
            return "option 'decay' of 'score' needs baseline=ma (a moving average)"
        return None


class Score(SiteEstimator):
    name = "score"
    label = "score function"
    Options = ScoreOptions
    role = "score"
    nested = ""  # DiCE: the magic box keeps every derivative (the outer term: surrogate)

    def problem(self, spec: DistSpec) -> str | None:
        if spec.fixed_support:
            return None
        return (f"cannot use 'score' on {spec.name}: its support depends on its parameters, "
                f"so the score function misses the boundary terms and is biased; use reparam")

    def bias(self, e: Annotation, where: str) -> str | None:
        if e.option("baseline") == "grpo":
            return f"the GRPO baseline at {where} scales the gradient by about 1/std"
        return None

    def cost(self, e: Annotation, size: int | None) -> str:
        return "1 draw + log_prob"

    def sample(self, key, d, site: SampleParams, sampling):
        params = tuple(lax.stop_gradient(p) for p in d.params)
        return lax.stop_gradient(d.family.sample(key, *params, shape=d.batch))
