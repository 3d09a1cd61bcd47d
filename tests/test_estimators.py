"""The estimator registry (gradlang.estimators) and the option schema (gradlang.options)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from gradlang.distributions import DISTRIBUTIONS
from gradlang.estimators import REGISTRY, OptionError, lookup
from gradlang.estimators.score import ScoreOptions
from gradlang.ops import Annotation
from gradlang.options import parse, rendered

BRANCHED = [(e, family) for e in REGISTRY.values() if e.role == "branched" for family in e.families]


@pytest.mark.parametrize("estimator", REGISTRY.values(), ids=lambda e: e.name)
def test_every_estimator_declares_frozen_options_whose_defaults_are_valid(estimator):
    assert dataclasses.is_dataclass(estimator.Options)
    assert estimator.Options.__dataclass_params__.frozen
    done = estimator.complete(Annotation(estimator.name))
    assert done == estimator.complete(done), "completing is idempotent"
    assert estimator.label and estimator.role in ("pathwise", "score", "enum", "branched", "dreg")


@pytest.mark.parametrize("estimator, family", BRANCHED, ids=lambda x: getattr(x, "name", x))
def test_branches_have_the_declared_count_and_noise(estimator, family):
    """Each branched estimator's draw yields its declared number of values (k for those
    drawn without replacement) and auxiliary noise exactly when it declares its shape."""
    spec, how = DISTRIBUTIONS[family], estimator.families[family]
    e = estimator.complete(Annotation(estimator.name, (("k", 3),) if how.size is None else ()))
    opts = dict(e.options)
    batch = () if spec.event else (5,)
    params = ([jnp.zeros(5), jnp.ones(5)] if family == "Normal"  # loc, scale
              else [jnp.linspace(-1.0, 1.0, 4 if spec.event else 5)])  # logits
    values, aux = how.branches(jax.random.key(0), opts, *params)
    size = estimator.size(e, spec, 4)
    assert values.shape[0] == size
    assert values.shape[1:] == batch + ((4,) if spec.onehot else ())
    assert (aux is None) == (estimator.aux is None)
    if aux is not None:
        assert aux.shape == estimator.aux + batch
    assert set(how.draws) <= set(range(size))


@pytest.mark.parametrize("estimator", REGISTRY.values(), ids=lambda e: e.name)
def test_applicability_comes_from_distribution_capabilities(estimator):
    """Each estimator applies to some family, and says why it does not apply to the others."""
    applies = [s.name for s in DISTRIBUTIONS.values() if estimator.problem(s) is None]
    assert applies, estimator.name
    for spec in DISTRIBUTIONS.values():
        problem = estimator.problem(spec)
        assert problem is None or spec.name in problem


def test_an_unknown_estimator_or_option_gets_a_did_you_mean():
    with pytest.raises(OptionError, match="unknown estimator 'scor'; did you mean 'score'"):
        lookup("scor")
    with pytest.raises(OptionError, match="estimator 'score' has no option 'basline'; did you "
                                          "mean 'baseline'"):
        REGISTRY["score"].options(Annotation("score", (("basline", "loo"),)))
    with pytest.raises(OptionError, match=r"has no option 'x' \(options: tau\)"):
        REGISTRY["gumbel"].options(Annotation("gumbel", (("x", 1.0),)))
    with pytest.raises(OptionError, match=r"has no option 'tau' \(it takes none\)"):
        REGISTRY["reparam"].options(Annotation("reparam", (("tau", 1.0),)))


@pytest.mark.parametrize("given, message", [
    ((("baseline", "mean"),), "unknown baseline 'mean' for score"),
    ((("decay", 1.0),), "must be below 1, got 1.0"),
    ((("baseline", "ma"), ("decay", 1e300)), "must be below 1"),
    ((("baseline", "ma"), ("decay", -0.5)), "must be a positive number, got -0.5"),
    ((("baseline", "loo"), ("decay", 0.5)), "needs baseline=ma"),
    ((("credit", True),), "unknown credit 'true' for score"),
])
def test_option_values_are_checked(given, message):
    with pytest.raises(OptionError, match=message):
        parse(ScoreOptions, given, "estimator 'score'", "score")


def test_defaults_fill_in_and_absent_options_are_not_rendered():
    assert rendered(parse(ScoreOptions, (), "", "score")) == (("baseline", "auto"),)
    assert rendered(parse(ScoreOptions, (("baseline", "ma"),), "", "score")) == \
        (("baseline", "ma"), ("decay", 0.9))
    assert str(REGISTRY["relax"].complete(Annotation("relax", (("control", "r"),)))) == \
        "relax(control=r, eta=1.0, tau=0.5, lr=0.01)"
