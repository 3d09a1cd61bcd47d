"""The reference of each case (see `case.py`), built from the program, its objective and,
where a better reference needs one, a variant of it (`variants.py`):

- exact: finite differences of the objective (float32, the step and bound of `reference.py`);
- random: the mean of many gradients of the variant with `auto(enum_max=64)` at every site,
  when it enumerates or reparameterizes every draw (enumeration of a finite draw gives the
  exact expectation; the automatic rule reparameterizes only draws whose every path to the
  objective is differentiable), unless that is the estimator under test; otherwise finite
  differences of the expectation with common random numbers (relaxed `gumbel` and `mvd`
  draws replaced by plain ones, so that the forward is the model's);
- compose: the plug-in gradient with many inner samples (`composition.py`);
- black box: the gradient of the Gaussian-smoothed objective at the estimator's own scale;
- non-smooth: the gradient of the plain forward (the rules are never called: the forward
  value of a `straight_through` op is the op's), Gaussian-smoothed at `smoothing` x the RMS of
  each parameter leaf;
- inner: finite differences of the outer objective with every inner problem of this file
  solved with 10x its solver's steps (and a 100x smaller `tol`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import jax
import numpy as np

from gradlang.estimators import REGISTRY
from gradlang.estimators.black_box import estimator
from gradlang.ir import externs_of
from gradlang.ops import Annotation
from gradlang.passes.overrides import Overrides

from . import composition
from .case import Case, classify, place_key, stochastic_ops
from .inputs import VerifyError
from .program import Program, load
from .reference import Reference, finite_differences, mean_gradient, pick_coordinates, smoothed
from .report import Settings
from .variants import Origin

ENUM_MAX = 64
TIGHTER = 10
PLAIN = Annotation("score", (("baseline", "none"),))
"""The estimator of a draw in the program whose forward is the model's."""


def _variant(origin: Origin, overrides: Overrides, name: str) -> Program | str:
    compiled = origin.compile(overrides)
    if isinstance(compiled, str):
        return compiled
    return load(compiled, name, origin.externs, origin.mesh)


def tighter(solver: Annotation, factor: int) -> Annotation:
    """The solver with `factor` times its steps and, when it stops at a tolerance, a factor^2
    smaller one (its other options as they are)."""
    options = dict(solver.options)
    options["steps"] = int(options["steps"]) * factor
    if options.get("tol"):
        options["tol"] = float(options["tol"]) / factor ** 2
    return replace(solver, options=tuple(options.items()))


def _plain(origin: Origin, program: Program, case: Case) -> Program:
    """The program whose forward is the model's: its draws of this file whose estimator's
    forward is not (`model_forward`: relaxed draws, measure-valued branches) made plain
    `score(baseline=none)` draws."""
    draws = {s.span: PLAIN for s in case.sites
             if origin.owns(s.span) and not REGISTRY[s.estimator.name].model_forward}
    plain = _variant(origin, Overrides(draws=draws), program.export.name) if draws else program
    if isinstance(plain, str):
        raise VerifyError(f"the variant without relaxed draws does not compile: {plain}")
    return plain


def reference(origin: Origin, program: Program, case: Case, named: Mapping, settings: Settings,
              chunk: int) -> Reference:
    key = jax.random.fold_in(jax.random.key(settings.seed), 2)
    args = program.arguments(named)
    f, theta = program.objective(args)
    sizes = [int(np.size(t)) for t in theta]
    coords = pick_coordinates(sizes, settings.coordinates, settings.seed)
    m = settings.reference_samples
    name = program.export.name
    if case.kind == "black_box":
        s = estimator(case.by).scale
        differentiable = not (program.value_draws or case.nonsmooth
                              or externs_of(program.module, case.objective))
        how = (f"the gradient of the Gaussian-smoothed objective E f(w + {s} z), which "
               f"{case.by.name} estimates, from {m} antithetic "
               f"{'pathwise' if differentiable else 'ES'} pairs")
        return smoothed(f, theta, args, [s] * len(theta), m, key, program.value_draws,
                        differentiable, chunk, how)
    if case.kind == "compose":
        return composition.reference(origin, program, case, named, settings, key)
    if case.kind == "non_smooth":
        plain = _plain(origin, program, case)
        plain_args = plain.arguments(named)
        g, _ = plain.objective(plain_args)
        sigmas = [settings.smoothing * (float(np.sqrt(np.mean(np.square(t)))) or 1.0) for t in theta]
        return smoothed(g, theta, plain_args, sigmas, m, key, plain.value_draws, False, chunk,
                        f"the gradient of the plain non-smooth forward (no backward rule used), "
                        f"Gaussian-smoothed at {settings.smoothing} x the RMS of each parameter, "
                        f"from {m} antithetic ES pairs")
    if case.kind == "random":
        return _random(origin, program, case, named, settings, chunk, key, coords, theta)
    if case.kind == "inner":
        solvers = {h.span: tighter(h.solver, TIGHTER) for h in case.inner if origin.owns(h.span)}
        tight = _variant(origin, Overrides(solvers=solvers), name) if solvers else program
        if isinstance(tight, str):
            raise VerifyError(f"the variant with tighter solvers does not compile: {tight}")
        tight_args = tight.arguments(named)
        g, _ = tight.objective(tight_args)
        how = (f"every inner problem of this file solved with {TIGHTER}x its solver's steps "
               f"(and a {TIGHTER ** 2}x smaller tol)" if solvers
               else "the inner problems as compiled (they are in imported files)")
        return finite_differences(g, theta, tight_args, coords, None, chunk,
                                  f"central differences of the outer objective in float32, with "
                                  f"{how}")
    return finite_differences(f, theta, args, coords, None, chunk,
                              "central differences of the objective in float32: reverse mode is "
                              "exact here, so only rounding may differ")


def _random(origin: Origin, program: Program, case: Case, named: Mapping, settings: Settings,
            chunk: int, key, coords, theta) -> Reference:
    name, m = program.export.name, settings.reference_samples
    auto = Annotation("auto", (("enum_max", ENUM_MAX),))
    draws = {s.span: auto for s in case.sites if origin.owns(s.span)}
    variant = _variant(origin, Overrides(draws=draws), name) if draws else None
    if isinstance(variant, Program):
        chosen = {place_key(s): s for s in classify(variant.module, variant.export).sites}
        usable = all(s.estimator.name in ("enum", "reparam") for s in chosen.values())
        same = all(chosen[place_key(s)].estimator.name == s.estimator.name
                   for s in case.sites if place_key(s) in chosen)
        if usable and not same:
            exact = not stochastic_ops(variant.module, variant.export.transform.fn)
            how = ", ".join(f"{s.estimator.name} at {s.site} (line {s.span.line})"
                            for s in chosen.values())
            if exact:
                return mean_gradient(variant, variant.arguments(named), 1, key, chunk,
                                     "enumeration", f"the exact expectation's gradient ({how})")
            names = {s.estimator.name for s in chosen.values()}
            method = "pathwise" if names == {"reparam"} else "enumeration and pathwise"
            return mean_gradient(variant, variant.arguments(named), m, key, chunk, method,
                                 f"the mean of {m} gradients with {how}: unbiased, and not the "
                                 f"estimator under test")
    plain = _plain(origin, program, case)
    plain_args = plain.arguments(named)
    g, _ = plain.objective(plain_args)
    if not stochastic_ops(plain.module, plain.export.transform.fn):
        return finite_differences(g, theta, plain_args, coords, None, chunk,
                                  "central differences of the exact (enumerated) expectation")
    return finite_differences(g, theta, plain_args, coords, jax.random.split(key, m), chunk,
                              f"central differences of the expectation over {m} keys, the same "
                              f"keys for +h and -h (common random numbers)")
