"""What every gradient estimator of a random choice declares, in one class per estimator.

An estimator (`z ~ d with NAME(options)`) is a `SiteEstimator` subclass in its own module of
this package: its options (a frozen dataclass, `gradlang.options`), the distributions it applies
to (from their capabilities, `DistSpec`), what it adds to the surrogate (`role`), how many
values of its draw the objective is evaluated at and the functions that weigh them (`Branched`),
its auxiliary noise and shifts, how it draws at run time (`sample`), its label in `explain` and,
when it is biased by design, why (`verify`). The estimators pass, the surrogate pass, the
lowering, `explain` and `verify` read these classes through `estimators.REGISTRY`; none of them
lists estimators by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax import lax

from gradlang.distributions import DistSpec
from gradlang.ops import Annotation, SampleParams
from gradlang.options import NoOptions, OptionError, parse, rendered


@dataclass(frozen=True)
class Branched:
    """How a branched estimator evaluates the objective at several values of one draw (its
    branches, on axis 1 of the `samples` region's results) and forms the draw's gradient, a
    weighted difference of those evaluations (`runtime.branched.weak_derivative`).

    `branches(key, opts, *params) -> (values [size, *batch], aux)`: the draw's value in every
    branch, all from the draw's own key. `coefficients(f, z, aux, opts, *params)`: one array per
    distribution parameter, from the objective's values f [n, size], the draw's values z [n,
    size, *batch] and the auxiliary noise (per sample)."""

    size: int | None
    """Evaluations per sample (None: the estimator's option `k`)."""
    draws: tuple[int, ...]
    """The branches that are draws of the distribution (the value's estimate averages them)."""
    branches: Callable
    coefficients: Callable
    live: bool = False
    """The branches are differentiable functions of the parameters (relaxations)."""
    pathwise: Callable | None = None
    """`pathwise(f, opts)`: a term whose derivative is added (minus its stopped value)."""
    weights: Callable | None = None
    """`weights(f, z, aux, opts, *params) -> [n, size]`: how the branches' values make the
    value's estimate (None: the mean of the `draws` branches)."""

    def weighting(self, f, z, aux, opts: dict, params) -> jax.Array:
        """The weight of each branch in the value's estimate, per sample (no gradient)."""
        if self.weights is not None:
            return lax.stop_gradient(self.weights(*lax.stop_gradient((f, z, aux)), opts, *params))
        w = jnp.zeros(f.shape[1], f.dtype).at[jnp.array(self.draws)].set(1 / len(self.draws))
        return jnp.broadcast_to(w, f.shape[:2])


class SiteEstimator:
    """A gradient estimator for random choices. Subclasses set the class attributes and
    override the methods that differ; one instance per estimator is registered."""

    name: ClassVar[str]
    label: ClassVar[str]
    """How `explain` names it."""
    Options: ClassVar[type] = NoOptions
    role: ClassVar[str] = "pathwise"
    """What it adds to the surrogate: `pathwise` (nothing: the draw is differentiable),
    `score` (its log-probability, credited with costs, with a baseline), `enum` (the
    log-probability of each enumerated value), `branched` (a weak derivative from several
    evaluations) or `dreg` (a shifted pathwise draw reweighted in logmeanexp scopes)."""
    families: ClassVar[Mapping[str, Branched]] = {}
    """For a branched estimator: per distribution family, how it branches."""
    batched: ClassVar[bool] = False
    """Its draw may have batch axes (a branched estimator whose evaluations do not multiply)."""
    aux: ClassVar[tuple[int, ...] | None] = None
    """The leading shape of the auxiliary noise its draw also yields (a second result of the
    sample op), None if none."""
    shifted: ClassVar[bool] = False
    """`samples` differentiates its evaluations with respect to a zero shift of the draw or
    of its parameters (DReG, RELAX)."""
    static_support: ClassVar[bool] = False
    """It needs the number of categories of its draw at compile time."""
    control: ClassVar[bool] = False
    """It takes a learned control variate, the function named by its option `control`
    (checked by the estimators pass: r(psi, s) -> f32 of parameters and a draw shaped as
    its own, relaxed or not), whose parameters psi are state of the export; the surrogate
    adds its `control_term`."""
    stateless: ClassVar[str] = ""
    """With `control`: the estimator to suggest where psi cannot be threaded through calls."""
    relaxed: ClassVar[bool] = False
    """It differentiates a continuous relaxation of a discrete draw."""
    nested: ClassVar[str] = "its estimate is built for first derivatives only"
    """Why its estimate cannot be differentiated again, as `grad(f, ...)(args)` in a body
    under a differentiated export needs ("" when it can: its derivatives of every order are
    those of a differentiable function of the parameters)."""
    model_forward: ClassVar[bool] = True
    """The program as compiled computes the model's value, so that `verify` may difference
    it for a reference (False: a relaxed draw's forward, or branches whose evaluations it
    must not difference; verify swaps the draw for a plain score-function one)."""

    def __repr__(self) -> str:
        return f"<estimator {self.name}>"

    @property
    def branched(self) -> bool:
        """It evaluates the objective at several values of its draw."""
        return self.role in ("branched", "enum")

    # ---- compile time

    def options(self, e: Annotation) -> Any:
        """The annotation's options, checked, as `Options` (raises OptionError)."""
        return parse(self.Options, e.options, f"estimator '{self.name}'", self.name)

    def complete(self, e: Annotation) -> Annotation:
        """The annotation with its defaults filled in (options already checked)."""
        return Annotation(self.name, rendered(self.options(e)), e.span)

    def problem(self, spec: DistSpec) -> str | None:
        """Why it cannot estimate gradients through a `spec` draw (None when it can)."""
        if self.families and spec.name not in self.families:
            return (f"'{self.name}' is an estimator for {listed(self.families)} draws, not "
                    f"{spec.name}; use score")
        return None

    def size(self, e: Annotation, spec: DistSpec, support: int | None) -> int | None:
        """The number of values of the draw the objective is evaluated at (branched ones)."""
        branched = self.families.get(spec.name)
        return None if branched is None else branched.size

    def fits(self, e: Annotation, support: int | None) -> str | None:
        """Why its options do not fit a draw with `support` values (None when they do)."""
        return None

    def bias(self, e: Annotation, where: str) -> str | None:
        """Why it is biased by design at the draw `where` (for `verify`), None if it is
        meant to be unbiased."""
        return None

    def cost(self, e: Annotation, size: int | None) -> str:
        """The evaluations it costs per sample (`size` for a branched one), for `explain`."""
        return f"x{size} evaluations" if size is not None else "1 draw"

    # ---- run time

    def sample(self, key, d, site: SampleParams, sampling) -> Any:
        """The draw's value (and its auxiliary noise when `aux`) from distribution `d`
        (`runtime.rules_random.Dist`) at `key`, for the sample op's `site` params (its
        estimator, slot and shift); `sampling` (`runtime.lower.Sampling`) holds the
        enumeration index and the shifts of the `samples` op being lowered."""
        return d.family.sample(key, *d.params, shape=d.batch)


class BranchedEstimator(SiteEstimator):
    """An estimator that evaluates the objective at several values of its draw, each from
    the draw's own key, and adds its weak derivative (`runtime.branched.weak_derivative`)."""

    role = "branched"

    def sample(self, key, d, site: SampleParams, sampling):
        """The draw's value in the branch being evaluated (and its noise when `aux`)."""
        how = self.families[d.family.name]
        params = tuple(jnp.broadcast_to(p, d.batch + jnp.shape(p)[jnp.ndim(p) - r:])
                       for p, r in zip(d.params, d.family.param_event_ranks))
        if self.shifted:  # RELAX: the parameters' zero shift
            params = tuple(p + sampling.shifts[site.shift] for p in params)
        if not how.live:
            params = lax.stop_gradient(params)
        values, aux = how.branches(key, dict(site.estimator.options), *params)
        value = values[sampling.enum_index[site.slot]]
        return value if self.aux is None else (value, aux)

    def control_term(self, family: str, control: Callable, psi, f, z, aux, params: list, df,
                     opts: dict) -> tuple[jax.Array, Any]:
        """With `control`: the surrogate's term per sample, of value 0 and whose derivative
        is the estimate of the gradient through the draw, and psi after one step against
        the estimate's variance. `family` names the draw's distribution, f [n, size] are the
        objective's values, z [n, size, *batch] the draw's, aux its noise and params its
        distribution's parameters (per sample), df d f / d shift per branch when `shifted`
        (else None), `control(psi, s)` the user's r."""
        raise NotImplementedError(f"{self.name} has no learned control variate")


def per_entry(x, like):
    """Per-sample values [n] broadcast against per-entry values [n, *batch]."""
    return x.reshape(x.shape + (1,) * (like.ndim - x.ndim))


def entries_sum(x):
    """Per sample (axis 0), the sum over the other axes."""
    return jnp.sum(x.reshape(x.shape[0], -1), -1)


def listed(names, last: str = "and") -> str:
    """"a, b and c" (or `last` before the last name)."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {last} {names[-1]}"


__all__ = ["Branched", "BranchedEstimator", "OptionError", "SiteEstimator"]
