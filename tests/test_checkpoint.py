"""`checkpoint { ... }` blocks (rematerialization) and truncated backpropagation through loops
(`for ... { } with truncated(k=K)`): exact against JAX written by hand, and the memory they save
measured by XLA's compiled memory analysis."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradlang
from stats import assert_close, assert_unbiased, estimates, sigmoid

CHAIN = """
fn f(w: f32[H, H], x: f32[N, H], s: f32[S]) -> f32 {
  let y = for i in range(S) carry (y = x) {
    BODY
  } TRUNCATE
  return mean(y * y)
}
export g = value_and_grad(f, wrt=[w])
"""
PLAIN = "tanh(y @ w) + 0.5 * y"
CHECKPOINTED = "let v = checkpoint { tanh(y @ w) }\n    v + 0.5 * y"


def chain(body: str = PLAIN, truncate: str = ""):
    return gradlang.compile_source(CHAIN.replace("BODY", body).replace("TRUNCATE", truncate))


def args(h: int = 16, n: int = 8, s: int = 12):
    rng = np.random.default_rng(0)
    return (rng.normal(size=(h, h)).astype(np.float32) / np.sqrt(h),
            rng.normal(size=(n, h)).astype(np.float32), np.zeros(s, np.float32))


def hand(w, x, s: int, k: int | None):
    """The same chain in JAX, the carry stopped before the last k steps."""
    y = x
    for i in range(s):
        if k is not None and i == s - k:
            y = jax.lax.stop_gradient(y)
        y = jnp.tanh(y @ w) + 0.5 * y
    return jnp.mean(y * y)


def rounding(h: int, n: int, s: int, grad: bool = True) -> int:
    """The chain's float32 roundings, for `assert_close`: a step sums h products and rounds
    ~6 more times (tanh, the adds), forward and (grad) backward; the value then sums n h
    squares, the gradient n s outer-product terms; both sides float32."""
    if grad:
        return 2 * (2 * s * (h + 6) + n * s)
    return 2 * (s * (h + 6) + n * h)


def temp_bytes(export, *a) -> int:
    return jax.jit(export).lower(*a).compile().memory_analysis().temp_size_in_bytes


def test_a_checkpoint_block_gives_the_same_numbers_and_stores_less():
    a = args(h=64, n=64, s=40)
    plain, checkpointed = chain(), chain(CHECKPOINTED)
    (v1, g1), (v2, g2) = plain.g(*a), checkpointed.g(*a)
    assert_close(v1, v2, ops=rounding(64, 64, 40, grad=False))
    assert_close(g1["w"], g2["w"], ops=rounding(64, 64, 40))
    want = jax.value_and_grad(lambda w: hand(w, a[1], 40, None))(a[0])
    assert_close(g1["w"], want[1], ops=rounding(64, 64, 40))
    full, remat = temp_bytes(plain.g, *a), temp_bytes(checkpointed.g, *a)
    print(f"temp memory: {full} -> {remat} bytes with checkpoint")
    assert remat < 0.6 * full  # the tanh activations of the 40 steps are not stored


@pytest.mark.parametrize("k", [1, 5, 12, 30])
def test_truncated_backpropagation_is_the_hand_written_one(k):
    a = args()
    value, grads = chain(truncate=f"with truncated(k={k})").g(*a)
    want_value, want = jax.value_and_grad(lambda w: hand(w, a[1], 12, min(k, 12)))(a[0])
    assert_close(value, want_value, ops=rounding(16, 8, 12, grad=False))
    assert_close(grads["w"], want, ops=rounding(16, 8, 12))
    if k >= 12:  # the whole loop: plain backpropagation
        assert_close(grads["w"], chain().g(*a)[1]["w"], ops=rounding(16, 8, 12))


def test_truncation_bounds_the_memory_by_k_not_the_length():
    h = 64
    sizes = {s: temp_bytes(chain(truncate="with truncated(k=4)").g, *args(h, 64, s)) for s in (20, 80)}
    full = {s: temp_bytes(chain().g, *args(h, 64, s)) for s in (20, 80)}
    print(f"temp memory, truncated(k=4): {sizes}; full: {full}")
    assert sizes[80] < 1.1 * sizes[20] and full[80] > 3 * full[20]


def test_explain_lists_checkpoint_blocks_and_truncated_loops():
    from gradlang.explain import explain
    text = explain(chain(CHECKPOINTED, "with truncated(k=3)").ir)
    assert "checkpoint block" in text and "truncated(k=3) loop" in text


def test_draws_inside_a_checkpoint_keep_their_estimators():
    m = gradlang.compile_source("""
fn f(t: f32, v: f32) -> f32 {
  let y = checkpoint {
    b ~ Bernoulli(logits=t)
    let d = b - v
    d * d
  }
  return y + t
}
export g = grad(expect(f, samples=4), wrt=[t])
""")
    s = sigmoid(0.3)
    assert_unbiased(estimates(m.g, (0.3, 0.2))["t"], s * (1 - s) * (0.64 - 0.04) + 1)


@pytest.mark.slow  # the default suite's time (12 min on 2 cores); run with -m slow
def test_the_alignprop_example_runs_with_a_few_steps(run_example):
    summary, _ = run_example("alignprop", ["--steps", "20", "--chain", "12", "--samples", "32"],
                             {"methods", "initial_loss"})
    r = summary["methods"]
    assert r["checkpointed"]["cosine"] > 0.9999 and r["truncated"]["cosine"] < 0.9999
    assert r["checkpointed"]["temp_bytes"] < r["full"]["temp_bytes"]
    assert all(v["final_loss"] < summary["initial_loss"] for v in r.values())
