"""Black-box gradients: extern functions, the zeroth-order estimators against closed forms of
the Gaussian-smoothed objective, EGGROLL's low-rank forward, sharding and artifacts."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradlang
from gradlang.runtime.host import ExternError
from gradlang.runtime.split import SplitError
from stats import EPS32, assert_close, assert_unbiased

RNG = np.random.default_rng(0)
THETA = RNG.normal(size=5).astype(np.float32)
A = RNG.normal(size=(5, 5)).astype(np.float32)
A = (A @ A.T / 5).astype(np.float32)

# f(t) = sum(sin(t)) + 1/2 t^T A t, whose Gaussian smoothing E f(t + s z) has the gradient
# cos(t) exp(-s^2 / 2) + A t: what every estimator must match on average.
SMOOTH = """
fn f(t: f32[N], a: f32[N, N]) -> f32 {
  return sum(sin(t)) + 0.5 * sum(t * (a @ t))
}
"""


def smoothed_grad(s: float) -> np.ndarray:
    return np.cos(THETA) * np.exp(-s * s / 2) + A @ THETA


def estimates(module, name: str, n: int, *args) -> np.ndarray:
    keys = jax.random.split(jax.random.key(42), n)
    out = jax.vmap(lambda k: module[name](*args, k))(keys)
    return np.asarray(out["t"], np.float64)


@pytest.mark.parametrize("by, s", [("spsa(eps=0.5)", 0.5), ("spsa(eps=0.3, samples=4)", 0.3),
                                   ("es(sigma=0.5, pop=8)", 0.5), ("es(sigma=0.2, pop=4)", 0.2),
                                   ("es(sigma=0.5, pop=7, antithetic=false)", 0.5)])
def test_estimators_are_unbiased_for_the_smoothed_gradient(by, s):
    m = gradlang.compile_source(SMOOTH + f"export g = grad(f, wrt=[t], by={by})")
    assert_unbiased(estimates(m, "g", 8000, THETA, A), smoothed_grad(s))


@pytest.mark.parametrize("by", ["spsa(eps=1.0)", "es(sigma=1.0, pop=2)",
                                "es(sigma=1.0, pop=1, antithetic=false)"])
def test_the_estimate_is_of_the_smoothed_gradient_not_the_plain_one(by):
    """f(t) = sum(sin(t)) at t = 0: the smoothed gradient is exp(-1/2) = 0.61 per coordinate,
    the plain one 1. Every estimate here is (sum_i sin(z_i)) z_j (f is odd about 0, so the
    one-sided difference is the antithetic one), of variance E[sin(z)^2 z^2] + 4 E[sin(z)^2] -
    e^-1 = 0.70 + 1.73 - 0.37 = 2.06 (D = 5): over 8,000 estimates the mean's standard error is
    0.016 and the gap 0.39 is 24 of them, far past the 10 asserted."""
    m = gradlang.compile_source(
        "fn f(t: f32[N]) -> f32 { return sum(sin(t)) }\n" f"export g = grad(f, wrt=[t], by={by})")
    samples = estimates(m, "g", 8000, np.zeros(5, np.float32))
    assert_unbiased(samples, np.full(5, math.exp(-0.5)))
    se = samples.std(0, ddof=1) / np.sqrt(len(samples))
    assert np.all(np.abs(samples.mean(0) - 1.0) > 10 * se)


# A quadratic in a matrix and a vector: EGGROLL's low-rank perturbation has identity
# covariance and is symmetric, so its estimate is unbiased for the exact gradient.
QUADRATIC = """
fn q(w: f32[M, K], b: f32[K], x: f32[B, M], y: f32[B, K]) -> f32 {
  let r = x @ w + b - y
  return 0.5 * sum(r * r)
}
export g = grad(q, wrt=[w, b])
export e = grad(q, wrt=[w, b], by=eggroll(sigma=0.1, pop=16, rank=2))
export e1 = grad(q, wrt=[w, b], by=eggroll(sigma=0.1, pop=15, rank=1, antithetic=false))
"""
X = RNG.normal(size=(12, 6)).astype(np.float32)
Y = RNG.normal(size=(12, 4)).astype(np.float32)
W = (0.3 * RNG.normal(size=(6, 4))).astype(np.float32)
BIAS = np.zeros(4, np.float32)


@pytest.mark.parametrize("name", ["e", "e1"])
def test_eggroll_is_unbiased_on_a_quadratic(name):
    m = gradlang.compile_source(QUADRATIC)
    exact = m.g(W, BIAS, X, Y)
    keys = jax.random.split(jax.random.key(7), 3000)
    out = jax.vmap(lambda k: m[name](W, BIAS, X, Y, k))(keys)
    for leaf in ("w", "b"):
        samples = np.asarray(out[leaf], np.float64).reshape(3000, -1)
        assert_unbiased(samples, np.asarray(exact[leaf], np.float64).ravel())


CONV_QUADRATIC = """
fn q(k: f32[3, 2, 3], x: f32[B, 7, 3], y: f32[B, 7, 2]) -> f32 {
  let r = conv(x, transpose(k, [0, 2, 1])) - y
  return 0.5 * sum(r * r)
}
export g = grad(q, wrt=[k])
export e = grad(q, wrt=[k], by=eggroll(sigma=0.1, pop=8, rank=1))
export s = grad(q, wrt=[k], by=spsa(eps=0.01, samples=4))
"""


@pytest.mark.parametrize("name", ["e", "s"])
def test_a_convolution_kernel_is_perturbed_without_bias(name):
    """A conv is linear in its kernel, so the loss is a quadratic in it: eggroll's low-rank
    noise on the kernel (as the matrix [3 * 2, 3] of its leading dims by its last) has
    identity covariance, and SPSA's regenerated Gaussian noise on it is exact for a quadratic:
    both estimates are unbiased. explain says how eggroll perturbs it."""
    from gradlang.explain import explain
    m = gradlang.compile_source(CONV_QUADRATIC)
    assert ("perturbed: k (kernels, as the matrix of the leading dims by the last): low-rank "
            "A B^T / sqrt(1)") in explain(m.ir)
    k = (0.3 * RNG.normal(size=(3, 2, 3))).astype(np.float32)
    x = RNG.normal(size=(4, 7, 3)).astype(np.float32)
    y = RNG.normal(size=(4, 7, 2)).astype(np.float32)
    exact = m.g(k, x, y)["k"]
    keys = jax.random.split(jax.random.key(5), 3000)
    samples = np.asarray(jax.vmap(lambda key: m[name](k, x, y, key)["k"])(keys), np.float64)
    assert_unbiased(samples.reshape(3000, -1), np.asarray(exact, np.float64).ravel())


def test_eggroll_low_rank_forward_equals_the_materialized_matrix():
    from gradlang.runtime.lower import Lowering
    from gradlang.runtime.perturbed import LowRank

    m = gradlang.compile_source("""
fn f(w: f32[M, K], x: f32[B, M]) -> f32 {
  return sum(tanh(x @ w)) + sum(w * w) + sum(transpose(w) @ transpose(x))
}
export f = f
""")
    f = Lowering(m.ir).function("f")
    a, b = RNG.normal(size=(6, 2)).astype(np.float32), RNG.normal(size=(4, 2)).astype(np.float32)
    low = LowRank(jnp.asarray(W), jnp.asarray(a), jnp.asarray(b), 0.3)
    # 6-term products (and rank-2 corrections), tanh, then sums of 48 and 24 terms, both sides
    assert_close(f(low, X), f(W + 0.3 * a @ b.T, X), ops=2 * (6 + 2 + 4 + 48 + 24))
    assert_close(low.rmatmul(X), X @ (W + 0.3 * a @ b.T), ops=2 * (6 + 2 + 2))
    # a lookup reads the perturbed rows (an id out of range: NaN, as a dense table's)
    ids = np.array([[0, 5, 5], [2, -1, 3]], np.int32)
    assert_close(low.take(jnp.asarray(ids)), (W + 0.3 * a @ b.T)[ids], ops=2 * (2 + 2))
    assert np.all(np.isnan(low.take(jnp.asarray([6, -7]))))


def test_eggroll_descends_a_quadratic_to_its_minimum():
    m = gradlang.compile_source(QUADRATIC)
    w, b = np.zeros_like(W), np.zeros_like(BIAS)
    solution, *_ = np.linalg.lstsq(np.c_[X, np.ones(12)], Y, rcond=None)
    key = jax.random.key(0)
    for i in range(400):
        g = m.e(w, b, X, Y, jax.random.fold_in(key, i))
        w, b = w - 0.02 * np.asarray(g["w"]), b - 0.02 * np.asarray(g["b"])
    start = np.linalg.norm(solution)
    assert np.linalg.norm(np.r_[w, b[None]] - solution) < 0.05 * start


EXTERN = """
extern fn score(logits: f32[B, C], labels: i32[B]) -> f32
fn objective(w: f32[D, C], x: f32[B, D], labels: i32[B]) -> f32 {
  return score(x @ w, labels) + 0.01 * sum(w * w)
}
export value = objective
export es = value_and_grad(objective, wrt=[w], by=es(sigma=0.1, pop=8))
export spsa1 = grad(objective, wrt=[w], by=spsa(eps=0.01))
export spsa4 = grad(objective, wrt=[w], by=spsa(eps=0.01, samples=4))
"""
XE = RNG.normal(size=(20, 3)).astype(np.float32)
LABELS = RNG.integers(0, 2, 20).astype(np.int32)
WE = RNG.normal(size=(3, 2)).astype(np.float32)


def error_rate(logits, labels):
    return np.mean(np.argmax(logits, -1) != labels)


def test_an_extern_runs_with_its_declared_shapes_under_vmap():
    seen = []

    def score(logits, labels):
        seen.append(logits.shape)
        return error_rate(logits, labels)

    m = gradlang.compile_source(EXTERN, externs={"score": score})
    ws = np.stack([WE, -WE, 2 * WE])
    values = jax.vmap(m.value, in_axes=(0, None, None))(ws, XE, LABELS)
    want = [error_rate(XE @ w, LABELS) + 0.01 * np.sum(w * w) for w in ws]
    assert_close(values, np.asarray(want), ops=8)  # an exact rate k / 20 plus 0.01 times a 6-term sum
    assert set(seen) == {(20, 2)}
    vectorized = gradlang.compile_source(EXTERN, externs={"score": gradlang.batched(
        lambda logits, labels: np.mean(np.argmax(logits, -1) != labels, axis=-1))})
    assert_close(jax.vmap(vectorized.value, in_axes=(0, None, None))(ws, XE, LABELS), np.asarray(want), ops=8)


def test_extern_binding_errors_are_clear():
    unbound = gradlang.compile_source(EXTERN)
    with pytest.raises(ExternError, match="calls extern 'score', which is not bound"):
        unbound.value(WE, XE, LABELS)
    with pytest.raises(ExternError, match="declares no extern 'scor'"):
        gradlang.compile_source(EXTERN, externs={"scor": error_rate})
    wrong = gradlang.compile_source(EXTERN, externs={"score": lambda l, y: np.zeros(3)})
    with pytest.raises(Exception, match="returned shape \\[3\\], declared f32 = \\[\\]"):
        wrong.value(WE, XE, LABELS)


def test_black_box_estimates_through_an_extern_match_the_same_estimate_without_it():
    """The extern (error rate) replaced by the same computation in gradlang gives the same
    estimate for the same key: the estimator sees only values."""
    m = gradlang.compile_source(EXTERN, externs={"score": error_rate})
    inline = gradlang.compile_source(EXTERN.replace(
        "extern fn score(logits: f32[B, C], labels: i32[B]) -> f32",
        "fn score(logits: f32[B, C], labels: i32[B]) -> f32 {\n"
        "  return mean(f32(argmax(logits, axis=1) @ f32(arange(C)) != f32(labels)))\n}"))
    key = jax.random.key(3)
    # the rate is exact (k / 20) on both sides; 0.01 sum(w^2) (8 roundings, at most twice its
    # value at WE once perturbed) differs by rounding, divided by 2 eps = 0.02 (sigma: 0.2) and
    # multiplied by |z| <= 5
    atol = 2 * 8 * EPS32 * 2 * 0.01 * np.sum(WE ** 2) / 0.02 * 5
    for name in ("es", "spsa1", "spsa4"):
        a, b = m[name](WE, XE, LABELS, key), inline[name](WE, XE, LABELS, key)
        a, b = (a[1], b[1]) if name == "es" else (a, b)
        np.testing.assert_allclose(a["w"], b["w"], rtol=0, atol=atol)


def test_artifacts_split_at_extern_calls_and_need_the_bindings(tmp_path):
    m = gradlang.compile_source(EXTERN.replace("export spsa4", "# export spsa4"),
                                externs={"score": error_rate})
    path = m.save(tmp_path / "blackbox.gx")
    loaded = gradlang.load(path, externs={"score": error_rate})
    key = jax.random.key(5)
    np.testing.assert_array_equal(loaded.value(WE, XE, LABELS), m.value(WE, XE, LABELS))
    np.testing.assert_array_equal(loaded.es(WE, XE, LABELS, key)[1]["w"],
                                  m.es(WE, XE, LABELS, key)[1]["w"])
    np.testing.assert_array_equal(loaded.spsa1(WE, XE, LABELS, key)["w"],
                                  m.spsa1(WE, XE, LABELS, key)["w"])
    ws = np.stack([WE, -WE])
    np.testing.assert_array_equal(jax.vmap(loaded.value, in_axes=(0, None, None))(ws, XE, LABELS),
                                  jax.vmap(m.value, in_axes=(0, None, None))(ws, XE, LABELS))
    with pytest.raises(ExternError, match="not bound"):
        gradlang.load(path).value(WE, XE, LABELS)


def test_an_artifact_takes_the_bindings_its_module_took(tmp_path):
    """An extern that no export calls is still declared: the externs that compiled the module
    load its artifact, and a misspelled one is refused at load as at compile."""
    source = "extern fn unused(x: f32) -> f32\n" + EXTERN.split("export es")[0]
    bindings = {"score": error_rate, "unused": np.sin}
    m = gradlang.compile_source(source, externs=bindings)
    path = m.save(tmp_path / "unused.gx")
    loaded = gradlang.load(path, externs=bindings)
    assert loaded.header["externs"] == ["score", "unused"]
    np.testing.assert_array_equal(loaded.value(WE, XE, LABELS), m.value(WE, XE, LABELS))
    with pytest.raises(ExternError, match="declares no extern 'unusd'"):
        gradlang.load(path, externs={"score": error_rate, "unusd": np.sin})


def test_an_extern_in_a_loop_is_refused_when_saving(tmp_path):
    m = gradlang.compile_source(EXTERN, externs={"score": error_rate})
    with pytest.raises(SplitError, match="export 'spsa4' calls extern 'score' and cannot be saved"):
        m.save(tmp_path / "x.gx")


def test_the_cli_reports_an_unsplittable_artifact(tmp_path, capsys):
    from gradlang.cli import main

    (tmp_path / "m.grad").write_text(EXTERN)
    assert main(["compile", str(tmp_path / "m.grad"), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    # a diagnostic at the export, with its line and caret
    assert "m.grad:9:1: error: export 'spsa4' calls extern 'score'" in err
    assert "\n  export spsa4 = grad(" in err and "\n  ^^^^" in err
    assert "Traceback" not in err


@pytest.mark.slow  # the default suite's time (12 min on 2 cores); fast twin: test_sharding's ES on 8 devices
def test_population_sharding_gives_the_numbers_of_one_device():
    src = QUADRATIC + "export s = grad(q, wrt=[w, b], by=es(sigma=0.1, pop=32))\n"
    script = textwrap.dedent(f"""
        import numpy as np, jax, gradlang
        from jax.sharding import Mesh
        src = {src!r}
        rng = np.random.default_rng(0)
        args = (rng.normal(size=(6, 4)).astype(np.float32), np.zeros(4, np.float32),
                rng.normal(size=(12, 6)).astype(np.float32), rng.normal(size=(12, 4)).astype(np.float32),
                jax.random.key(0))
        assert len(jax.devices()) == 8
        mesh = Mesh(np.array(jax.devices()), ("pop",))
        one, many = gradlang.compile_source(src), gradlang.compile_source(src, mesh=mesh)
        assert "sharding" in many.s._fn.lower(*args).as_text()
        for name in ("s", "e"):
            a, b = one[name](*args), many[name](*args)
            for leaf in a:
                # the same numbers up to the rounding of reordered reductions: the population's
                # 32 members and their 24-term products, both sides
                atol = 2 * (32 + 24) * np.finfo(np.float32).eps * np.abs(a[leaf]).max()
                np.testing.assert_allclose(a[leaf], b[leaf], rtol=0, atol=atol)
        print("ok")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_explain_names_the_estimator_its_target_the_externs_and_the_cost():
    from gradlang.explain import explain

    text = explain(gradlang.compile_source(EXTERN).ir)
    assert "export es = value_and_grad(objective, wrt=[w], by=es(sigma=0.1, pop=8, antithetic=true))" in text
    assert "unbiased for the gradient of the Gaussian-smoothed objective E f(w + 0.1 z)" in text
    assert "externs called: score" in text
    assert "cost: 9 forward evaluations, no backward pass" in text  # 8 + the value
    assert "cost: 8 forward evaluations" in text  # spsa with 4 samples


def test_spsa_noise_is_standard_normal_and_independent_across_keys():
    from gradlang.runtime.perturbed import hashed_normal

    n = 400_000
    z = np.asarray(hashed_normal(jax.random.key(11), (n,), jnp.float32), np.float64)
    se = 1 / np.sqrt(n)
    assert abs(z.mean()) < 5 * se and abs(z.var() - 1) < 5 * np.sqrt(2) * se
    assert abs(np.mean(z ** 3)) < 5 * np.sqrt(15) * se  # symmetric
    assert abs(np.mean(z ** 4) - 3) < 5 * np.sqrt(96) * se  # Gaussian kurtosis
    assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < 5 * se  # neighbours independent
    other = np.asarray(hashed_normal(jax.random.key(12), (n,), jnp.float32))
    assert abs(np.corrcoef(z, other)[0, 1]) < 5 * se
