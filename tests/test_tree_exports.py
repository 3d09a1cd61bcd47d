"""Export forms with a tree parameter beyond grad / value_and_grad / descend (tests/test_trees.py):
an inner problem over a tree (`argmin v: tree`), against the ridge problem's closed form and
reverse mode through a hand-written JAX loop on the same tree."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradlang
from stats import assert_close
from test_bilevel import ARGS, RIDGE_OPS, XV, YV, D, X, Y, ridge_closed_form

# ---- argmin over a tree

SPLIT = 2
"""The ridge weights as a tree: w[:2] in a nested dict, w[2:] in a tuple."""


def tree_of(w) -> dict:
    return {"w": {"head": w[:SPLIT]}, "tail": (w[SPLIT:],)}


def lin(p, x):
    """The binding: x @ w with w spread over the tree's leaves."""
    return x[:, :SPLIT] @ p["w"]["head"] + x[:, SPLIT:] @ p["tail"][0]


RIDGE = """
jax fn lin(p: tree, x: f32[N, D]) -> f32[N]
fn fit(p0: tree, lam: f32, x: f32[N, D], y: f32[N]) -> tree {
  return argmin v: tree = p0 {
    0.5 * mean((lin(v, x) - y) ^ 2) + 0.5 * exp(lam) * sum_squares(v)
  } via SOLVER METHOD
}
fn f(p0: tree, lam: f32, x: f32[N, D], y: f32[N], xv: f32[M, D], yv: f32[M]) -> f32 {
  return 0.5 * mean((lin(fit(p0, lam, x, y), xv) - yv) ^ 2)
}
export fit = fit
export g = value_and_grad(f, wrt=[lam, p0])
"""
P0 = tree_of(np.zeros(D, np.float32))


def ridge_tree(solver: str, method: str) -> gradlang.CompiledModule:
    source = RIDGE.replace("SOLVER", solver).replace("METHOD", method)
    return gradlang.compile_source(source, "ridge.grad", functions={"lin": lin})


@pytest.mark.parametrize("solver, method", [
    ("gd(steps=300, lr=0.3)", ""), ("gd(steps=300, lr=0.3)", "with implicit(gmres, iters=10)"),
    ("gd(steps=300, lr=0.3)", "with implicit(neumann, iters=300)"),
    ("gd(steps=300, lr=0.3)", "with unrolled"), ("newton_cg(steps=5)", "")])
def test_an_inner_problem_over_a_tree_matches_the_ridge_closed_form(solver, method):
    """The minimizer comes back in the start value's structure, the hypergradient through the
    jax fn (Hessian-vector products for implicit and newton_cg, reverse mode through the loop
    for unrolled) is the closed form's; the tolerance is the tensor form's (tests/
    test_bilevel.py: the same problem, data and solver, its leaves in another order)."""
    m = ridge_tree(solver, method)
    lam = ARGS[0]
    a = X.T @ X / len(Y) + np.exp(lam) * np.eye(D)
    w = m.fit(P0, lam, X, Y)
    assert jax.tree.structure(w) == jax.tree.structure(P0)
    assert_close(w, tree_of(np.linalg.solve(a.astype(np.float64), X.T @ Y / len(Y))),
                 ops=RIDGE_OPS)
    value, grads = m.g(P0, lam, X, Y, XV, YV)
    want_value, want_grad = jax.value_and_grad(ridge_closed_form)(lam)
    assert_close(value, want_value, ops=RIDGE_OPS)
    assert_close(grads["lam"], want_grad, ops=RIDGE_OPS)
    if method != "with unrolled":  # the solution does not depend on where the solver starts
        np.testing.assert_array_equal(np.concatenate([np.ravel(g) for g in
                                                      jax.tree.leaves(grads["p0"])]), 0.0)


def test_reverse_mode_through_the_solver_reaches_the_start_tree():
    """unrolled: the gradient with respect to the start value is reverse mode through 20 gd
    steps, here written by hand in JAX on the same tree (tree_map updates)."""
    m = ridge_tree("gd(steps=20, lr=0.3)", "with unrolled")
    start = tree_of(np.linspace(-1, 1, D).astype(np.float32))

    def by_hand(p0, lam):
        def inner(v):
            return 0.5 * jnp.mean((lin(v, X) - Y) ** 2) + 0.5 * jnp.exp(lam) * sum(
                jnp.sum(leaf ** 2) for leaf in jax.tree.leaves(v))

        def step(_, v):
            return jax.tree.map(lambda a, g: a - 0.3 * g, v, jax.grad(inner)(v))

        v = jax.lax.fori_loop(0, 20, step, p0)
        return 0.5 * jnp.mean((lin(v, XV) - YV) ** 2)

    value, grads = m.g(start, ARGS[0], X, Y, XV, YV)
    want_value, (want_p0, want_lam) = jax.jit(jax.value_and_grad(by_hand, argnums=(0, 1)))(
        start, ARGS[0])
    # as tests/test_bilevel.py's truncated-backprop test: ~70 roundings a gd step, contracted
    # by 0.74 a step (270 per side), forward and backward, both sides float32
    assert_close(value, want_value, ops=4 * 270)
    assert_close(grads["lam"], want_lam, ops=4 * 270)
    assert_close(grads["p0"], want_p0, ops=4 * 270)


def test_the_solver_report_of_a_tree_problem():
    """`argmin ... as (w, report)` binds the tree solution and the report directly (no tuple
    holds the tree)."""
    m = gradlang.compile_source("""
jax fn lin(p: tree, x: f32[N, D]) -> f32[N]
fn fit(p0: tree, x: f32[N, D], y: f32[N]) -> f32 {
  argmin v: tree = p0 { 0.5 * mean((lin(v, x) - y) ^ 2) + 0.5 * sum_squares(v) }
    via gd(steps=1000, lr=0.3, tol=1e-4) as (w, report)
  return report.residual
}
export fit = fit
""", functions={"lin": lin})
    assert 0 < float(m.fit(P0, X, Y)) <= 1e-4
