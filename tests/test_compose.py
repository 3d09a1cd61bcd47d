"""Compositional objectives f(E[g]): `compose(f, expect(g, samples=N), by=scgd(...) | plugin)`.

Numbers are checked against hand-written JAX (exactness) and closed forms (bias, tracking);
statistical checks use independent chains, each run for T calls from zeros, and a 5 standard
error bound.
"""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradlang
from gradlang.explain import explain
from stats import assert_close

Z = 5.0
SRC = """
fn g(t: f32) -> f32 {
  z ~ Normal(0.0, 1.0)
  return t * (1.0 + z)
}
fn square(u: f32) -> f32 { return u * u }
export scgd = value_and_grad(compose(square, expect(g, samples=4), by=scgd(beta=0.1)), wrt=[t])
export plugin = value_and_grad(compose(square, expect(g, samples=4), by=plugin), wrt=[t])
"""
N, BETA, THETA = 4, 0.1, 1.5
SRC_OPS = 32
"""SRC's rounding, for `assert_close` between two compilations of it: a mean of 4 samples, the
square and its derivative, the moving average's update: ~16 roundings a side."""


def weights(beta: float, steps: int) -> np.ndarray:
    """The weight of each call's estimate in u after `steps` calls: b_n = max(beta, 1/n)."""
    w = np.zeros(steps)
    for n in range(1, steps + 1):
        b = max(beta, 1.0 / n)
        w *= 1.0 - b
        w[n - 1] = b
    return w


def chains(step, stateful: bool, chains: int, steps: int, seed: int = 0):
    """The last call's gradient and u of independent chains at t = THETA."""
    keys = jax.random.split(jax.random.key(seed), (steps, chains))
    batched = jax.vmap(step, in_axes=(None, 0, 0) if stateful else (None, 0))

    @jax.jit
    def run(keys):
        def body(state, ks):
            if stateful:
                _, grads, state = batched(THETA, state, ks)
                return state, grads["t"]
            _, grads = batched(THETA, ks)
            return state, grads["t"]

        init = (jnp.zeros(chains), jnp.zeros(chains))
        state, grads = jax.lax.scan(body, init, keys)
        return grads[-1], state[0]

    g, u = run(keys)
    return np.asarray(g, np.float64), np.asarray(u, np.float64)


@pytest.fixture(scope="module")
def model():
    return gradlang.compile_source(SRC, name="compose.grad")


CHAINS, STEPS = 6000, 30


@pytest.fixture(scope="module")
def scgd_chains(model):
    """The gradient and u at the last of STEPS calls of CHAINS independent SCGD chains."""
    return chains(model.scgd, True, CHAINS, STEPS, seed=1)


def test_deterministic_inner_is_exact():
    """With no draws in g, SCGD (any beta: its first call, and beta=1 at every call) and the
    plug-in are the exact gradient of f(g(w), a)."""
    m = gradlang.compile_source("""
fn g(w: f32[3], x: f32[5, 3]) -> f32[2] {
  let h = tanh(x @ w)
  return stack([mean(h * h) + 0.5, sum(w * w)])
}
fn f(u: f32[2], a: f32) -> f32 { return log(u[0]) * a + sin(u[1]) }
export one = value_and_grad(compose(f, expect(g, samples=3), by=scgd(beta=1.0)), wrt=[w, a])
export tenth = grad(compose(f, expect(g, samples=3), by=scgd(beta=0.1)), wrt=[w, a])
export plug = grad(compose(f, expect(g, samples=3), by=plugin), wrt=[w, a])
""")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)

    def ref(w, a):
        h = jnp.tanh(x @ w)
        u = jnp.stack([jnp.mean(h * h) + 0.5, jnp.sum(w * w)])
        return jnp.log(u[0]) * a + jnp.sin(u[1])

    state = (jnp.zeros(2), jnp.float32(0.0))
    key = jax.random.key(0)
    one, tenth, plug = jax.jit(m.one), jax.jit(m.tenth), jax.jit(m.plug)
    for i in range(3):
        w = jnp.asarray(rng.normal(size=3), jnp.float32)
        a = jnp.float32(0.5 + i)
        value, grads, state = one(w, x, a, state, key)
        want = jax.grad(ref, argnums=(0, 1))(w, a)
        # 3-term products, tanh, a 5-term mean, a mean of 3 samples, log and sin (4 each) and a
        # few steps, forward and backward, both sides: 2 * 2 * 25
        assert_close(value, ref(w, a), ops=100)
        assert_close(grads, {"w": want[0], "a": want[1]}, ops=100)
        assert float(state[1]) == i + 1
        first, _ = tenth(w, x, a, (jnp.zeros(2), jnp.float32(0.0)), key)
        assert_close(first["w"], want[0], ops=100)
        assert_close(plug(w, x, a, key)["w"], want[0], ops=100)


def test_moving_average_tracks_the_inner_expectation(scgd_chains):
    """At fixed t, u is a weighted mean of unbiased estimates: its mean is E g = t and its
    variance Var(g_hat) * sum w_i^2 (0.053 of one estimate's after 30 calls at beta = 0.1)."""
    _, u = scgd_chains
    se = u.std(ddof=1) / np.sqrt(CHAINS)
    assert abs(u.mean() - THETA) < Z * se
    var = THETA**2 / N * np.sum(weights(BETA, STEPS) ** 2)
    assert abs(u.var(ddof=1) / var - 1) < Z * np.sqrt(2 / (CHAINS - 1))
    assert u.var() < 0.1 * THETA**2 / N  # an order of magnitude below one estimate's


def test_gradient_bias_scgd_against_plugin(model, scgd_chains):
    """d/dt (E g)^2 = 2t. The gradient at call T is J_T 2 u_T, J_T = 1 + mean(z_T): its mean is
    2t (1 + w_T / N), w_T the weight of the last estimate in u (beta at T >= 10); the plug-in's
    is 2t (1 + 1/N). Both closed forms hold within 5 standard errors, and the plug-in is
    measurably biased."""
    m = CHAINS
    g, _ = scgd_chains
    want = 2 * THETA * (1 + weights(BETA, STEPS)[-1] / N)
    se = g.std(ddof=1) / np.sqrt(m)
    assert abs(g.mean() - want) < Z * se
    p, _ = chains(model.plugin, False, m, 1, seed=2)
    se_p = p.std(ddof=1) / np.sqrt(m)
    assert abs(p.mean() - 2 * THETA * (1 + 1 / N)) < Z * se_p
    assert p.mean() - 2 * THETA > Z * se_p
    assert abs(g.mean() - 2 * THETA) < abs(p.mean() - 2 * THETA) / 5


def test_plugin_value_bias_is_the_closed_form():
    """f = log, g = exp(t + s z): the plug-in value log(mean of N draws) has mean t (N = 1,
    Jensen gap -s^2/2 from log E g = t + s^2/2) and, for N = 4, the mean of a float64
    reference of 10^6 draws."""
    m = gradlang.compile_source("""
fn g(t: f32, s: f32) -> f32 {
  z ~ Normal(0.0, 1.0)
  return exp(t + s * z)
}
fn lg(u: f32) -> f32 { return log(u) }
export one = compose(lg, expect(g, samples=1), by=plugin)
export four = compose(lg, expect(g, samples=4), by=plugin)
""")
    t, s, reps = 0.3, 0.8, 10000
    keys = jax.random.split(jax.random.key(3), reps)
    one = np.asarray(jax.jit(jax.vmap(m.one, in_axes=(None, None, 0)))(t, s, keys), np.float64)
    assert abs(one.mean() - t) < Z * one.std(ddof=1) / np.sqrt(reps)
    assert t + s**2 / 2 - one.mean() > Z * one.std(ddof=1) / np.sqrt(reps)
    four = np.asarray(jax.jit(jax.vmap(m.four, in_axes=(None, None, 0)))(t, s, keys), np.float64)
    z = np.random.default_rng(0).normal(size=(10**6, 4))
    ref = np.log(np.mean(np.exp(t + s * z), axis=1))
    se = np.sqrt(four.var(ddof=1) / reps + ref.var(ddof=1) / ref.size)
    assert abs(four.mean() - ref.mean()) < Z * se


def test_score_function_inner_estimator_is_kept():
    """A discrete inner draw keeps its score-function estimator (leave-one-out over the inner
    samples): with a linear f the composition's gradient is that of E g, unbiased."""
    m = gradlang.compile_source("""
fn g(l: f32) -> f32 {
  b ~ Bernoulli(logits=l)
  return 3.0 * b + 1.0
}
fn twice(u: f32) -> f32 { return 2.0 * u }
export step = grad(compose(twice, expect(g, samples=4), by=scgd(beta=0.5)), wrt=[l])
""")
    assert "score function" in explain(m.ir)
    l, reps = 0.4, 20000
    keys = jax.random.split(jax.random.key(4), reps)
    state = (jnp.zeros(reps), jnp.zeros(reps))
    grads, _ = jax.jit(jax.vmap(m.step, in_axes=(None, 0, 0)))(l, state, keys)
    est = np.asarray(grads["l"], np.float64)
    p = 1 / (1 + np.exp(-l))
    assert abs(est.mean() - 2 * 3 * p * (1 - p)) < Z * est.std(ddof=1) / np.sqrt(reps)


def test_state_threads_through_jit_and_descend(model):
    state = (jnp.float32(0.0), jnp.float32(0.0))
    key = jax.random.key(5)
    eager = model.scgd(THETA, state, key)
    jitted = jax.jit(model.scgd)(THETA, state, key)
    assert_close(jitted, eager, ops=SRC_OPS)
    assert model.scgd.signature.stateful
    assert [n for n, _ in model.scgd.signature.params] == ["t", "inner", "key"]
    m = gradlang.compile_source(SRC.replace("value_and_grad(compose(square, expect(g, samples=4), "
                                            "by=scgd(beta=0.1)), wrt=[t])",
                                            "descend(compose(square, expect(g, samples=4)), "
                                            "wrt=[t], lr=0.25)"))
    new, state2 = m.scgd(jnp.float32(THETA), state, key)
    assert_close(new["t"], THETA - 0.25 * eager[1]["t"], ops=SRC_OPS + 2, scale=THETA)
    assert_close(state2[0], eager[2][0], ops=SRC_OPS)


def test_artifact_round_trip_in_a_fresh_process(model, tmp_path):
    path = tmp_path / "compose.gx"
    model.save(str(path))
    state = (jnp.float32(0.7), jnp.float32(3.0))
    value, grads, (u, n) = model.scgd(THETA, state, jax.random.key(6))
    code = (f"import jax, jax.numpy as jnp, gradlang\n"
            f"art = gradlang.load({str(path)!r})\n"
            f"v, g, (u, n) = art.scgd({THETA}, (jnp.float32(0.7), jnp.float32(3.0)), "
            f"jax.random.key(6))\n"
            f"print(float(v), float(g['t']), float(u), float(n))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    got = [float(x) for x in out.stdout.split()]
    assert_close(np.array(got), np.array([value, grads["t"], u, n]), ops=SRC_OPS, scale=np.abs(got))
    assert got[3] == 4.0


def test_explain_names_the_estimator_and_state(model):
    text = explain(model.ir)
    assert ("compose: moving-average inner estimate u <- (1 - b) u + b g_hat, g_hat = the mean "
            "of 4 draws of g, b = max(beta=0.1, 1/n) at the n-th call") in text
    assert "state 'inner' = (u, n)" in text
    assert "compose: plug-in square(g_hat)" in text
    default = gradlang.compile_source(SRC.replace(", by=scgd(beta=0.1)", ""))
    assert "(the default; by=plugin for the plug-in)" in explain(default.ir)


def test_unnormalized_density_example_runs(run_example):
    """A short run: every method improves the held-out log-likelihood of the initial model
    (the noise distribution itself, about -2.2) and reports its log Z against the quadrature."""
    summary, _ = run_example("unnormalized_density", ["--steps", "60", "--seeds", "1",
                                                      "--train", "500", "--batch", "64"],
                             {"methods", "ceiling"})
    for name in ("scgd", "plugin", "nce"):
        r = summary["methods"][name]
        assert -2.0 < r["held_out_log_likelihood"][0] < summary["ceiling"]
        assert np.isfinite(r["log_z_error"][0])


def test_verify_reports_compose_as_biased_by_design(model):
    """verify takes compose exports: the case, the plug-in reference and why each estimator is
    biased (tests/test_verify.py checks the measured biases)."""
    for name in ("scgd", "plugin"):
        report = model.verify(name, {"t": 0.7}, samples=200, reference_samples=512)
        assert report.case == "compose" and report.reference.method == "plug-in at large M"
        assert report.biased_by_design and report.exit_code == 0


def test_plugin_in_a_body_is_f_of_the_expectation():
    """compose(f, expect(g(t), samples=N), by=plugin) in a body is f(expect(g(t), samples=N)):
    the same program, so the same numbers under the same key."""
    m = gradlang.compile_source("""
fn g(t: f32) -> f32 {
  z ~ Normal(t, 1.0)
  return z * z
}
fn f(u: f32) -> f32 { return sqrt(u + 1.0) }
fn composed(t: f32) -> f32 { return compose(f, expect(g(t), samples=4), by=plugin) * t }
fn written(t: f32) -> f32 { return f(expect(g(t), samples=4)) * t }
export a = value_and_grad(composed, wrt=[t])
export b = value_and_grad(written, wrt=[t])
""")
    key = jax.random.key(7)
    (va, ga), (vb, gb) = m.a(jnp.float32(0.3), key), m.b(jnp.float32(0.3), key)
    assert va == vb and ga["t"] == gb["t"]
