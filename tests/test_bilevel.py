"""Inner problems (`argmin`): hypergradients against closed forms and finite differences, the
methods' memory, and the argmax / struct forms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradlang
from stats import EPS32, assert_close

RNG = np.random.default_rng(0)
N, M, D = 60, 40, 5
X = RNG.normal(size=(N, D)).astype(np.float32)
W_TRUE = RNG.normal(size=D).astype(np.float32)
Y = (X @ W_TRUE + 0.5 * RNG.normal(size=N)).astype(np.float32)
XV = RNG.normal(size=(M, D)).astype(np.float32)
YV = (XV @ W_TRUE + 0.5 * RNG.normal(size=M)).astype(np.float32)
ARGS = (np.float32(-1.0), X, Y, XV, YV)
RIDGE_OPS = 1200
"""The ridge hypergradient's float32 rounding, for `assert_close`: a gd step rounds ~70 times (a
60-term and a 5-term product, exp, the update) and the iteration contracts errors by
1 - 0.3 * 0.88 = 0.74 a step (the Hessian's eigenvalues are 0.88-1.89): 70 / 0.26 ~ 270 per
solve; the forward solve and the adjoint's, amplified by the condition number 2.2."""


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
    assert_close(value, want_value, ops=RIDGE_OPS)
    assert_close(grads["lam"], want_grad, ops=RIDGE_OPS)


LINEAR = """
fn f(theta: f32[3], h: f32[3, 3], c: f32[3]) -> f32 {
  let u = argmin v: f32[3] = zeros([3]) { 0.5 * sum(v * (h @ v)) - sum(theta * v) }
            via gd(steps=200, lr=0.4) METHOD
  return sum(c * u)
}
export g = grad(f, wrt=[theta])
"""
H = np.array([[2.0, 0.5, 0.0], [0.5, 1.5, 0.3], [0.0, 0.3, 1.0]], np.float32)  # eigenvalues 0.81-2.33


@pytest.mark.parametrize("method", ["with implicit(neumann, iters=200)", "with implicit(cg, iters=10)"])
def test_the_adjoint_solve_of_a_quadratic_is_its_inverse_hessian(method):
    """u*(theta) = H^-1 theta, so d/dtheta c . u* = H^-1 c. Neumann's step is the solver's
    lr = 0.4 (a step of 1 diverges here: 1 - 2.33 < -1), contracting by 1 - 0.4 * 0.81 = 0.68."""
    c = np.array([1.0, -2.0, 0.5], np.float32)
    m = gradlang.compile_source(LINEAR.replace("METHOD", method))
    got = m.g(np.array([0.3, 1.0, -0.7], np.float32), H, c)["theta"]
    # a step rounds ~6 times (a 3-term product, the update), contracted by 0.68 a step:
    # 6 / 0.32 ~ 20, for the forward solve and the adjoint, times cond(H) = 2.9: 2 * 20 * 2.9
    assert_close(got, np.linalg.solve(H.astype(np.float64), c), ops=120)


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
    h = 0.1
    fd = (float(m.v(args[0] + h, *args[1:])) - float(m.v(args[0] - h, *args[1:]))) / (2 * h)
    # truncation h^2 |f'''| / 6 = 4.6e-5 (f''' = -0.028 by a float64 Newton solve); roundoff:
    # f (= 0.44) rounds a few hundred times (~70 a momentum step, over the ~10 steps its
    # contraction remembers), differenced over 2h: 700 eps 0.44 / 0.2 = 1.8e-4
    np.testing.assert_allclose(m.g(*args)["lam"], fd, rtol=0,
                               atol=h * h * 0.028 / 6 + 700 * EPS32 * 0.44 / (2 * h))


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
    # a step rounds ~4 times and contracts by 1 - 0.2 * 2 = 0.6: 10; then 3 squares summed
    assert_close(m.v(c), np.sum(c * c), ops=16)
    assert_close(m.g(c)["c"], 2 * c, ops=16)


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
    # (the tol=1e-6 solvers stop at a residual of 1e-6, an error of 1e-6 / 0.88 in w: within it)
    assert lam_grad_error(ridge_with(solver)) < RIDGE_OPS * EPS32


@pytest.mark.parametrize("method", ["with implicit(gmres, iters=10)",
                                    "with implicit(cg, iters=100, tol=1e-7)",
                                    "with value_function(sigma=0.01)"])
def test_more_hypergradient_methods_match_the_closed_form(method):
    # value_function's difference of two solves over 2 sigma = 0.02 divides their rounding (270
    # eps each, relative) by it; its O(sigma^2) bias is 1e-4 relative
    bound = (2 * 270 * EPS32 / 0.02 + 1e-4) if "value_function" in method else RIDGE_OPS * EPS32
    assert lam_grad_error(ridge_with("gd(steps=300, lr=0.3)", method)) < bound


def ridge_by_hand(lam, steps: int, k: int):
    """The ridge problem's gd(lr=0.3) from zero written in JAX, reverse mode through its last
    k steps only (the iterate stopped before them)."""
    def inner(v, lam):
        return 0.5 * jnp.mean((X @ v - Y) ** 2) + 0.5 * jnp.exp(lam) * jnp.sum(v * v)

    def step(_, v):
        return v - 0.3 * jax.grad(inner)(v, lam)

    v = jax.lax.stop_gradient(jax.lax.fori_loop(0, steps - k, step, jnp.zeros(D, jnp.float32)))
    v = jax.lax.fori_loop(0, k, step, v)
    return 0.5 * jnp.mean((XV @ v - YV) ** 2)


@pytest.mark.parametrize("k", [1, 3, 8, 40])
def test_truncated_backprop_is_the_hand_written_one(k):
    """k and k + 1 steps differ by 0.5% of the hypergradient at k = 8 (measured; the iteration
    contracts by 1 - 0.3 * 0.88 = 0.74 a step), 40 times the tolerance below; k = 40 is every
    step: plain unrolled reverse mode."""
    value, grads = ridge_with("gd(steps=40, lr=0.3)", f"with truncated({k})").g(*ARGS)
    want_value, want = jax.jit(jax.value_and_grad(ridge_by_hand), static_argnums=(1, 2))(ARGS[0], 40, k)
    # one gd step rounds ~70 times (a 60-term and a 5-term product, exp, the update); the
    # iteration contracts the errors by 0.74 a step: 70 / (1 - 0.74) ~ 270 per side, forward
    # and backward, both sides float32: 4 * 270
    assert_close(value, want_value, ops=1080)
    assert_close(grads["lam"], want, ops=1080)


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
    # The float32 gradient sums N + D products per coordinate: each within (N + D + 4) eps32 of
    # the sum of their magnitudes (the standard bound), a few % of a 1e-4 residual.
    terms = np.abs(X).T @ (np.abs(X) @ np.abs(np.asarray(w)) + np.abs(Y)) / N + np.exp(ARGS[0]) * np.abs(w)
    atol = (N + D + 4) * EPS32 * np.linalg.norm(terms)
    np.testing.assert_allclose(early["residual"], np.linalg.norm(g), rtol=0, atol=atol)
    assert float(early["residual"]) <= 1e-4
    assert int(fixed["steps"]) == 20 and float(fixed["residual"]) > 1e-4


def test_the_report_carries_no_gradient_with_constraints_and_reverse_mode_through_the_loop():
    """The residual of a constrained problem (the norm of the constraint violation, whose
    derivative is undefined where it is 0) read by an objective differentiated through the
    loop: the gradient is the one without the report (the report is a constant), not NaN."""
    m = gradlang.compile_source("""
fn f(x: f32) -> f32 {
  argmin v: f32 = 0.0 { 0.5 * (v - 2.0 * x) ^ 2 } via gd(steps=200, lr=0.2)
    subject to v <= x + 1.0 with unrolled as (w, report)
  return w + report.residual
}
export g = grad(f, wrt=[x])
""")
    # v* = min(2x, x + 1) = x + 1 at x = 3 (the constraint is active): d v* / dx = 1,
    # reached by the primal-dual iteration to well within float32 (contraction per step < 1)
    assert np.isfinite(float(m.g(np.float32(3.0))["x"]))
    assert abs(float(m.g(np.float32(3.0))["x"]) - 1.0) < 1e-3


@pytest.mark.parametrize("solver", ["lbfgs(steps=20)", "newton_cg(steps=5)"])
def test_a_neumann_series_needs_the_solvers_step(solver):
    """A line-search solver has no step that bounds the Hessian: the series diverged silently
    (-1.3e11 on a ridge problem) and is now an error at the method."""
    with pytest.raises(gradlang.CompileError, match=r"implicit\(neumann\) sums its series "
                       r"with the solver's step lr.*searches its step and has no lr; use "
                       r"implicit\(cg\) or implicit\(gmres\)"):
        gradlang.compile_source(f"""
fn f(lam: f32) -> f32 {{
  let v = argmin u: f32 = 0.0 {{ 0.5 * exp(lam) * u ^ 2 - u }} via {solver} with implicit(neumann)
  return v
}}
export g = grad(f, wrt=[lam])
""")


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
    # a projected step rounds ~4 times and contracts by 0.5: 8, then 4 products summed;
    # value_function divides that rounding by 2 sigma = 0.2
    assert_close(m.v(theta, c), np.sum(c * np.clip(theta, 0, 1)), ops=16, scale=np.abs(c).sum())
    assert_close(m.g(theta, c)["theta"], c * (theta > 0) * (theta < 1), ops=16 / 0.2,
                 scale=np.abs(c).max())


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
COUPLED_GRAD_ERROR = 60 * 3 / 0.02
"""The hypergradient's error in eps32: value_function (sigma = 0.01 unless given) divides
grad_x L's rounding (|.| <= 3, ~60 roundings: ~6 a primal-dual step over the ~10 steps it
remembers) by 2 sigma. The problem is quadratic on each side of the constraint's switch
(2x = x + 1), so the central difference has no truncation error while its solves stay on one
side, as they do at these points (0.5 or more from it)."""


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
        # y rounds ~60 times (~6 a primal-dual step, over the ~10 steps it remembers), the value
        # a few more; the terms are nonnegative, so |value| is their scale
        assert_close(value, want_value, ops=64)
        assert_close(grads["x"], want, ops=1, scale=COUPLED_GRAD_ERROR)


def test_value_function_solves_the_coupled_toy_problem():
    m = gradlang.compile_source(COUPLED.replace("METHOD", ""))
    x = np.zeros(2, np.float32)
    for _ in range(300):
        x = x - 0.2 * np.asarray(m.g(x, A, B)[1]["x"])
    # the outer steps contract by 1 - 0.2 = 0.8 (curvature >= 1), so x lands within the
    # hypergradient's error of the solution
    assert_close(x, np.array([2.0, 0.0]), ops=1, scale=COUPLED_GRAD_ERROR)


def test_ignoring_the_constraint_in_the_hypergradient_finds_the_wrong_point():
    """The same outer descent with the unconstrained dy/dx = 2 lands at x1 = 5/3, not 2: the
    constraint's coupling is what value_function accounts for."""
    x = np.zeros(2, np.float32)
    for _ in range(300):
        y = np.minimum(2 * x, x + 1)
        x = x - 0.2 * ((x - A) + 2 * (y - B))
    assert abs(x[0] - 5 / 3) < 4 * EPS32 * 5 / 3  # a float32 fixed point: a few roundings


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
    # the inner step rounds ~4 times, contracting by 0.5: 8 a solve; the middle step wraps it,
    # contracting by 1 - 0.3 * 2 = 0.4: 8 * 4 / 0.6 ~ 50; value_function divides by 2 sigma = 0.2
    assert_close(m.g(theta)["theta"], theta / 2, ops=50 / 0.2)


def test_explain_says_why_a_constrained_problem_uses_value_function():
    from gradlang.explain import explain

    text = explain(gradlang.compile_source(COUPLED.replace("METHOD", "")).ir)
    assert "value_function(sigma=0.01, steps=500)" in text
    assert "constraints coupling" in text


def test_coupled_bilevel_example_reaches_the_known_solution(tmp_path, load_example):
    out = load_example("coupled_bilevel").main(["--n", "8", "--steps", "150", "--out", str(tmp_path)])
    methods = out["methods"]
    # as test_value_function_solves_the_coupled_toy_problem: the hypergradient's error
    assert methods["value_function"]["max_abs_error_x"] < COUPLED_GRAD_ERROR * EPS32
    assert methods["unrolled"]["max_abs_error_x"] < COUPLED_GRAD_ERROR * EPS32
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
