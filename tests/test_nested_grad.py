"""Gradients of gradients: `grad(f, wrt=[...])(args)` in a function body, differentiated again
by the export (Hessian-vector products, MAML, gradient penalties), against JAX written by hand
and closed forms."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradlang

from stats import assert_unbiased

SOURCE = """
fn f(w: f32[3], x: f32[3]) -> f32 {
  return sum(tanh(w * x) ^ 2) + sum(w ^ 4)
}
fn gv(w: f32[3], v: f32[3], x: f32[3]) -> f32 {
  return sum(grad(f, wrt=[w])(w, x) * v)
}
fn hvp_norm(w: f32[3], v: f32[3], x: f32[3]) -> f32 {
  return sum(grad(gv, wrt=[w])(w, v, x) ^ 2)
}
fn cubic(t: f32[3], x: f32[3]) -> f32 {
  return sum((t - x) ^ 2 * t)
}
fn maml(w: f32[3], x: f32[3]) -> f32 {
  let adapted = for i in range(3) carry(t = w) {
    t - 0.1 * grad(cubic, wrt=[t])(t, x)
  }
  let (v, (gw, gx)) = value_and_grad(f, wrt=[w, x])(adapted, x)
  return v + sum(gw) + sum(gx)
}
fn signed(t: f32[3], x: f32[3]) -> f32 {
  return sum((t - x) ^ 2 * sign(t) with ste)
}
fn penalty(w: f32[3], x: f32[3]) -> f32 {
  return sum(grad(signed, wrt=[t])(w, x) ^ 2)
}
fn solved(w: f32[3], x: f32[3]) -> f32 {
  let v = argmin u: f32[3] = zeros([3]) { sum((u - w) ^ 2) + sum((u * x) ^ 2) }
          via lbfgs(steps=50)
  return sum(v ^ 3 * x)
}
fn bilevel(w: f32[3], x: f32[3]) -> f32 {
  return sum(grad(solved, wrt=[w])(w, x) ^ 2)
}
fn noisy(theta: f32, x: f32) -> f32 {
  z ~ Normal(theta, 1.0)
  return (z - x) ^ 2
}
fn adapted(theta: f32, x: f32) -> f32 {
  return (theta - 0.1 * grad(noisy, wrt=[theta])(theta, x) - x) ^ 2
}
fn flip(theta: f32, x: f32) -> f32 {
  b ~ Bernoulli(logits=theta)
  return (f32(b) - x) ^ 2
}
fn flip_maml(theta: f32, x: f32) -> f32 {
  return (theta - 0.1 * grad(flip, wrt=[theta])(theta, x) - x) ^ 2
}
fn flip_maml4(theta: f32, x: f32) -> f32 {
  return (theta - 0.1 * grad(expect(flip, samples=4), wrt=[theta])(theta, x) - x) ^ 2
}
fn coin(w: f32[3]) -> f32 {
  b ~ Bernoulli(logits=w)
  return sum(b * (w + 2.0))
}
fn coin_grad(w: f32[3]) -> f32[3] {
  return grad(coin, wrt=[w])(w)
}
fn cubed(w: f32[3], x: f32) -> f32 {
  return sum(tanh(w * x) ^ 2) + x ^ 3 * sum(w)
}
export twice = grad(grad(cubed, wrt=[x]), wrt=[w])
export twice_both = value_and_grad(grad(cubed, wrt=[x]), wrt=[w, x])
export hvp = grad(hvp_norm, wrt=[w])
export meta = value_and_grad(maml, wrt=[w])
export pen = grad(penalty, wrt=[w])
export bi = grad(bilevel, wrt=[w])
export step = grad(expect(adapted, samples=32), wrt=[theta])
export coin_estimate = expect(coin_grad, samples=64)
export flip_step = grad(expect(flip_maml, samples=8), wrt=[theta])
export flip_step4 = grad(expect(flip_maml4, samples=8), wrt=[theta])
"""

W = jnp.array([0.3, -0.5, 0.8])
X = jnp.array([1.0, 2.0, -1.5])
V = jnp.array([0.2, 0.1, -0.4])
EPS = float(jnp.finfo(jnp.float32).eps)


@pytest.fixture(scope="module")
def m():
    return gradlang.compile_source(SOURCE, "nested.grad")


def f(w, x):
    return jnp.sum(jnp.tanh(w * x) ** 2) + jnp.sum(w ** 4)


def close(a, b, scale):
    """Equal up to float32 rounding of a few hundred operations at the values' scale."""
    np.testing.assert_allclose(a, b, rtol=0, atol=256 * EPS * scale)


def test_hessian_vector_product(m):
    def hvp_norm(w):
        hv = jax.grad(lambda w: jnp.sum(jax.grad(f)(w, X) * V))(w)
        return jnp.sum(hv ** 2)

    want = jax.grad(hvp_norm)(W)
    close(m.hvp(W, V, X)["w"], want, float(jnp.max(jnp.abs(want))))


def test_export_of_a_derivative(m):
    """grad(grad(f, wrt=[x]), wrt=[...]) exports the derivative of f's x-derivative."""
    def cubed(w, x):
        return jnp.sum(jnp.tanh(w * x) ** 2) + x ** 3 * jnp.sum(w)

    x = jnp.float32(1.5)
    want = jax.grad(jax.grad(cubed, 1), 0)(W, x)
    close(m.twice(W, x)["w"], want, float(jnp.max(jnp.abs(want))))
    value, grads = m.twice_both(W, x)
    want_value, (gw, gx) = jax.value_and_grad(jax.grad(cubed, 1), (0, 1))(W, x)
    close(value, want_value, float(abs(want_value)))
    close(grads["w"], gw, float(jnp.max(jnp.abs(gw))))
    close(grads["x"], gx, float(abs(gx)))


def test_maml_loop_and_several_wrt(m):
    def cubic(t, x):
        return jnp.sum((t - x) ** 2 * t)

    def maml(w):
        t = w
        for _ in range(3):
            t = t - 0.1 * jax.grad(cubic)(t, X)
        v, (gw, gx) = jax.value_and_grad(f, argnums=(0, 1))(t, X)
        return v + jnp.sum(gw) + jnp.sum(gx)

    value, grads = m.meta(W, X)
    want_value, want = jax.value_and_grad(maml)(W)
    close(value, want_value, float(abs(want_value)))
    close(grads["w"], want, float(jnp.max(jnp.abs(want))))


def test_backward_rule_at_every_order(m):
    """`sign(t) with ste` stands in for sign's derivative at every order: a custom_jvp whose
    tangent's primal is the op itself, so the second derivative takes the rule again."""

    @jax.custom_jvp
    def ste_sign(t):
        return jnp.sign(t)

    ste_sign.defjvp(lambda p, t: (ste_sign(p[0]), t[0]))

    def penalty(w):
        return jnp.sum(jax.grad(lambda t: jnp.sum((t - X) ** 2 * ste_sign(t)))(w) ** 2)

    want = jax.grad(penalty)(W)
    close(m.pen(W, X)["w"], want, float(jnp.max(jnp.abs(want))))


def test_inner_problem_differentiated_twice(m):
    """The implicit hypergradient is itself differentiable: against the closed-form solution
    u* = w / (1 + x^2); the solver stops at its tolerance, so float32 rounding of its steps."""
    def bilevel(w):
        return jnp.sum(jax.grad(lambda w: jnp.sum((w / (1 + X ** 2)) ** 3 * X))(w) ** 2)

    want = jax.grad(bilevel)(W)
    np.testing.assert_allclose(m.bi(W, X)["w"], want, rtol=1e-4, atol=1e-6)


def test_maml_pathwise_draw_unbiased(m):
    """adapted = theta - 0.1 * 2 (theta + eps - x), loss (adapted - x)^2: per sample the
    gradient is 1.6 (0.8 (theta - x) - 0.2 eps), mean 1.28 (theta - x), std 0.32."""
    theta, x = 0.5, 2.0
    keys = jax.random.split(jax.random.key(0), 16)
    g = jax.vmap(lambda k: m.step(jnp.float32(theta), jnp.float32(x), k)["theta"])(keys)
    se = 0.32 / np.sqrt(16 * 32)
    assert abs(float(g.mean()) - 1.28 * (theta - x)) < 5 * se


def test_score_draw_differentiated_again(m):
    """A score-function draw under grad(...), differentiated again: the gradient of
    E_b[(theta - 0.1 g(theta, b) - x)^2], g = (b - x)^2 (b - sigmoid(theta)) the draw's
    one-sample score estimate, which the export differentiates as an ordinary function of theta,
    and the enclosing expectation credits b with the cost downstream of it (the outer term).
    The truth by summing over b; DiCE's magic box alone would also differentiate g's box,
    crediting b twice to first order in 0.1 (-2.64 instead of -2.80 here)."""
    theta, x = 0.5, 2.0

    def objective(t):
        s = jax.nn.sigmoid(t)
        u = [t - 0.1 * (b - x) ** 2 * (b - s) - x for b in (0.0, 1.0)]
        return (1 - s) * u[0] ** 2 + s * u[1] ** 2

    keys = jax.random.split(jax.random.key(2), 512)
    g = jax.jit(jax.vmap(lambda k: m.flip_step(jnp.float32(theta), jnp.float32(x), k)))(keys)
    assert_unbiased(g["theta"], jax.grad(objective)(theta))


def test_score_draws_with_a_baseline_differentiated_again(m):
    """grad(expect(flip, samples=4), ...): the inner estimate averages 4 draws, each with the
    leave-one-out baseline of the other three's costs; the truth sums over the 16 values of
    the four draws."""
    theta, x = 0.5, 2.0

    def objective(t):
        s = jax.nn.sigmoid(t)
        total = 0.0
        for bits in itertools.product((0.0, 1.0), repeat=4):
            b = jnp.array(bits)
            c = (b - x) ** 2
            loo = (c.sum() - c) / 3
            g = jnp.mean((c - loo) * (b - s))
            p = jnp.prod(jnp.where(b == 1, s, 1 - s))
            total = total + p * (t - 0.1 * g - x) ** 2
        return total

    keys = jax.random.split(jax.random.key(3), 512)
    g = jax.jit(jax.vmap(lambda k: m.flip_step4(jnp.float32(theta), jnp.float32(x), k)))(keys)
    assert_unbiased(g["theta"], jax.grad(objective)(theta))


def test_score_draw_first_order(m):
    """A score-function draw inside grad(...) under an export that does not differentiate it
    again: the magic box of the grad's own expectation gives d/dw E[sum(b (w + 2))] =
    sigmoid'(w) (w + 2) + sigmoid(w)."""
    s = jax.nn.sigmoid(W)
    want = s * (1 - s) * (W + 2.0) + s
    keys = jax.random.split(jax.random.key(1), 16)
    est = jax.vmap(lambda k: m.coin_estimate(W, k))(keys)
    # per draw: (b - s)(w + 2) + b, variance at most (w + 2)^2 s (1 - s) + s + 2 |w + 2| s
    bound = (W + 2) ** 2 * s * (1 - s) + s + 2 * jnp.abs(W + 2) * s
    se = jnp.sqrt(bound / (16 * 64))
    assert jnp.all(jnp.abs(est.mean(0) - want) < 5 * se)


@pytest.mark.slow  # 20 s; test_maml_loop_and_several_wrt is its fast twin
def test_maml_example(run_example):
    """examples/maml.py: its meta-gradient equals MAML written by hand in JAX (float32 rounding
    of the network's few hundred operations), and a few hundred meta-steps already make one
    adaptation step from the learned weights beat one from the initial ones on held-out tasks."""
    s, _ = run_example("maml", ["--steps", "300", "--tasks", "8", "--eval-tasks", "50"],
                       {"meta_gradient_relative_difference_vs_jax", "held_out_adapted_loss"})
    assert s["meta_gradient_relative_difference_vs_jax"] < 256 * EPS
    assert s["held_out_adapted_loss"] < 0.9 * s["held_out_adapted_loss_from_init"]



def test_explain_lists_the_nested_gradients(m):
    from gradlang.explain import explain

    text = explain(m.ir)
    hvp = text[text.index("export hvp"):text.index("export meta")]
    assert "gradients in the program (2)" in hvp
    assert "grad(gv, wrt=[w]) at hvp_norm, line 9" in hvp
    assert "grad(f, wrt=[w]) at gv, line 6" in hvp
    twice = text[text.index("export twice "):text.index("export twice_both")]
    assert twice.startswith("export twice = grad(grad(cubed, wrt=[x]), wrt=[w])")
    assert "grad(cubed, wrt=[x]) at the export, line" in twice
