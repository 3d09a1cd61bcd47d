"""LAX (Grathwohl, Choi, Wu, Roeder & Duvenaud 2018, "Backpropagation through the Void: Optimizing
control variates for black-box gradient estimation", section 3.1) for a continuous draw
rebuilt from standard noise, z = T(theta, eps) with eps of a parameter-free law: the score
function with a learned control variate c_psi, differentiated along that reparameterization,

    g = [f(z) - c_psi(z)] d/dtheta log p(z | theta) + d/dtheta c_psi(T(theta, eps)),

unbiased for any psi (E[c(z) d log p(z | theta)] = d/dtheta E[c(T(theta, eps))]). The objective
f is only evaluated, at the stopped draw: it may be a black box or not differentiable (a
comparison, a step). `lax(control, lr)`: c_psi(z) = r(psi, z), r a user function `control` of
learned parameters psi (state of the export) and the draw, and one gradient step of size lr on
psi per call against d/dpsi mean_samples sum_entries g^2 (the estimate's second moment, whose
psi-dependent part is its variance), g the estimate of the gradient with respect to the
distribution's parameters (`lax_term`).

The draw is the one branch of a branched estimator (the objective is evaluated once per
sample); its noise eps is its auxiliary result, from which `lax_term` rebuilds T(theta, eps)
differentiably in the parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from gradlang.distributions import DistSpec
from gradlang.ops import Annotation
from gradlang.options import option
from gradlang.runtime.distributions import FAMILIES

from .base import Branched, BranchedEstimator, entries_sum, listed, per_entry


@dataclass(frozen=True)
class Reparameterization:
    """A family drawn as z = transform(eps, *params) from standard noise eps = noise(key,
    shape, dtype), whose law does not depend on the parameters."""

    noise: Callable
    transform: Callable


REPARAMETERIZATIONS = {
    "Normal": Reparameterization(jax.random.normal, lambda eps, loc, scale: loc + scale * eps),
    "Exponential": Reparameterization(jax.random.exponential, lambda eps, rate: eps / rate),
}
"""The families LAX applies to, by name (the runtime's samplers draw them the same way)."""


def _branches(how: Reparameterization, key, opts, *params):
    """The draw (one branch) and its noise eps, from parameters broadcast to the batch."""
    shape = jnp.broadcast_shapes(*(jnp.shape(p) for p in params))
    eps = how.noise(key, shape, jnp.result_type(*params))
    return how.transform(eps, *params)[None], eps


def _scores(log_prob: Callable, f, z, aux, opts, *params):
    """Per distribution parameter, f d/dparam log p(z | params) per sample (the score
    function's coefficients: LAX's with c = 0). f [n, 1], z [n, 1, *batch], params [n, ...]."""
    grads = jax.grad(lambda ps: jnp.sum(jax.vmap(log_prob)(z[:, 0], *ps)))(params)
    return tuple(per_entry(f[:, 0], g) * g for g in grads)


def lax_term(control: Callable, psi, f, z, aux, params: list, how: Reparameterization,
             branched: Branched, opts: dict):
    """The surrogate's LAX term per sample and psi after one variance step. f [n, 1] is the
    objective's value at the draw z [n, 1, *batch] (stopped), aux [n, *batch] its noise eps,
    params the distribution's parameters per sample (differentiable), `control(psi, z)` the
    user's r. The term is sum_p (p - stop(p)) stop([f - c] d log p / dp) + c(T) - stop(c(T)),
    c(T) = r(psi, T(params, eps)): its value is 0, its derivative g."""
    r = jax.vmap(control, in_axes=(None, 0))
    fixed = lax.stop_gradient(psi)
    f, z, eps = lax.stop_gradient((f, z, aux))
    stopped = lax.stop_gradient(tuple(params))

    def c(psi, params):
        """c_psi(T(params, eps)) per sample, and its sum (whose gradient is per sample)."""
        values = r(psi, jax.vmap(how.transform)(eps, *params))
        return jnp.sum(values), values

    def score(c_values):
        """[f - c] d log p / dp per parameter p and sample."""
        return branched.coefficients(f - c_values[:, None], z, eps, opts, *stopped)

    _, live = c(fixed, tuple(params))
    coefficients = score(lax.stop_gradient(live))
    term = (sum(entries_sum((p - q) * k) for p, q, k in zip(params, stopped, coefficients))
            + live - lax.stop_gradient(live))

    def second_moment(psi):
        """mean_samples sum_entries g^2 over the parameters, as a function of psi."""
        d_c, values = jax.grad(partial(c, psi), has_aux=True)(stopped)
        return jnp.mean(sum(entries_sum((k + d) ** 2) for k, d in zip(score(values), d_c)))

    step = jax.grad(second_moment)(fixed)
    return term, jax.tree.map(lambda a, g: a - opts["lr"] * g, fixed, step)


@dataclass(frozen=True)
class LaxOptions:
    control: str = option("", "name")
    """The function r(psi, z) of the learned control variate."""
    lr: float = option(0.01)
    """The step size of psi's variance-reducing step."""


class Lax(BranchedEstimator):
    name = "lax"
    label = "LAX (learned control variate)"
    Options = LaxOptions
    families = {name: Branched(1, (0,), partial(_branches, how),
                               partial(_scores, FAMILIES[name].log_prob))
                for name, how in REPARAMETERIZATIONS.items()}
    batched = True
    aux = ()
    """The standard noise eps."""
    control = True
    stateless = "score"

    def problem(self, spec: DistSpec) -> str | None:
        if spec.name in self.families:
            return None
        if spec.discrete:
            why = "it is discrete; use relax (Bernoulli) or score"
        elif not spec.fixed_support:
            why = ("its support depends on its parameters, so the score term would miss the "
                   "boundary terms; use reparam")
        elif not spec.reparam:
            why = "it has no reparameterized sampler; use score"
        else:
            why = ("lax does not rebuild it (Gamma, Beta and Dirichlet are reparameterized "
                   "implicitly, without such noise); use reparam, or score for an objective "
                   "that is not differentiable")
        return (f"'lax' applies to draws rebuilt from standard noise "
                f"({listed(sorted(self.families))}), not {spec.name}: {why}")

    def cost(self, e: Annotation, size: int | None) -> str:
        return "1 draw + r(psi, z) and its derivatives"

    def control_term(self, family, control, psi, f, z, aux, params, df, opts):
        return lax_term(control, psi, f, z, aux, params, REPARAMETERIZATIONS[family],
                        self.families[family], opts)
