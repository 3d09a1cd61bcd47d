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
    assert "implicit(method=cg, iters=30, tol=0.0, damping=0.0)" in text
    assert "the default: implicit differentiation" in text


def lam_grad_error(module) -> float:
    want = float(jax.grad(ridge_closed_form)(ARGS[0]))
    return abs(float(module.g(*ARGS)[1]["lam"]) - want) / abs(want)


def ridge_with(solver: str, method: str = "") -> gradlang.CompiledModule:
    return gradlang.compile_source(f"""
fn f(lam: f32, x: f32[N, D], y: f32[N], xv: f32[M, D], yv: f32[M]) -> f32 {{
  let w = argmin v: f32[D] = zeros([D]) {{
            0.5 * mean((x @ v - y) ^ 2) + 0.5 * exp(lam) * sum(v * v)
          }} via {solver} {method}
  return 0.5 * mean((xv @ w - yv) ^ 2)
}}
export g = value_and_grad(f, wrt=[lam])
""")


@pytest.mark.parametrize("solver", ["gd(steps=300, lr=0.3, tol=1e-6)", "momentum(steps=300, lr=0.1)",
                                    "adam(steps=3000, lr=0.02)", "lbfgs(steps=30)",
                                    "lbfgs(steps=100, memory=3, tol=1e-6)", "newton_cg(steps=4)"])
def test_every_solver_reaches_the_ridge_closed_form(solver):
    assert lam_grad_error(ridge_with(solver)) < 1e-4


@pytest.mark.parametrize("method", ["with implicit(gmres, iters=10)",
                                    "with implicit(cg, iters=100, tol=1e-7)",
                                    "with value_function(sigma=0.01)"])
def test_more_hypergradient_methods_match_the_closed_form(method):
    assert lam_grad_error(ridge_with("gd(steps=300, lr=0.3)", method)) < 1e-4


def test_truncated_backprop_converges_to_unrolled_as_k_grows():
    errors = [lam_grad_error(ridge_with("gd(steps=200, lr=0.3)", f"with truncated({k})"))
              for k in (1, 5, 20, 200)]
    assert errors[0] > errors[1] > errors[2] > errors[3], errors
    assert errors[3] < 1e-4


def test_the_solver_report_gives_the_residual_and_steps_and_tol_stops_early():
    m = gradlang.compile_source("""
fn f(lam: f32, x: f32[N, D], y: f32[N]) -> (f32[D], SolverReport, SolverReport) {
  argmin v: f32[D] = zeros([D]) { 0.5 * mean((x @ v - y) ^ 2) + 0.5 * exp(lam) * sum(v * v) }
    via gd(steps=1000, lr=0.3, tol=1e-4) as (w, early)
  argmin u: f32[D] = zeros([D]) { 0.5 * mean((x @ u - y) ^ 2) + 0.5 * exp(lam) * sum(u * u) }
    via gd(steps=20, lr=0.3) as (w2, fixed)
  return (w, early, fixed)
}
export f = f
""")
    w, early, fixed = m.f(ARGS[0], X, Y)
    a = X.T @ X / N + np.exp(ARGS[0]) * np.eye(D)
    g = a @ np.asarray(w) - X.T @ Y / N
    assert 1 < int(early["steps"]) < 1000
    # The float32 residual cancels terms of size |a w| + |b|: its rounding error is about
    # eps32 * sqrt(D) times their norm, which is ~1e-3 of a 1e-4 residual.
    b = X.T @ Y / N
    atol = 4 * np.finfo(np.float32).eps * np.sqrt(D) * (np.linalg.norm(a @ np.asarray(w)) + np.linalg.norm(b))
    np.testing.assert_allclose(early["residual"], np.linalg.norm(g), rtol=1e-4, atol=atol)
    assert float(early["residual"]) <= 1e-4
    assert int(fixed["steps"]) == 20 and float(fixed["residual"]) > 1e-4


BOX = """
fn f(theta: f32[4], c: f32[4]) -> f32 {
  let v = argmin u: f32[4] = zeros([4]) { 0.5 * sum((u - theta) ^ 2) }
            via projected(steps=100, lr=0.5, lower=0.0, upper=1.0) METHOD
  return sum(c * v)
}
export v = f
export g = grad(f, wrt=[theta])
"""


@pytest.mark.parametrize("method", ["", "with value_function(sigma=0.1)", "with unrolled"])
def test_projected_solver_and_its_hypergradient_on_a_box(method):
    m = gradlang.compile_source(BOX.replace("METHOD", method))
    theta = np.array([-0.5, 0.3, 0.7, 1.5], np.float32)
    c = np.array([1.0, 2.0, -3.0, 4.0], np.float32)
    np.testing.assert_allclose(m.v(theta, c), np.sum(c * np.clip(theta, 0, 1)), rtol=1e-5)
    np.testing.assert_allclose(m.g(theta, c)["theta"], c * (theta > 0) * (theta < 1), atol=1e-4)


# A bilevel problem whose lower level has a constraint coupling both levels (the setting of
# LV-HBA): y*(x) = argmin_y 1/2 |y - 2x|^2 s.t. y <= x + 1, i.e. min(2x, x + 1), and
# F(x) = 1/2 |x - a|^2 + 1/2 |y*(x) - b|^2. With a = (3, 0), b = (2, 0) the solution is
# x = (2, 0), y = (3, 0): the constraint is active in the first coordinate only.
COUPLED = """
fn outer(x: f32[2], a: f32[2], b: f32[2]) -> f32 {
  let y = argmin v: f32[2] = zeros([2]) { 0.5 * sum((v - 2.0 * x) ^ 2) }
            via gd(steps=500, lr=0.2) subject to v <= x + 1.0 METHOD
  return 0.5 * sum((x - a) ^ 2) + 0.5 * sum((y - b) ^ 2)
}
export g = value_and_grad(outer, wrt=[x])
"""
A, B = np.array([3.0, 0.0], np.float32), np.array([2.0, 0.0], np.float32)


def coupled_closed_form(x):
    y = jnp.minimum(2 * x, x + 1)
    return 0.5 * jnp.sum((x - A) ** 2) + 0.5 * jnp.sum((y - B) ** 2)


@pytest.mark.parametrize("method", ["", "with value_function(sigma=0.05)", "with unrolled"])
def test_coupled_constraint_hypergradient_matches_the_closed_form(method):
    m = gradlang.compile_source(COUPLED.replace("METHOD", method))
    for x in ([2.5, 0.3], [0.5, -0.4], [2.0, 0.0]):
        x = np.array(x, np.float32)
        value, grads = m.g(x, A, B)
        want_value, want = jax.value_and_grad(coupled_closed_form)(x)
        np.testing.assert_allclose(value, want_value, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(grads["x"], want, atol=2e-3)


def test_value_function_solves_the_coupled_toy_problem():
    m = gradlang.compile_source(COUPLED.replace("METHOD", ""))
    x = np.zeros(2, np.float32)
    for _ in range(300):
        x = x - 0.2 * np.asarray(m.g(x, A, B)[1]["x"])
    np.testing.assert_allclose(x, [2.0, 0.0], atol=1e-3)


def test_ignoring_the_constraint_in_the_hypergradient_finds_the_wrong_point():
    """The same outer descent with the unconstrained dy/dx = 2 lands at x1 = 5/3, not 2: the
    constraint's coupling is what value_function accounts for."""
    x = np.zeros(2, np.float32)
    for _ in range(300):
        y = np.minimum(2 * x, x + 1)
        x = x - 0.2 * ((x - A) + 2 * (y - B))
    assert abs(x[0] - 5 / 3) < 1e-3


NESTED = """
fn f(theta: f32[3]) -> f32 {
  let a = argmin m: f32[3] = zeros([3]) {
            let w = argmin u: f32[3] = zeros([3]) { 0.5 * sum((u - m) ^ 2) } via gd(steps=100, lr=0.5) INNER
            0.5 * sum((m - theta) ^ 2) + 0.5 * sum(w * w)
          } via gd(steps=200, lr=0.3) MIDDLE
  return sum(a * a)
}
export g = grad(f, wrt=[theta])
"""


@pytest.mark.parametrize("inner, middle", [("", "with unrolled"), ("with unrolled", ""),
                                           ("", "with value_function(sigma=0.1)")])
def test_nested_inner_problems(inner, middle):
    """w*(m) = m, so a*(theta) = theta / 2 and d/dtheta sum(a^2) = theta / 2."""
    m = gradlang.compile_source(NESTED.replace("INNER", inner).replace("MIDDLE", middle))
    theta = np.array([1.0, -2.0, 0.5], np.float32)
    np.testing.assert_allclose(m.g(theta)["theta"], theta / 2, rtol=1e-3)


def test_explain_says_why_a_constrained_problem_uses_value_function():
    from gradlang.explain import explain

    text = explain(gradlang.compile_source(COUPLED.replace("METHOD", "")).ir)
    assert "value_function(sigma=0.01, steps=500)" in text
    assert "constraints coupling" in text


def test_coupled_bilevel_example_reaches_the_known_solution(tmp_path, load_example):
    out = load_example("coupled_bilevel").main(["--n", "8", "--steps", "150", "--out", str(tmp_path)])
    methods = out["methods"]
    assert methods["value_function"]["max_abs_error_x"] < 1e-3
    assert methods["unrolled"]["max_abs_error_x"] < 1e-3
    assert methods["constraint-blind"]["max_abs_error_x"] > 0.1
    assert 0 < out["active"] < 8
    assert (tmp_path / "coupled_bilevel.png").exists()


def test_artifacts_keep_constrained_problems_tolerances_and_reports(tmp_path):
    m = gradlang.compile_source(COUPLED.replace("METHOD", "") + """
fn lower(x: f32[2]) -> (f32[2], SolverReport) {
  argmin v: f32[2] = zeros([2]) { 0.5 * sum((v - 2.0 * x) ^ 4) } via lbfgs(steps=50, tol=1e-5)
    as (y, report)
  return (y, report)
}
export s = lower
""")
    loaded = gradlang.load(m.save(tmp_path / "coupled.gradpkg"))
    x = np.array([2.5, 0.3], np.float32)
    np.testing.assert_array_equal(loaded.g(x, A, B)[1]["x"], m.g(x, A, B)[1]["x"])
    (y, report), (y0, report0) = loaded.s(x), m.s(x)
    np.testing.assert_array_equal(y, y0)
    assert int(report["steps"]) == int(report0["steps"]) > 1
