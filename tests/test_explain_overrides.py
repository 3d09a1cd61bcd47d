"""explain's override column lists every estimator the draw accepts, and only those: each one
listed compiles when written on the draw."""

from __future__ import annotations

import re

import pytest

import gradlang
from gradlang.diagnostics import CompileError
from gradlang.explain import explain

PROGRAMS = {
    "batched_bernoulli": """
fn f(t: f32[B]) -> f32 {
  z ~ Bernoulli(logits=t)SITE
  return sum((z - 0.3) * (z - 0.3))
}
export a = grad(expect(f, samples=4), wrt=[t])
""",
    "bernoulli": """
fn f(t: f32) -> f32 {
  z ~ Bernoulli(logits=t)SITE
  return (z - 0.3) * (z - 0.3)
}
export a = grad(expect(f, samples=4), wrt=[t])
""",
    "categorical": """
fn f(t: f32[4]) -> f32 {
  z ~ OneHotCategorical(logits=t)SITE
  return sum(z * stack([0.1, 0.5, -0.2, 0.9]))
}
export a = grad(expect(f, samples=4), wrt=[t])
""",
    "normal": """
fn f(m: f32) -> f32 {
  z ~ Normal(m, 1.0)SITE
  return z * z
}
export a = grad(expect(f, samples=4), wrt=[m])
""",
}


def _listed(source: str) -> list[str]:
    text = explain(gradlang.compile_source(source.replace("SITE", "")).ir)
    row = next(line for line in text.splitlines() if line.strip().startswith("z ("))
    return re.findall(r"with ([a-z_]+(?:\([^)]*\))?)", row)


@pytest.mark.parametrize("name", PROGRAMS)
def test_every_listed_override_compiles(name):
    source = PROGRAMS[name]
    listed = _listed(source)
    assert listed
    for annotation in listed:
        try:
            gradlang.compile_source(source.replace("SITE", f" with {annotation}"))
        except CompileError as exc:
            pytest.fail(f"explain lists 'with {annotation}', which does not compile:\n{exc}")


def test_a_batched_bernoulli_lists_disarm_and_not_the_single_draw_estimators():
    listed = _listed(PROGRAMS["batched_bernoulli"])
    assert {"disarm", "arm", "gumbel"} <= set(listed)
    assert not {"mvd", "enum"} & set(listed)  # they differentiate one draw
    assert {"mvd", "enum"} <= set(_listed(PROGRAMS["bernoulli"]))
