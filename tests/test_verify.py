"""`gradlang verify`: every estimator family is consistent with its reference on closed-form
programs, estimators biased by design are reported so with their measured bias, a wrong rule
and a zero gradient are flagged, the JSON schema is stable and bad input gives diagnostics.

The verdicts rest on verify's own statistics (z = 5 standard errors of the estimates and of
the reference, plus the reference's deterministic bound): every statistical test here has a
fixed seed, and the biases injected (x1.3) sit at more than 10 standard errors, so a flagged
verdict does not depend on the draw.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from jax import lax

import gradlang
from gradlang.cli import main
from gradlang.runtime.rules import LOWERINGS
from gradlang.verify import (BIASED, BY_DESIGN, CONSISTENT, SCHEMA, ZERO, VerifyError, document,
                             dumps)
from stats import EPS32

FAST = {"samples": 400, "reference_samples": 2048}

FAMILIES = """
fn normal(m: f32, s: f32) -> f32 {
  x ~ Normal(m, s)
  return x * x
}
fn normal_score(m: f32, s: f32) -> f32 {
  x ~ Normal(m, s) with score(baseline=loo)
  return x * x
}
fn normal_mvd(m: f32, s: f32) -> f32 {
  x ~ Normal(m, s) with mvd
  return f32(x > 0.5) + x
}
fn coin(t: f32, w: f32) -> f32 {
  c ~ Bernoulli(logits=t) with score(baseline=none)
  return (c + w) * (c + w)
}
fn coin_enum(t: f32, w: f32) -> f32 {
  c ~ Bernoulli(logits=t) with enum
  return (c + w) * (c + w)
}
fn poisson(r: f32) -> f32 {
  x ~ Poisson(r)
  return x * x
}
fn quadratic(w: f32[2, 3], a: f32[2, 3]) -> f32 { return sum(a * w * w) + sum(w) }
fn ridge(lam: f32, x: f32[8, 3], y: f32[8]) -> f32 {
  let w = argmin v: f32[3] = zeros([3]) {
    mean((x @ v - y) ^ 2) + exp(lam) * sum(v * v)
  } via gd(steps=100, lr=0.1)
  return sum(w * w)
}
export pathwise = grad(expect(normal, samples=1), wrt=[m, s])
export score_loo = grad(expect(normal_score, samples=4), wrt=[m, s])
export mvd = grad(expect(normal_mvd, samples=1), wrt=[m, s])
export score = grad(expect(coin, samples=1), wrt=[t, w])
export enum = value_and_grad(expect(coin_enum, samples=1), wrt=[t, w])
export poisson = grad(expect(poisson, samples=4), wrt=[r])
export spsa = grad(quadratic, wrt=[w], by=spsa(eps=0.01))
export es = grad(quadratic, wrt=[w], by=es(sigma=0.1, pop=16))
export eggroll = grad(quadratic, wrt=[w], by=eggroll(sigma=0.1, pop=16, rank=1))
export implicit = grad(ridge, wrt=[lam])
"""

SCALES = {"m": 0.7, "s": 1.3}


@pytest.fixture(scope="module")
def families():
    return gradlang.compile_source(FAMILIES, name="families.grad")


@pytest.mark.parametrize("export, args, case, method", [
    ("pathwise", SCALES, "random", "finite differences"),
    ("score_loo", SCALES, "random", "pathwise"),
    ("mvd", SCALES, "random", "finite differences"),
    ("score", {"t": 0.4, "w": 2.5}, "random", "enumeration"),
    ("enum", {"t": 0.4, "w": 2.5}, "random", "finite differences"),
    pytest.param("poisson", {"r": 1.8}, "random", "finite differences", marks=pytest.mark.slow),
    ("spsa", None, "black_box", "smoothed (pathwise)"),
    ("es", None, "black_box", "smoothed (pathwise)"),
    ("eggroll", None, "black_box", "smoothed (pathwise)"),
    ("implicit", None, "inner", "finite differences"),
])
def test_every_family_is_consistent_on_closed_form_programs(families, export, args, case, method):
    report = families.verify(export, args, **FAST)
    assert (report.case, report.reference.method) == (case, method)
    assert report.verdict == CONSISTENT, report.table()
    assert report.biased_by_design is None


def test_an_estimator_is_never_its_own_reference(families):
    """A pathwise estimator is checked by finite differences, not by more pathwise samples;
    an enumerated one by finite differences of the exact expectation."""
    assert "common random numbers" in families.verify("pathwise", SCALES, **FAST).reference.description
    assert "enumerated" in families.verify("enum", {"t": 0.4, "w": 2.5}, **FAST).reference.description


def test_a_smooth_program_is_exact(families):
    m = gradlang.compile_source("""
struct P { w: f32[3, 2], b: f32[2] }
fn f(p: P, x: f32[B, 3]) -> f32 { return mean(tanh(x @ p.w + p.b) ^ 2) }
export g = value_and_grad(f, wrt=[p])
export step = descend(f, wrt=[p], lr=0.1)
""")
    for name in ("g", "step"):
        report = m.verify(name, dims={"B": 5})
        assert report.case == "exact" and report.samples == 1
        assert [l.name for l in report.leaves] == ["p.b", "p.w"]
        assert report.verdict == CONSISTENT
        for leaf in report.leaves:  # rounding only: the finite differences' own bound
            bound = np.linalg.norm(leaf.reference_bound) / np.linalg.norm(leaf.reference)
            assert leaf.relative_bias <= bound and leaf.cosine > 1 - 1e-6


@pytest.mark.parametrize("draw", ["z ~ Bernoulli(logits=t) with relax(control=net, lr=0.05)",
                                  "z ~ Normal(t, 1.0) with lax(control=net, lr=0.001)"])
def test_an_export_with_a_learned_control_variate_is_verified_at_zero_control(draw):
    """Its state, the control's parameters psi (here a struct), starts at zeros and is
    carried from one estimate to the next, as in training (a linear control, whose step on
    the estimate's second moment stays stable at this lr)."""
    m = gradlang.compile_source(f"""
struct CV {{ w: f32[3], a: f32 }}
fn net(psi: CV, s: f32[3]) -> f32 {{
  return psi.a + sum(psi.w * s)
}}
fn f(t: f32[3]) -> f32 {{
  {draw}
  return (sum(z) - 1.3) ^ 2
}}
export g = value_and_grad(expect(f, samples=2), wrt=[t])
""")
    report = m.verify("g", {"t": [0.2, -0.4, 0.9]}, **FAST)
    assert report.verdict == CONSISTENT


# ---- biased by design: reported as such, with the measured bias


@pytest.mark.parametrize("estimator, named", [("gumbel(tau=0.5)", "Gumbel-softmax"),
                                              ("gumbel_sparsemax(tau=1.0)", "sparsemax")])
def test_relaxations_are_biased_by_design(estimator, named):
    """The reference is the model's (the relaxed draw made a plain one), so the relaxation's
    bias shows."""
    m = gradlang.compile_source(f"""
fn f(t: f32[3], c: f32[3]) -> f32 {{
  z ~ OneHotCategorical(logits=t) with {estimator}
  return sum(z * c) ^ 2
}}
export g = grad(expect(f, samples=1), wrt=[t, c])
""")
    report = m.verify("g", {"t": [0.2, -0.4, 0.9], "c": [1.0, -2.0, 0.5]}, **FAST)
    assert report.reference.method == "enumeration"
    assert named in report.biased_by_design
    assert report.verdict == BY_DESIGN and report.exit_code == 0
    c = report.leaf("c")  # the relaxed draw's E[z_i z_j] differs from the one-hot draw's
    assert c.verdict == BY_DESIGN and c.ci95[0] > 0


@pytest.mark.parametrize("estimator", ["gumbel(tau=1.0)", "gumbel_sparsemax(tau=1.0)"])
def test_a_relaxed_batched_draw_is_differenced_as_a_plain_draw(estimator):
    """Not enumerable (a batch of 4): the reference differences the model's expectation, the
    relaxed draws made plain score-function ones (`model_forward`), so the bias shows."""
    m = gradlang.compile_source(f"""
fn f(t: f32[4], c: f32[4]) -> f32 {{
  z ~ Bernoulli(logits=t) with {estimator}
  return sum(z * c) ^ 2
}}
export g = grad(expect(f, samples=1), wrt=[t, c])
""")
    report = m.verify("g", {"t": [0.2, -0.4, 0.9, 0.1], "c": [1.0, -2.0, 0.5, 1.5]}, **FAST)
    assert report.reference.method == "finite differences"
    assert report.verdict == BY_DESIGN and report.leaf("c").verdict == BY_DESIGN


@pytest.mark.parametrize("rule", ["ste", "reste"])
def test_straight_through_rules_are_biased_by_design(rule):
    m = gradlang.compile_source(f"""
fn f(w: f32[4], x: f32[4]) -> f32 {{ return sum(x * (sign(w) with {rule})) }}
export g = grad(f, wrt=[w])
""")
    report = m.verify("g", {"w": [0.02, -0.01, 0.6, -0.8], "x": [1.0, 2.0, -1.0, 0.5]}, **FAST)
    assert report.case == "non_smooth" and report.reference.method.startswith("smoothed")
    assert f"backward rule {rule} of sign" in report.biased_by_design
    w = report.leaf("w")
    assert w.verdict == BY_DESIGN and w.ci95[0] > 0  # a bias measured at this input
    assert "biased by design" in report.table()


# ---- flagged: a wrong rule and a zero gradient


def _scaled(x, factor: float = 1.3):
    """x with its derivative multiplied by `factor` (the value unchanged)."""
    return x + (factor - 1) * (x - lax.stop_gradient(x))


def test_a_wrong_derivative_rule_is_flagged(monkeypatch):
    tanh = LOWERINGS["tanh"]
    monkeypatch.setitem(LOWERINGS, "tanh", lambda ctx, op, x: _scaled(tanh(ctx, op, x)))
    m = gradlang.compile_source("fn f(w: f32[3]) -> f32 { return sum(tanh(w)) }\n"
                                "export g = grad(f, wrt=[w])\n")
    report = m.verify("g")
    w = report.leaf("w")
    assert report.verdict == BIASED and report.exit_code == 1
    # with r = g (1 + e), |e| <= bound: |1.3 g - r| / |r| = |0.3 - e| / |1 + e| = 0.3 +- 1.3 bound
    bound = np.linalg.norm(w.reference_bound) / np.linalg.norm(w.reference)
    assert abs(w.relative_bias - 0.3) <= 1.3 * bound / (1 - bound)


def test_a_wrong_pathwise_rule_is_flagged(monkeypatch):
    sample = LOWERINGS["sample"]

    def wrong(ctx, op, d):
        x = sample(ctx, op, d)
        return _scaled(x) if op.params.estimator.name == "reparam" else x

    monkeypatch.setitem(LOWERINGS, "sample", wrong)
    m = gradlang.compile_source("""
fn f(m: f32) -> f32 {
  x ~ Normal(m, 1.0)
  return x * x
}
export g = grad(expect(f, samples=1), wrt=[m])
""")
    report = m.verify("g", {"m": 2.0}, samples=4000, reference_samples=4096)
    assert report.reference.method == "finite differences"  # the forward is untouched
    leaf = report.leaf("m")  # the bias, 0.3 x 4, is 23 standard errors (0.052) away from 0
    assert leaf.verdict == BIASED and abs(leaf.relative_bias - 0.3) <= 5 * leaf.noise_floor


def test_a_draw_forced_pathwise_through_a_comparison_is_a_zero_gradient():
    m = gradlang.compile_source("""
fn f(m: f32) -> f32 {
  x ~ Normal(m, 1.0) with reparam
  return f32(x > 0.0)
}
export g = grad(expect(f, samples=1), wrt=[m])
""")
    report = m.verify("g", {"m": 0.3}, **FAST)
    leaf = report.leaf("m")
    assert report.verdict == ZERO and report.exit_code == 1
    assert leaf.zero_estimate and not leaf.zero_reference
    phi = np.exp(-0.3 ** 2 / 2) / np.sqrt(2 * np.pi)  # d/dm P(m + eps > 0) at m = 0.3
    assert abs(leaf.reference[0] - phi) <= 5 * leaf.reference_error[0] + leaf.reference_bound[0]


def test_a_non_smooth_op_without_a_rule_is_a_zero_gradient():
    m = gradlang.compile_source("fn f(w: f32[3], x: f32[3]) -> f32 { return sum(x * sign(w)) }\n"
                                "export g = grad(f, wrt=[w])\n")
    report = m.verify("g", {"w": [0.01, -0.6, 0.8], "x": [1.0, 2.0, 3.0]}, **FAST)
    assert report.verdict == ZERO
    assert any("no backward rule" in n for n in report.notes)


def test_leaves_that_reach_no_non_smooth_op_are_compared_exactly():
    """A straight-through encoder and a smooth decoder: dec's gradient never passes through
    sign, so it is checked against finite differences of the objective (exact: consistent),
    while enc's is set against the smoothed forward (biased by design)."""
    m = gradlang.compile_source("""
fn loss(enc: f32[D, L], dec: f32[L, D], x: f32[B, D]) -> f32 {
  let h = sign(x @ enc) with ste
  let r = h @ dec - x
  return mean(r * r)
}
export g = grad(loss, wrt=[enc, dec])
""")
    rng = np.random.default_rng(0)
    args = {"enc": rng.normal(size=(4, 3)), "dec": rng.normal(size=(3, 4)),
            "x": rng.normal(size=(8, 4))}
    report = m.verify("g", args, **FAST)
    assert report.leaf("dec").verdict == CONSISTENT
    assert report.leaf("enc").verdict == BY_DESIGN
    assert "for dec (no non-smooth op on their way to the result" in report.reference.description


# ---- compare, Python API, JSON


@pytest.fixture(scope="module")
def compared():
    m = gradlang.compile_source("""
fn f(t: f32, w: f32) -> f32 {
  c ~ Bernoulli(logits=t)
  return (c + w) * (c + w)
}
export g = grad(expect(f, samples=4), wrt=[t, w])
""")
    return m.verify("g", {"t": 0.4, "w": 2.5}, compare=True, **FAST)


@pytest.mark.slow  # the default suite's time (12 min on 2 cores); run with -m slow
def test_compare_ranks_every_applicable_estimator(compared):
    (site,) = compared.compare
    rows = {r.annotation: r for r in site.rows}
    assert rows["with reparam"].report is None and "discrete" in rows["with reparam"].reason
    assert rows["with enum"].variance == 0 and rows["with enum"].report.verdict == CONSISTENT
    assert rows["with auto"].current and rows["with auto"].report.leaves is compared.leaves
    assert rows["with score(baseline=grpo)"].report.verdict == BY_DESIGN
    ranked = site.ranked()
    assert ranked[0].annotation == "with enum"
    unbiased = [r for r in ranked if r.report is not None and r.report.biased_by_design is None]
    assert [r.score for r in unbiased] == sorted(r.score for r in unbiased)
    assert ranked.index(rows["with score(baseline=grpo)"]) > ranked.index(unbiased[-1])
    assert "compare the estimators of the random choice c (f, line 3, Bernoulli)" in compared.table()
    _consistent_row_biased_by_design(compared)
    _json_schema_is_stable(compared)


def _consistent_row_biased_by_design(compared):
    """Ranked among the biased by design, a row whose bias is within the noise says both.
    (The compare run's checks are one test, so that its 20 s run once, not once per test
    worker.)"""
    from dataclasses import replace

    from gradlang.verify.report import Comparison, Row, render_comparison

    assert compared.verdict == CONSISTENT
    row = Row("with score(baseline=grpo)", False, replace(compared, biased_by_design="scaled"))
    (line,) = [l for l in render_comparison(Comparison("c", "random", [row])) if "grpo" in l]
    assert line.rstrip().endswith("consistent (biased by design)")
    assert document("m.grad", [row.report])["exports"][0]["verdict"] == CONSISTENT


def test_python_api_takes_arguments_by_name_or_in_order(families):
    by_name = families.verify("pathwise", SCALES, **FAST)
    in_order = families.verify("pathwise", (0.7, 1.3), **FAST)
    assert np.array_equal(by_name.leaf("m").mean, in_order.leaf("m").mean)


@pytest.mark.parametrize("name, args, dims, message", [
    ("nope", None, None, "no export 'nope'"),
    ("pathwise", {"m": 0.7}, None, "missing argument 's'"),
    ("pathwise", {"m": 0.7, "s": 1.0, "q": 1.0}, None, "unknown argument 'q'"),
    ("spsa", {"w": np.zeros((3, 2)), "a": np.ones((2, 3))}, None, "expected f32[2, 3]"),
])
def test_python_api_bad_input(families, name, args, dims, message):
    with pytest.raises(VerifyError, match=message.replace("[", r"\[")):
        families.verify(name, args, dims=dims)


GOLDEN = {
    "schema": "str", "file": "str", "verdict": "str", "exit_code": "int",
    "exports": [{
        "export": "str", "call": "str", "case": "str", "estimator": "str",
        "biased_by_design": "null", "notes": [], "samples": "int", "seed": "int",
        "reference": {"method": "str", "description": "str", "samples": "int",
                      "evaluations": "int", "seconds": "float"},
        "leaves": [{
            "name": "str", "shape": [], "size": "int", "coordinates": "null",
            "mean": ["float"],
            "reference": {"values": ["float"], "standard_error": ["float"], "bound": ["float"],
                          "norm": "float"},
            "bias": {"relative": "float", "ci95": ["float"], "absolute": "float",
                     "noise_floor": "float"},
            "variance": {"total": "float", "per_coordinate": ["float"]},
            "cosine": "float", "ess": "float",
            "test": {"max_z": "float", "chi2_z": "float"},
            "zero": {"estimate": "bool", "reference": "bool"},
            "verdict": "str",
        }],
        "cost": {"forward": "int", "backward": "int", "detail": "str",
                 "seconds_per_estimate": "float",
                 "memory_bytes": {"temp": "int", "argument": "int", "output": "int",
                                  "alias": "int", "peak": "int"}},
        "compare": [{"site": "str", "kind": "str", "rows": [{
            "annotation": "str", "current": "bool", "applicable": "bool", "reason": "null",
            "variance": "float", "relative_bias": "float", "seconds_per_estimate": "float",
            "evaluations": {"forward": "int", "backward": "int"}, "score": "float",
            "verdict": "str"}]}],
        "parts": "null", "combination": "null",
        "verdict": "str",
    }],
}


def _shape(x):
    """The structure of a JSON value: dicts by key, lists by their first element."""
    if isinstance(x, dict):
        return {k: _shape(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_shape(x[0])] if x else []
    return {bool: "bool", int: "int", float: "float", str: "str", type(None): "null"}[type(x)]


def _json_schema_is_stable(compared):
    """Changing the schema must be deliberate: bump "gradlang.verify/N" and this golden."""
    doc = json.loads(dumps(document("m.grad", [compared])))
    assert doc["schema"] == SCHEMA == "gradlang.verify/1"
    rows = doc["exports"][0]["compare"][0]["rows"]
    doc["exports"][0]["compare"][0]["rows"] = [r for r in rows if r["applicable"]]
    assert _shape(doc) == GOLDEN
    assert {r["annotation"] for r in rows} >= {"with reparam", "with mvd", "with enum"}
    assert all(r["reason"] for r in rows if not r["applicable"])


# ---- the command line


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ok.grad").write_text("""
struct P { w: f32[3], b: f32 }
fn f(p: P, x: f32[N, 3]) -> f32 { return mean(tanh(x @ p.w + p.b) ^ 2) }
export g = grad(f, wrt=[p])
export value = f
""")
    (tmp_path / "zero.grad").write_text("""
fn f(m: f32) -> f32 {
  x ~ Normal(m, 1.0) with reparam
  return f32(x > 0.0)
}
export g = grad(expect(f, samples=1), wrt=[m])
""")
    np.savez(tmp_path / "at.npz", **{"p.w": np.ones(3, np.float32), "p.b": np.float32(0.1),
                                     "x": np.ones((4, 3), np.float32)})
    return tmp_path


def test_cli_exit_codes_and_outputs(folder, capsys):
    assert main(["verify", "ok.grad", "--at", "at.npz", "--json", "r.json", "--plot", "r.png"]) == 0
    out = capsys.readouterr().out
    assert "export g = grad(f, wrt=[p])" in out and "verdict: consistent" in out
    doc = json.loads((folder / "r.json").read_text())
    assert (doc["schema"], doc["file"], doc["verdict"]) == (SCHEMA, "ok.grad", CONSISTENT)
    assert doc["exports"][0]["leaves"][0]["name"] == "p.b"
    assert (folder / "r.png").stat().st_size > 0
    assert main(["verify", "ok.grad", "--dim", "N=4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["exports"][0]["case"] == "exact"
    assert main(["verify", "zero.grad", "--samples", "100", "--reference-samples", "1024"]) == 1
    assert "verdict: zero gradient" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["verify", "missing.grad"], "gradlang: error: cannot read missing.grad"),
    (["verify", "ok.grad", "--export", "nope", "--dim", "N=2"], "no export 'nope'"),
    (["verify", "ok.grad", "--export", "value", "--dim", "N=2"], "computes no gradient"),
    (["verify", "ok.grad"], "symbolic dims N: give their sizes (--dim N=SIZE"),
    (["verify", "ok.grad", "--at", "nothing.npz"], "cannot read nothing.npz as an .npz file"),
    (["verify", "ok.grad", "--at", "bad.npz"], "'p' (struct P): missing p.b"),
    (["verify", "ok.grad", "--at", "extra.npz"], "'y' is not a parameter of g"),
    (["verify", "ok.grad", "--at", "shape.npz"], "argument 'x': expected f32[N, 3], got shape [4, 2]"),
    (["verify", "ok.grad", "--samples", "1"], "--samples must be at least 2"),
    (["verify", "ok.grad", "--dim", "N"], "--dim expects NAME=SIZE"),
])
def test_cli_bad_input_is_a_diagnostic_not_a_traceback(folder, capsys, argv, message):
    np.savez(folder / "bad.npz", **{"p.w": np.ones(3, np.float32), "x": np.ones((4, 3))})
    np.savez(folder / "extra.npz", **{"p.w": np.ones(3), "p.b": 0.1, "x": np.ones((4, 3)),
                                      "y": np.ones(2)})
    np.savez(folder / "shape.npz", **{"p.w": np.ones(3), "p.b": 0.1, "x": np.ones((4, 2))})
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err
    assert captured.err.startswith("gradlang: error: ")


def test_cli_plot_without_matplotlib_is_a_diagnostic(folder, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert main(["verify", "ok.grad", "--at", "at.npz", "--plot", "r.png"]) == 2
    assert "gradlang: error: --plot needs matplotlib" in capsys.readouterr().err


def test_cli_program_errors_are_diagnostics(folder, capsys):
    (folder / "bad.grad").write_text("fn f(x: f32) -> f32 { return y }\nexport g = grad(f, wrt=[x])\n")
    assert main(["verify", "bad.grad"]) == 1
    assert capsys.readouterr().err.startswith("bad.grad:1:30: error: unknown name 'y'")


def test_cli_extern_exports_need_python(folder, capsys):
    (folder / "bb.grad").write_text("extern fn acc(w: f32[3]) -> f32\n"
                                    "fn f(w: f32[3]) -> f32 { return acc(w) }\n"
                                    "export g = grad(f, wrt=[w], by=es(sigma=0.1, pop=8))\n")
    assert main(["verify", "bb.grad"]) == 2
    assert "calls extern 'acc', which is not bound" in capsys.readouterr().err


def test_document_of_several_exports_takes_the_worst_verdict(families):
    reports = [families.verify("score", {"t": 0.4, "w": 2.5}, **FAST)]
    assert document("f.grad", reports)["verdict"] == CONSISTENT


@pytest.mark.slow
def test_verify_demo_example(load_example, tmp_path):
    summary = load_example("verify_demo").main(["--samples", "300", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "verify_demo.json").read_text())
    assert written["example"] == "verify_demo" and written["schema"] == SCHEMA
    assert summary["verdict"] == CONSISTENT
    assert summary["best"]["c (objective, line 10, OneHotCategorical)"] == "with enum"
    assert (tmp_path / "verify_demo_variance.png").stat().st_size > 0


# ---- minimize: each objective, then the combination


MULTI = """
fn f1(w: f32[3]) -> f32 { return sum((w - 1.0) ^ 2) }
fn f2(w: f32[3]) -> f32 { return sum(tanh(w) * w) }
fn f3(w: f32[3]) -> f32 { return sum(w * w * w) }
fn noisy(w: f32[3]) -> f32 {
  z ~ Normal(0.0, 1.0)
  return sum((w - z) ^ 2)
}
export mgda = minimize([f1, f2, f3], wrt=[w], by=mgda)
export pcgrad = minimize([f1, f2], wrt=[w], by=pcgrad(shuffle=false))
export weights = minimize([f1, f2], wrt=[w], by=weights(0.3, 0.7))
export dynamic = minimize([f1, f2], wrt=[w], by=dynamic(temperature=2))
export random_mgda = minimize([expect(noisy, samples=2), f2], wrt=[w], by=mgda)
export random_weights = minimize([expect(noisy, samples=2), f2], wrt=[w], by=weights(1, 2))
"""


@pytest.fixture(scope="module")
def multi():
    return gradlang.compile_source(MULTI, name="multi.grad")


@pytest.mark.parametrize("export", ["mgda", "pcgrad", "weights", "dynamic"])
def test_minimize_deterministic_objectives_and_exact_combination(multi, export):
    args = {"w": [0.3, -0.8, 1.2]} | ({"history": [[1.0, 2.0], [2.0, 1.0]]}
                                      if export == "dynamic" else {})
    report = multi.verify(export, args)
    assert [p.export for p in report.parts][:2] == [f"{export}[0]", f"{export}[1]"]
    assert all(p.case == "exact" and p.verdict == CONSISTENT for p in report.parts)
    # the rule's rounding relative to the largest gradient: ~16 roundings (3-term Gram entries,
    # a small solve or PCGrad's projections) amplified by the Gram's condition number, 28 at w
    assert report.combination.calls == 1 and report.combination.max_relative_error <= 16 * 28 * EPS32
    assert report.verdict == CONSISTENT and report.biased_by_design is None, report.table()


def test_mgda_reference_is_the_min_norm_point():
    """The NumPy min-norm point: the KKT conditions <d, g_i> >= |d|^2 hold, with equality on
    the support."""
    from gradlang.verify.combination import min_norm

    g = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    c = min_norm(g @ g.T)
    d = c @ g
    assert np.isclose(c.sum(), 1) and c.min() >= 0
    tol = 64 * np.finfo(np.float64).eps * np.abs(g).max() ** 2  # float64: 2-term products, a 3 x 3 solve
    assert np.all(g @ d >= d @ d - tol) and np.allclose((g @ d)[c > 0], d @ d, rtol=0, atol=tol)


def test_a_wrong_combination_is_flagged(multi, monkeypatch):
    from gradlang.estimators import combine

    monkeypatch.setattr(combine, "min_norm_faces", lambda gram: _wrong(gram))
    report = multi.verify("mgda", {"w": [0.3, -0.8, 1.2]})
    assert all(p.verdict == CONSISTENT for p in report.parts)
    assert report.combination.verdict == BIASED and report.exit_code == 1
    assert "the combination" in report.table()


def _wrong(gram):
    """Equal weights: a convex combination, but not the min-norm one."""
    import jax.numpy as jnp

    return jnp.full(gram.shape[0], 1.0 / gram.shape[0], gram.dtype)


@pytest.mark.slow  # the default suite's time (12 min on 2 cores); fast twin: test_multiobjective's verify of padded objectives
def test_minimize_random_objectives(multi):
    args = {"w": [0.3, -0.8, 1.2]}
    mgda = multi.verify("random_mgda", args, **FAST)
    assert mgda.parts[0].case == "random" and mgda.combination.calls > 1
    assert mgda.combination.verdict == CONSISTENT  # per call, at the same keys
    assert "nonlinear in the gradients" in mgda.biased_by_design
    assert mgda.verdict in (CONSISTENT, BY_DESIGN)
    weights = multi.verify("random_weights", args, **FAST)
    assert weights.biased_by_design is None and weights.verdict == CONSISTENT, weights.table()


# ---- compose: f(E g) against the plug-in at many inner samples


COMPOSE = """
fn g(t: f32) -> f32 {
  z ~ Normal(0.0, 1.0)
  return exp(t * z)
}
fn lg(u: f32) -> f32 { return log(u) }
export plugin = grad(compose(lg, expect(g, samples=4), by=plugin), wrt=[t])
export scgd = grad(compose(lg, expect(g, samples=4), by=scgd(beta=0.1)), wrt=[t])
"""


@pytest.fixture(scope="module")
def composed():
    return gradlang.compile_source(COMPOSE, name="compose.grad")


def test_compose_plugin_is_biased_by_design_by_jensens_gap(composed):
    """d/dt log E exp(t z) = t; the plug-in of N draws has mean d/dt E log g_hat, which the
    delta method puts at t - t e^(t^2) / N + O(1/N^2)."""
    t, n = 0.5, 4
    report = composed.verify("plugin", {"t": t}, samples=4000, reference_samples=2048)
    leaf = report.leaf("t")
    assert report.case == "compose" and "Jensen" in report.biased_by_design
    assert leaf.verdict == BY_DESIGN and report.exit_code == 0
    assert abs(leaf.reference[0] - t) <= 5 * leaf.reference_error[0] + leaf.reference_bound[0]
    rng = np.random.default_rng(0)  # the plug-in's own mean, by NumPy
    z = rng.standard_normal((400_000, n))
    e = np.exp(t * z)
    exact = np.mean((z * e).sum(1) / e.sum(1))
    assert abs(leaf.mean[0] - exact) <= 5 * np.sqrt(leaf.variance[0] / report.samples) + 0.003
    assert abs((exact - t) + t * np.exp(t * t) / n) < 0.05  # first order: -0.16


def test_compose_scgd_after_warm_up_is_close_to_the_reference(composed):
    report = composed.verify("scgd", {"t": 0.5}, samples=4000, reference_samples=2048)
    leaf = report.leaf("t")
    assert "scgd(beta=0.1)" in report.biased_by_design and any("call 51" in n for n in report.notes)
    assert leaf.relative_bias < 0.06 and leaf.verdict in (CONSISTENT, BY_DESIGN), report.table()


def test_cli_verifies_minimize_and_compose(folder, w_npz, capsys):
    (folder / "multi.grad").write_text(MULTI)
    assert main(["verify", "multi.grad", "--export", "mgda", "--at", "w.npz"]) == 0
    assert "combination: by=mgda" in capsys.readouterr().out
    (folder / "compose.grad").write_text(COMPOSE)
    assert main(["verify", "compose.grad", "--samples", "200", "--reference-samples", "512",
                 "--json", "-"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [e["case"] for e in doc["exports"]] == ["compose", "compose"]
    assert main(["verify", "multi.grad", "--export", "mgda[7]", "--at", "w.npz"]) == 2
    assert "no objective 7 in export 'mgda'" in capsys.readouterr().err


@pytest.fixture
def w_npz(folder):
    np.savez(folder / "w.npz", w=np.array([0.3, -0.8, 1.2], np.float32))
