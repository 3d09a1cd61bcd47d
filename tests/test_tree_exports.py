"""Export forms with a tree parameter beyond grad / value_and_grad / descend (tests/test_trees.py):
an inner problem over a tree (`argmin v: tree`) against the ridge problem's closed form and
reverse mode through a hand-written JAX loop on the same tree; `by=eggroll` (low-rank noise on
each 2-D leaf) unbiased on a quadratic; `by=dp` against DP-SGD written directly in JAX with the
same key; what `explain` says of each; `minimize` against MGDA's closed form over every leaf;
`compose` against the same export with the tree spelled as a struct; `verify` leaf by leaf."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

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
    assert ("    perturbed: every leaf of rank >= 2 (a matrix [m, n], or a kernel [..., n] as "
            "the matrix of its leading dims by its last): low-rank A B^T / sqrt(2), A [m, 2], "
            "B [n, 2]; every other leaf: a full-rank Gaussian, as es (the tree's leaves are "
            "known at run time)\n") in text
    assert ("    a perturbed matrix passed to a jax fn stays low-rank through its matmuls (x W + "
            "sigma (x A) B^T / sqrt(rank)); any other use of it inside the function forms W + "
            "sigma A B^T / sqrt(rank) there, once per member\n") in text
    assert ("  s: black-box estimate by low-rank evolution strategies (EGGROLL): matrices "
            "perturbed by A B^T / sqrt(rank), never materialized in the forward pass; "
            "identity-covariance noise: unbiased on quadratics, otherwise O(sigma^2) from the "
            "gradient of the Gaussian-smoothed objective E f(w + 0.1 z)\n"
            "    perturbed: s.w, s.t[0] (matrices): low-rank A B^T / sqrt(1), A [m, 1], "
            "B [n, 1]; s.b, s.t[1]: a full-rank Gaussian, as es\n") in text


# ---- by=dp: per-example gradients of every leaf of a tree

PRIVATE = """
jax fn net(p: tree, x: f32[B, D]) -> f32[B, H]
struct Head { w: f32[H, C] }
fn loss(p: tree, head: Head, x: f32[B, D], y: f32[B, C]) -> f32 {
  return mean((net(p, x) @ head.w - y) ^ 2)
}
export g = grad(loss, wrt=[p, head], by=dp(clip=CLIP, noise=0.7))
export vg = value_and_grad(loss, wrt=[p, head], by=dp(clip=CLIP, noise=0.7))
export step = descend(loss, wrt=[p, head], lr=0.1, by=dp(clip=CLIP, noise=0.7))
"""
CLIP, SIGMA, NB = 6.5, 0.7, 12


class Dense(NamedTuple):
    w: np.ndarray
    b: np.ndarray


def private_net(p, x):
    """The binding: two tanh layers from a list of NamedTuples."""
    for layer in p["layers"]:
        x = jnp.tanh(x @ layer.w + layer.b)
    return x


def private_loss(p, head, x, y):
    return jnp.mean((private_net(p, x) @ head["w"] - y) ** 2)


def dp_by_hand(theta: dict, x, y, key):
    """DP-SGD written directly in JAX: vmap of jax.grad over the examples (a batch of one
    each), each example's gradient scaled to global norm at most CLIP over every leaf of both
    parameters, summed, plus N(0, (SIGMA CLIP)^2) noise drawn once for all the leaves (in
    flattening order) from the export's key, divided by n. Also the per-example norms."""
    def one(xi, yi):
        return jax.grad(lambda t: private_loss(t["p"], t["head"], xi[None], yi[None]))(theta)

    per = jax.vmap(one)(x, y)
    norms = jnp.sqrt(sum(jnp.sum(g.reshape(NB, -1) ** 2, 1) for g in jax.tree.leaves(per)))
    c = CLIP / jnp.maximum(norms, CLIP)
    summed = jax.tree.map(lambda g: jnp.tensordot(c, g, axes=1), per)
    flat, tree = jax.tree.flatten(summed)
    z = SIGMA * CLIP * jax.random.normal(key, (sum(a.size for a in flat),), jnp.float32)
    cuts = np.cumsum([a.size for a in flat])[:-1]
    noise = [part.reshape(a.shape) for part, a in zip(jnp.split(z, cuts), flat)]
    return tree.unflatten([(a + e) / NB for a, e in zip(flat, noise)]), np.asarray(norms)


def test_dp_clips_each_examples_gradient_over_every_leaf_of_the_tree():
    """The tree's leaves get per-example gradients (vmap through the jax fn), the struct's
    linear layer head.w ghost clipping; the norm is global over both. Tolerance: both sides
    float32, as tests/test_privacy.py's DP_OPS (an example's gradient through two tanh layers
    and a square, forward and backward: ~60 roundings; its norm over the 4 + 4 + 16 + 4 + 8
    = 36 entries and a sqrt; the clip factor; the sum over 12 examples; the noise's add and
    the division: ~115 a side)."""
    rng = np.random.default_rng(5)
    d, h, c = 2, 4, 2
    p = {"layers": [Dense(*(rng.normal(size=(d, h)).astype(np.float32),
                            rng.normal(size=h).astype(np.float32))),
                    Dense(*(rng.normal(size=(h, h)).astype(np.float32) / 2,
                            rng.normal(size=h).astype(np.float32)))]}
    head = {"w": rng.normal(size=(h, c)).astype(np.float32)}
    x = (rng.normal(size=(NB, d)) * np.linspace(0.1, 2.0, NB)[:, None]).astype(np.float32)
    y = rng.normal(size=(NB, c)).astype(np.float32)
    m = gradlang.compile_source(PRIVATE.replace("CLIP", str(CLIP)), "dp.grad",
                                functions={"net": private_net})
    plan = {n.leaf: n for n in m.ir.facts.privacy["g"].leaves}
    assert plan["head.w"].ghost and not plan["p"].ghost
    key = jax.random.key(11)
    want, norms = dp_by_hand({"p": p, "head": head}, x, y, key)
    assert (norms > CLIP).sum() >= 3 and (norms < CLIP).sum() >= 3  # clipping matters for some
    got = m.g(p, head, x, y, key)
    assert jax.tree.structure(got["p"]) == jax.tree.structure(p)
    assert_close(got, want, ops=230)
    value, grads = m.vg(p, head, x, y, key)
    # the mean of the per-example losses against the batch loss: 12 more terms each
    assert_close(value, private_loss(p, head, x, y), ops=230)
    assert_close(grads, want, ops=230)
    stepped = m.step(jax.tree.map(jnp.array, p), jax.tree.map(jnp.array, head), x, y, key)
    assert_close(stepped, jax.tree.map(lambda a, g: a - 0.1 * g, {"p": p, "head": head}, want),
                 ops=232)


def test_explain_says_why_a_tree_gets_per_example_gradients():
    from gradlang.explain import explain
    m = gradlang.compile_source(PRIVATE.replace("CLIP", "1.0"), "dp.grad",
                                functions={"net": private_net})
    text = explain(m.ir)
    assert ("    p       per-example gradient  a tree: per-example gradients of every leaf (its "
            "leaves are known only at run time): passed to jax fn 'net' in loss (dp.grad:5), "
            "whose matmuls the compiler cannot see (no ghost clipping through it)\n") in text
    assert "    head.w  ghost (linear layer)  x @ w in loss (dp.grad:5)\n" in text


# ---- minimize and compose

MULTI = """
jax fn net(p: tree, x: f32[B, D]) -> f32[B]
fn fit(p: tree, x: f32[B, D], y: f32[B]) -> f32 { return mean((net(p, x) - y) ^ 2) }
fn small(p: tree, x: f32[B, D], y: f32[B]) -> f32 { return sum_squares(p) }
export mgda = minimize([fit, small], wrt=[p], by=mgda)
export weighted = minimize([fit, small], wrt=[p], by=weights(1.0, 0.5))
"""


def multi_net(p, x):
    return jnp.tanh(x @ p["w"] + p["b"][0])


def multi_loss(p, x, y):
    return jnp.mean((multi_net(p, x) - y) ** 2)


def test_minimize_combines_the_gradients_of_a_tree_over_all_its_leaves():
    """mgda of two objectives is the closed form c g1 + (1 - c) g2 with c = clip(<g2 - g1, g2>
    / |g1 - g2|^2, 0, 1), the inner products over every leaf; weights(1, 0.5) is g1 + 0.5 g2.
    Tolerance: both float32; a gradient (a product over D = 3, tanh, the mean over B = 8:
    ~20 roundings), the Gram matrix's sums over the 4 entries and the closed form's few
    operations, amplified by |g| / |g1 - g2| (about 2 here) through c."""
    rng = np.random.default_rng(2)
    p = {"w": rng.normal(size=3).astype(np.float32), "b": (np.float32(0.3) * np.ones((), np.float32),)}
    x = rng.normal(size=(8, 3)).astype(np.float32)
    y = rng.normal(size=8).astype(np.float32)
    m = gradlang.compile_source(MULTI, functions={"net": multi_net})
    g1 = jax.grad(multi_loss)(p, x, y)
    g2 = jax.tree.map(lambda a: 2 * a, p)
    a, b = leaves(g1).astype(np.float64), leaves(g2).astype(np.float64)
    c = float(np.clip((b - a) @ b / ((a - b) @ (a - b)), 0.0, 1.0))
    assert 0.05 < c < 0.95  # the interior of the segment: neither gradient alone
    values, direction, weights = m.mgda(p, x, y)
    assert jax.tree.structure(direction["p"]) == jax.tree.structure(p)
    assert_close(weights, np.array([c, 1 - c]), ops=2 * 2 * (20 + 4 + 8), scale=1.0)
    assert_close(direction["p"], jax.tree.map(lambda u, v: c * u + (1 - c) * v, g1, g2),
                 ops=2 * 2 * (20 + 4 + 8))
    values, direction, _ = m.weighted(p, x, y)
    assert_close(values, np.array([multi_loss(p, x, y), float(leaves(p) @ leaves(p))]), ops=2 * 20)
    assert_close(direction["p"], jax.tree.map(lambda u, v: u + 0.5 * v, g1, g2), ops=2 * 22)


COMPOSED = """
struct P { w: f32[D] }
jax fn net(p: tree, x: f32[B, D]) -> f32[B]
jax fn net_s(p: P, x: f32[B, D]) -> f32[B]
fn g(p: tree, x: f32[B, D]) -> f32 {
  z ~ Normal(0.0, 1.0)
  return mean(net(p, x)) * (1.0 + z)
}
fn g_s(p: P, x: f32[B, D]) -> f32 {
  z ~ Normal(0.0, 1.0)
  return mean(net_s(p, x)) * (1.0 + z)
}
fn square(u: f32, p: tree, x: f32[B, D]) -> f32 { return u * u + 0.1 * sum_squares(p) }
fn square_s(u: f32, p: P, x: f32[B, D]) -> f32 { return u * u + 0.1 * sum_squares(p) }
export scgd = value_and_grad(compose(square, expect(g, samples=4), by=scgd(beta=0.1)), wrt=[p])
export scgd_s = value_and_grad(compose(square_s, expect(g_s, samples=4), by=scgd(beta=0.1)), wrt=[p])
export plugin = grad(compose(square, expect(g, samples=4), by=plugin), wrt=[p])
export plugin_s = grad(compose(square_s, expect(g_s, samples=4), by=plugin), wrt=[p])
"""


def test_compose_with_a_tree_is_the_struct_form_with_the_same_draws():
    """The tree {'w': w} and the struct P { w } are the same parameters: with the same keys
    (the draws do not depend on the parameters' form) both estimators give the same values,
    gradients and scgd state over three calls. Tolerance as tests/test_compose.py's SRC_OPS
    (a mean of 4 samples, the square and its derivative, the moving average) plus the
    network's product over D = 3 and tanh, the mean over B = 5 and the decay term: ~30 a
    side."""
    rng = np.random.default_rng(4)
    w = rng.normal(size=3).astype(np.float32)
    x = rng.normal(size=(5, 3)).astype(np.float32)

    def net(p, x):
        return jnp.tanh(x @ p["w"])

    m = gradlang.compile_source(COMPOSED, functions={"net": net, "net_s": net})
    state = state_s = (np.float32(0.0), np.float32(0.0))
    for i in range(3):
        key = jax.random.key(i)
        value, grads, state = m.scgd({"w": w}, x, state, key)
        want_value, want, state_s = m.scgd_s({"w": w}, x, state_s, key)
        assert_close((value, grads, state), (want_value, want, state_s), ops=60)
        assert_close(m.plugin({"w": w}, x, key), m.plugin_s({"w": w}, x, key), ops=60)
    assert float(state[1]) == 3  # the calls counted: the state was threaded


# ---- structs from NamedTuples and dataclasses

STRUCTS = """
struct Layer { w: f32[D, H], b: f32[H] }
struct Net { first: Layer, scale: f32 }
struct Config { steps: i32 }
fn loss(n: Net, c: Config, x: f32[B, D]) -> f32 {
  return sum(tanh(x @ n.first.w + n.first.b)) * n.scale * f32(c.steps)
}
export g = grad(loss, wrt=[n])
export step = descend(loss, wrt=[n], lr=0.1)
"""


class LayerTuple(NamedTuple):
    w: np.ndarray
    b: np.ndarray


class Short(NamedTuple):
    w: np.ndarray


class Config(NamedTuple):
    steps: int


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class NetData:
    first: LayerTuple
    scale: np.ndarray


def test_a_struct_argument_may_be_a_named_tuple_or_a_dataclass_its_results_are_dicts():
    """A dataclass holding a NamedTuple computes what the dicts with the same fields do, bit
    for bit (the same program on the same arrays); gradients and descend's update are dicts.
    A Python int in a NamedTuple's field is range-checked on every call, as in a dict's."""
    rng = np.random.default_rng(6)
    w, b = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=4).astype(np.float32)
    x = rng.normal(size=(2, 3)).astype(np.float32)
    m = gradlang.compile_source(STRUCTS)
    want = m.g({"first": {"w": w, "b": b}, "scale": np.float32(0.5)}, {"steps": 3}, x)
    for given in (NetData(LayerTuple(w, b), np.float32(0.5)),
                  {"first": LayerTuple(w, b), "scale": np.float32(0.5)}):
        got = m.g(given, Config(3), x)
        assert jax.tree.structure(got) == jax.tree.structure(want)  # dicts
        for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(a, e)
        assert jax.jit(m.g)(given, Config(3), x)["n"]["first"]["w"].shape == (3, 4)
    with pytest.raises(gradlang.ArgumentError) as info:  # the same layout: the fast path
        m.g(NetData(LayerTuple(w, b), np.float32(0.5)), Config(2 ** 40), x)
    assert str(info.value).startswith("g(): argument 'c'.steps: expected i32, got int "
                                      "1099511627776, outside the i32 range")
    stepped = m.step(NetData(LayerTuple(jnp.array(w), jnp.array(b)), jnp.float32(0.5)),
                     Config(3), x)
    assert set(stepped["n"]) == {"first", "scale"} and set(stepped["n"]["first"]) == {"w", "b"}
    with pytest.raises(gradlang.ArgumentError) as info:
        m.g({"first": (w, b), "scale": np.float32(0.5)}, Config(3), x)
    assert str(info.value) == ("g(): argument 'n'.first: expected a dict for struct Layer (or a "
                               "NamedTuple or dataclass with its fields), got tuple")
    with pytest.raises(gradlang.ArgumentError) as info:
        m.g({"first": Short(w), "scale": np.float32(0.5)}, Config(3), x)
    assert str(info.value) == ("g(): argument 'n'.first: struct Layer needs fields (a Short) "
                               "['w', 'b']; missing ['b']")


# ---- forward mode through a jax fn that has only a custom VJP


@jax.custom_vjp
def lin_vjp(p, x):
    """`lin` with a hand-written backward and, as a custom_vjp, no forward-mode derivative."""
    return lin(p, x)


def _lin_fwd(p, x):
    """As JAX's documentation writes it: the custom_vjp function itself, called under the
    outer jvp of a Hessian-vector product, has no forward-mode rule."""
    return lin_vjp(p, x), (p, x)


def _lin_bwd(saved, g):
    p, x = saved
    return jax.vjp(lin, p, x)[1](g)


lin_vjp.defvjp(_lin_fwd, _lin_bwd)


@pytest.mark.parametrize("solver, method, needs, instead", [
    ("gd(steps=300, lr=0.3)", "", "implicit differentiation's linear solve",
     "write 'with value_function' (first order) after the solver, or 'with unrolled' for a "
     "solver without line search"),
    ("newton_cg(steps=5)", "with value_function", "the newton_cg solver's Newton steps",
     "use a first-order solver (gd, momentum, adam, lbfgs)")])
def test_forward_mode_through_a_custom_vjp_function_is_an_error_naming_it(solver, method, needs,
                                                                           instead):
    """JAX would raise "can't apply forward-mode autodiff (jvp) to a custom_vjp function" only
    when compiling, naming nothing; the export's first call says which function, which
    problem, why and what to write instead."""
    source = RIDGE.replace("SOLVER", solver).replace("METHOD", method)
    m = gradlang.compile_source(source, "ridge.grad", functions={"lin": lin_vjp})
    with pytest.raises(gradlang.JaxFunctionError) as info:
        m.g(P0, ARGS[0], X, Y, XV, YV)
    assert str(info.value) == (
        f"jax fn 'lin' has a custom VJP and no forward-mode derivative, but the inner problem "
        f"at ridge.grad:4:10 takes Hessian-vector products through it ({needs}): {instead}, "
        f"or give the function a jax.custom_jvp")


def test_reverse_mode_through_a_custom_vjp_function_is_fine():
    """unrolled needs no forward mode: the hypergradient through the custom VJP is the ridge
    closed form's (the tolerance as for the plain function)."""
    m = gradlang.compile_source(RIDGE.replace("SOLVER", "gd(steps=300, lr=0.3)")
                                .replace("METHOD", "with unrolled"), functions={"lin": lin_vjp})
    value, grads = m.g(P0, *ARGS)
    want_value, want_grad = jax.value_and_grad(ridge_closed_form)(ARGS[0])
    assert_close(value, want_value, ops=RIDGE_OPS)
    assert_close(grads["lam"], want_grad, ops=RIDGE_OPS)


# ---- verify with a tree parameter

VERIFIED = """
jax fn lin(p: tree, x: f32[N, D]) -> f32[N]
fn loss(p: tree, x: f32[N, D], y: f32[N]) -> f32 {
  return 0.5 * mean((lin(p, x) - y) ^ 2)
}
export exact = grad(loss, wrt=[p])
export zeroth = grad(loss, wrt=[p], by=spsa(eps=0.01))
"""


@pytest.mark.parametrize("export", ["exact", "zeroth"])
def test_verify_takes_a_tree_its_leaves_named_by_path(export):
    """verify's statistics run leaf by leaf over the tree, named by their paths; reverse mode
    matches the finite differences and SPSA its smoothed gradient."""
    m = gradlang.compile_source(VERIFIED, functions={"lin": lin})
    p = tree_of(np.linspace(-0.5, 0.5, D).astype(np.float32))
    report = m.verify(export, (p, X, Y), samples=200)
    assert [leaf.name for leaf in report.leaves] == ["p.tail.0", "p.w.head"]
    assert report.verdict == "consistent"


def test_verify_needs_a_trees_value_and_float_leaves():
    from gradlang.verify import VerifyError
    m = gradlang.compile_source(VERIFIED, functions={"lin": lin})
    with pytest.raises(VerifyError, match=r"parameter 'p' is a tree, whose structure only a "
                                          r"value gives: give the arguments"):
        m.verify("exact", dims={"N": 4, "D": D})
    bad = {"w": {"head": np.zeros(SPLIT, np.int32)}, "tail": (np.zeros(D - SPLIT, np.float32),)}
    with pytest.raises(VerifyError, match=r"argument 'p': a tree's leaves must be float arrays; "
                                          r"p\['w'\]\['head'\] is int32"):
        m.verify("exact", (bad, X, Y))
