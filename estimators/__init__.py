"""Gradient estimators for random choices, one class each (`estimators.base.SiteEstimator`);
`REGISTRY` maps each name to its estimator. The choice of estimator per draw is the estimators
pass (`gradlang.passes.estimators`), which also takes `auto(enum_max=N)`."""

from __future__ import annotations

from gradlang.options import unknown

from .arm import Arm, Disarm
from .base import Branched, BranchedEstimator, OptionError, SiteEstimator
from .enum import Enum
from .lax import Lax
from .mvd import MeasureValued
from .pathwise import Dreg, Reparam
from .rao_blackwell import RaoBlackwell
from .rebar import Rebar, Relax
from .relaxed import Gumbel, StraightThroughGumbel
from .score import Score
from .sparse import GumbelEntmax, GumbelSparsemax
from .wor import Swor, Unordered

REGISTRY: dict[str, SiteEstimator] = {e.name: e for e in (
    Reparam(), Score(), Gumbel(), StraightThroughGumbel(), GumbelSparsemax(), GumbelEntmax(),
    Enum(), MeasureValued(), Arm(), Disarm(), Dreg(), Rebar(), Relax(), Lax(), Swor(),
    Unordered(), RaoBlackwell())}
"""Every estimator of a random choice, by name (in the order `explain` and messages list them)."""


def lookup(name: str) -> SiteEstimator:
    """The estimator called `name`; OptionError (with a did-you-mean) if there is none."""
    if name in REGISTRY:
        return REGISTRY[name]
    raise OptionError(unknown("estimator", name, ["auto", *REGISTRY]))


__all__ = ["REGISTRY", "Branched", "BranchedEstimator", "OptionError", "SiteEstimator", "lookup"]
