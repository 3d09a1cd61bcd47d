"""`(x @ w) with wta_crs(keep=K)`: the sampled-matmul backward (WTA-CRS) is unbiased for the
gradient of w (5 standard errors over 10^4 fixed-seed estimates), exact for x, and the exact
backward when K covers every row."""

from __future__ import annotations

import numpy as np

import gradlang
from gradlang.explain import explain
from stats import N, assert_close, assert_unbiased, estimates

SOURCE = """
fn f(w: f32[8, 4], x: f32[4, 16, 8], y: f32[4, 16, 4]) -> f32 {
  let r = tanh(PRODUCT) - y
  return mean(r * r)
}
export g = value_and_grad(f, wrt=[w, x])
"""


def compile_product(product: str):
    return gradlang.compile_source(SOURCE.replace("PRODUCT", product))


def data():
    rng = np.random.default_rng(0)
    scale = np.exp(rng.normal(size=(4, 16, 1)))  # rows of unequal norms
    return ((rng.normal(size=(8, 4)) * 0.3).astype(np.float32),
            (rng.normal(size=(4, 16, 8)) * scale).astype(np.float32),
            rng.normal(size=(4, 16, 4)).astype(np.float32))


def test_the_sampled_backward_is_unbiased_for_w_and_exact_for_x():
    """64 rows (a [4, 16] batch), 16 kept: 8 winners, 8 drawn."""
    w, x, y = data()
    value, exact = compile_product("x @ w").g(w, x, y)
    values, grads = estimates(compile_product("(x @ w) with wta_crs(keep=16)").g, (w, x, y))
    # the same exact forward, batched by vmap: 8-term products, tanh and a mean of 256
    # nonnegative terms (5 sqrt(256), the probabilistic bound), both sides
    assert_close(values, np.full(N, value), ops=2 * (8 + 4 + 5 * 16))
    assert_unbiased(np.asarray(grads["w"]).reshape(N, -1), np.asarray(exact["w"]).reshape(-1))
    # the exact backward for x: the forward's rounding and a 4-term product, both sides
    assert_close(np.asarray(grads["x"])[:3], np.stack([exact["x"]] * 3), ops=2 * (8 + 4 + 8 + 4))
    assert np.var(np.asarray(grads["w"]), 0).sum() > 0  # it is sampled


def test_keeping_every_row_is_the_exact_backward():
    w, x, y = data()
    exact = compile_product("x @ w").g(w, x, y)[1]
    kept = compile_product("(x @ w) with wta_crs(keep=64)").g(w, x, y, __import__("jax").random.key(0))[1]
    # every row kept with weight 1: the gradient of w sums 64 rows (either order), both sides
    assert_close(kept["w"], exact["w"], ops=2 * (8 + 4 + 64))


def test_explain_lists_the_sampled_matmul():
    text = explain(compile_product("(x @ w) with wta_crs(keep=16)").ir)
    assert "wta_crs(keep=16) matmul" in text


def test_the_example_runs_with_a_few_steps(run_example):
    summary, _ = run_example("wta_crs", ["--steps", "30", "--batch", "128", "--hidden", "128"],
                             {"methods", "relative_variance"})
    assert summary["max_bias_se"] < 6  # the worst of 2048 coordinates, 2,000 estimates each
    assert all(r["final_loss"] < 2.3 for r in summary["methods"].values())
