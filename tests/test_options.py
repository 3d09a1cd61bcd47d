"""The option schema (gradlang.options) as the passes use it: black-box and private gradients,
solvers and hypergradient methods, combination rules, compositions and backward rules each
declare their options once, as a frozen dataclass (for estimators of random choices, see
test_estimators.py)."""

from __future__ import annotations

import dataclasses

import pytest

import gradlang
from gradlang.estimators import backward
from gradlang.estimators import combine, compose as composition
from gradlang.estimators.black_box import BLACK_BOX, Eggroll, Es
from gradlang.estimators import hypergrads, solvers
from gradlang.ir import Combination
from gradlang.ops import Annotation
from gradlang.options import OptionError, parse, rendered, unknown
from gradlang.passes import (compose, multiobjective, privacy, straight_through,
                             zeroth_order)

CLASSES = [*BLACK_BOX.values(), privacy.DpOptions, *solvers.SOLVERS.values(),
           *solvers.CONSTRAINED.values(), *hypergrads.METHODS.values(),
           *combine.RULES.values(), *composition.ESTIMATORS.values(),
           *backward.RULES.values()]
REQUIRED = {privacy.DpOptions: (("clip", 1.0), ("noise", 1.1)),
            solvers.Projected: (("lower", -1.0), ("upper", 1.0))}
"""The options an annotation needs written."""


def _parse(cls: type, given=()):
    return parse(cls, given, "annotation 'x'", "x")


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: f"{c.__module__}.{c.__qualname__}")
def test_every_option_class_has_valid_defaults_that_render_back_to_themselves(cls):
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
    done = _parse(cls, REQUIRED.get(cls, ()))
    assert _parse(cls, rendered(done)) == done


@pytest.mark.parametrize("cls", REQUIRED)
def test_required_options_are_asked_for(cls):
    with pytest.raises(OptionError, match="needs"):
        _parse(cls, REQUIRED[cls][:1])


BAD = {
    "black box": ("fn f(w: f32[2]) -> f32 { return sum(w * w) }\n"
                  "export g = grad(f, wrt=[w], by=es(sigm=0.1))",
                  "estimator 'es' has no option 'sigm'; did you mean 'sigma'?"),
    "dp": ("fn f(w: f32[2], x: f32[B, 2]) -> f32 { return mean(x @ w) }\n"
           "export g = grad(f, wrt=[w], by=dp(clip=1.0, noise=1.0, clippng=ghost))",
           "dp has no option 'clippng'; did you mean 'clipping'?"),
    "solver": ("fn f(t: f32) -> f32 {\n"
               "  let v = argmin v: f32 = 0.0 { (v - t) ^ 2 } via gd(step=10)\n  return v\n}",
               "solver 'gd' has no option 'step'; did you mean 'steps'?"),
    "method": ("fn f(t: f32) -> f32 {\n"
               "  let v = argmin v: f32 = 0.0 { (v - t) ^ 2 } via gd() with implicit(iter=5)\n"
               "  return v\n}",
               "hypergradient method 'implicit' has no option 'iter'; did you mean 'iters'?"),
    "combination": ("fn f1(x: f32) -> f32 { return x * x }\n"
                    "fn f2(x: f32) -> f32 { return (x - 1.0) ^ 2 }\n"
                    "export m = minimize([f1, f2], wrt=[x], by=mgda(iter=5))",
                    "rule 'mgda' has no option 'iter'; did you mean 'iters'?"),
    "compose": ("fn g(t: f32) -> f32 {\n  z ~ Normal(t, 1.0)\n  return z\n}\n"
                "fn f(u: f32) -> f32 { return u * u }\n"
                "export c = grad(compose(f, expect(g, samples=4), by=scgd(bta=0.2)), wrt=[t])",
                "estimator 'scgd' has no option 'bta'; did you mean 'beta'?"),
    "backward": ("fn f(w: f32[2]) -> f32 { return sum(sign(w) with reste(powr=3) * w) }\n"
                 "export g = grad(f, wrt=[w])",
                 "rule 'reste' has no option 'powr'; did you mean 'power'?"),
}


@pytest.mark.parametrize("source, message", BAD.values(), ids=BAD)
def test_an_unknown_option_gets_a_did_you_mean_in_every_pass(source, message):
    with pytest.raises(gradlang.CompileError) as raised:
        gradlang.compile_source(source)
    assert f"error: {message}" in str(raised.value)


@pytest.mark.parametrize("cls, given, message", [
    (backward.Reste, (("power", 0.5),),
     "option 'power' of 'x' must be at least 1, got 0.5"),
    (composition.Scgd, (("beta", 1.5),), "option 'beta' of 'x' must be at most 1, got 1.5"),
    (composition.Scgd, (("beta", 0),), "must be a positive number, got 0"),
    (solvers.Adam, (("b1", 1.0),), "option 'b1' of 'x' must be below 1, got 1.0"),
    (solvers.Adam, (("b2", -0.5),), "must be a non-negative number, got -0.5"),
    (privacy.DpOptions, REQUIRED[privacy.DpOptions] + (("per_example_axis", -1),),
     "must be a non-negative integer, got -1"),
    (privacy.DpOptions, REQUIRED[privacy.DpOptions] + (("per_example_axis", True),),
     "must be a non-negative integer, got true"),
    (Es, (("pop", 63),), "'es' with antithetic pairs needs an even pop, got 63"),
    (Eggroll, (("antithetic", 1),), "must be true or false, got 1"),
    (solvers.Projected, (("lower", 1.0), ("upper", 1.0)), "needs lower < upper"),
    (combine.Mgda, (("solver", "newton"),),
     r"unknown solver 'newton' for x \(solvers: auto, exact, frank_wolfe\)"),
])
def test_option_values_are_checked_against_their_declared_ranges(cls, given, message):
    with pytest.raises(OptionError, match=message):
        _parse(cls, given)


@pytest.mark.parametrize("cls, given", [
    (composition.Scgd, (("beta", 1),)),
    (backward.Reste, (("power", 1),)),
    (backward.Ste, (("clip", 0),)),  # clip=0 is the default: no clipping
    (solvers.Momentum, (("beta", 0.0),)),
    (Es, (("pop", 63), ("antithetic", False))),
    (privacy.DpOptions, REQUIRED[privacy.DpOptions] + (("noise", 0.0), ("per_example_axis", 2))),
])
def test_values_at_the_ends_of_their_ranges_are_accepted(cls, given):
    assert rendered(_parse(cls, given))


def test_completed_annotations_keep_their_rendered_form():
    """What the runtime and the golden IR read: every option, in declaration order (rho last
    for a constrained solver), backward rules and compositions in floats, mgda's solver
    resolved for the number of objectives."""
    assert rendered(solvers.CONSTRAINED["gd"]()) == (
        ("steps", 100), ("lr", 0.1), ("tol", 0.0), ("rho", 1.0))
    assert str(straight_through.complete(Annotation("reste", (("power", 3),)))) == \
        "reste(power=3.0, clip=1.0, max_grad=10.0)"
    assert str(zeroth_order.complete(Annotation("eggroll", (("rank", 2),)))) == \
        "eggroll(sigma=0.1, pop=64, rank=2, antithetic=true)"
    assert str(privacy.complete(Annotation("dp", (("noise", 2), ("clip", 0.5))))) == \
        "dp(clip=0.5, noise=2, per_example_axis=0, clipping=ghost)"
    assert str(multiobjective.complete(Combination("mgda"), 2)) == "mgda(solver=exact, iters=100)"
    assert multiobjective.complete(Combination("mgda"), 9).option("solver") == "frank_wolfe"
    assert compose.DEFAULT == Annotation("scgd", (("beta", 0.1),))


def test_unknown_names_get_a_did_you_mean_or_the_list():
    assert unknown("solver", "newton", ["gd", "newton_cg"]) == \
        "unknown solver 'newton'; did you mean 'newton_cg'?"
    assert unknown("backward rule", "zzz", ["ste", "reste"], listing="rules") == \
        "unknown backward rule 'zzz' (rules: ste, reste)"
    with pytest.raises(OptionError, match=r"unknown gradient estimator 'eggrol' for by=; did "
                                          r"you mean 'eggroll'\?"):
        zeroth_order.complete(Annotation("eggrol"))


def test_an_unnamed_first_option_is_named_by_the_schema():
    """`implicit(cg)`: the builder leaves the first option unnamed (key None), the printer
    writes it bare, and parse names it by the field declared positional."""
    a = Annotation("implicit", ((None, "gmres"), ("iters", 5)))
    assert str(a) == "implicit(gmres, iters=5)"
    assert parse(hypergrads.Implicit, a.options, "method 'implicit'", "implicit").method == "gmres"
    assert parse(hypergrads.Truncated, ((None, 3),), "method 'truncated'", "truncated").k == 3
    with pytest.raises(OptionError, match=r"options of 'unrolled' are given by name"):
        parse(hypergrads.Unrolled, ((None, 3),), "method 'unrolled'", "unrolled")
    with pytest.raises(OptionError, match=r"option 'method' of 'implicit' is given twice"):
        parse(hypergrads.Implicit, ((None, "cg"), ("method", "gmres")), "method 'implicit'",
              "implicit")
