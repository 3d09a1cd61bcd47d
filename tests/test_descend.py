"""`descend(f, wrt=[...], lr=...)`: one gradient step written over the parameters (MeZO's
in-place SPSA step), and SPSA's perturbed matrices that matmuls never materialize."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradlang
from gradlang.runtime.perturbed import Seeded, seed_of, seeded_normal
from stats import EPS32, assert_close

RNG = np.random.default_rng(3)

LINEAR = """
fn loss(w: f32[M, N], b: f32[N], x: f32[B, M], y: f32[B, N]) -> f32 {
  let r = tanh(x @ w + b) - y
  return mean(r * r)
}
fn dense_loss(w: f32[M, N], b: f32[N], x: f32[B, M], y: f32[B, N]) -> f32 {
  let r = tanh(x @ (w * 1.0) + b) - y
  return mean(r * r)
}
export grad_spsa = grad(loss, wrt=[w, b], by=spsa(eps=0.001, samples=3))
export grad_spsa_dense = grad(dense_loss, wrt=[w, b], by=spsa(eps=0.001, samples=3))
export step_spsa = descend(loss, wrt=[w, b], lr=0.1, by=spsa(eps=0.001, samples=3))
export grad_spsa1 = grad(loss, wrt=[w, b], by=spsa(eps=0.001))
export step_spsa1 = descend(loss, wrt=[w, b], lr=0.1, by=spsa(eps=0.001))
export grad_exact = grad(loss, wrt=[w, b])
export step_exact = descend(loss, wrt=[w, b], lr=0.1)
export grad_es = grad(loss, wrt=[w], by=es(sigma=0.01, pop=8))
export step_es = descend(loss, wrt=[w], lr=0.1, by=es(sigma=0.01, pop=8))
export step_spsa_lr = descend(loss, wrt=[w, b], by=spsa(eps=0.001, samples=3))
export step_exact_lr = descend(loss, wrt=[w, b])
"""
# 300 x 200 = 60,000 entries: SPSA's tiled noise regeneration runs several tiles
W = (RNG.normal(size=(300, 200)) / 17).astype(np.float32)
B = RNG.normal(size=200).astype(np.float32)
X = RNG.normal(size=(5, 300)).astype(np.float32)
Y = RNG.normal(size=(5, 200)).astype(np.float32)
KEY = jax.random.key(3)
SPSA_REORDERED = 5 * np.sqrt(300 + 5 * 200) * EPS32 / (2 * 0.001) * 4.5
"""The relative difference, in units of the largest entry, between two float32 forms of the same
SPSA estimate (eps = 0.001): the loss (~1) sums 300-term products and 1,000 squares, whose
reordered roundings differ by at most ~5 sqrt(1300) eps32 (Higham and Mary's probabilistic bound:
rounding errors independent, mean zero); SPSA divides it by 2 eps and multiplies it by z
(|z| <= 4.5): ~6%. Noise regenerated wrongly would change each projection by O(1)."""


@pytest.fixture(scope="module")
def linear():
    return gradlang.compile_source(LINEAR)


@pytest.mark.parametrize("rows, cols", [(300, 200), (257, 300), (64, 7),
                                        pytest.param(5000, 4, marks=pytest.mark.slow)])
def test_seeded_matmuls_equal_the_materialized_perturbed_matrix(rows, cols):
    """Tiles that divide the rows, padded tiles, a single tile, and many tiles."""
    w = RNG.normal(size=(rows, cols)).astype(np.float32)
    seed = seed_of(jax.random.key(rows))
    p = Seeded(jnp.asarray(w), seed, -0.3)
    full = w + -0.3 * np.asarray(seeded_normal(seed, (rows, cols), jnp.float32))
    assert_close(p.dense(), full, ops=2)  # one multiply-add: an FMA or two roundings
    # products of n = rows (or cols) terms against float64: within 5 sqrt(n) eps32 of the sum of
    # their magnitudes (Higham and Mary's probabilistic bound), plus the noise's multiply-add
    full64 = full.astype(np.float64)
    x = RNG.normal(size=(3, rows)).astype(np.float32)
    for xs in (x, x[0]):
        assert_close(p.rmatmul(xs), xs @ full64, ops=5 * np.sqrt(rows) + 2, scale=np.abs(xs) @ np.abs(full64))
    v = RNG.normal(size=(cols, 2)).astype(np.float32)
    for vs in (v, v[:, 0]):
        assert_close(p.matmul(vs), full64 @ vs, ops=5 * np.sqrt(cols) + 2, scale=np.abs(full64) @ np.abs(vs))


def test_spsa_through_a_matmul_equals_spsa_through_the_materialized_matrix(linear):
    """`x @ w` keeps w + eps z factored (tiled noise); `x @ (w * 1.0)` materializes it: the
    same key gives the same estimate, so the tiles regenerate exactly the update's noise."""
    tiled, dense = linear.grad_spsa(W, B, X, Y, KEY), linear.grad_spsa_dense(W, B, X, Y, KEY)
    assert_close(tiled, dense, ops=SPSA_REORDERED / EPS32)


@pytest.mark.parametrize("step, grad", [("step_spsa", "grad_spsa"), ("step_spsa1", "grad_spsa1"),
                                        ("step_exact", "grad_exact"), ("step_es", "grad_es")])
def test_descend_is_theta_minus_lr_times_the_same_gradient(linear, step, grad):
    key = () if "exact" in step else (KEY,)
    g = linear[grad](W, B, X, Y, *key)
    new = linear[step](jnp.asarray(W), jnp.asarray(B), X, Y, *key)
    assert set(new) == set(g)
    # the same gradient computation in both exports, then the update's multiply-add
    want = {n: theta - 0.1 * np.asarray(g[n]) for n, theta in (("w", W), ("b", B)) if n in g}
    assert_close(new, want, ops=4)


@pytest.mark.parametrize("given, taken", [("step_spsa", "step_spsa_lr"),
                                          ("step_exact", "step_exact_lr")])
def test_descend_without_lr_takes_it_as_an_argument_after_the_functions(linear, given, taken):
    sig = linear[taken].signature
    assert [n for n, _ in sig.params][4:] == (["lr", "key"] if "spsa" in taken else ["lr"])
    key = (KEY,) if "spsa" in taken else ()
    a = linear[taken](jnp.asarray(W), jnp.asarray(B), X, Y, 0.1, *key)
    e = linear[given](jnp.asarray(W), jnp.asarray(B), X, Y, *key)
    assert_close(a, e, ops=4)  # lr folded in as a constant or read: the update's rounding


def test_descend_consumes_the_parameters_passed(linear):
    w, b = jnp.asarray(W), jnp.asarray(B)
    linear.step_spsa1(w, b, X, Y, KEY)
    assert w.is_deleted() and b.is_deleted()
    x = jnp.asarray(X)
    linear.step_spsa1(jnp.asarray(W), jnp.asarray(B), x, Y, KEY)
    assert not x.is_deleted()  # only the wrt arguments are donated


def test_mezo_descends_a_least_squares_problem():
    m = gradlang.compile_source("""
fn q(w: f32[M, K], x: f32[B, M], y: f32[B, K]) -> f32 {
  let r = x @ w - y
  return 0.5 * mean(r * r)
}
export step = descend(q, wrt=[w], lr=0.02, by=spsa(eps=0.001, samples=4))
export loss = q
""")
    x = RNG.normal(size=(64, 8)).astype(np.float32)
    y = (x @ RNG.normal(size=(8, 3))).astype(np.float32)
    w = jnp.zeros((8, 3), jnp.float32)
    start = float(m.loss(w, x, y))
    for i in range(600):
        w = m.step(w, x, y, jax.random.fold_in(KEY, i))["w"]
    assert float(m.loss(w, x, y)) < 0.02 * start


def test_the_descend_step_keeps_no_copy_of_the_parameters():
    """XLA's compiled memory of a MeZO step over a 3-layer MLP (2.1M parameters, the largest
    matrix 1M entries): the parameters are updated in place and the perturbed matrices are
    never stored, so the step's temporaries exceed the forward pass's by much less than the
    largest matrix (4 MiB), and the gradient export keeps no perturbed copy either."""
    m = gradlang.compile_source("""
use std.nn
struct MLP { l1: Dense[I=D, O=H], l2: Dense[I=H, O=H], l3: Dense[I=H, O=C] }
fn loss(p: MLP, x: f32[B, D], y: f32[B, C]) -> f32 {
  let r = dense(p.l3, dense_tanh(p.l2, dense_tanh(p.l1, x))) - y
  return mean(r * r)
}
export forward = loss
export grad_spsa = grad(loss, wrt=[p], by=spsa(eps=0.001))
export step = descend(loss, wrt=[p], lr=0.01, by=spsa(eps=0.001))
""")
    f32, sd, (d, h, c, b) = jnp.float32, jax.ShapeDtypeStruct, (1024, 1024, 10, 32)
    p = {"l1": {"w": sd((d, h), f32), "b": sd((h,), f32)},
         "l2": {"w": sd((h, h), f32), "b": sd((h,), f32)},
         "l3": {"w": sd((h, c), f32), "b": sd((c,), f32)}}
    args = (p, sd((b, d), f32), sd((b, c), f32))
    key = jax.eval_shape(lambda: jax.random.key(0))

    def memory(name, *extra):
        return jax.jit(m[name], donate_argnums=m[name].signature.donated).lower(
            *args, *extra).compile().memory_analysis()

    forward, step, grad = memory("forward"), memory("step", key), memory("grad_spsa", key)
    largest = 4 * h * h
    assert step.output_size_in_bytes - step.alias_size_in_bytes < 1024  # in place (less a tuple)
    assert step.temp_size_in_bytes - forward.temp_size_in_bytes < largest / 4
    assert grad.temp_size_in_bytes - forward.temp_size_in_bytes < largest / 4


def test_descend_round_trips_through_an_artifact(linear, tmp_path):
    """The artifact has symbolic shapes (its noise is regenerated untiled): the updates agree
    to rounding, amplified by SPSA's 1 / eps (SPSA_REORDERED)."""
    loaded = gradlang.load(linear.save(tmp_path / "descend.gx"))
    for name, key in (("step_spsa", (KEY,)), ("step_exact", ())):
        a = loaded[name](jnp.asarray(W), jnp.asarray(B), X, Y, *key)
        e = linear[name](jnp.asarray(W), jnp.asarray(B), X, Y, *key)
        for n, theta in (("w", W), ("b", B)):
            update = np.asarray(e[n]) - theta
            assert_close(np.asarray(a[n]) - theta, update, ops=SPSA_REORDERED / EPS32)


def test_explain_shows_the_update(linear):
    from gradlang.explain import explain

    text = explain(linear.ir)
    assert "export step_spsa1 = descend(loss, wrt=[w, b], lr=0.1, by=spsa(eps=0.001, samples=1))" in text
    assert ("update: p <- p - 0.1 * grad p for p in w, b, written over the arrays passed for them "
            "(donated); the update regenerates the SPSA noise, so no gradient is stored (MeZO)") in text
    assert "export step_exact = descend(loss, wrt=[w, b], lr=0.1)" in text
