"""Differentially private gradients, `by=dp(clip=C, noise=SIGMA, per_example_axis=A)`.

- exactness: with noise=0 the export equals a direct computation (the gradient of each example
  alone by `vmap`, each clipped to norm C, summed, divided by n), with ghost clipping and with
  `clipping=per_example`, for an MLP (linear layers: ghost norms; biases: per-example
  gradients), a model whose parameters are not all linear layers (an elementwise scale, a
  weight decay term, a tied weight used twice), and sequence models (T rows per example: the
  Gram form when T^2 <= D H, the product x^T g otherwise) split along axis 1;
- the noise: the export minus the same export without noise (same key) is Gaussian with
  standard deviation SIGMA C / n and mean 0 (5 standard errors, fixed keys);
- an objective that draws: each example's key is the objective's key folded with its index;
- value_and_grad's value, descend's step, jit, artifacts, explain, gradflow's warnings;
- the benefit: ghost clipping's compiled memory against per-example gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradlang
from gradlang.explain import explain
from stats import assert_close

MLP = """
use std.nn
struct MLP { l1: Dense[I=D, O=H], l2: Dense[I=H, O=C] }
fn loss(p: MLP, x: f32[B, D], y: i32[B]) -> f32 {
  return cross_entropy(dense(p.l2, dense_tanh(p.l1, x)), y)
}
export plain = value_and_grad(loss, wrt=[p])
export ghost = grad(loss, wrt=[p], by=dp(clip=1.0, noise=0))
export per_example = grad(loss, wrt=[p], by=dp(clip=1.0, noise=0, clipping=per_example))
export noisy = value_and_grad(loss, wrt=[p], by=dp(clip=1.0, noise=1.3))
export step = descend(loss, wrt=[p], lr=0.5, by=dp(clip=1.0, noise=1.3))
"""

MIXED = """
use std.nn
struct Net { l1: Dense[I=D, O=H], s: f32[H], w2: f32[H, C] }
# s scales the hidden units elementwise; w2 is used twice (tied) and in a weight decay term
fn loss(p: Net, x: f32[B, D], y: i32[B], wd: f32) -> f32 {
  let h = tanh(dense(p.l1, x)) * p.s
  let logits = h @ p.w2 + tanh(h @ p.w2)
  return cross_entropy(logits, y) + wd * sum(p.w2 * p.w2)
}
fn tied(p: Net, x: f32[B, D], y: i32[B], wd: f32) -> f32 {
  let h = tanh(dense(p.l1, x)) * p.s
  return cross_entropy(h @ p.w2 + tanh(h @ p.w2), y)
}
export plain = grad(loss, wrt=[p])
export plain_tied = grad(tied, wrt=[p])
export dp = grad(loss, wrt=[p], by=dp(clip=3.0, noise=0))
export dp_tied = grad(tied, wrt=[p], by=dp(clip=3.0, noise=0))
"""

SEQUENCE = """
fn loss(w: f32[D, D], v: f32[D, K], x: f32[T, B, D]) -> f32 {
  let h = tanh(x @ w)
  return mean((tanh(h @ w) @ v) ^ 2)
}
export plain = grad(loss, wrt=[w, v])
export dp = grad(loss, wrt=[w, v], by=dp(clip=0.3, noise=0, per_example_axis=1))
"""

B = 12


def mlp_params(rng, d: int = 5, h: int = 7, c: int = 3) -> dict:
    def dense(i, o):
        return {"w": rng.normal(size=(i, o)).astype(np.float32),
                "b": rng.normal(size=o).astype(np.float32)}

    return {"l1": dense(d, h), "l2": dense(h, c)}


def direct(grad_fn, args: list, wrt: int, batched: list[int], clip: float, axis: int = 0):
    """The clipped mean computed the plain way: per-example gradients by vmap of the reverse-
    mode export on one example (the axis kept), each scaled to norm at most `clip`, summed,
    divided by n; and the per-example norms."""

    def one(*example):
        full = list(args)
        for i, e in zip(batched, example):
            full[i] = jnp.expand_dims(e, axis)
        return grad_fn(*full)

    per = jax.vmap(one, in_axes=axis)(*[args[i] for i in batched])
    n = args[batched[0]].shape[axis]
    norms = jnp.sqrt(sum(jnp.sum(jnp.square(g.reshape(n, -1)), 1) for g in jax.tree.leaves(per)))
    c = jnp.minimum(1.0, clip / norms)
    return jax.tree.map(lambda g: jnp.tensordot(c, g, axes=1) / n, per), np.asarray(norms)


DP_OPS = 256
"""Two float32 computations of a clipped mean gradient, for `assert_close`: an example's
gradient (products over D, H or T = 40 rows, tanh, the softmax; forward and backward: ~60
roundings), its norm over every leaf (~66 squares, sqrt), the clip factor, the sum over B = 12
examples: ~128 a side."""


@pytest.fixture(scope="module")
def mlp():
    return gradlang.compile_source(MLP)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, 5)).astype(np.float32) * np.linspace(0.1, 2.0, B, dtype=np.float32)[:, None]
    return mlp_params(rng), x, rng.integers(0, 3, B).astype(np.int32)


# ---- exactness


@pytest.mark.parametrize("export", ["ghost", "per_example"])
def test_clipped_gradients_equal_a_direct_per_example_computation_mlp(mlp, data, export):
    p, x, y = data
    want, norms = direct(lambda *a: mlp.plain(*a)[1]["p"], [p, x, y], 0, [1, 2], 1.0)
    assert (norms > 1.0).sum() >= 3 and (norms < 1.0).sum() >= 3  # clipping matters for some
    got = mlp[export](p, x, y, jax.random.key(0))["p"]
    assert_close(got, want, DP_OPS)


def test_ghost_and_fallback_leaves_in_a_model_that_is_not_all_linear_layers():
    m = gradlang.compile_source(MIXED)
    leaves = {n.leaf: n for n in m.ir.facts.privacy["dp"].leaves}
    assert leaves["p.l1.w"].ghost
    assert not leaves["p.l1.b"].ghost and "add" in leaves["p.l1.b"].why
    assert not leaves["p.s"].ghost and "mul" in leaves["p.s"].why
    assert not leaves["p.w2"].ghost and "mul" in leaves["p.w2"].why  # the weight decay term
    tied = {n.leaf: n for n in m.ir.facts.privacy["dp_tied"].leaves}
    assert tied["p.w2"].ghost and tied["p.l1.w"].ghost  # tied: two products, one leaf
    rng = np.random.default_rng(1)
    p = {"l1": mlp_params(rng, 4, 6, 3)["l1"], "s": rng.normal(size=6).astype(np.float32),
         "w2": rng.normal(size=(6, 3)).astype(np.float32)}
    x = rng.normal(size=(B, 4)).astype(np.float32)
    y = rng.integers(0, 3, B).astype(np.int32)
    wd = np.float32(0.01)
    for export, plain in (("dp", m.plain), ("dp_tied", m.plain_tied)):
        want, norms = direct(lambda *a: plain(*a)["p"], [p, x, y, wd], 0, [1, 2], 3.0)
        assert (norms > 3.0).any() and (norms < 3.0).any()
        assert_close(m[export](p, x, y, wd, jax.random.key(0))["p"], want, DP_OPS)


QUANTIZED = """
fn loss(w: f32[D, H], v: f32[H], x: f32[B, D], y: f32[B]) -> f32 {
  let h = tanh(x @ (quantize(w, 4) with ste))
  let r = h @ (sign(v) with ste(clip=1.0)) - y
  return mean(r * r)
}
export plain = grad(loss, wrt=[w, v])
export dp = grad(loss, wrt=[w, v], by=dp(clip=8.0, noise=0))
"""


def test_ghost_norms_go_through_an_identity_backward_rule():
    """x @ (quantize(w, 4) with ste): w's gradient is the quantized weight's, x_i^T g_i, so its
    norm is a ghost norm; sign(v) with ste(clip=1.0) masks the gradient: per-example."""
    m = gradlang.compile_source(QUANTIZED)
    leaves = {n.leaf: n for n in m.ir.facts.privacy["dp"].leaves}
    assert leaves["w"].ghost and "x @ w" in leaves["w"].why
    assert not leaves["v"].ghost and "straight_through" in leaves["v"].why
    rng = np.random.default_rng(4)
    w = rng.normal(size=(4, 6)).astype(np.float32)
    v = rng.uniform(-0.9, 0.9, size=6).astype(np.float32)
    x = rng.normal(size=(B, 4)).astype(np.float32)
    y = rng.normal(size=B).astype(np.float32)
    want, norms = direct(lambda *a: m.plain(*a), [w, v, x, y], 0, [2, 3], 8.0)
    assert (norms > 8.0).any() and (norms < 8.0).any()
    assert_close(m.dp(w, v, x, y, jax.random.key(0)), want, DP_OPS)


@pytest.mark.parametrize("t, d", [(4, 5), (40, 3)])
def test_sequences_split_along_axis_1(t, d):
    """T rows per example: the Gram form <x x^T, g g^T> (T^2 <= D^2) or x^T g (T^2 > D^2)."""
    m = gradlang.compile_source(SEQUENCE)
    assert all(n.ghost for n in m.ir.facts.privacy["dp"].leaves)
    rng = np.random.default_rng(t)
    w = (0.5 * rng.normal(size=(d, d))).astype(np.float32)
    v = rng.normal(size=(d, 2)).astype(np.float32)
    x = rng.normal(size=(t, B, d)).astype(np.float32)
    want, norms = direct(lambda *a: m.plain(*a), [w, v, x], 0, [2], 0.3, axis=1)
    assert (norms > 0.3).any()
    assert_close(m.dp(w, v, x, jax.random.key(0)), want, DP_OPS)


# ---- the noise


@pytest.mark.parametrize("clip, sigma", [(1.0, 1.3), (2.5, 0.6)])
def test_the_noise_is_gaussian_with_standard_deviation_sigma_clip_over_n(mlp, data, clip, sigma):
    """At clip = 2.5 a standard deviation of sigma / n instead of sigma clip / n would give z a
    variance of 0.16, hundreds of standard errors from 1."""
    p, x, y = data
    if clip != 1.0:
        mlp = gradlang.compile_source(MLP.replace("clip=1.0", f"clip={clip}")
                                      .replace("noise=1.3", f"noise={sigma}"))
    keys = jax.random.split(jax.random.key(7), 100)
    noisy = jax.jit(jax.vmap(lambda k: mlp.noisy(p, x, y, k)[1]["p"]))(keys)
    clean = mlp.ghost(p, x, y, jax.random.key(0))["p"]
    z = np.concatenate([np.asarray(a - b).reshape(100, -1) for a, b in
                        zip(jax.tree.leaves(noisy), jax.tree.leaves(clean))], 1) * B / (sigma * clip)
    n = z.size
    assert abs(z.mean()) < 5 / np.sqrt(n)
    assert abs(z.var() - 1.0) < 5 * np.sqrt(2.0 / n)
    assert abs(np.corrcoef(z[:, 0], z[:, 1])[0, 1]) < 5 / np.sqrt(100)  # independent coordinates


def test_value_and_descend(mlp, data):
    p, x, y = data
    key = jax.random.key(3)
    value, grads = mlp.noisy(p, x, y, key)
    assert_close(value, mlp.plain(p, x, y)[0], DP_OPS)  # a mean loss, computed twice
    stepped = mlp.step(jax.tree.map(jnp.array, p), x, y, key)["p"]
    assert_close(stepped, jax.tree.map(lambda a, g: a - 0.5 * g, p, grads["p"]), DP_OPS)
    assert_close(jax.jit(mlp.noisy)(p, x, y, key)[1], grads, DP_OPS)


# ---- an objective that draws

DRAWS = """
fn loss(w: f32[D], x: f32[B, D]) -> f32 {
  z ~ Normal(0.0, ones([B]))
  return mean((x @ w + z) ^ 2)
}
export plain = grad(loss, wrt=[w])
export dp = grad(loss, wrt=[w], by=dp(clip=0.5, noise=0))
"""


def test_each_example_draws_with_its_own_key():
    m = gradlang.compile_source(DRAWS)
    rng = np.random.default_rng(2)
    w = rng.normal(size=3).astype(np.float32)
    x = np.repeat(rng.normal(size=(1, 3)).astype(np.float32), B, 0)  # identical examples
    key = jax.random.key(5)
    f_key = jax.random.split(key)[1]
    per = [m.plain(w, x[i:i + 1], jax.random.fold_in(f_key, i))["w"] for i in range(B)]
    assert len({float(g[0]) for g in per}) == B  # the draws differ between the examples
    c = [min(1.0, 0.5 / float(np.linalg.norm(g))) for g in per]
    want = sum(ci * g for ci, g in zip(c, per)) / B
    assert_close(m.dp(w, x, key)["w"], want, DP_OPS)


# ---- artifacts, explain, gradflow


def test_artifact_round_trip(mlp, data, tmp_path):
    p, x, y = data
    mlp.save(tmp_path / "dp.gx")
    loaded = gradlang.load(tmp_path / "dp.gx")
    key = jax.random.key(11)
    assert_close(loaded.noisy(p, x, y, key), mlp.noisy(p, x, y, key), DP_OPS)
    assert_close(loaded.noisy(p, x[:5], y[:5], key), mlp.noisy(p, x[:5], y[:5], key), DP_OPS)


def test_explain_names_ghost_and_per_example_leaves(mlp):
    text = explain(mlp.ir)
    block = text[text.index("export ghost"):text.index("export per_example")]
    assert "clipped to norm 1 over all leaves together" in block
    assert "examples: x, y split along axis 0 (batch dim B)" in block
    assert "p.l1.w  ghost (linear layer)  x @ w in std.nn.dense (nn.grad:7)" in block
    assert "p.l1.b  per-example gradient  used by add in std.nn.dense (nn.grad:7)" in block
    assert "per-example gradients are formed for p.l1.b, p.l2.b only" in block
    assert "per-example gradients are formed for every leaf" in text[text.index("export per_example"):]


def test_dp_is_reverse_mode_for_gradflow():
    src = """
fn loss(w: f32[D], x: f32[B, D]) -> f32 { return mean(sign(x @ w)) }
export dp = grad(loss, wrt=[w], by=dp(clip=1.0, noise=1.0))
export es = grad(loss, wrt=[w], by=es(sigma=0.1, pop=8))
"""
    with pytest.raises(gradlang.CompileError, match="'sign' has a zero derivative"):
        gradlang.compile_source(src, strict=True)
    ok = src.replace("sign(x @ w)", "sign(x @ w) with ste")
    assert gradlang.compile_source(ok, strict=True).ir.facts.privacy["dp"].batched == ("x",)


# ---- the benefit


def test_ghost_clipping_uses_less_memory_than_per_example_gradients():
    src = """
use std.nn
struct MLP { l1: Dense[I=D, O=H], l2: Dense[I=H, O=C] }
fn loss(p: MLP, x: f32[B, D], y: i32[B]) -> f32 {
  return cross_entropy(dense(p.l2, dense_relu(p.l1, x)), y)
}
export ghost = grad(loss, wrt=[p], by=dp(clip=1.0, noise=1.0))
export per_example = grad(loss, wrt=[p], by=dp(clip=1.0, noise=1.0, clipping=per_example))
"""
    m = gradlang.compile_source(src)
    rng = np.random.default_rng(0)
    p = mlp_params(rng, 256, 256, 10)
    x = rng.normal(size=(64, 256)).astype(np.float32)
    y = rng.integers(0, 10, 64).astype(np.int32)

    def temp(export):
        compiled = jax.jit(m[export]).lower(p, x, y, jax.random.key(0)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    # per-example gradients hold 64 x 256 x 256 floats (16 MiB) for the first layer alone
    assert temp("ghost") < temp("per_example") / 8


def test_verify_reports_clipping_as_biased_by_design():
    src = """
fn loss(w: f32[D], x: f32[B, D], y: f32[B]) -> f32 { return mean((x @ w - y) ^ 2) }
export loose = grad(loss, wrt=[w], by=dp(clip=1000.0, noise=0.5))
export tight = grad(loss, wrt=[w], by=dp(clip=0.01, noise=0.5))
"""
    m = gradlang.compile_source(src)
    rng = np.random.default_rng(4)
    args = {"w": rng.normal(size=3).astype(np.float32), "x": rng.normal(size=(8, 3)).astype(np.float32),
            "y": rng.normal(size=8).astype(np.float32)}
    loose = m.verify("loose", args, samples=200)
    tight = m.verify("tight", args, samples=200)
    assert loose.case == "exact" and loose.verdict == "consistent"
    assert tight.verdict == "biased by design" and "clips each example" in tight.biased_by_design
    assert any("noise" in note for note in tight.notes)
