"""`descend(f, wrt=[...], lr=...)`: one gradient step written over the parameters (MeZO's
in-place SPSA step), and SPSA's perturbed matrices that matmuls never materialize."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradlang
from gradlang.runtime.perturbed import Seeded, seed_of, seeded_normal

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


@pytest.fixture(scope="module")
def linear():
    return gradlang.compile_source(LINEAR)


@pytest.mark.parametrize("rows, cols", [(300, 200), (257, 300), (64, 7), (5000, 4)])
def test_seeded_matmuls_equal_the_materialized_perturbed_matrix(rows, cols):
    """Tiles that divide the rows, padded tiles, a single tile, and many tiles."""
    w = RNG.normal(size=(rows, cols)).astype(np.float32)
    seed = seed_of(jax.random.key(rows))
    p = Seeded(jnp.asarray(w), seed, -0.3)
    full = w + -0.3 * np.asarray(seeded_normal(seed, (rows, cols), jnp.float32))
    np.testing.assert_allclose(p.dense(), full, rtol=1e-6, atol=1e-6)
    x = RNG.normal(size=(3, rows)).astype(np.float32)
    np.testing.assert_allclose(p.rmatmul(x), x @ full, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(p.rmatmul(x[0]), x[0] @ full, rtol=2e-4, atol=2e-4)
    v = RNG.normal(size=(cols, 2)).astype(np.float32)
    np.testing.assert_allclose(p.matmul(v), full @ v, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(p.matmul(v[:, 0]), full @ v[:, 0], rtol=2e-4, atol=2e-4)


def test_spsa_through_a_matmul_equals_spsa_through_the_materialized_matrix(linear):
    """`x @ w` keeps w + eps z factored (tiled noise); `x @ (w * 1.0)` materializes it: the
    same key gives the same estimate, so the tiles regenerate exactly the update's noise."""
    tiled, dense = linear.grad_spsa(W, B, X, Y, KEY), linear.grad_spsa_dense(W, B, X, Y, KEY)
    for n in ("w", "b"):
        np.testing.assert_allclose(tiled[n], dense[n], rtol=1e-3,
                                   atol=1e-3 * float(np.abs(dense[n]).max()))


@pytest.mark.parametrize("step, grad", [("step_spsa", "grad_spsa"), ("step_spsa1", "grad_spsa1"),
                                        ("step_exact", "grad_exact"), ("step_es", "grad_es")])
def test_descend_is_theta_minus_lr_times_the_same_gradient(linear, step, grad):
    key = () if "exact" in step else (KEY,)
    g = linear[grad](W, B, X, Y, *key)
    new = linear[step](jnp.asarray(W), jnp.asarray(B), X, Y, *key)
    assert set(new) == set(g)
    for n, theta in (("w", W), ("b", B)):
        if n in g:
            np.testing.assert_allclose(new[n], theta - 0.1 * np.asarray(g[n]), rtol=1e-5,
                                       atol=1e-6)


@pytest.mark.parametrize("given, taken", [("step_spsa", "step_spsa_lr"),
                                          ("step_exact", "step_exact_lr")])
def test_descend_without_lr_takes_it_as_an_argument_after_the_functions(linear, given, taken):
    sig = linear[taken].signature
    assert [n for n, _ in sig.params][4:] == (["lr", "key"] if "spsa" in taken else ["lr"])
    key = (KEY,) if "spsa" in taken else ()
    a = linear[taken](jnp.asarray(W), jnp.asarray(B), X, Y, 0.1, *key)
    e = linear[given](jnp.asarray(W), jnp.asarray(B), X, Y, *key)
    for n in e:
        np.testing.assert_allclose(a[n], e[n], rtol=1e-6, atol=1e-7)


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
    to rounding, amplified by SPSA's 1 / eps."""
    loaded = gradlang.load(linear.save(tmp_path / "descend.gx"))
    for name, key in (("step_spsa", (KEY,)), ("step_exact", ())):
        a = loaded[name](jnp.asarray(W), jnp.asarray(B), X, Y, *key)
        e = linear[name](jnp.asarray(W), jnp.asarray(B), X, Y, *key)
        for n, theta in (("w", W), ("b", B)):
            update = np.asarray(e[n]) - theta
            np.testing.assert_allclose(np.asarray(a[n]) - theta, update, rtol=0,
                                       atol=1e-3 * np.abs(update).max())


def test_explain_shows_the_update(linear):
    from gradlang.explain import explain

    text = explain(linear.ir)
    assert "export step_spsa1 = descend(loss, wrt=[w, b], lr=0.1, by=spsa(eps=0.001, samples=1))" in text
    assert ("update: p <- p - 0.1 * grad p for p in w, b, written over the arrays passed for them "
            "(donated); the update regenerates the SPSA noise, so no gradient is stored (MeZO)") in text
    assert "export step_exact = descend(loss, wrt=[w, b], lr=0.1)" in text
