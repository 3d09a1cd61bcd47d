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
