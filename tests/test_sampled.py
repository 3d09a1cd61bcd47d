"""`(x @ w) with wta_crs(keep=K)` and `einsum(s, x, w) with wta_crs(keep=K)`: the sampled
backward (WTA-CRS) is unbiased for the gradient of w (5 standard errors over 10^4 fixed-seed
estimates), exact for x, and the exact backward when K covers every row."""

from __future__ import annotations

import numpy as np
import pytest

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


HEADS = """
fn f(w: f32[8, 2, 3], o: f32[2, 3, 8], x: f32[4, 16, 8], y: f32[4, 16, 8]) -> f32 {
  let h = tanh(PROJECT_IN)
  let r = PROJECT_OUT - y
  return mean(r * r)
}
export g = value_and_grad(f, wrt=[w, o, x])
"""


def test_a_sampled_einsum_projection_is_unbiased_for_its_weight_and_exact_for_x():
    """Attention-style projections in and out of heads ("btd,dnk->btnk", "btnk,nkd->btd"),
    64 rows (a [4, 16] batch), 16 kept."""
    w, x, y = data()
    rng = np.random.default_rng(1)
    w = (0.3 * rng.normal(size=(8, 2, 3))).astype(np.float32)
    o = (0.3 * rng.normal(size=(2, 3, 8))).astype(np.float32)
    y = rng.normal(size=(4, 16, 8)).astype(np.float32)
    exact_in, exact_out = 'einsum("btd,dnk->btnk", x, w)', 'einsum("btnk,nkd->btd", h, o)'
    exact = gradlang.compile_source(HEADS.replace("PROJECT_IN", exact_in)
                                    .replace("PROJECT_OUT", exact_out))
    sampled = gradlang.compile_source(
        HEADS.replace("PROJECT_IN", exact_in[:-1] + ") with wta_crs(keep=16)")
        .replace("PROJECT_OUT", exact_out[:-1] + ") with wta_crs(16)"))
    assert "wta_crs(keep=16) einsum \"btd,dnk->btnk\"" in explain(sampled.ir)
    value, want = exact.g(w, o, x, y)
    values, grads = estimates(sampled.g, (w, o, x, y))
    # the same forward, batched by vmap: 8- and 6-term products, tanh and a mean of 512
    # nonnegative terms (5 sqrt(512)), both sides
    assert_close(values, np.full(N, value), ops=2 * (8 + 6 + 4 + 5 * 23))
    for leaf in ("w", "o"):
        assert_unbiased(np.asarray(grads[leaf]).reshape(N, -1),
                        np.asarray(want[leaf]).reshape(-1))
        assert np.var(np.asarray(grads[leaf]), 0).sum() > 0  # it is sampled
    # x's gradient goes back through both projections' exact input backwards, but the
    # sampled weight gradient of the inner one does not reach it: exact
    assert_close(np.asarray(grads["x"])[:3], np.stack([want["x"]] * 3), ops=2 * (8 + 6 + 8 + 6))


def test_keeping_every_row_is_the_exact_backward():
    w, x, y = data()
    exact = compile_product("x @ w").g(w, x, y)[1]
    kept = compile_product("(x @ w) with wta_crs(keep=64)").g(w, x, y, __import__("jax").random.key(0))[1]
    # every row kept with weight 1: the gradient of w sums 64 rows (either order), both sides
    assert_close(kept["w"], exact["w"], ops=2 * (8 + 4 + 64))


def test_explain_lists_the_sampled_matmul():
    text = explain(compile_product("(x @ w) with wta_crs(keep=16)").ir)
    assert "wta_crs(keep=16) matmul" in text


@pytest.mark.slow  # the default suite's time (12 min on 2 cores); fast twin: the wta_crs tests above
def test_the_example_runs_with_a_few_steps(run_example):
    summary, _ = run_example("wta_crs", ["--steps", "30", "--batch", "128", "--hidden", "128"],
                             {"methods", "relative_variance"})
    assert summary["max_bias_se"] < 6  # the worst of 2048 coordinates, 2,000 estimates each
    assert all(r["final_loss"] < 2.3 for r in summary["methods"].values())


def test_bad_sampled_einsums_are_located_errors():
    cases = {
        'einsum("ij,jk->ik", x, w) with ste': "einsum takes 'with wta_crs(keep=K)': its weight's "
                                              "backward from K sampled rows of x; not 'ste'",
        'einsum("ij,jk->ik", x, w) with wta_crs(keep=1)': "wta_crs(keep=...) needs an integer "
                                                          "of at least 2, got 1",
        'einsum("ij,kj->ik", x, w) with wta_crs(keep=4)': "wta_crs samples rows of x for the "
                                                          "gradient of the weight it projects by",
    }
    for body, message in cases.items():
        with pytest.raises(gradlang.CompileError) as info:
            gradlang.compile_source(f"fn f(x: f32[8, 4], w: f32[4, 4]) -> f32 {{\n"
                                    f"  return sum({body})\n}}\nexport g = grad(f, wrt=[w])\n",
                                    "bad.grad")
        assert "bad.grad:2:" in str(info.value) and message in str(info.value)
