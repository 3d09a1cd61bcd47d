"""`gradlang.Trainer`: an export and an optax optimizer as init / update, the export's state and
key threaded for the user (the same numbers as the loop written by hand)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradlang
from gradlang.train import Trainer

SOURCE = """
fn loss(w: f32[D], b: f32, x: f32[B, D], y: f32[B]) -> (f32, f32) {
  let r = x @ w + b - y
  return (mean(r * r), max(abs(r)))
}

fn scored(theta: f32[K], t: f32[K]) -> f32 {
  z ~ Bernoulli(sigmoid(theta)) with score(baseline=ma)
  return sum((z - t) * (z - t))
}

fn per_entry(theta: f32[B, K], t: f32[B, K]) -> f32 {
  z ~ Bernoulli(sigmoid(theta)) with score(baseline=ma)
  return mean(sum((z - t) * (z - t), axis=1))
}

fn shared(theta: f32[K], t: f32[B, K]) -> f32 {
  z ~ Bernoulli(sigmoid(theta + 0.0 * t)) with score(baseline=ma)
  return mean(sum((z - t) * (z - t), axis=1))
}

fn a(w: f32[D]) -> f32 { return sum((w - 1.0) * (w - 1.0)) }
fn c(w: f32[D]) -> f32 { return sum((w + 1.0) * (w + 1.0)) }

export step = value_and_grad(loss, wrt=[w, b], has_aux=true)
export g = grad(expect(scored, samples=4), wrt=[theta])
export batched = grad(expect(per_entry, samples=4), wrt=[theta])
export data_sized = grad(expect(shared, samples=4), wrt=[theta])
export both = minimize([a, c], wrt=[w], by=dynamic(temperature=2))
export d = descend(a, wrt=[w], lr=0.1)
"""


@pytest.fixture(scope="module")
def m():
    return gradlang.compile_source(SOURCE, name="train")


def _data():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 3)), jnp.float32)
    return x, x @ jnp.asarray([1.0, -2.0, 0.5]) + 0.3


def test_steps_equal_the_loop_written_by_hand(m):
    x, y = _data()
    opt = optax.adam(0.05)
    trainer = Trainer(m.step, opt)
    params = {"w": jnp.zeros(3), "b": jnp.zeros(())}
    state = trainer.init(params)
    hand, opt_state = params, opt.init(params)
    for _ in range(5):
        state, out = trainer.update(state, x, y)
        value, grads, aux = m.step(hand["w"], hand["b"], x, y)
        updates, opt_state = opt.update(grads, opt_state, hand)
        hand = optax.apply_updates(hand, updates)
        # the same float32 operations, jitted or not: a few roundings of values of order 10
        np.testing.assert_allclose(out.value, value, rtol=1e-5)
        np.testing.assert_allclose(out.aux, aux, rtol=1e-5)
    jax.tree.map(lambda p, h: np.testing.assert_allclose(p, h, rtol=1e-5, atol=1e-6),
                 state.params, hand)
    assert int(state.step) == 5


def test_training_converges(m):
    x, y = _data()
    trainer = Trainer(m.step, optax.adam(0.1))
    state = trainer.init({"w": jnp.zeros(3), "b": jnp.zeros(())})
    for _ in range(300):
        state, out = trainer.update(state, y=y, x=x)
    np.testing.assert_allclose(state.params["w"], [1.0, -2.0, 0.5], atol=1e-3)
    np.testing.assert_allclose(state.params["b"], 0.3, atol=1e-3)


def test_export_state_and_key_are_threaded_as_by_hand(m):
    t = jnp.asarray([1.0, 0.0, 1.0])
    opt = optax.sgd(0.1)
    trainer = Trainer(m.g, opt)
    state = trainer.init(jnp.zeros(3), key=jax.random.key(7))
    np.testing.assert_array_equal(state.export_state, 0.0)
    theta, baseline, key, opt_state = jnp.zeros(3), jnp.zeros(3), jax.random.key(7), opt.init(jnp.zeros(3))
    for _ in range(4):
        state, out = trainer.update(state, t)
        key, sub = jax.random.split(key)
        grads, baseline = m.g(theta, t, baseline, sub)
        updates, opt_state = opt.update(grads["theta"], opt_state, theta)
        theta = theta + updates
        np.testing.assert_allclose(out.grads, grads["theta"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(state.params, theta, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(state.export_state, baseline, rtol=1e-5, atol=1e-7)
    assert out.value is None and out.aux is None


def test_a_per_entry_state_is_sized_from_the_parameters_or_example_arguments(m):
    trainer = Trainer(m.batched, optax.sgd(0.1))
    state = trainer.init(jnp.zeros((4, 3)), key=jax.random.key(0))   # B: theta's first dim
    assert state.export_state.shape == (4,)
    state, _ = trainer.update(state, jnp.ones((4, 3)))
    assert state.export_state.shape == (4,)
    trainer = Trainer(m.data_sized, optax.sgd(0.1))
    with pytest.raises(gradlang.ArgumentError, match=r"no argument sizes B of f32\[B\], the state "
                       r"'baseline' of 'data_sized': pass example arguments to init, e.g. "
                       r"trainer.init\(params, t\)"):
        trainer.init(jnp.zeros(3), key=jax.random.key(0))
    state = trainer.init(jnp.zeros(3), jnp.ones((5, 3)), key=jax.random.key(0))
    assert state.export_state.shape == (5,)
    state, _ = trainer.update(state, jnp.ones((5, 3)))
    assert state.export_state.shape == (5,)


def test_minimize_threads_its_history(m):
    trainer = Trainer(m.both, optax.sgd(0.1))
    state = trainer.init(jnp.asarray([3.0, -3.0]))
    assert state.export_state.shape == (2, 2)
    for _ in range(50):
        state, out = trainer.update(state)
    assert out.value.shape == (2,)
    # the combined direction drives w to the Pareto set between -1 and 1
    assert np.all(np.abs(np.asarray(state.params)) <= 1.0 + 1e-3)


def test_errors_say_what_to_do(m):
    with pytest.raises(gradlang.ArgumentError, match="'d' is a descend export, which updates"):
        Trainer(m.d, optax.sgd(0.1))
    with pytest.raises(TypeError, match="Trainer takes a gradlang export"):
        Trainer(lambda w: w, optax.sgd(0.1))
    with pytest.raises(gradlang.ArgumentError, match=r"draws: pass key=jax.random.key\(0\)"):
        Trainer(m.g, optax.sgd(0.1)).init(jnp.zeros(3))
    trainer = Trainer(m.step, optax.sgd(0.1))
    with pytest.raises(gradlang.ArgumentError, match="pass params as a dict with those keys"):
        trainer.init(jnp.zeros(3))
    state = trainer.init({"w": jnp.zeros(3), "b": jnp.zeros(())})
    with pytest.raises(gradlang.ArgumentError, match=r"no argument 'z' \(arguments: x, y\)"):
        trainer.update(state, z=1.0)
