"""Overrides (`passes.overrides`): a compile with an override is the compile of the source with
the annotation written, and `gradlang verify` builds its variants with them, never by editing
source text or through the Python API."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from gradlang.diagnostics import Diagnostics, SourceFile, Span
from gradlang.driver import compile_module
from gradlang.ir import Module
from gradlang.ops import Annotation
from gradlang.passes.overrides import Overrides
from gradlang.printer import print_module

SRC = """\
fn f(t: f32, w: f32) -> f32 {
  c ~ Bernoulli(logits=t)
  x ~ Normal(w, 1.0) with score(baseline=loo)
  return (c + x) * (c + x)
}
fn ridge(lam: f32, x: f32[8, 3], y: f32[8]) -> f32 {
  let v = argmin v: f32[3] = zeros([3]) {
    mean((x @ v - y) ^ 2) + exp(lam) * sum(v * v)
  } via gd(steps=100, lr=0.1)
  return sum(v * v)
}
fn quadratic(w: f32[3]) -> f32 { return sum(w * w) }
fn g(t: f32) -> f32 {
  z ~ Normal(0.0, 1.0)
  return exp(t * z)
}
fn lg(u: f32) -> f32 { return log(u) }
export sites = grad(expect(f, samples=4), wrt=[t, w])
export inner = grad(ridge, wrt=[lam])
export bb = grad(quadratic, wrt=[w], by=spsa(eps=0.01))
export composed = grad(compose(lg, expect(g, samples=4), by=scgd(beta=0.1)), wrt=[t])
"""
SOURCE = SourceFile("t.grad", SRC)


def _compile(source: SourceFile,
             overrides: Overrides | None = None) -> tuple[Module | None, Diagnostics]:
    diags = Diagnostics()
    return compile_module(source, None, diags, overrides=overrides), diags


@pytest.fixture(scope="module")
def base() -> Module:
    module, diags = _compile(SOURCE)
    assert module is not None, diags.items
    return module


def _site(m: Module, name: str) -> Span:
    return next(s.span for s in m.facts.estimators if s.site == name)


def _argmin(m: Module) -> Span:
    (problem,) = m.facts.hypergrad
    return problem.span


def _export(m: Module, name: str):
    return next(e for e in m.exports if e.name == name)


def _choices(m: Module) -> list[tuple]:
    """What the passes chose, as they report it (spans left out: written text moves them)."""
    return ([(s.function, s.site, str(s.estimator), s.why, s.annotated)
             for s in m.facts.estimators]
            + [(h.function, str(h.solver), str(h.method), h.why) for h in m.facts.hypergrad]
            + sorted((n, c.samples, str(c.by)) for n, c in m.facts.compose.items()))


VARIANTS = [  # the edit of the source text, and the override that stands for it
    ("c ~ Bernoulli(logits=t)", "c ~ Bernoulli(logits=t) with enum",
     lambda m: Overrides(draws={_site(m, "c"): Annotation("enum")})),
    ("with score(baseline=loo)", "with score(baseline=ma, credit=whole)",
     lambda m: Overrides(draws={_site(m, "x"): Annotation("score", (("baseline", "ma"),
                                                                   ("credit", "whole")))})),
    ("} via gd(steps=100, lr=0.1)", "} via gd(steps=100, lr=0.1) with unrolled",
     lambda m: Overrides(methods={_argmin(m): Annotation("unrolled")})),
    ("via gd(steps=100, lr=0.1)", "via adam(steps=300, tol=0.001) with implicit(gmres)",
     lambda m: Overrides(solvers={_argmin(m): Annotation("adam", (("steps", 300), ("tol", 0.001)))},
                         methods={_argmin(m): Annotation("implicit", (("method", "gmres"),))})),
    ("by=spsa(eps=0.01)", "by=es(sigma=0.01, pop=8)",
     lambda m: Overrides(by={_export(m, "bb").span: Annotation("es", (("sigma", 0.01),
                                                                      ("pop", 8)))})),
    (", by=spsa(eps=0.01)", "",
     lambda m: Overrides(by={_export(m, "bb").span: None})),
    ("expect(g, samples=4), by=scgd(beta=0.1)", "expect(g, samples=16), by=plugin",
     lambda m: Overrides(by={_export(m, "composed").transform.compose.span: Annotation("plugin")},
                         samples={_export(m, "composed").span: 16})),
    ("expect(f, samples=4)", "expect(f, samples=2)",
     lambda m: Overrides(samples={_export(m, "sites").span: 2})),
]


@pytest.mark.parametrize("old, new, override", VARIANTS,
                         ids=[new or "no by" for _, new, _ in VARIANTS])
def test_an_override_compiles_as_the_written_annotation(base, old, new, override):
    assert SRC.count(old) == 1
    written, diags = _compile(SourceFile("t.grad", SRC.replace(old, new)))
    assert written is not None, diags.items
    overridden, diags = _compile(SOURCE, override(base))
    assert overridden is not None, diags.items
    assert print_module(overridden) == print_module(written)
    assert _choices(overridden) == _choices(written)
    assert print_module(overridden) != print_module(base)


def test_an_override_that_cannot_apply_is_the_written_annotations_error(base):
    written, expected = _compile(SourceFile("t.grad", SRC.replace(
        "c ~ Bernoulli(logits=t)", "c ~ Bernoulli(logits=t) with reparam")))
    overridden, got = _compile(SOURCE, Overrides(draws={_site(base, "c"): Annotation("reparam")}))
    assert written is None and overridden is None
    assert [d.message for d in got.errors] == [d.message for d in expected.errors]


@pytest.mark.parametrize("overrides", [
    lambda m: Overrides(methods={_site(m, "c"): Annotation("unrolled")}),  # a draw is no argmin
    lambda m: Overrides(by={_argmin(m): None}),  # an argmin is no export
    lambda m: Overrides(samples={_export(m, "bb").span: 8}),  # bb is no expectation
    # the same place in another read of the file
    lambda m: Overrides(draws={Span(SourceFile("t.grad", SRC), 2, 3, 2, 26): Annotation("enum")}),
])
def test_an_override_of_nothing_is_a_bug_of_its_caller(base, overrides):
    with pytest.raises(ValueError, match="overrides that match nothing"):
        _compile(SOURCE, overrides(base))


def _imports(path: Path, package: str) -> set[str]:
    """The modules a Python file imports (relative imports resolved in `package`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module) if p)
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)
    return found


def test_verify_does_not_import_the_api():
    """The API is the facade on top: it imports verify, and verify compiles through the driver."""
    import gradlang.verify

    folder = Path(gradlang.verify.__file__).parent
    imported = {p.name: _imports(p, "gradlang.verify") for p in sorted(folder.glob("*.py"))}
    assert "gradlang.driver.compile_module" in imported["variants.py"]
    assert {name: [m for m in found if m == "gradlang.api" or m.startswith("gradlang.api.")]
            for name, found in imported.items()} == {name: [] for name in imported}
