"""The neural-network layer builtins (gelu, silu, layer_norm, rms_norm, lookups `table[ids]`,
take_along_axis, segment_sum): gradients against `jax.grad` of the same computation written
with jax.nn / jnp, lookups out of range, and the type errors of each (values against NumPy:
tests/test_builtins.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradlang

EPS32 = float(np.finfo(np.float32).eps)
RNG = np.random.default_rng(0)
V, E, B, T = 7, 4, 3, 5
TABLE = RNG.normal(size=(V, E)).astype(np.float32)
IDS = RNG.integers(0, V, size=(B, T)).astype(np.int32)
SCALE = RNG.normal(size=E).astype(np.float32)
OFFSET = RNG.normal(size=E).astype(np.float32)
PICK = RNG.integers(0, E, size=(B, T, 2)).astype(np.int32)

SOURCE = """
fn f(t: f32[V, 4], ids: i32[B, T], g: f32[4], b: f32[4], k: i32[B, T, 2]) -> f32 {
  let h = layer_norm(gelu(t[ids]), g, b)
  let r = rms_norm(silu(h), g)
  let s = segment_sum(r[0], ids[0], 9)
  return sum(s * s) + sum(take_along_axis(r, k, axis=2) * t[ids][:, :, 0:2])
}
export g = value_and_grad(f, wrt=[t, g, b])
"""


def reference(t, g, b):
    """The same computation in jax.nn / jnp (Flax's LayerNorm and RMSNorm epsilons)."""
    h = jax.nn.gelu(t[IDS])
    mu = h.mean(-1, keepdims=True)
    h = (h - mu) * jax.lax.rsqrt(((h - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * g + b
    r = jax.nn.silu(h)
    r = r * jax.lax.rsqrt((r ** 2).mean(-1, keepdims=True) + 1e-6) * g
    s = jax.ops.segment_sum(r[0], IDS[0], 9)
    return jnp.sum(s * s) + jnp.sum(jnp.take_along_axis(r, PICK, axis=2) * t[IDS][:, :, 0:2])


def test_gradients_are_jax_grad_of_the_same_layers():
    m = gradlang.compile_source(SOURCE, "layers.grad")
    value, grads = m.g(TABLE, IDS, SCALE, OFFSET, PICK)
    want_value, want = jax.value_and_grad(reference, argnums=(0, 1, 2))(TABLE, SCALE, OFFSET)
    # the same float32 operations in other orders: each output sums at most B * T * E terms
    # of a few roundings each, against the scale of the summed terms
    ops = 8 * B * T * E
    np.testing.assert_allclose(value, want_value, rtol=ops * EPS32)
    for name, w in zip("tgb", want):
        got = np.asarray(grads[name])
        np.testing.assert_allclose(got, w, rtol=0, atol=ops * EPS32 * float(np.abs(w).max()))




def test_a_lookup_out_of_range_reads_nan_and_a_gradient_scatters_into_the_rows():
    m = gradlang.compile_source("""
fn f(t: f32[V, E], ids: i32[N]) -> f32 { return sum(t[ids] * t[ids]) }
fn rows(t: f32[V, E], ids: i32[N]) -> f32[N, E] { return t[ids] }
export g = value_and_grad(f, wrt=[t])
export rows = rows
""")
    ids = np.array([1, 1, -1, 3], np.int32)
    _, grads = m.g(TABLE, ids)
    want = np.zeros_like(TABLE)
    np.add.at(want, ids, 2 * TABLE[ids])  # row 1 twice, row V - 1 by its negative id
    np.testing.assert_allclose(grads["t"], want, rtol=2 * EPS32)
    out = np.asarray(m.rows(TABLE, np.array([0, V, -V - 1], np.int32)))
    np.testing.assert_array_equal(out[0], TABLE[0])
    assert np.isnan(out[1:]).all()  # beyond the table either way: NaN, not a clamped row


@pytest.mark.parametrize("body, message", [
    ("sum(t[ids, 0])", "an integer tensor index (a lookup, table[ids]) takes the other "
                       "subscripts as slices (:), got [?, 0]"),
    ("sum(t[ids, ids])", "an integer tensor index (a lookup, table[ids]) takes the other "
                         "subscripts as slices (:), got [?, ?]"),
    ("sum(t[t])", "an index must be i32, got f32[V, E]"),
    ("sum(layer_norm(t, x))", "the scale of layer_norm must be a float vector of the last "
                              "axis of f32[V, E], [E], got f32[V]"),
    ("sum(rms_norm(ids))", "rms_norm normalizes a float tensor, got i32[N]"),
    ("sum(layer_norm(t, offset=t))", "the offset of layer_norm must be a float vector of the "
                                     "last axis of f32[V, E], [E], got f32[V, E]"),
    ("sum(take_along_axis(t, ids))", "take_along_axis needs indices of the rank of x (2), got "
                                     "i32[N]"),
    ("sum(take_along_axis(t, t))", "the indices of take_along_axis must be an integer tensor, "
                                   "got f32[V, E]"),
    ("sum(segment_sum(t, ids, 4))", "segment_sum needs one segment id per row of the data "
                                    "[V], got i32[N]"),
    ("sum(segment_sum(t, x, 4))", "the segment ids of segment_sum must be an integer tensor, "
                                  "got f32[V]"),
])
def test_bad_layer_arguments_are_located_errors(body, message):
    source = f"fn f(t: f32[V, E], ids: i32[N], x: f32[V]) -> f32 {{\n  return {body}\n}}\n"
    with pytest.raises(gradlang.CompileError) as info:
        gradlang.compile_source(source + "export f = f\n", "bad.grad")
    assert "bad.grad:2:" in str(info.value) and f"error: {message}\n" in str(info.value)


CNN = """
fn f(x: f32[B, 8, 8, 3], w1: f32[3, 3, 3, 4], w2: f32[2, 2, 1, 6], q: f32[4, 5]) -> f32 {
  let h = max_pool(relu(conv(x, w1, stride=2)), 2)
  let g = avg_pool(gelu(conv(x, w2, padding="VALID", dilation=[1, 2], groups=3, stride=1)), [2, 1],
                   padding="SAME")
  return sum(einsum("bhwc,cd->bd", h, q) ^ 2) + mean(g)
}
export g = value_and_grad(f, wrt=[x, w1, w2, q])
"""


def cnn_reference(x, w1, w2, q):
    """The same network in jax.lax / jax.nn: conv_general_dilated (NHWC, HWIO),
    reduce_window, einsum."""
    dn = ("NHWC", "HWIO", "NHWC")
    h = jax.lax.conv_general_dilated(x, w1, (2, 2), "SAME", dimension_numbers=dn)
    h = jax.lax.reduce_window(jax.nn.relu(h), -jnp.inf, jax.lax.max, (1, 2, 2, 1),
                              (1, 2, 2, 1), "VALID")
    g = jax.lax.conv_general_dilated(x, w2, (1, 1), "VALID", rhs_dilation=(1, 2),
                                     dimension_numbers=dn, feature_group_count=3)
    g = jax.lax.reduce_window(jax.nn.gelu(g), 0.0, jax.lax.add, (1, 2, 1, 1), (1, 2, 1, 1),
                              "SAME") / 2
    return jnp.sum(jnp.einsum("bhwc,cd->bd", h, q) ** 2) + jnp.mean(g)


def test_convolutions_pools_and_einsum_differentiate_as_the_lax_ops():
    m = gradlang.compile_source(CNN, "cnn.grad")
    args = [RNG.normal(size=s).astype(np.float32)
            for s in ((2, 8, 8, 3), (3, 3, 3, 4), (2, 2, 1, 6), (4, 5))]
    value, grads = m.g(*args)
    want_value, want = jax.value_and_grad(cnn_reference, argnums=(0, 1, 2, 3))(*args)
    # the same lax ops on the same float32 values: a convolution sums 27 products, the
    # einsum 16 positions x 4 channels, the loss 2 x 5 squares
    ops = 4 * 27 * 64
    np.testing.assert_allclose(value, want_value, rtol=ops * EPS32)
    for name, w in zip(("x", "w1", "w2", "q"), want):
        np.testing.assert_allclose(grads[name], w, rtol=0,
                                   atol=ops * EPS32 * float(np.abs(w).max()))


DN1 = ("NWC", "WIO", "NWC")


@pytest.mark.parametrize("call, reference", [
    ('conv_transpose(x, w, stride=2)',
     lambda x, w: jax.lax.conv_transpose(x, w, (2,), "SAME", dimension_numbers=DN1)),
    ('conv_transpose(x, w, stride=3, padding="VALID", dilation=2)',
     lambda x, w: jax.lax.conv_transpose(x, w, (3,), "VALID", rhs_dilation=(2,),
                                         dimension_numbers=DN1)),
    ('conv_transpose(x, w, stride=2, padding=[(2, 1)])',
     lambda x, w: jax.lax.conv_transpose(x, w, (2,), [(2, 1)], dimension_numbers=DN1)),
    ('conv_transpose(x, w, padding="VALID")',
     lambda x, w: jax.lax.conv_transpose(x, w, (1,), "VALID", dimension_numbers=DN1)),
    ('conv(x, w, stride=2, padding=[(0, 3)])',
     lambda x, w: jax.lax.conv_general_dilated(x, w, (2,), [(0, 3)], dimension_numbers=DN1)),
    ('conv(x, w, padding=[(1, 0)], dilation=2)',
     lambda x, w: jax.lax.conv_general_dilated(x, w, (1,), [(1, 0)], rhs_dilation=(2,),
                                               dimension_numbers=DN1)),
    ('max_pool(x, 2, stride=1, padding=[(1, 1)])',
     lambda x, w: jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 1), (1, 1, 1),
                                        ((0, 0), (1, 1), (0, 0)))),
])
def test_transposed_convolutions_and_explicit_padding_are_the_lax_ops(call, reference):
    """The declared result type is the one inferred (the output length from jax.eval_shape),
    the value and gradient are the lax op's, and with stride 1 a symbolic length L gives L
    plus the same difference."""
    x = RNG.normal(size=(2, 7, 3)).astype(np.float32)
    w = RNG.normal(size=(3, 3, 4)).astype(np.float32)
    out = jax.eval_shape(reference, x, w).shape
    m = gradlang.compile_source(_layer_source(call, 7, out[1], out[2]), "transpose.grad")
    value, grads = m.g(x, w)
    want_value, want = jax.value_and_grad(lambda x, w: jnp.sum(reference(x, w) ** 2),
                                          argnums=(0, 1))(x, w)
    ops = 4 * 9 * out[1] * out[2]  # each output sums at most 9 products; the loss them all
    np.testing.assert_allclose(value, want_value, rtol=ops * EPS32)
    for name, g in zip("xw", want):
        np.testing.assert_allclose(grads[name], g, rtol=0,
                                   atol=ops * EPS32 * float(np.abs(g).max()))
    if "stride=1" in call or "stride" not in call:
        delta = out[1] - 7
        assert _inferred_length(_layer_source(call, "L", "L", out[2])) == (
            "L" if delta == 0 else f"L{delta:+d}")


def _layer_source(call: str, length, out_length, channels: int) -> str:
    return (f"fn f(x: f32[2, {length}, 3], w: f32[3, 3, 4]) -> f32[2, {out_length}, "
            f"{channels}] {{\n  return {call}\n}}\n"
            f"fn l(x: f32[2, {length}, 3], w: f32[3, 3, 4]) -> f32 {{ return sum(f(x, w) ^ 2) }}\n"
            "export g = value_and_grad(l, wrt=[x, w])\n")


def _inferred_length(source: str) -> str:
    """The length of f's result, when declared [2, L, O]: L, or what the error says it is."""
    from gradlang.diagnostics import Diagnostics, SourceFile
    from gradlang.driver import compile_module

    diags = Diagnostics()
    if compile_module(SourceFile("t.grad", source), None, diags) is not None:
        return "L"
    text = diags.render()
    return text[text.index("returns f32[2, ") + len("returns f32[2, "):].split(",")[0]


@pytest.mark.parametrize("body, message", [
    ('sum(einsum("ij,jk", t, x))', 'einsum term "jk" has 2 letters for f32[V] of rank 1'),
    ('sum(einsum("ij,jk->ik", t))', 'einsum subscripts "ij,jk->ik" name 2 operands, given 1'),
    ('sum(einsum("ij,ij->i", t, k[0]))', "einsum letter 'i' is V and 3 in \"ij,ij->i\""),
    ('sum(einsum("ij->iz", t))', 'einsum output "iz" must name each input letter at most '
                                 "once; 'z' is in no input"),
    ('sum(einsum("i...", x))', "einsum subscripts are letters, one term per operand separated "
                               "by commas, then optionally -> and the output's letters (no "
                               'ellipsis), got "i..."'),
    ("sum(einsum(ids, t))", "argument 'subscripts' of einsum must be a string literal, e.g. "
                            '"ij,jk->ik"; \'ids\' is a value computed at run time'),
    ('sum(x) + "a"', "a string literal can only be a static argument of a builtin, such as "
                     "einsum's subscripts"),
    ("sum(conv(t, t))", "conv takes x [B, W, C] (1-D) or [B, H, W, C] (2-D), got f32[V, E]"),
    ("sum(conv(c, t))", "conv of f32[B, 8, 3] needs a kernel [K, C / groups, O], got f32[V, E]"),
    ("sum(conv(c, k, groups=2))", "conv of f32[B, 8, 3] with 2 groups needs a kernel "
                                  "[K, C / groups, O] with C / groups = 3 / 2 input channels, "
                                  "got f32[3, 3, 4]"),
    ('sum(conv(c, k, padding="FULL"))', 'the padding of conv must be "SAME", "VALID" or (low, '
                                        'high) pairs, got "FULL"'),
    ("sum(conv(c, k, padding=[1, 1]))", "argument 'padding' of conv must be \"SAME\", "
                                        "\"VALID\" or a list of (low, high) pairs of integer "
                                        "literals, one per spatial axis, e.g. [(1, 1), (2, 2)]"),
    ("sum(conv(c, k, padding=[(1, 1), (2, 2)]))", "the padding of conv needs one (low, high) "
                                                  "pair per spatial axis (1), got 2"),
    ("sum(conv_transpose(c, t))", "conv_transpose of f32[B, 8, 3] needs a kernel [K, C, O] "
                                  "with C = 3, got f32[V, E]"),
    ("sum(conv_transpose(c, k, padding=[(0, 0)], dilation=4))",
     "conv_transpose: the padding [(0, 0)] leaves no output of f32[B, 8, 3]"),
    ("sum(conv(c, k, stride=[1, 2]))", "the stride of conv must be a positive integer or 1 of "
                                       "them (one per spatial axis), got [1, 2]"),
    ('sum(max_pool(c, 9, padding="VALID"))', "max_pool: a window of 9 does not fit in 8 with "
                                             "VALID padding (f32[B, 8, 3])"),
    ("sum(conv(c, k, padding=\"VALID\", dilation=4))", "conv: a window of 9 (dilated) does not "
                                                     "fit in 8 with VALID padding "
                                                     "(f32[B, 8, 3])"),
])
def test_bad_convolution_and_einsum_arguments_are_located_errors(body, message):
    source = ("fn f(t: f32[V, E], ids: i32[N], x: f32[V], c: f32[B, 8, 3], k: f32[3, 3, 4]) "
              f"-> f32 {{\n  return {body}\n}}\nexport f = f\n")
    with pytest.raises(gradlang.CompileError) as info:
        gradlang.compile_source(source, "bad.grad")
    assert "bad.grad:2:" in str(info.value) and f"error: {message}\n" in str(info.value)


DROPOUT = """
fn f(x: f32[N], c: f32[N]) -> f32 { return sum(dropout(x, 0.25) * c) }
fn kept(x: f32[N]) -> f32[N] { return dropout(x, 0.25) }
export g = value_and_grad(f, wrt=[x])
export kept = kept
"""


def test_dropout_is_unbiased_and_its_gradient_goes_through_the_kept_entries():
    """Over 4000 keys the mean of dropout(x) is x (each entry's variance x^2 r / (1 - r)),
    the kept fraction is 1 - r (binomial), and the gradient is c / (1 - r) where the entry
    was kept, 0 elsewhere, with the forward pass's mask."""
    m = gradlang.compile_source(DROPOUT, "dropout.grad")
    rate, n, keys = 0.25, 16, 4000
    x = np.linspace(0.5, 2.0, n).astype(np.float32)
    c = np.linspace(-1.0, 1.0, n).astype(np.float32)
    draws = np.asarray(jax.vmap(lambda k: m.kept(x, k))(jax.random.split(jax.random.key(0), keys)))
    sd = np.abs(x) * np.sqrt(rate / (1 - rate) / keys)
    assert np.all(np.abs(draws.mean(0) - x) <= 5 * sd)
    kept = (draws != 0).mean()
    assert abs(kept - (1 - rate)) <= 5 * np.sqrt(rate * (1 - rate) / (keys * n))
    np.testing.assert_allclose(draws[draws != 0], np.broadcast_to(x / (1 - rate), draws.shape)[
        draws != 0], rtol=2 * EPS32)
    value, grads = m.g(x, c, jax.random.key(7))
    g = np.asarray(grads["x"])
    kept = np.isclose(g, c / (1 - rate), rtol=2 * EPS32, atol=0)
    assert np.all(kept | (g == 0)) and 0 < kept.sum() < n
    # the value is sum(mask x c) / (1 - r) = sum(g x): the backward's mask is the forward's
    np.testing.assert_allclose(value, np.sum(g * x), rtol=n * EPS32)


ATTENTION = """
fn f(q: f32[B, T, 4, 8], k: f32[B, S, 2, 8], v: f32[B, S, 2, 8], m: bool[B, S], x: f32[B, 5, 6],
     g: f32[6]) -> f32 {
  let o = dot_product_attention(q, k, v, m, causal=true)
  return sum(o * o) + sum(leaky_relu(group_norm(x, 3, g, g), 0.1) ^ 2)
}
export g = value_and_grad(f, wrt=[q, k, v, x, g])
"""


def test_attention_and_group_norm_differentiate_as_jax_nn():
    def reference(q, k, v, x, g):
        o = jax.nn.dot_product_attention(q, k, v, mask=MASK[:, None, None, :], is_causal=True)
        y = x.reshape(2, 5, 3, 2)
        y = y - y.mean((1, 3), keepdims=True)
        y = (y * jax.lax.rsqrt((y * y).mean((1, 3), keepdims=True) + 1e-5)).reshape(x.shape)
        return jnp.sum(o * o) + jnp.sum(jax.nn.leaky_relu(y * g + g, 0.1) ** 2)

    MASK = np.array([[True, True, False, True], [True, True, True, False]])
    args = [RNG.normal(size=s).astype(np.float32)
            for s in ((2, 3, 4, 8), (2, 4, 2, 8), (2, 4, 2, 8), (2, 5, 6), (6,))]
    m = gradlang.compile_source(ATTENTION, "attention.grad")
    value, grads = m.g(*args[:3], MASK, *args[3:])
    want_value, want = jax.value_and_grad(reference, argnums=range(5))(*args)
    ops = 8 * 4 * 8 * 10  # a softmax over 4 keys of 8-term scores, the sums over 2 x 3 x 4 x 8
    np.testing.assert_allclose(value, want_value, rtol=ops * EPS32)
    for name, w in zip(("q", "k", "v", "x", "g"), want):
        np.testing.assert_allclose(grads[name], w, rtol=0,
                                   atol=ops * EPS32 * float(np.abs(w).max()))


@pytest.mark.parametrize("body, message", [
    ("sum(dot_product_attention(a, a, c4))", "dot_product_attention needs q [B, T, H, D], k "
                                             "and v [B, S, K, D] with H a multiple of K, got "
                                             "f32[B, 8, 3, 4], f32[B, 8, 3, 4] and "
                                             "f32[B, 8, 2, 4]"),
    ("sum(dot_product_attention(a, a, a, t))", "the mask of dot_product_attention must be bool "
                                               "[B, S] = [B, 8] (key padding) or broadcast to "
                                               "[B, H, T, S] = [B, 3, 8, 8], got f32[V, E]"),
    ("sum(dot_product_attention(c, c, c))", "dot_product_attention takes float q [B, T, H, "
                                            "D], k [B, S, K, D] and v [B, S, K, D], got "
                                            "f32[B, 8, 3], f32[B, 8, 3] and f32[B, 8, 3]"),
    ("sum(group_norm(c, 2))", "group_norm needs a channel count (3, the last axis of "
                              "f32[B, 8, 3]) divisible by the groups (2)"),
    ("sum(group_norm(c, 3, x))", "the scale of group_norm must be a float vector of the "
                                 "channels, [3], got f32[V]"),
    ("sum(leaky_relu(t, x))", "the slope of leaky_relu must be a scalar, got f32[V]"),
    ("sum(dropout(t, x))", "dropout takes a float tensor and a scalar rate, got f32[V, E] and "
                           "f32[V]"),
])
def test_bad_attention_and_norm_arguments_are_located_errors(body, message):
    source = ("fn f(t: f32[V, E], x: f32[V], c: f32[B, 8, 3], a: f32[B, 8, 3, 4], "
              f"c4: f32[B, 8, 2, 4]) -> f32 {{\n  return {body}\n}}\nexport f = f\n")
    with pytest.raises(gradlang.CompileError) as info:
        gradlang.compile_source(source, "bad.grad")
    assert "bad.grad:2:" in str(info.value) and f"error: {message}\n" in str(info.value)


LM = """
use std.nn
fn lm(embed: f32[V, D], block: Block, ids: i32[B, T]) -> f32 {
  let h = transformer_block(block, embed[ids])
  return next_token_loss(einsum("btd,vd->btv", h, embed), ids)
}
fn cnn(layer: Conv, x: f32[B, H, W, C]) -> f32 { return mean(conv_relu(layer, x)) }
export g = value_and_grad(lm, wrt=[embed, block])
export c = value_and_grad(cnn, wrt=[layer])
"""


def lm_reference(embed, block, ids):
    """std.nn's transformer block and next-token loss, written in JAX (GPT-2's pre-norm
    block; the layer norms without offsets)."""
    def norm(x, g):
        c = x - x.mean(-1, keepdims=True)
        return c * jax.lax.rsqrt((c * c).mean(-1, keepdims=True) + 1e-5) * g

    a = block["attn"]
    x = embed[ids]
    y = norm(x, block["norm1"])
    q, k, v = (jnp.einsum("btd,dnk->btnk", y, a[n]) for n in "qkv")
    h = x + jnp.einsum("btnk,nkd->btd", jax.nn.dot_product_attention(q, k, v, is_causal=True),
                       a["o"])
    u = jax.nn.gelu(norm(h, block["norm2"]) @ block["up"]["w"] + block["up"]["b"])
    h = h + u @ block["down"]["w"] + block["down"]["b"]
    scores = jax.nn.log_softmax(jnp.einsum("btd,vd->btv", h, embed)[:, :-1])
    return -jnp.mean(jnp.take_along_axis(scores, ids[:, 1:, None], axis=2))


def test_the_std_nn_transformer_block_and_lm_loss_are_the_jax_ones():
    v, d, n, k, f, b, t = 11, 8, 2, 4, 16, 2, 6
    shapes = {"norm1": (d,), "norm2": (d,), "attn": {"q": (d, n, k), "k": (d, n, k),
                                                     "v": (d, n, k), "o": (n, k, d)},
              "up": {"w": (d, f), "b": (f,)}, "down": {"w": (f, d), "b": (d,)}}
    block = jax.tree.map(lambda s: (0.3 * RNG.normal(size=s)).astype(np.float32), shapes,
                         is_leaf=lambda s: isinstance(s, tuple))
    embed = RNG.normal(size=(v, d)).astype(np.float32)
    ids = RNG.integers(0, v, size=(b, t)).astype(np.int32)
    m = gradlang.compile_source(LM, "lm.grad")
    value, grads = m.g(embed, block, ids)
    want_value, (g_embed, g_block) = jax.value_and_grad(lm_reference, argnums=(0, 1))(
        embed, block, ids)
    # float32 sums of at most V x D products through a few layers
    ops = 16 * v * d
    np.testing.assert_allclose(value, want_value, rtol=ops * EPS32)
    for got, want in zip(jax.tree.leaves((grads["embed"], grads["block"])),
                         jax.tree.leaves((g_embed, g_block))):
        np.testing.assert_allclose(got, want, rtol=0, atol=ops * EPS32 * float(np.abs(want).max()))
    layer = {"w": RNG.normal(size=(3, 3, 2, 5)).astype(np.float32),
             "b": RNG.normal(size=5).astype(np.float32)}
    x = RNG.normal(size=(2, 6, 6, 2)).astype(np.float32)
    value, grads = m.c(layer, x)

    def cnn(p):
        y = jax.lax.conv_general_dilated(x, p["w"], (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.mean(jax.nn.relu(y + p["b"]))

    want_value, want = jax.value_and_grad(cnn)(layer)
    np.testing.assert_allclose(value, want_value, rtol=64 * EPS32)
    for name in ("w", "b"):
        np.testing.assert_allclose(grads["layer"][name], want[name], rtol=0,
                                   atol=64 * EPS32 * float(np.abs(want[name]).max()))


DP_LM = """
use std.nn
struct LM { embed: f32[V, D], block: Block }
fn loss(p: LM, ids: i32[B, T]) -> f32 {
  let h = transformer_block(p.block, p.embed[ids])
  return next_token_loss(einsum("btd,vd->btv", h, p.embed), ids)
}
export ghost = grad(loss, wrt=[p], by=dp(clip=0.5, noise=0))
export per_example = grad(loss, wrt=[p], by=dp(clip=0.5, noise=0, clipping=per_example))
export plain = grad(loss, wrt=[p])
"""


def test_dp_ghost_clipping_reaches_the_attention_projections():
    """The per-head projections (einsum "btd,dnk->btnk", "btnk,nkd->btd") are ghost clipped
    like the MLP's x @ w, and the clipped sum equals per-example clipping's."""
    from gradlang.explain import explain
    v, d, n, k, f, b, t = 11, 8, 2, 4, 16, 5, 6
    shapes = {"embed": (v, d), "block": {
        "norm1": (d,), "norm2": (d,), "attn": {"q": (d, n, k), "k": (d, n, k), "v": (d, n, k),
                                               "o": (n, k, d)},
        "up": {"w": (d, f), "b": (f,)}, "down": {"w": (f, d), "b": (d,)}}}
    p = jax.tree.map(lambda s: (0.5 * RNG.normal(size=s)).astype(np.float32), shapes,
                     is_leaf=lambda s: isinstance(s, tuple))
    ids = RNG.integers(0, v, size=(b, t)).astype(np.int32)
    m = gradlang.compile_source(DP_LM, "dp_lm.grad")
    text = explain(m.ir)
    for leaf in ("q", "k", "v"):
        assert (f"p.block.attn.{leaf}  ghost (linear layer)  einsum \"btd,dnk->btnk\" in "
                f"std.nn.causal_self_attention") in text
    assert "p.block.attn.o  ghost (linear layer)  einsum \"btnk,nkd->btd\"" in text
    ghost, per_example = m.ghost(p, ids, jax.random.key(0)), m.per_example(p, ids,
                                                                           jax.random.key(0))
    def norm(tree):
        return float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(tree))))

    # the clip binds: the unclipped sum (B x the mean's gradient) is longer than B x C, the
    # clipped sum is not
    assert norm(ghost) <= b * 0.5 * (1 + 1e-5) < b * norm(m.plain(p, ids))
    # two summations of the same clipped per-example gradients: 8 roundings per term over
    # B examples and T positions, against each leaf's scale
    for g, w in zip(jax.tree.leaves(ghost), jax.tree.leaves(per_example)):
        np.testing.assert_allclose(g, w, rtol=0,
                                   atol=8 * b * t * EPS32 * float(np.abs(w).max()) + 1e-30)


DP_EMBED = """
use std.nn
struct Tagger { embed: f32[V, D], out: Dense[I=D, O=C] }
fn loss(p: Tagger, ids: i32[B, T], tags: i32[B, T]) -> f32 {
  let logits = dense(p.out, reshape(p.embed[ids], [-1, D]))
  return cross_entropy(logits, reshape(tags, [-1]))
}
export ghost = grad(loss, wrt=[p], by=dp(clip=0.2, noise=0))
export per_example = grad(loss, wrt=[p], by=dp(clip=0.2, noise=0, clipping=per_example))
export plain = grad(loss, wrt=[p])
"""


def test_dp_ghost_clipping_of_an_embedding_table_from_its_token_counts():
    """The table looked up by ids is ghost clipped (per-example norms from the pairs of
    positions reading the same row); with repeated and negative ids, the clipped sum equals
    per-example clipping's."""
    from gradlang.explain import explain
    v, d, c, b, t = 9, 6, 4, 5, 7
    p = {"embed": RNG.normal(size=(v, d)).astype(np.float32),
         "out": {"w": RNG.normal(size=(d, c)).astype(np.float32), "b": np.zeros(c, np.float32)}}
    ids = RNG.integers(0, 4, size=(b, t)).astype(np.int32)  # few rows: many repeats
    ids[0, :2] = [-1, -v]  # counted from the end: the last row and the first
    tags = RNG.integers(0, c, size=(b, t)).astype(np.int32)
    m = gradlang.compile_source(DP_EMBED, "dp_embed.grad")
    assert "p.embed  ghost (linear layer)  a lookup w[ids] in loss" in explain(m.ir)
    key = jax.random.key(0)
    got, want = m.ghost(p, ids, tags, key), m.per_example(p, ids, tags, key)
    mean_norm = np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(m.plain(p, ids, tags))))
    assert mean_norm > 0.2  # the clip binds
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=0,
                                   atol=8 * b * t * EPS32 * float(np.abs(w).max()) + 1e-30)


DP_CNN = """
fn loss(k1: f32[3, 3, 1, 4], k2: f32[2, 2, 4, 6], g: f32[3, 1, 2, 4], w: f32[6, 3],
        x: f32[B, 8, 8, 1], y: i32[B]) -> f32 {
  let h = relu(conv(x, k1, padding=[(1, 0), (0, 2)]))
  let h = max_pool(relu(conv(h, k2, stride=2, padding="VALID", dilation=[1, 2])), 2)
  let grouped = conv(h[:, :, :, 0:4], g, groups=2)
  return cross_entropy(mean(h, axis=[1, 2]) @ w, y) + mean(grouped ^ 2)
}
export ghost = grad(loss, wrt=[k1, k2, g, w], by=dp(clip=0.05, noise=0))
export per_example = grad(loss, wrt=[k1, k2, g, w], by=dp(clip=0.05, noise=0,
                                                          clipping=per_example))
export plain = grad(loss, wrt=[k1, k2, g, w])
"""


def test_dp_ghost_clipping_of_convolution_kernels_through_their_patches():
    """Kernels of convolutions without groups (explicit padding, stride, dilation) are ghost
    clipped as their input's patches (im2col) times the flattened kernel; a grouped one falls
    back to per-example gradients; the clipped sum equals per-example clipping's."""
    from gradlang.explain import explain
    m = gradlang.compile_source(DP_CNN, "dp_cnn.grad")
    text = explain(m.ir)
    for leaf in ("k1", "k2"):
        assert f"{leaf}    ghost (linear layer)  a convolution conv(x, w) in loss" in text
    assert ("g     per-example gradient  used by conv (with feature groups: a product per "
            "group) in loss") in text
    b = 6
    shapes = ((3, 3, 1, 4), (2, 2, 4, 6), (3, 1, 2, 4), (6, 3))
    params = [(0.5 * RNG.normal(size=s)).astype(np.float32) for s in shapes]
    x = RNG.normal(size=(b, 8, 8, 1)).astype(np.float32)
    y = RNG.integers(0, 3, size=b).astype(np.int32)
    key = jax.random.key(0)
    got, want = m.ghost(*params, x, y, key), m.per_example(*params, x, y, key)
    def norm(tree):
        return float(np.sqrt(sum(np.sum(np.square(v)) for v in jax.tree.leaves(tree))))

    # the clip binds: the unclipped sum (B x the mean's gradient) is longer than B x C, the
    # clipped sum is not
    assert norm(got) <= b * 0.05 * (1 + 1e-5) < b * norm(m.plain(*params, x, y))
    # two summations of the same clipped per-example gradients: 8 roundings per term over
    # the examples and a kernel's output positions, against each leaf's scale
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=0,
                                   atol=8 * b * 64 * EPS32 * float(np.abs(w).max()) + 1e-30)


def test_a_table_both_looked_up_and_multiplied_is_clipped_per_example():
    """A lookup's ghost norm and a product's have different forms: a leaf used both ways
    gets per-example gradients, and explain says why."""
    from gradlang.explain import explain
    m = gradlang.compile_source("""
fn loss(w: f32[V, D], ids: i32[B, T], x: f32[B, V]) -> f32 {
  return sum(w[ids]) + sum(x @ w)
}
export g = grad(loss, wrt=[w], by=dp(clip=1.0, noise=1.0))
""", "both.grad")
    assert ("w     per-example gradient  both looked up (w[ids]) and multiplied: its "
            "per-example norm has no one ghost form") in explain(m.ir)
