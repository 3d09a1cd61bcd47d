"""What the front end knows of each distribution family (the JAX implementations live in
`gradlang.runtime.distributions`): constructor parameters, shapes, support and whether a
pathwise (reparameterized) sampler exists."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DistSpec:
    name: str
    params: tuple[str, ...]
    """Canonical constructor parameters, in positional order."""
    aliases: tuple[tuple[str, str], ...] = ()
    """Alternative parameter name -> the canonical one it replaces (`probs` -> `logits`)."""
    event: int = 0
    """Trailing axes of every parameter that are not batch axes (categories, components)."""
    onehot: bool = False
    """A draw has a trailing event axis of the categories' size (one-hot or simplex draws)."""
    integer: bool = False
    """Draws are i32 (class indices)."""
    reparam: bool = False
    finite: bool = False
    """Finite support: enumeration is possible."""
    relaxable: bool = False
    """Has a continuous relaxation (binary Concrete, Gumbel-softmax)."""
    fixed_support: bool = True
    """The support does not depend on the parameters (else the score function is biased:
    it misses the boundary terms of d/dθ ∫_{a(θ)}^{b(θ)})."""

    @property
    def discrete(self) -> bool:
        return self.finite or self.name == "Poisson"

    def canonical(self, name: str) -> str | None:
        """The canonical parameter a given argument name stands for (None if unknown)."""
        return name if name in self.params else dict(self.aliases).get(name)


_PROBS = (("probs", "logits"),)

DISTRIBUTIONS: dict[str, DistSpec] = {d.name: d for d in [
    DistSpec("Normal", ("loc", "scale"), reparam=True),
    DistSpec("LogNormal", ("loc", "scale"), reparam=True),
    DistSpec("Uniform", ("low", "high"), reparam=True, fixed_support=False),
    DistSpec("Exponential", ("rate",), reparam=True),
    DistSpec("Gamma", ("concentration", "rate"), reparam=True),
    DistSpec("Beta", ("concentration1", "concentration0"), reparam=True),
    DistSpec("Dirichlet", ("concentration",), event=1, onehot=True, reparam=True),
    DistSpec("Gumbel", ("loc", "scale"), reparam=True),
    DistSpec("Bernoulli", ("logits",), _PROBS, finite=True, relaxable=True),
    DistSpec("Categorical", ("logits",), _PROBS, event=1, integer=True, finite=True),
    DistSpec("OneHotCategorical", ("logits",), _PROBS, event=1, onehot=True, finite=True,
             relaxable=True),
    DistSpec("Poisson", ("rate",)),
    DistSpec("MixtureNormal", ("logits", "locs", "scales"), event=1),
]}

KL_PAIRS: frozenset[tuple[str, str]] = frozenset((n, n) for n in (
    "Normal", "LogNormal", "Uniform", "Exponential", "Gamma", "Beta", "Dirichlet", "Gumbel",
    "Bernoulli", "Categorical", "OneHotCategorical", "Poisson"))
"""Pairs (p, q) with a closed-form KL(p || q)."""
