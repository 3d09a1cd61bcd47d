"""Random choices: every (distribution, estimator) pair is unbiased for a closed-form gradient.

Each statistical test averages N = 10^4 gradient estimates (independent fixed-seed keys) of an
expectation whose gradient is known in closed form, and asserts that every coordinate of the
mean is within 5 standard errors of the truth, the standard error being computed from the
sampled estimates themselves (`assert_unbiased`). A coordinate whose estimates all coincide
(a pathwise gradient that does not depend on the draw) has a zero standard error; it is then
compared with a float32 rounding tolerance of 1e-5 relative.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradlang
from gradlang.runtime.signature import ArgumentError
from stats import N, assert_close, assert_unbiased, estimates, sigmoid, softmax, total_variance

EULER = 0.5772156649015329


def compile_objective(body: str, params: str, estimator: str = "", samples: int = 1):
    """`fn f(params) -> f32 { x ~ <dist> with <estimator>; return <objective> }` as a grad export."""
    src = f"""
fn f({params}) -> f32 {{
{body}
}}
export g = grad(expect(f, samples={samples}), wrt=[{', '.join(p.split(':')[0].strip() for p in params.split(', '))}])
"""
    return gradlang.compile_source(src.replace("WITH", f"with {estimator}" if estimator else ""))


# ---- continuous families: pathwise (the automatic choice) and score function

CONTINUOUS = [
    # id, params, args, draw + objective, closed-form gradient
    ("Normal", "m: f32, s: f32", (0.7, 1.3), "x ~ Normal(m, s) WITH\nreturn x * x",
     lambda m, s: [2 * m, 2 * s]),
    ("LogNormal", "m: f32, s: f32", (0.2, 0.5), "x ~ LogNormal(m, s) WITH\nreturn x",
     lambda m, s: [math.exp(m + s * s / 2), s * math.exp(m + s * s / 2)]),
    ("Uniform", "a: f32, b: f32", (-0.5, 2.0), "x ~ Uniform(a, b) WITH\nreturn x * x",
     lambda a, b: [(2 * a + b) / 3, (a + 2 * b) / 3]),
    ("Exponential", "r: f32", (1.7,), "x ~ Exponential(r) WITH\nreturn x * x",
     lambda r: [-4 / r ** 3]),
    ("Gamma", "a: f32, r: f32", (2.5, 1.5), "x ~ Gamma(a, r) WITH\nreturn x",
     lambda a, r: [1 / r, -a / r ** 2]),
    ("Beta", "a: f32, b: f32", (2.0, 3.0), "x ~ Beta(a, b) WITH\nreturn x",
     lambda a, b: [b / (a + b) ** 2, -a / (a + b) ** 2]),
    ("Gumbel", "m: f32, s: f32", (0.3, 0.8), "x ~ Gumbel(m, s) WITH\nreturn x * x",
     lambda m, s: [2 * (m + EULER * s), math.pi ** 2 * s / 3 + 2 * EULER * (m + EULER * s)]),
]


@pytest.mark.parametrize("case, estimator", [
    pytest.param(c, e, id=f"{c[0]}-{e or 'auto'}") for c in CONTINUOUS
    for e in ["", "reparam", "score(baseline=none)", "score"]
    # score on Uniform is a compile error (its support depends on its parameters):
    # tests/diagnostics/random_uniform_score.grad
    if not (c[0] == "Uniform" and e.startswith("score"))])
def test_continuous_families_are_unbiased(case, estimator):
    name, params, args, body, truth = case
    samples = 4 if estimator == "score" else 1  # auto baseline: leave-one-out over 4 samples
    m = compile_objective(body, params, estimator, samples)
    chosen = m.ir.facts.estimators[0].estimator.name
    assert chosen == (estimator.split("(")[0] or "reparam")
    grads = estimates(m.g, args)
    names = [p.split(":")[0] for p in params.split(", ")]
    assert_unbiased(np.stack([grads[n] for n in names], -1), truth(*args))


@pytest.mark.parametrize("estimator", ["", "reparam", "score"])
def test_dirichlet_is_unbiased(estimator):
    """E[x . w], x ~ Dirichlet(a): d/da_j = (w_j a0 - w . a) / a0^2; pathwise by implicit
    reparameterization of its Gammas, or the score function."""
    a, w = np.array([0.8, 2.0, 1.5], np.float32), np.array([1.0, -2.0, 0.5], np.float32)
    m = compile_objective("x ~ Dirichlet(a) WITH\nreturn sum(x * w)", "a: f32[3], w: f32[3]",
                          estimator, 4 if estimator == "score" else 1)
    assert m.ir.facts.estimators[0].estimator.name == (estimator or "reparam")
    grads = estimates(m.g, (a, w))
    a0 = a.sum()
    assert_unbiased(grads["a"], (w * a0 - w @ a) / a0 ** 2)
    assert_unbiased(grads["w"], a / a0)


# ---- discrete families: score function (the only unbiased choice for them)

DISCRETE = [
    ("Bernoulli", "t: f32, w: f32", (0.4, 2.5), "c ~ Bernoulli(logits=t) WITH\nreturn c * w",
     lambda t, w: [w * sigmoid(t) * (1 - sigmoid(t)), sigmoid(t)]),
    ("Bernoulli-probs", "p: f32", (0.3,), "c ~ Bernoulli(probs=p) WITH\nreturn (c + 1.0) * (c + 1.0)",
     lambda p: [3.0]),
    ("Poisson", "r: f32", (1.8,), "x ~ Poisson(r) WITH\nreturn x * x", lambda r: [1 + 2 * r]),
]


@pytest.mark.parametrize("estimator", ["", "score(baseline=none)"])
@pytest.mark.parametrize("case", DISCRETE, ids=[c[0] for c in DISCRETE])
def test_discrete_families_are_unbiased(case, estimator):
    name, params, args, body, truth = case
    samples = 1 if estimator else 4
    m = compile_objective(body, params, estimator, samples)
    assert m.ir.facts.estimators[0].estimator.name == "score"
    grads = estimates(m.g, args)
    names = [p.split(":")[0] for p in params.split(", ")]
    assert_unbiased(np.stack([grads[n] for n in names], -1), truth(*args))


THETA = np.array([0.3, -1.0, 0.8, 0.1], np.float32)
V = np.array([1.0, -2.0, 0.5, 3.0], np.float32)


@pytest.mark.parametrize("draw, value", [
    ("k ~ Categorical(logits=t)", "v[k]"),
    ("k ~ Categorical(probs=softmax(t))", "v[k]"),
    ("e ~ OneHotCategorical(logits=t)", "sum(e * v)"),
], ids=["Categorical", "Categorical-probs", "OneHotCategorical"])
def test_categorical_families_are_unbiased(draw, value):
    m = compile_objective(f"{draw}\nreturn {value}", "t: f32[4], v: f32[4]", samples=4)
    grads = estimates(m.g, (THETA, V))
    p = softmax(THETA)
    assert_unbiased(grads["t"], p * (V - p @ V))
    assert_unbiased(grads["v"], p)


def test_mixture_of_normals_is_unbiased():
    m = compile_objective("x ~ MixtureNormal(l, mu, s)\nreturn x * x", "l: f32[3], mu: f32[3], s: f32[3]",
                          samples=4)
    l, mu, s = (np.array(a, np.float32) for a in ([0.2, -0.4, 0.9], [-1.0, 0.5, 2.0], [0.5, 1.0, 0.3]))
    grads = estimates(m.g, (l, mu, s))
    p = softmax(l)
    second = mu ** 2 + s ** 2  # E[x^2] of each component
    assert_unbiased(grads["l"], p * (second - p @ second))
    assert_unbiased(grads["mu"], 2 * p * mu)
    assert_unbiased(grads["s"], 2 * p * s)


# ---- the automatic choice avoids silently wrong pathwise gradients


def test_a_draw_reaching_an_if_condition_gets_the_score_function():
    """d/dm P(z > 0) for z ~ Normal(m, 1) is the density phi(m); a pathwise gradient is 0."""
    m = compile_objective("z ~ Normal(m, 1.0)\nreturn if z > 0.0 then 1.0 else 0.0", "m: f32",
                          samples=4)
    site = m.ir.facts.estimators[0]
    assert site.estimator.name == "score" and "non-differentiable" in site.why
    grads = estimates(m.g, (0.4,))
    assert_unbiased(grads["m"], math.exp(-0.4 ** 2 / 2) / math.sqrt(2 * math.pi))


def test_a_draw_used_non_differentiably_by_a_caller_gets_the_score_function():
    src = """
fn noise(m: f32) -> f32 {
  z ~ Normal(m, 1.0)
  return z
}
fn f(m: f32) -> f32 { return f32(noise(m) > 0.0) }
export g = grad(expect(f, samples=4), wrt=[m])
"""
    m = gradlang.compile_source(src)
    assert m.ir.facts.estimators[0].estimator.name == "score"
    assert_unbiased(estimates(m.g, (-0.3,))["m"], math.exp(-0.3 ** 2 / 2) / math.sqrt(2 * math.pi))


def test_pathwise_and_score_sites_mix_and_expectations_nest():
    """E = E_z[z^2 + E_b[(2b - 1) z]] with z ~ N(m, 1), b ~ Bernoulli(l)
         = m^2 + 1 + (2 sigmoid(l) - 1) m."""
    src = """
fn coin(l: f32) -> f32 {
  b ~ Bernoulli(logits=l)
  return 2.0 * b - 1.0
}
fn f(m: f32, l: f32) -> f32 {
  z ~ Normal(m, 1.0)
  return z * z + expect(coin(l) * z, samples=3)
}
export g = grad(expect(f, samples=2), wrt=[m, l])
"""
    m = gradlang.compile_source(src)
    chosen = {s.site: s.estimator.name for s in m.ir.facts.estimators}
    assert chosen == {"b": "score", "z": "reparam"}
    mv, lv = 0.6, -0.5
    grads = estimates(m.g, (mv, lv))
    s = sigmoid(lv)
    assert_unbiased(np.stack([grads["m"], grads["l"]], -1), [2 * mv + 2 * s - 1, 2 * s * (1 - s) * mv])


def test_draws_inside_a_loop_are_independent_and_pathwise():
    src = """
fn f(m: f32) -> f32 {
  return for i in range(3) carry (acc = 0.0) {
    z ~ Normal(m, 1.0)
    acc + z * z
  }
}
export v = expect(f, samples=1)
export g = grad(f, wrt=[m])
"""
    m = gradlang.compile_source(src)
    values = estimates(m.v, (0.5,))
    assert_unbiased(values, 3 * (0.25 + 1))  # independent draws: E = 3 (m^2 + 1)
    assert np.var(np.asarray(values)) > 2 * 3  # Var of a sum of 3 independent chi-square-like terms
    assert_unbiased(estimates(m.g, (0.5,))["m"], 6 * 0.5)


# ---- higher order: the magic box keeps second derivatives unbiased


@pytest.mark.parametrize("baseline", ["none", "loo"])
def test_second_derivative_of_a_score_function_expectation(baseline):
    """d^2/dt^2 E[c] = sigmoid''(t) for c ~ Bernoulli(logits=t)."""
    src = f"""
fn f(t: f32) -> f32 {{
  c ~ Bernoulli(logits=t) with score(baseline={baseline})
  return c
}}
export e = expect(f, samples=4)
"""
    m = gradlang.compile_source(src)
    second = jax.grad(jax.grad(lambda t, k: m.e(t, k)))
    keys = jax.random.split(jax.random.key(1), N)
    hess = jax.jit(jax.vmap(second, in_axes=(None, 0)))(jnp.float32(0.7), keys)
    s = sigmoid(0.7)
    assert_unbiased(hess, s * (1 - s) * (1 - 2 * s))


# ---- control variates lower the variance


def _variance(m, args, key="t"):
    return float(np.var(np.asarray(estimates(m.g, args)[key]), axis=0).sum())


@pytest.mark.parametrize("case", ["bernoulli", "categorical"])
def test_leave_one_out_baseline_reduces_variance(case):
    if case == "bernoulli":
        body, params, args = "c ~ Bernoulli(logits=t) WITH\nreturn (c + 2.0) * (c + 2.0)", "t: f32", (0.2,)
    else:
        body, params, args = "k ~ Categorical(logits=t) WITH\nreturn abs(v[k] + 5.0)", "t: f32[4], v: f32[4]", (THETA, V)
    plain = compile_objective(body, params, "score(baseline=none)", samples=8)
    loo = compile_objective(body, params, "score(baseline=loo)", samples=8)
    ratio = _variance(plain, args) / _variance(loo, args)
    print(f"leave-one-out variance reduction ({case}): {ratio:.1f}x")
    # measured 18.9x and 17.4x; a variance over N = 10^4 estimates has a relative standard error
    # of ~sqrt(2 / N) = 1.4% (more with heavy tails, never tens of %): 1.5 is far below
    assert ratio > 1.5, ratio


def test_a_leave_one_out_baseline_cancels_a_cost_that_does_not_vary():
    """c^2 - c = 0 for c in {0, 1}: every sample's cost is e (a nonlinear function of the draw,
    so no credit assignment separates it), so is the mean of the others', and each score term
    is multiplied by e - e = 0. A baseline off by a factor, e.g. the others' sum over n, would
    leave e/4 times the mean score, at least 0.68 |k - 4 sigmoid(0.4)| / 4 = 0.067 here."""
    m = compile_objective("c ~ Bernoulli(logits=t) WITH\nreturn exp(sum(c * c - c) + 1.0)",
                          "t: f32[3]", "score(baseline=loo)", samples=4)
    # the baseline sums 4 costs, subtracts one and divides: 6 roundings of e, times a score
    # of at most 1
    assert_close(estimates(m.g, (T3,), n=100)["t"], np.zeros((100, 3)), ops=6, scale=math.e)


def test_grpo_advantages_point_the_right_way_and_cut_variance():
    """GRPO normalizes advantages by the group's std: biased in scale by design (docs/reference/random.md), but
    the direction of the expected gradient is kept on this problem."""
    body, params = "k ~ Categorical(logits=t) WITH\nreturn abs(v[k] + 5.0)", "t: f32[4], v: f32[4]"
    grpo = compile_objective(body, params, "score(baseline=grpo)", samples=8)
    plain = compile_objective(body, params, "score(baseline=none)", samples=8)
    mean = np.asarray(estimates(grpo.g, (THETA, V))["t"]).mean(0)
    p = softmax(THETA)
    truth = p * (V - p @ V)
    # measured: cosine 0.991, variance ratio 31 (1.4% relative standard errors, as above)
    assert mean @ truth / (np.linalg.norm(mean) * np.linalg.norm(truth)) > 0.95
    assert _variance(plain, (THETA, V)) / _variance(grpo, (THETA, V)) > 1.5


# ---- determinism and the key argument


def test_same_key_same_numbers_and_the_key_is_an_argument():
    m = compile_objective("c ~ Bernoulli(logits=t)\nreturn c * 3.0", "t: f32", samples=4)
    assert [n for n, _ in m.g.signature.params] == ["t", "key"]
    a = m.g(0.1, jax.random.key(3))
    assert a == m.g(0.1, key=jax.random.key(3))
    assert a == m.g(0.1, jax.random.PRNGKey(3))  # raw key data is accepted as well
    draws = {float(m.g(0.1, jax.random.key(s))["t"]) for s in range(20)}
    assert len(draws) > 1
    with pytest.raises(ArgumentError, match="missing 'key'"):
        m.g(0.1)
    with pytest.raises(ArgumentError, match="expected a random key"):
        m.g(0.1, np.zeros(3, np.float32))


def test_deterministic_programs_take_no_key():
    m = gradlang.compile_source("fn f(x: f32) -> f32 { return x * x }\nexport g = grad(f, wrt=[x])")
    assert [n for n, _ in m.g.signature.params] == ["x"]


def test_a_stochastic_export_round_trips_through_an_artifact(tmp_path):
    m = compile_objective("z ~ Normal(m, 1.0)\nc ~ Bernoulli(logits=m)\nreturn z * c", "m: f32",
                          samples=4)
    loaded = gradlang.load(m.save(tmp_path / "r.gx"))
    key = jax.random.key(5)
    assert_close(loaded.g(0.3, key)["m"], m.g(0.3, key)["m"], ops=32)  # recompiled: ~16 a side


# ---- closed forms: log_prob, entropy, kl, mean


def test_closed_forms_and_their_gradients():
    src = """
fn f(a: f32, b: f32) -> f32 {
  let p = Normal(a, b)
  let q = Normal(0.5, 2.0)
  return kl(p, q) + entropy(p) + log_prob(p, 1.0) + mean(Gamma(a, b))
}
export v = f
export g = grad(f, wrt=[a, b])
"""
    m = gradlang.compile_source(src)

    def ref(a, b):
        kl = jnp.log(2.0 / b) + (b ** 2 + (a - 0.5) ** 2) / (2 * 4.0) - 0.5
        ent = 0.5 * jnp.log(2 * jnp.pi * jnp.e * b ** 2)
        lp = -0.5 * ((1.0 - a) / b) ** 2 - jnp.log(b) - 0.5 * jnp.log(2 * jnp.pi)
        return kl + ent + lp + a / b

    # ~20 steps with ~6 logs (4 roundings each), forward and backward, both sides float32
    assert_close(m.v(0.3, 1.4), ref(0.3, 1.4), ops=2 * (20 + 24))
    want = jax.grad(ref, argnums=(0, 1))(0.3, 1.4)
    got = m.g(0.3, 1.4)
    assert_close((got["a"], got["b"]), want, ops=4 * (20 + 24))


def test_batched_parameters_broadcast():
    src = """
fn f(m: f32[3, 1], s: f32[4]) -> f32[3, 4] {
  z ~ Normal(m, s)
  return z
}
export e = expect(f, samples=1)
"""
    m = gradlang.compile_source(src)
    loc = np.array([[-2.0], [0.5], [3.0]], np.float32)
    scale = np.array([0.5, 1.0, 2.0, 4.0], np.float32)
    assert m.e(loc, scale, jax.random.key(0)).shape == (3, 4)
    draws = np.asarray(estimates(m.e, (loc, scale)), np.float64)
    assert len(np.unique(draws[0])) == 12  # independent draws across the batch
    # each entry's mean and standard deviation are its own loc_i and scale_j, within 5
    # standard errors: scale_j / sqrt(N) for the mean, scale_j / sqrt(2 N) for the std
    assert np.all(np.abs(draws.mean(0) - loc) <= 5 * scale / math.sqrt(N))
    assert np.all(np.abs(draws.std(0) - scale) <= 5 * scale / math.sqrt(2 * N))


# ---- relaxations are biased by design (documented): check what they promise


def test_straight_through_gumbel_is_exactly_one_hot_forward():
    src = """
fn f(t: f32[4]) -> f32[4] {
  e ~ OneHotCategorical(logits=t) with st_gumbel(tau=0.5)
  return e
}
export e = expect(f, samples=1)
"""
    m = gradlang.compile_source(src)
    draws = np.asarray(estimates(m.e, (THETA,), n=4000))
    assert set(np.unique(draws)) <= {0.0, 1.0} and np.all(draws.sum(-1) == 1)
    freq = draws.mean(0)  # hard Gumbel-max draws: exact categorical frequencies
    se = np.sqrt(softmax(THETA) * (1 - softmax(THETA)) / 4000)
    assert np.all(np.abs(freq - softmax(THETA)) <= 5 * se)


# ---- explain


def test_explain_reports_each_site_with_its_estimator_control_variate_and_reason():
    from pathlib import Path

    from gradlang.explain import explain

    m = gradlang.compile_file(Path(__file__).parent / "golden" / "random.grad")
    text = explain(m.ir)
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith("    ")
            and line.split()[0] in "bzy" and "(" in line}
    assert "score function" in rows["b"] and "leave-one-out (RLOO) (auto) [samples=3]" in rows["b"]
    assert "pathwise (reparam)" in rows["z"] and "with score(baseline=loo)" in rows["z"]
    assert "group-normalized (GRPO, biased) [samples=4]" in rows["y"]
    assert "b: Bernoulli is discrete" in text and "y: annotated in the source" in text
    assert "cost: 4 x (1 forward + 1 backward evaluation)" in text


# ---- moving-average baseline: state threaded in and out of the compiled step

MA = """
fn f(t: f32) -> f32 {
  c ~ Bernoulli(logits=t) with score(baseline=ma, decay=0.8)
  return (c + 2.0) * (c + 2.0)
}
export g = grad(expect(f, samples=2), wrt=[t])
export v = value_and_grad(expect(f, samples=2), wrt=[t])
"""


def test_moving_average_baseline_is_unbiased_for_any_state_and_cuts_variance():
    """E[(c + 2)^2] = 4 + 5 sigmoid(t): the gradient is 5 s (1 - s) whatever the (stale)
    running average is, and a running average near E[v] lowers the variance."""
    m = gradlang.compile_source(MA)
    assert [n for n, _ in m.g.signature.params] == ["t", "baseline", "key"]
    s = sigmoid(0.2)
    truth, mean_value = 5 * s * (1 - s), 4 + 5 * s
    variances = {}
    for state in (0.0, mean_value, -3.0):
        grads, new_state = estimates(m.g, (0.2, state))
        assert_unbiased(grads["t"], truth)
        variances[state] = float(np.var(np.asarray(grads["t"])))
    assert variances[0.0] / variances[mean_value] > 5, variances  # measured 157


def test_moving_average_state_update():
    m = gradlang.compile_source(MA)
    value, grads, state = m.v(0.2, 3.0, jax.random.key(4))
    assert_close(state, 0.8 * 3.0 + 0.2 * float(value), ops=3, scale=2.4 + 0.2 * abs(float(value)))
    state = 0.0  # a training loop threads the state through the calls: it converges to E[v]
    for i in range(200):
        _, state = m.g(0.2, state, jax.random.key(i))
    assert abs(float(state) - (4 + 5 * sigmoid(0.2))) < 1.0


# ---- enumeration of finite supports: exact sums


ENUM = """
fn f(t: f32[3], w: f32[3], m: f32) -> f32 {
  k ~ Categorical(logits=t) with enum
  b ~ Bernoulli(logits=m) with enum
  z ~ Normal(m, 1.0)
  return w[k] * (b + 1.0) + z * z
}
export g = value_and_grad(expect(f, samples=2), wrt=[t, w, m])
"""


def test_enumeration_is_exact_and_mixes_with_pathwise_draws():
    """E = (p . w)(1 + s) + m^2 + 1 with p = softmax(t), s = sigmoid(m)."""
    m = gradlang.compile_source(ENUM)
    t, w, mv = np.array([0.1, -0.3, 0.5], np.float32), np.array([1.0, 2.0, 3.0], np.float32), 0.3
    p, s = softmax(t), sigmoid(mv)
    value, grads = m.g(t, w, mv, jax.random.key(0))
    # the enumerated parts have no noise: exact in one call
    # a softmax over 3, a sigmoid, 3-term sums and a few products, against float64
    assert_close(grads["t"], p * (w - p @ w) * (1 + s), ops=24)
    assert_close(grads["w"], p * (1 + s), ops=24)
    values, grads = estimates(m.g, (t, w, mv))
    assert_unbiased(values, (p @ w) * (1 + s) + mv ** 2 + 1)
    assert_unbiased(grads["m"], (p @ w) * s * (1 - s) + 2 * mv)


def test_auto_enumerates_small_supports_when_allowed():
    src = """
pragma estimator auto(enum_max=4)
fn f(t: f32[3], l: f32[8]) -> f32 {
  k ~ Categorical(logits=t)
  j ~ Categorical(logits=l)
  return f32(k) + f32(j)
}
export g = grad(expect(f, samples=2), wrt=[t, l])
"""
    m = gradlang.compile_source(src)
    chosen = {s.site: (s.estimator.name, s.why) for s in m.ir.facts.estimators}
    assert chosen["k"][0] == "enum" and "3 values (<= enum_max=4)" in chosen["k"][1]
    assert chosen["j"][0] == "score"
    t, l = np.array([0.1, -0.3, 0.5], np.float32), np.zeros(8, np.float32)
    p = softmax(t)
    grads = estimates(m.g, (t, l))
    # a softmax over 3 and a 3-term sum, against float64
    assert_close(np.asarray(grads["t"])[:3], np.tile(p * (np.arange(3) - p @ np.arange(3)), (3, 1)), ops=16)
    assert_unbiased(grads["l"], (np.arange(8) - 3.5) / 8)


# ---- measure-valued derivatives (Normal)


def _positive_part_second_moment(m, s):
    """E[z^2 1{z > 0}] for z ~ N(m, s^2)."""
    a = m / s
    return (m * m + s * s) * 0.5 * math.erfc(-a / math.sqrt(2)) + m * s * math.exp(-a * a / 2) / math.sqrt(2 * math.pi)


def test_measure_valued_derivative_is_unbiased_through_a_discontinuity():
    src = """
fn f(m: f32, s: f32) -> f32 {
  z ~ Normal(m, s) with mvd
  return if z > 0.0 then z * z else 0.0
}
export g = value_and_grad(expect(f, samples=2), wrt=[m, s])
"""
    m = gradlang.compile_source(src)
    values, grads = estimates(m.g, (0.3, 1.2))
    h = 1e-4
    truth = [(_positive_part_second_moment(0.3 + h, 1.2) - _positive_part_second_moment(0.3 - h, 1.2)) / (2 * h),
             (_positive_part_second_moment(0.3, 1.2 + h) - _positive_part_second_moment(0.3, 1.2 - h)) / (2 * h)]
    assert_unbiased(values, _positive_part_second_moment(0.3, 1.2))
    assert_unbiased(np.stack([grads["m"], grads["s"]], -1), truth)


def test_measure_valued_derivative_has_lower_variance_than_the_score_function_here():
    body = "z ~ Normal(m, 1.0) WITH\nreturn if z > 0.0 then 1.0 else 0.0"
    mvd = compile_objective(body, "m: f32", "mvd", samples=1)
    score = compile_objective(body, "m: f32", "score(baseline=none)", samples=1)
    var = {name: float(np.var(np.asarray(estimates(c.g, (0.4,))["m"]))) for name, c in
           (("mvd", mvd), ("score", score))}
    assert var["score"] / var["mvd"] > 1.5, var  # measured 33 (1.4% standard errors)


# ---- binary draws: ARM, DisARM and measure-valued derivatives

T3 = np.array([0.4, -0.8, 1.1], np.float32)


def _enumerated_gradient(t, f):
    """d/dt E f(z), z_i ~ Bernoulli(sigmoid(t_i)) independent, by summing over the 2^n values."""
    import itertools
    p = 1 / (1 + np.exp(-np.asarray(t, np.float64)))
    g = np.zeros_like(p)
    for z in itertools.product([0.0, 1.0], repeat=len(p)):
        z = np.array(z)
        g += np.prod(np.where(z == 1, p, 1 - p)) * f(z) * (z - p)
    return g


@pytest.mark.parametrize("estimator", ["arm", "disarm", "mvd", "rebar", "rebar(eta=0.5, tau=1.0)"])
def test_binary_estimators_are_unbiased(estimator):
    """E[(sum z - 1.3)^2] over a batch of 3 Bernoulli draws (ARM / DisARM: one pair of
    evaluations for the whole batch); MVD on one draw next to a pathwise Normal."""
    if estimator == "mvd":
        m = compile_objective("z ~ Bernoulli(logits=t) with mvd\nx ~ Normal(t, 1.0)\n"
                              "return (z - 0.3) ^ 2 * x * x", "t: f32", samples=2)
        s = sigmoid(0.7)  # E = (0.49 s + 0.09 (1 - s)) (1 + t^2)
        truth = s * (1 - s) * 0.4 * (1 + 0.49) + (0.49 * s + 0.09 * (1 - s)) * 2 * 0.7
        assert_unbiased(estimates(m.g, (0.7,))["t"], truth)
        return
    m = compile_objective(f"z ~ Bernoulli(logits=t) with {estimator}\nreturn (sum(z) - 1.3) ^ 2",
                          "t: f32[3]", samples=4)
    assert_unbiased(estimates(m.g, (T3,))["t"], _enumerated_gradient(T3, lambda z: (z.sum() - 1.3) ** 2))


RELAX = """
struct CV { w: f32[3], a: f32 }
fn net(psi: CV, s: f32[3]) -> f32 {
  return psi.a * (sum(psi.w * s) - 1.3) ^ 2
}
fn f(t: f32[3]) -> f32 {
  z ~ Bernoulli(logits=t) with relax(control=net, lr=0.05)
  return (sum(z) - 1.3) ^ 2
}
export g = value_and_grad(expect(f, samples=2), wrt=[t])
"""


def test_relax_is_unbiased_for_any_control_and_learning_it_cuts_the_variance():
    """RELAX with r(psi, s) = a (w . s - 1.3)^2: at psi = 0 it is REBAR (eta = 1); 2,000 calls,
    each stepping psi against the estimate's second moment, take the total variance from 0.357
    to 0.287 (measured), and the estimate stays unbiased. The bound 0.9 is 5 standard errors
    (of the two variances' ratio, 2% each) above the measured 0.80."""
    m = gradlang.compile_source(RELAX)
    truth = _enumerated_gradient(T3, lambda z: (z.sum() - 1.3) ** 2)

    def estimate(key, psi):
        _, grads, new = m.g(T3, psi, key)
        return grads["t"], new

    keys = jax.random.split(jax.random.key(0), N)
    many = jax.jit(jax.vmap(estimate, in_axes=(0, None)))
    psi = {"w": jnp.zeros(3), "a": jnp.float32(0.0)}
    before, _ = many(keys, psi)
    assert_unbiased(before, truth)
    step = jax.jit(estimate)
    for i in range(2000):
        _, psi = step(jax.random.key(100 + i), psi)
    after, _ = many(keys, psi)
    assert_unbiased(after, truth)
    ratio = total_variance(after) / total_variance(before)
    print(f"RELAX: variance x{ratio:.2f} after learning its control variate")
    assert ratio < 0.9


def test_relax_round_trips_through_an_artifact(tmp_path):
    m = gradlang.compile_source(RELAX)
    psi = {"w": jnp.ones(3), "a": jnp.float32(0.5)}
    m.save(tmp_path / "relax.gx")
    loaded = gradlang.load(tmp_path / "relax.gx")
    for a, b in zip(jax.tree.leaves(m.g(T3, psi, jax.random.key(3))),
                    jax.tree.leaves(loaded.g(T3, psi, jax.random.key(3)))):
        np.testing.assert_array_equal(a, b)


# ---- categorical draws without replacement

THETA6 = np.array([0.3, -1.0, 0.8, 0.1, 0.5, -0.2], np.float32)
V6 = np.array([1.0, -2.0, 0.5, 3.0, 0.7, -1.1], np.float32)


def _without_replacement(estimator: str, draw: str = "k ~ Categorical(logits=t)",
                         value: str = "v[k] * v[k]", samples: int = 1):
    return compile_objective(f"{draw} with {estimator}\nreturn {value}", "t: f32[6], v: f32[6]",
                             samples=samples)


@pytest.mark.parametrize("estimator, draw, value", [
    ("swor(k=3)", "k ~ Categorical(logits=t)", "v[k] * v[k]"),
    ("swor(k=3, baseline=builtin)", "k ~ Categorical(logits=t)", "v[k] * v[k]"),
    ("swor(k=2, baseline=builtin)", "e ~ OneHotCategorical(logits=t)", "sum(e * v) * sum(e * v)"),
    ("unordered(k=3)", "k ~ Categorical(logits=t)", "v[k] * v[k]"),
    ("unordered(k=4)", "e ~ OneHotCategorical(logits=t)", "sum(e * v) * sum(e * v)"),
    ("swor(k=6)", "k ~ Categorical(logits=t)", "v[k] * v[k]"),
])
def test_sampling_without_replacement_is_unbiased(estimator, draw, value):
    """E[v_k^2] over 6 categories: the value and the gradient (k = 6 is exact), two samples
    of the set per estimate."""
    m = gradlang.compile_source(f"""
fn f(t: f32[6], v: f32[6]) -> f32 {{
  {draw} with {estimator}
  return {value}
}}
export g = value_and_grad(expect(f, samples=2), wrt=[t])
""")
    values, grads = estimates(m.g, (THETA6, V6))
    p = softmax(THETA6)
    assert_unbiased(values, p @ V6 ** 2)
    assert_unbiased(grads["t"], p * (V6 ** 2 - p @ V6 ** 2))


@pytest.mark.parametrize("estimator", ["unordered(k=3)", "swor(k=3)", "enum", "rao_blackwell(k=3)"])
def test_a_draw_whose_batch_has_one_element_branches_like_an_unbatched_one(estimator):
    """As in a per-data-point model vmapped over the data (logits [1, 1, C])."""
    m = gradlang.compile_source(f"""
fn f(t: f32[1, 1, 6], v: f32[6]) -> f32 {{
  e ~ OneHotCategorical(logits=t) with {estimator}
  return sum(e * v) * sum(e * v)
}}
export g = grad(expect(f, samples=2), wrt=[t])
""")
    p = softmax(THETA6)
    grads = np.asarray(estimates(m.g, (THETA6.reshape(1, 1, 6), V6))["t"]).reshape(-1, 6)
    assert_unbiased(grads, p * (V6 ** 2 - p @ V6 ** 2))


@pytest.mark.slow  # the default suite's time (12 min on 2 cores); fast twin: the swor / unordered unbiasedness tests
def test_the_normalized_swor_estimator_is_biased_as_documented_and_the_set_estimator_wins():
    """Measured (N = 10^4, 6 categories): total variance 3.21 (swor, k = 3), 2.07 (unordered,
    k = 3), 0.80 (unordered, k = 4), against 3.62 for 3 samples with replacement and the
    leave-one-out baseline; the normalized swor estimate has variance 1.36 but shrinks the
    gradient (its mean is off by 19% of the truth's largest entry)."""
    p = softmax(THETA6)
    truth = p * (V6 ** 2 - p @ V6 ** 2)
    var = {}
    for name, est, samples in (("swor", "swor(k=3)", 1), ("set", "unordered(k=3)", 1),
                               ("loo", "score(baseline=loo)", 3),
                               ("normalized", "swor(k=3, baseline=normalized)", 1)):
        grads = np.asarray(estimates(_without_replacement(est, samples=samples).g, (THETA6, V6))["t"])
        var[name] = total_variance(grads)
        if name == "normalized":
            assert np.abs(grads.mean(0) - truth).max() > 0.1 * np.abs(truth).max()
    print(var)
    assert var["loo"] > var["set"] and var["swor"] > var["set"] and var["swor"] > var["normalized"]


@pytest.mark.parametrize("estimator, draw, value, samples", [
    ("rao_blackwell(k=2)", "k ~ Categorical(logits=t)", "v[k] * v[k]", 2),
    ("rao_blackwell(k=3, baseline=none)", "k ~ Categorical(logits=t)", "v[k] * v[k]", 1),
    ("rao_blackwell(k=1)", "e ~ OneHotCategorical(logits=t)", "sum(e * v) * sum(e * v)", 4),
])
def test_the_rao_blackwellized_score_function_is_unbiased(estimator, draw, value, samples):
    """E[v_k^2] over 6 categories, value and gradient: the k most probable categories summed
    exactly, one drawn from the rest (with the leave-one-out baseline across samples, or
    none)."""
    m = gradlang.compile_source(f"""
fn f(t: f32[6], v: f32[6]) -> f32 {{
  {draw} with {estimator}
  return {value}
}}
export g = value_and_grad(expect(f, samples={samples}), wrt=[t])
""")
    values, grads = estimates(m.g, (THETA6, V6))
    p = softmax(THETA6)
    assert_unbiased(values, p @ V6 ** 2)
    assert_unbiased(grads["t"], p * (V6 ** 2 - p @ V6 ** 2))


@pytest.mark.slow  # the default suite's time (12 min on 2 cores); fast twin: its unbiasedness tests above
def test_rao_blackwellization_cuts_the_variance_of_the_score_function():
    """Measured (printed; N = 10^4, 6 categories): at 2 samples each, total variance 2.4 for
    rao_blackwell(k=2) against 7.6 for score(loo) (3.1x). At equal evaluations (6 per
    estimate: score(loo) over 6 samples), it wins where the top categories hold most of the
    mass: 0.59 against 0.95 with the logits tripled (the top two hold 78%); with THETA6 itself
    (54%) it loses, 2.4 against 1.36. Bounds halfway between 1 and the measured factors.
    With k = 5 the one category left is drawn with certainty: the estimate is exact."""
    def variance(estimator: str, samples: int, theta) -> float:
        return total_variance(estimates(_without_replacement(estimator, samples=samples).g,
                                        (theta, V6))["t"])

    rb, loo = variance("rao_blackwell(k=2)", 2, THETA6), variance("score(baseline=loo)", 2, THETA6)
    peaked = (3 * THETA6).astype(np.float32)
    rb_peaked, loo6 = variance("rao_blackwell(k=2)", 2, peaked), variance("score(baseline=loo)", 6, peaked)
    print(f"2 samples: rao_blackwell(k=2) {rb:.3g}, score(loo) {loo:.3g}; tripled logits, 6 "
          f"evaluations: rao_blackwell(k=2) {rb_peaked:.3g}, score(loo) {loo6:.3g}")
    assert loo > 2.0 * rb and loo6 > 1.3 * rb_peaked
    p = softmax(THETA6)
    exact = np.asarray(estimates(_without_replacement("rao_blackwell(k=5, baseline=none)").g,
                                 (THETA6, V6), n=4)["t"])
    # float32 both sides, relative to the largest term |f(s)| <= 9: log_softmax and exp (8),
    # the weights' 5-term sum (5), the gradient's 6-term sum of products (12), the
    # reference's softmax and sums (14): 39, rounded up to 48
    assert_close(exact, np.broadcast_to(p * (V6 ** 2 - p @ V6 ** 2), exact.shape), ops=48, scale=9.0)


def test_verify_confirms_the_rao_blackwellized_score_function():
    report = _without_replacement("rao_blackwell(k=2)", samples=2).verify("g", (THETA6, V6),
                                                                          samples=400)
    assert report.verdict == "consistent", report.table()
    assert "enumeration" in report.table()  # the exact expectation is its reference


def test_swor_with_every_category_and_its_built_in_baseline_is_exact():
    """k = 6 of 6 categories: kappa = -inf, w_s = p(s), and b_s = E f for every s, so every
    estimate is the exact gradient sum_s p(s) (f(s) - E f) d log p(s)."""
    p = softmax(THETA6)
    grads = np.asarray(estimates(_without_replacement("swor(k=6, baseline=builtin)").g,
                                 (THETA6, V6))["t"])
    # both sides float32, relative to the largest term |f(s)| <= 9: log_softmax and exp (8),
    # the weight's exp / expm1 / log (12), b_s's 6-term sum and products (8), the gradient's
    # 6-term sum (6), the reference's softmax and 6-term sums (14): 48, rounded up to 64
    assert_close(grads, np.broadcast_to(p * (V6 ** 2 - p @ V6 ** 2), grads.shape), ops=64,
                 scale=9.0)


@pytest.mark.parametrize("t", [-0.8, 1.1])
def test_disarm_gives_zero_or_its_one_weighted_difference(t):
    """One draw, one sample: b != b' has probability 2 min(p, 1 - p), and then both orders give
    1/2 (f(1) - f(0)) sigmoid(|t|); otherwise the estimate is 0. Its mean is p (1 - p) (f(1) -
    f(0)), the gradient."""
    m = compile_objective("z ~ Bernoulli(logits=t) with disarm\nreturn (z - 0.3) ^ 2", "t: f32")
    g = np.asarray(estimates(m.g, (t,))["t"], np.float64)
    weighted = 0.5 * (0.49 - 0.09) * sigmoid(abs(t))
    # 0.49 - 0.09 and the product: a few roundings of O(1) values
    nonzero = np.abs(g) > 0
    assert_close(g[nonzero], np.full(nonzero.sum(), weighted), ops=8)
    q = 2 * min(sigmoid(t), 1 - sigmoid(t))
    assert abs(nonzero.mean() - q) <= 5 * math.sqrt(q * (1 - q) / N)  # 5 binomial standard errors


def test_disarm_has_lower_variance_than_arm_and_both_than_the_score_function():
    """Measured (N = 10^4): total variance 1.01 (score, no baseline) > 0.37 (ARM) > 0.31
    (DisARM: ARM with the uniform integrated out). Each variance has a 1.4% relative standard
    error, so the margins below are tens of standard errors."""
    body = "z ~ Bernoulli(logits=t) WITH\nreturn (sum(z) - 1.3) ^ 2"
    var = {e: _variance(compile_objective(body, "t: f32[3]", e), (T3,))
           for e in ("score(baseline=none)", "arm", "disarm")}
    print(var)
    assert var["score(baseline=none)"] > 2 * var["arm"] and var["arm"] > 1.1 * var["disarm"]


def test_score_function_draws_inside_a_loop():
    """A 3-step trajectory of coin flips: E[number of heads^2] = 3s(1-s) + 9s^2, s = sigmoid(t)."""
    src = """
fn f(t: f32) -> f32 {
  let heads = for i in range(3) carry (n = 0.0) {
    c ~ Bernoulli(logits=t)
    n + c
  }
  return heads * heads
}
export g = grad(expect(f, samples=4), wrt=[t])
"""
    m = gradlang.compile_source(src)
    assert m.ir.facts.estimators[0].estimator.name == "score"
    s = sigmoid(0.3)
    # d/dt of 3 s (1 - s) + 9 s^2 = (3 (1 - 2s) + 18 s) s (1 - s)
    assert_unbiased(estimates(m.g, (0.3,))["t"], (3 * (1 - 2 * s) + 18 * s) * s * (1 - s))


def test_a_plain_export_of_a_drawing_function_returns_one_draw_as_it_is():
    src = """
fn f(m: f32) -> (f32, i32) {
  a ~ Categorical(logits=zeros([3]) + m)
  c ~ Bernoulli(logits=m)
  return (m + c, a)
}
export draw = f
"""
    m = gradlang.compile_source(src)
    value, action = m.draw(0.5, jax.random.key(0))
    assert action.dtype == jnp.int32 and 0 <= int(action) < 3 and float(value) in (0.5, 1.5)


def test_explain_keeps_each_exports_control_variates_apart():
    from gradlang.explain import explain

    m = gradlang.compile_source("""
fn f(t: f32) -> f32 {
  c ~ Bernoulli(logits=t)
  return c
}
export a = grad(expect(f, samples=1), wrt=[t])
export b = grad(expect(f, samples=8), wrt=[t])
""")
    a, b = explain(m.ir).split("export b")
    assert "none (auto) [samples=1]" in a and "samples=8" not in a
    assert "leave-one-out (RLOO) (auto) [samples=8]" in b and "samples=1]" not in b


def test_gumbel_softmax_is_biased_as_documented_and_the_bias_shrinks_with_tau():
    """docs/reference/random.md: the relaxation is biased by design and the bias vanishes as tau -> 0."""
    s = sigmoid(0.2)
    truth = 5 * s * (1 - s)  # d/dt E[(c + 2)^2], c ~ Bernoulli(logits=t)
    bias = {}
    for tau in (1.0, 0.1):
        m = compile_objective("c ~ Bernoulli(logits=t) WITH\nreturn (c + 2.0) * (c + 2.0)", "t: f32",
                              f"gumbel(tau={tau})")
        g = np.asarray(estimates(m.g, (0.2,))["t"], np.float64)
        se = g.std(ddof=1) / math.sqrt(len(g))
        bias[tau] = (abs(g.mean() - truth), se)
    assert bias[1.0][0] > 5 * bias[1.0][1], bias  # a real, detectable bias at tau = 1
    assert bias[0.1][0] < bias[1.0][0] / 2, bias


def test_a_plain_export_of_a_function_with_enumerated_draws_sums_them():
    m = gradlang.compile_source(ENUM + "export d = f\n")
    t, w = np.array([0.1, -0.3, 0.5], np.float32), np.array([1.0, 2.0, 3.0], np.float32)
    p, s = softmax(t), sigmoid(0.3)
    values = estimates(m.d, (t, w, 0.3), n=2000)
    assert_unbiased(values, (p @ w) * (1 + s) + 0.3 ** 2 + 1)


def test_jax_grad_of_a_plain_export_of_score_draws_says_what_to_do():
    """A plain export returns one sample: its score-function draws carry no gradient, so
    jax.grad of it would silently drop them (it gave 0). It raises, naming the draw and the
    expectation to differentiate; calls, jit and vmap are unchanged, and a plain export of
    pathwise draws still differentiates (one sample's pathwise gradient)."""
    from gradlang import ScoreDrawGradientError

    m = gradlang.compile_source("""
fn f(t: f32) -> f32 {
  z ~ Bernoulli(logits=t)
  return z * 3.0
}
fn h(t: f32) -> f32 {
  z ~ Normal(t, 1.0)
  return z * 3.0
}
export plain = f
export pathwise = h
""")
    key = jax.random.key(0)
    with pytest.raises(ScoreDrawGradientError, match=r"draws z \(f, line 3\) take the score "
                       r"function.*grad\(expect\(f, samples=N\)"):
        jax.grad(lambda t: m.plain(t, key))(0.3)
    with pytest.raises(ScoreDrawGradientError):
        jax.jvp(lambda t: m.plain(t, key), (0.3,), (1.0,))
    values = jax.jit(jax.vmap(lambda k: m.plain(0.3, k)))(jax.random.split(key, 4))
    assert set(np.asarray(values).tolist()) <= {0.0, 3.0}
    assert float(jax.grad(lambda t: m.pathwise(t, key))(0.3)) == 3.0
