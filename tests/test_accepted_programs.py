"""Programs that `gradlang check` accepts run when called with arguments of the declared types
(issue 19): scalar literals where a float is expected, struct fields read inside inner problems,
a symbolic dim that the call binds to a size the program cannot take, and option values at the
edge of their float32 range.

The programs refused instead are in the diagnostics corpus (`tests/diagnostics/accepted_*`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradlang

EPS = float(np.finfo(np.float32).eps)
KEY = jax.random.key(0)


# ---- an integer literal as the start of an inner problem over f32


@pytest.mark.parametrize("method, dv_ds", [("", lambda c: 1.0), ("with unrolled", lambda c: 1 - c)])
def test_an_integer_literal_starts_an_inner_problem_over_f32(method, dv_ds):
    m = gradlang.compile_source(f"""
fn f(s: f32) -> f32 {{ return argmin v: f32 = 3 {{ (v - s) ^ 2 }} via gd(steps=5) {method} }}
export v = f
export g = grad(f, wrt=[s])
""")
    s = np.float32(1.0)
    # gd(lr=0.1) on (v - s)^2 contracts v - s by c = 1 - 2 lr per step; implicit
    # differentiation gives dv/ds = 1 at any v (the objective is quadratic), unrolled 1 - c^5.
    c = 0.8 ** 5
    # Each of the 5 steps rounds about three times, each to eps32 of |v| <= 3.
    np.testing.assert_allclose(m.v(s), s + (3 - s) * c, rtol=16 * EPS)
    np.testing.assert_allclose(m.g(s)["s"], dv_ds(c), rtol=16 * EPS)


# ---- scalar literals as operands of non-smooth ops


LITERAL_CALLS = ["step(L)", "sign(L)", "round(L)", "floor(L)", "ceil(L)", "binarize(L)",
                 "quantize(L, 4)", "quantize(L, 1)", "quantize(L, 3, symmetric=false)",
                 "quantize(L, 4, scale=0.25)", "stochastic_round(L)", "step(L) with ste",
                 "sign(L) with reste", "binarize(L) with swish_sign",
                 "quantize(L, 4) with trust", "round(L) with ste(clip=1.0)"]


@pytest.mark.parametrize("literal", ["0.3", "-1.7", "3"])
@pytest.mark.parametrize("call", LITERAL_CALLS)
def test_non_smooth_ops_take_scalar_literals(call, literal):
    """op(literal) has the value and gradient of op(y) called with y = literal (a parameter)."""
    m = gradlang.compile_source(f"""
fn lit(x: f32, y: f32) -> f32 {{ return x * ({call.replace("L", literal)}) }}
fn param(x: f32, y: f32) -> f32 {{ return x * ({call.replace("L", "y")}) }}
export a = value_and_grad(lit, wrt=[x])
export b = value_and_grad(param, wrt=[x])
""")
    kw = {"key": KEY} if "stochastic" in call else {}
    x, y = np.float32(1.5), np.float32(float(literal))
    (va, ga), (vb, gb) = m.a(x, y, **kw), m.b(x, y, **kw)
    # XLA folds the literal's arithmetic at compile time, possibly in another order: the
    # quantizers' scale, division and product may each round differently (eps32 apiece).
    np.testing.assert_allclose(va, vb, rtol=4 * EPS)
    np.testing.assert_allclose(ga["x"], gb["x"], rtol=4 * EPS)


# ---- struct fields read inside inner problems


def test_an_inner_problem_reads_struct_fields_of_a_parameter():
    m = gradlang.compile_source("""
struct P { a: f32, b: f32 }
fn f(p: P) -> f32 {
  return argmin v: f32 = 0.0 { (v - p.b) ^ 2 + exp(p.a) * v ^ 2 } via gd(steps=100, lr=0.3)
}
fn chain(p: P) -> f32 {
  let q = argmin q: P = P(a=0, b=0) { (q.a - p.a) ^ 2 + (q.b - 2.0 * p.b) ^ 2 }
          via gd(steps=100, lr=0.3)
  return argmin u: f32 = 0 { (u - q.b) ^ 2 + exp(q.a) * u ^ 2 } via gd(steps=100, lr=0.3)
}
export v = value_and_grad(f, wrt=[p])
export c = value_and_grad(chain, wrt=[p])
""")
    p = {"a": np.float32(-0.5), "b": np.float32(1.25)}

    def solution(p):  # argmin_v (v - b)^2 + e^a v^2
        return p["b"] / (1 + jnp.exp(p["a"]))

    # gd contracts the error by |1 - 0.6 (1 + e^a)| < 0.05 per step: the float32 fixed point is
    # within a few roundings (eps32 each) of the solution, and so is the 1-D implicit gradient.
    for export, scale in ((m.v, 1.0), (m.c, 2.0)):
        value, grads = export(p)
        want, want_grad = jax.value_and_grad(lambda p: scale * solution(p))(p)
        np.testing.assert_allclose(value, want, rtol=8 * EPS)
        for name in p:
            np.testing.assert_allclose(grads["p"][name], want_grad[name], rtol=8 * EPS)


def test_an_inner_problem_reads_the_report_of_another():
    m = gradlang.compile_source("""
fn h(s: f32) -> f32 {
  argmin v: f32 = 0.0 { (v - s) ^ 2 } via gd(steps=5, lr=0.3) as (w, report)
  return argmin u: f32 = 0.0 { (u - report.residual) ^ 2 } via gd(steps=50, lr=0.3)
}
export h = h
""")
    s = np.float32(1.5)
    # Five steps leave w - s = -s 0.4^5; the residual |2 (w - s)| is what u converges to
    # (fifty steps leave a factor 1 - 0.4^50). A dozen float32 roundings in all.
    want = 2 * s * 0.4 ** 5 * (1 - 0.4 ** 50)
    np.testing.assert_allclose(m.h(s), want, rtol=16 * EPS)


# ---- a symbolic dim bound to a size the program cannot take


@pytest.mark.parametrize("method", ["", "with implicit(cg)", "with implicit(neumann)",
                                    "with value_function", "with unrolled"])
def test_an_inner_problem_in_a_loop_reads_the_loop_index(method):
    """The loop index (an integer of the loop body's trace) reaches the solver and its backward
    pass as an argument: nothing traced is closed over (it leaked a tracer before)."""
    m = gradlang.compile_source(f"""
fn f(m: f32) -> f32 {{
  return for i in range(3) carry (c = 0.0) {{
    c + (argmin q: f32 = 1.0 {{ 0.5 * (q - m * f32(i)) ^ 2 }} via gd(steps=60, lr=0.5) {method})
  }}
}}
export e = grad(f, wrt=[m])
""")
    # q* = m i, so the sum over i = 0, 1, 2 has derivative 3 in m. gd(lr=0.5) halves q - q*
    # per step: after 60 steps that is 2^-60, below float32's rounding, so the unrolled and the
    # implicit derivative are 3 to a few roundings of values of scale 4 per step;
    # value_function's central difference is exact on a quadratic (bias O(sigma^2) vanishes).
    np.testing.assert_allclose(m.e(np.float32(2.0))["m"], 3.0, rtol=0, atol=64 * 4 * EPS)


@pytest.mark.parametrize("op, solver, method", [
    ("sign(v) with ste", "gd(steps=5)", ""),
    ("sign(v) with ste", "gd(steps=5)", "with implicit(gmres)"),
    ("quantize(v, 4) with trust", "gd(steps=5)", ""),
])
def test_a_backward_rule_inside_an_inner_problem_with_forward_mode(op, solver, method):
    """Hessian-vector products (implicit CG / GMRES, Newton-CG) are forward-over-reverse: the
    straight-through op's rule is a JVP, so they go through it (they failed on a custom VJP)."""
    m = gradlang.compile_source(f"""
fn f(x: f32[3]) -> f32 {{
  let w = argmin v: f32[3] = zeros([3]) {{ 0.5 * sum((v - x) ^ 2) + 0.1 * sum({op}) }}
      via {solver} {method}
  return sum(w)
}}
export e = grad(f, wrt=[x])
""")
    # The rule's derivative of the penalty is constant in v (STE: 0.1; trust: 0.1 inside the
    # range), so the Hessian is I and dv*/dx = I: the gradient of sum(v*) is all ones, up to
    # a few float32 roundings of values of scale 1 per solver step.
    np.testing.assert_allclose(m.e(np.array([1, 2, 3], np.float32))["x"], np.ones(3), rtol=0,
                               atol=32 * EPS)


def test_newton_steps_go_through_a_backward_rule():
    """Newton-CG's Hessian-vector products see the rule's derivative (0.1 for the penalty):
    from 0, one Newton step reaches v* = x - 0.1 (the Hessian is I)."""
    m = gradlang.compile_source("""
fn f(x: f32[3]) -> f32[3] {
  return argmin v: f32[3] = zeros([3]) { 0.5 * sum((v - x) ^ 2) + 0.1 * sum(sign(v) with ste) }
      via newton_cg(steps=3)
}
export f = f
""")
    x = np.array([1, 2, 3], np.float32)
    np.testing.assert_allclose(m.f(x), x - 0.1, rtol=0, atol=8 * 3 * EPS)  # a few roundings of 3


def test_forward_mode_through_a_backward_rule():
    """`jax.jvp` of an export with a straight-through op gives the rule's derivative."""
    m = gradlang.compile_source("""
fn f(x: f32[3]) -> f32 { return sum(round(x) with ste) + sum(sign(x) with ste(clip=1.0)) }
export f = f
""")
    x, t = np.array([0.5, -2.0, 0.25], np.float32), np.array([1.0, 1.0, -2.0], np.float32)
    _, tangent = jax.jvp(m.f, (x,), (t,))
    # ste passes the tangent through: sum(t) for round, plus the tangent where |x| <= 1 for
    # the clipped sign; sums of three small integers, exact in float32
    assert float(tangent) == t.sum() + t[[0, 2]].sum()


def test_a_hadamard_dim_that_is_not_a_power_of_two_is_an_argument_error():
    m = gradlang.compile_source("""
fn rotate(x: f32[N, D]) -> f32[N, D] { return hadamard(x) }
fn q(x: f32[N, D]) -> f32 { return sum(quest(x, 4) with trust) }
export rotate = rotate
export q = grad(q, wrt=[x])
""")
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    h2 = np.array([[1, 1], [1, -1]], np.float32)
    np.testing.assert_allclose(m.rotate(x), x @ np.kron(h2, h2).T / 2, rtol=4 * EPS, atol=4 * EPS)
    with pytest.raises(gradlang.ArgumentError, match=r"hadamard at <source>:2:47 transforms the "
                       r"last axis, whose size must be a power of two, but the arguments make D = 3"):
        m.rotate(np.ones((2, 3), np.float32))
    with pytest.raises(gradlang.ArgumentError, match=r"quest at .* make D = 6"):
        m.q(np.ones((5, 6), np.float32))


# ---- options at the edge of their float32 range


@pytest.mark.parametrize("annotation", ["gumbel(tau=1.2e-38)", "st_gumbel(tau=1.2e-38)",
                                        "rebar(tau=1.2e-38)"])
def test_the_smallest_accepted_temperature_gives_finite_gradients(annotation):
    m = gradlang.compile_source(f"""
fn f(t: f32) -> f32 {{
  c ~ Bernoulli(logits = t) with {annotation}
  return (c - 0.3) ^ 2
}}
export g = value_and_grad(expect(f, samples=16), wrt=[t])
""")
    value, grads = m.g(np.float32(0.2), key=KEY)
    assert np.isfinite(value) and np.isfinite(grads["t"])


@pytest.mark.parametrize("by", ["spsa(eps=1.2e-38)", "es(sigma=1.2e-38)", "eggroll(sigma=1.2e-38)"])
def test_the_smallest_accepted_black_box_step_gives_finite_gradients(by):
    m = gradlang.compile_source(f"""
fn f(w: f32[3]) -> f32 {{ return sum((w - 1.0) ^ 2) }}
export g = grad(f, wrt=[w], by={by})
""")
    assert np.all(np.isfinite(m.g(np.zeros(3, np.float32), key=KEY)["w"]))


def test_a_perturbed_parameter_carried_by_a_loop():
    """SPSA keeps a matrix parameter factored (W + eps z); a loop carrying it gets it
    materialized (its carry's structure cannot change): the same estimate, on the same key, as
    the program without the loop."""
    m = gradlang.compile_source("""
fn looped(w: f32[3, N], x: f32[2, 3]) -> f32 {
  let h = for i in range(N) carry (c = w) { w }
  return sum(tanh(x @ h))
}
fn plain(w: f32[3, N], x: f32[2, 3]) -> f32 { return sum(tanh(x @ w)) }
export looped = grad(looped, wrt=[w], by=spsa(eps=0.01, samples=2))
export plain = grad(plain, wrt=[w], by=spsa(eps=0.01, samples=2))
""")
    w = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    x = np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3)
    # the materialized matmul rounds in another order than the blocked one: 8 roundings of
    # sums of scale 1, divided by 2 eps = 0.02 and times |z| <= 4
    np.testing.assert_allclose(m.looped(w, x, key=KEY)["w"], m.plain(w, x, key=KEY)["w"],
                               rtol=0, atol=8 * EPS / 0.02 * 4)


def test_topk_of_more_entries_than_a_symbolic_axis_binds_is_an_argument_error():
    m = gradlang.compile_source("fn f(x: f32[4, H]) -> f32 { return sum(topk(x, 2) * x) }\n"
                                "export f = f\n")
    x = np.arange(8, dtype=np.float32).reshape(4, 2)
    np.testing.assert_array_equal(m.f(x), np.sum(x))  # k = H = 2: every entry
    with pytest.raises(gradlang.ArgumentError, match=r"topk at <source>:1:40 needs 1 <= k <= the "
                                                     r"size of axis -1, but the arguments make "
                                                     r"k = 2 and that size 1"):
        m.f(np.ones((4, 1), np.float32))
