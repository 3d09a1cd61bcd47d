"""Inner problems (`argmin`): hypergradients against closed forms and finite differences, the
methods' memory, and the argmax / struct forms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradlang

RNG = np.random.default_rng(0)
N, M, D = 60, 40, 5
X = RNG.normal(size=(N, D)).astype(np.float32)
W_TRUE = RNG.normal(size=D).astype(np.float32)
Y = (X @ W_TRUE + 0.5 * RNG.normal(size=N)).astype(np.float32)
XV = RNG.normal(size=(M, D)).astype(np.float32)
YV = (XV @ W_TRUE + 0.5 * RNG.normal(size=M)).astype(np.float32)
ARGS = (np.float32(-1.0), X, Y, XV, YV)


def ridge(method: str, steps: int = 300) -> gradlang.CompiledModule:
    return gradlang.compile_source(f"""
fn f(lam: f32, x: f32[N, D], y: f32[N], xv: f32[M, D], yv: f32[M]) -> f32 {{
  let w = argmin v: f32[D] = zeros([D]) {{
            0.5 * mean((x @ v - y) ^ 2) + 0.5 * exp(lam) * sum(v * v)
          }} via gd(steps={steps}, lr=0.3) {method}
  return 0.5 * mean((xv @ w - yv) ^ 2)
}}
export g = value_and_grad(f, wrt=[lam])
""")


def ridge_closed_form(lam):
    a = X.T @ X / N + jnp.exp(lam) * jnp.eye(D)
    w = jnp.linalg.solve(a, X.T @ Y / N)
    return 0.5 * jnp.mean((XV @ w - YV) ** 2)


@pytest.mark.parametrize("method", ["", "with implicit(cg, iters=30)",
                                    "with implicit(neumann, iters=300)", "with unrolled"])
def test_ridge_hypergradient_matches_the_closed_form(method):
    value, grads = ridge(method).g(*ARGS)
    want_value, want_grad = jax.value_and_grad(ridge_closed_form)(ARGS[0])
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    np.testing.assert_allclose(grads["lam"], want_grad, rtol=1e-5)


def test_unrolled_converges_to_the_implicit_hypergradient_as_steps_grow():
    want = float(jax.grad(ridge_closed_form)(ARGS[0]))
    errors = [abs(float(ridge("with unrolled", steps).g(*ARGS)[1]["lam"]) - want)
              for steps in (3, 10, 40)]
    assert errors[0] > errors[1] > errors[2], errors


def test_implicit_memory_stays_flat_as_inner_steps_grow_unrolled_does_not():
    def temp_bytes(method, steps):
        m = ridge(method, steps)
        compiled = jax.jit(m.g).lower(*ARGS).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    implicit = [temp_bytes("", s) for s in (100, 1000)]
    unrolled = [temp_bytes("with unrolled", s) for s in (100, 1000)]
    assert implicit[1] <= implicit[0] * 1.01, implicit
    assert unrolled[1] > 5 * unrolled[0], unrolled


def test_logistic_hypergradient_matches_finite_differences_and_struct_variables_work():
    m = gradlang.compile_source("""
struct Lin { w: f32[D], b: f32 }
fn f(lam: f32, x: f32[N, D], t: f32[N], xv: f32[M, D], tv: f32[M]) -> f32 {
  let p = argmin q: Lin = Lin(w=zeros([D]), b=0.0) {
            mean(softplus(x @ q.w + q.b) - t * (x @ q.w + q.b)) + exp(lam) * sum(q.w * q.w)
          } via momentum(steps=400, lr=0.5, beta=0.5)
  let z = xv @ p.w + p.b
  return mean(softplus(z) - tv * z)
}
export v = f
export g = grad(f, wrt=[lam])
""")
    t, tv = (Y > 0).astype(np.float32), (YV > 0).astype(np.float32)
    args = (np.float32(-2.0), X, t, XV, tv)
    h = 1e-2
    fd = (float(m.v(args[0] + h, *args[1:])) - float(m.v(args[0] - h, *args[1:]))) / (2 * h)
    np.testing.assert_allclose(m.g(*args)["lam"], fd, rtol=2e-3)


def test_argmax_maximizes():
    m = gradlang.compile_source("""
fn f(c: f32[3]) -> f32 {
  let v = argmax u: f32[3] = zeros([3]) { -sum((u - c) * (u - c)) } via gd(steps=100, lr=0.2)
  return sum(v * v)
}
export v = f
export g = grad(f, wrt=[c])
""")
    c = np.array([1.0, -2.0, 0.5], np.float32)
    np.testing.assert_allclose(m.v(c), np.sum(c * c), rtol=1e-5)
    np.testing.assert_allclose(m.g(c)["c"], 2 * c, rtol=1e-4)


def test_explain_reports_the_method_and_why():
    from gradlang.explain import explain

    text = explain(ridge("").ir)
    assert "implicit(method=cg, iters=30, damping=0.0)" in text
    assert "the default: implicit differentiation" in text
