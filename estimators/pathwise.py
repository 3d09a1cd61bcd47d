"""Pathwise estimators: the draw is a differentiable function of the distribution's parameters
and of parameter-free noise, and reverse mode differentiates through it.

- `reparam`: the reparameterization gradient, for families with a reparameterized sampler.
- `dreg` (Tucker, Lawson, Gu & Maddison 2018, "Doubly Reparameterized Gradient Estimators"):
  in a `logmeanexp(...)` scope (an importance-weighted bound), the draw's own log-density is
  taken with its parameters stopped and the pathwise derivative is reweighted by the squared
  normalized weights (the surrogate op's `dreg` operands); the draw carries a zero shift the
  `samples` op differentiates against.
"""

from __future__ import annotations

from gradlang.distributions import DistSpec
from gradlang.ops import SampleParams

from .base import SiteEstimator, listed


def why_not_pathwise(spec: DistSpec) -> str:
    if spec.discrete:
        return f"{spec.name} is discrete: there is no pathwise derivative"
    return f"{spec.name} has no reparameterized sampler"


class Reparam(SiteEstimator):
    name = "reparam"
    label = "pathwise (reparam)"
    nested = ""

    def problem(self, spec: DistSpec) -> str | None:
        if spec.reparam:
            return None
        alts = "score"
        if spec.relaxable:
            from . import REGISTRY  # the registry imports this module

            alts = listed(["score", *(e.name for e in REGISTRY.values() if e.relaxed)], "or")
        return f"cannot use '{self.name}' on {spec.name}: {why_not_pathwise(spec)}; use {alts}"


class Dreg(Reparam):
    name = "dreg"
    label = "pathwise, doubly reparameterized (DReG)"
    role = "dreg"
    shifted = True
    nested = "DReG stops the density's parameters for the first derivative only"

    def sample(self, key, d, site: SampleParams, sampling):
        return super().sample(key, d, site, sampling) + sampling.shifts[site.shift]
