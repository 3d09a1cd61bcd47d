"""Exports with `has_aux=true` return the function's other results beside the gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradlang
from gradlang.explain import explain

SOURCE = """
fn loss(w: f32[D], x: f32[B, D], y: f32[B]) -> (f32, f32, f32[B]) {
  let r = x @ w - y
  return (mean(r * r), max(abs(r)), r)
}

fn scored(theta: f32[K]) -> f32 {
  z ~ Bernoulli(sigmoid(theta)) with score(baseline=ma)
  return sum((z - 0.3) * (z - 0.3))
}

fn scored_aux(theta: f32[K]) -> (f32, f32[K]) {
  z ~ Bernoulli(sigmoid(theta)) with score(baseline=ma)
  return (sum((z - 0.3) * (z - 0.3)), z)
}

export step = value_and_grad(loss, wrt=[w], has_aux=true)
export g = grad(loss, wrt=[w], has_aux=true)
export d = descend(loss, wrt=[w], lr=0.1, has_aux=true)
export es = grad(loss, wrt=[w], by=es(pop=8, sigma=0.01), has_aux=true)
export dp = value_and_grad(loss, wrt=[w], by=dp(clip=1.0, noise=1.0), has_aux=true)
export plain = value_and_grad(expect(scored, samples=8), wrt=[theta])
export with_aux = value_and_grad(expect(scored_aux, samples=8), wrt=[theta], has_aux=true)
"""


@pytest.fixture(scope="module")
def m():
    return gradlang.compile_source(SOURCE, name="aux")


def _data():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)), jnp.float32)
    return jnp.asarray([0.5, -1.0, 2.0]), x, jnp.arange(5.0)


def _reference(w, x, y):
    r = x @ w - y
    return jnp.mean(r * r), (jnp.max(jnp.abs(r)), r)


def _close(a, b):
    # a few float32 roundings of values of order |x| |w| |y| ~ 10
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_value_and_grad_returns_aux_after_the_gradient(m):
    w, x, y = _data()
    (value, aux), grads = jax.value_and_grad(_reference, has_aux=True)(w, x, y)
    got = m.step(w, x, y)
    assert len(got) == 3
    _close(got[0], value)
    _close(got[1]["w"], grads)
    jax.tree.map(_close, got[2], aux)


def test_grad_and_descend_return_aux_after_the_gradient(m):
    w, x, y = _data()
    grads, aux = jax.grad(_reference, has_aux=True)(w, x, y)
    got, got_aux = m.g(w, x, y)
    _close(got["w"], grads)
    jax.tree.map(_close, got_aux, aux)
    new, got_aux = m.d(jnp.array(w), x, y)   # descend donates its parameters
    _close(new["w"], w - 0.1 * grads)
    jax.tree.map(_close, got_aux, aux)


def test_aux_composes_with_jit_and_vmap(m):
    w, x, y = _data()
    eager = m.step(w, x, y)
    jax.tree.map(_close, jax.jit(m.step)(w, x, y), eager)
    batched = jax.vmap(m.step, in_axes=(None, 0, 0))(w, jnp.stack([x, x]), jnp.stack([y, y]))
    jax.tree.map(lambda b, e: _close(b[1], e), batched, eager)


def test_black_box_and_private_exports_return_the_same_aux(m):
    w, x, y = _data()
    _, aux = _reference(w, x, y)
    key = jax.random.key(0)
    jax.tree.map(_close, m.es(w, x, y, key)[1], aux)
    jax.tree.map(_close, m.dp(w, x, y, key)[2], aux)


def test_aux_leaves_the_estimator_and_its_state_unchanged(m):
    """Same key: the value, gradient and moving-average state equal those of the same export
    without aux (per element of K in both: the objective is analysed as written); the state
    stays last."""
    theta, key = jnp.asarray([0.2, -0.4, 1.0]), jax.random.key(3)
    base = jnp.zeros(3)
    value, grads, state = m.plain(theta, base, key)
    got = m.with_aux(theta, base, key)
    assert len(got) == 4
    _close(got[0], value)
    _close(got[1]["theta"], grads["theta"])
    _close(got[3], state)
    z = np.asarray(got[2])
    assert z.shape == (3,) and set(np.unique(z)) <= {0.0, 1.0}


def test_artifact_keeps_aux(m, tmp_path):
    w, x, y = _data()
    m.save(tmp_path / "aux.gx")
    art = gradlang.load(tmp_path / "aux.gx")
    jax.tree.map(_close, art.step(w, x, y), m.step(w, x, y))
    assert art.step.signature.aux == m.step.signature.aux is not None


def test_explain_states_what_aux_returns(m):
    text = explain(m.ir)
    assert "export step = value_and_grad(loss, wrt=[w], has_aux=true)" in text
    assert "aux: (f32, f32[B]), the function's other results at the same arguments" in text
    assert "aux: f32[K], the function's other results at the same arguments, returned after " \
           "the gradient: with draws, one sample's, drawn with the export's key" in text
