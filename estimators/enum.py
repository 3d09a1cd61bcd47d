"""Enumeration: the objective is evaluated at every value of a finite draw (every combination
of the scope's enumerated draws, on axis 1 of the `samples` op's results), weighted by its
probability: the exact expectation over those draws, and so its exact gradient."""

from __future__ import annotations

from gradlang.distributions import DistSpec
from gradlang.ops import Annotation, SampleParams

from .base import SiteEstimator


class Enum(SiteEstimator):
    name = "enum"
    label = "enumeration"
    role = "enum"
    static_support = True

    def problem(self, spec: DistSpec) -> str | None:
        return None if spec.finite else f"cannot enumerate {spec.name}: its support is not finite"

    def size(self, e: Annotation, spec: DistSpec, support: int | None) -> int | None:
        return support

    def cost(self, e: Annotation, size: int | None) -> str:
        return f"x{size} evaluations (exact)"

    def sample(self, key, d, site: SampleParams, sampling):
        return d.family.enumerate_support(*d.params)[sampling.enum_index[site.slot]]
