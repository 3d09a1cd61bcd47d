"""Export forms with a tree parameter beyond grad / value_and_grad / descend (tests/test_trees.py):
an inner problem over a tree (`argmin v: tree`), against the ridge problem's closed form and
reverse mode through a hand-written JAX loop on the same tree."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradlang
from stats import assert_close, assert_unbiased
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


# ---- by=eggroll: low-rank noise on each 2-D leaf, full rank on the others

EGGROLL = """
jax fn q(p: tree, x: f32[B, M], y: f32[B, K]) -> f32
fn loss(p: tree, x: f32[B, M], y: f32[B, K]) -> f32 { return q(p, x, y) }
export eggroll = grad(loss, wrt=[p], by=eggroll(sigma=0.1, pop=16, rank=2))
export pair = grad(loss, wrt=[p], by=eggroll(sigma=0.1, pop=2, rank=1))
export es_pair = grad(loss, wrt=[p], by=es(sigma=0.1, pop=2))
export step = descend(loss, wrt=[p], lr=0.05, by=eggroll(sigma=0.1, pop=16, rank=2))
"""
RNG = np.random.default_rng(1)
XQ = RNG.normal(size=(12, 6)).astype(np.float32)
YQ = RNG.normal(size=(12, 4)).astype(np.float32)
QP = {"w": (0.3 * RNG.normal(size=(6, 4))).astype(np.float32),
      "b": (np.zeros(4, np.float32),), "t": RNG.normal(size=(2, 2, 2)).astype(np.float32)}


def quadratic(p, x, y):
    """A quadratic in a matrix leaf, a vector leaf and a 3-D leaf: EGGROLL's noise has identity
    covariance and is symmetric, so its estimate is unbiased for the exact gradient."""
    r = x @ p["w"] + p["b"][0] - y
    return 0.5 * jnp.sum(r * r) + 0.5 * jnp.sum((p["t"] - 1.0) ** 2)


def leaves(tree, samples: bool = False) -> np.ndarray:
    """A tree's leaves as one vector (with `samples`: one per stacked estimate)."""
    if samples:
        return np.concatenate([np.reshape(x, (np.shape(x)[0], -1)) for x in jax.tree.leaves(tree)],
                              axis=1)
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


@pytest.fixture(scope="module")
def eggroll():
    return gradlang.compile_source(EGGROLL, "eggroll.grad", functions={"q": quadratic})


def test_eggroll_on_a_tree_is_unbiased_on_a_quadratic(eggroll):
    keys = jax.random.split(jax.random.key(7), 3000)
    samples = jax.vmap(lambda k: eggroll.eggroll(QP, XQ, YQ, k))(keys)["p"]
    assert jax.tree.structure(samples) == jax.tree.structure(QP)
    exact = jax.grad(quadratic)(QP, XQ, YQ)
    assert_unbiased(leaves(samples, samples=True), leaves(exact))


def test_eggroll_perturbs_each_matrix_leaf_by_a_low_rank_matrix(eggroll):
    """One antithetic pair of rank 1: the matrix leaf's estimate w_1 a b^T has rank 1 (es's,
    from a full Gaussian matrix, rank 4); the other leaves get a full-rank Gaussian, as es. The
    rank tolerance is NumPy's for float32 (largest singular value x max dim x eps32)."""
    key = jax.random.key(3)
    low = eggroll.pair(QP, XQ, YQ, key)["p"]
    full = eggroll.es_pair(QP, XQ, YQ, key)["p"]
    assert np.linalg.matrix_rank(np.asarray(low["w"], np.float32)) == 1
    assert np.linalg.matrix_rank(np.asarray(full["w"], np.float32)) == 4
    for name in ("b", "t"):  # w_1 z: every entry of a Gaussian is non-zero almost surely
        assert np.all(leaves(low[name]) != 0)
    moved = eggroll.step(jax.tree.map(jnp.array, QP), XQ, YQ, key)["p"]
    want = jax.tree.map(lambda t, g: t - 0.05 * g, QP, eggroll.eggroll(QP, XQ, YQ, key)["p"])
    # the update is theta - lr * (the estimate for the same key): a multiply and a subtract
    assert_close(moved, want, ops=2, scale=1.0)


def test_explain_says_which_leaves_eggroll_perturbs_low_rank():
    from gradlang.explain import explain
    text = explain(gradlang.compile_source(EGGROLL + """
struct S { w: f32[M, K], b: f32[K], t: (f32[M, K], f32) }
fn plain(s: S, x: f32[B, M]) -> f32 {
  let (m, c) = s.t
  return sum(x @ s.w + s.b) + sum(x @ m) * c
}
export fields = grad(plain, wrt=[s], by=eggroll(sigma=0.1, pop=2))
""", functions={"q": quadratic}).ir)
    assert ("    perturbed: every 2-D leaf (a matrix): low-rank A B^T / sqrt(2), A [m, 2], "
            "B [n, 2]; every other leaf: a full-rank Gaussian, as es (the tree's leaves are "
            "known at run time)\n") in text
    assert ("    a perturbed matrix passed to a jax fn enters it materialized (W + sigma A B^T / "
            "sqrt(rank), once per member): the perturbation stays low-rank, but only matmuls "
            "written in the .grad file skip forming it\n") in text
    assert ("  s: black-box estimate by low-rank evolution strategies (EGGROLL): matrices "
            "perturbed by A B^T / sqrt(rank), never materialized in the forward pass; "
            "identity-covariance noise: unbiased on quadratics, otherwise O(sigma^2) from the "
            "gradient of the Gaussian-smoothed objective E f(w + 0.1 z)\n"
            "    perturbed: s.w, s.t[0] (matrices): low-rank A B^T / sqrt(1), A [m, 1], "
            "B [n, 1]; s.b, s.t[1]: a full-rank Gaussian, as es\n") in text
