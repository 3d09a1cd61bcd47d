"""Non-smooth operators: exact forward values, each backward rule against its formula, and the
gradient-flow warnings where a rule-less non-smooth op cuts a gradient."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import gradlang
from stats import assert_close

X = np.random.default_rng(0).uniform(-2.0, 2.0, size=(6, 5)).astype(np.float32)
X[0, :3] = [0.0, 0.5, -1.0]  # ties and boundaries
C = np.random.default_rng(1).normal(size=(6, 5)).astype(np.float32)


def program(op: str, rule: str) -> gradlang.CompiledModule:
    call = f"{op}(x)" + (f" with {rule}" if rule else "")
    return gradlang.compile_source(f"""
fn f(x: f32[6, 5], c: f32[6, 5]) -> f32 {{
  return sum({call} * c)
}}
fn value(x: f32[6, 5]) -> f32[6, 5] {{
  return {call}
}}
export g = grad(f, wrt=[x])
export v = value
""")


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def swish_sign_grad(x, b):
    return b * (2 - b * x * np.tanh(b * x / 2)) / (1 + np.cosh(b * x))


RULES = [  # (op, rule, d op(x) / dx under the rule)
    ("sign", "ste", lambda x: np.ones_like(x)),
    ("sign", "ste(clip=1.0)", lambda x: (np.abs(x) <= 1).astype(np.float32)),
    ("sign", "reste(power=3)",
     lambda x: np.minimum(np.abs(x) ** (1 / 3 - 1) / 3, 10.0) * (np.abs(x) <= 1)),
    ("sign", "reste(power=2, clip=1.5, max_grad=4)",
     lambda x: np.minimum(np.abs(x) ** (1 / 2 - 1) / 2, 4.0) * (np.abs(x) <= 1.5)),
    ("sign", "approx_sign", lambda x: (2 - 2 * np.abs(x)) * (np.abs(x) <= 1)),
    ("sign", "swish_sign(beta=5.0)", lambda x: swish_sign_grad(x, 5.0)),
    ("binarize", "swish_sign(beta=2)", lambda x: swish_sign_grad(x, 2.0)),
    ("binarize", "ste(clip=1.0)", lambda x: (np.abs(x) <= 1).astype(np.float32)),
    ("round", "ste", lambda x: np.ones_like(x)),
    ("floor", "ste(clip=1.5)", lambda x: (np.abs(x) <= 1.5).astype(np.float32)),
    ("ceil", "ste", lambda x: np.ones_like(x)),
    ("step", "ste(clip=1.0)", lambda x: (np.abs(x) <= 1).astype(np.float32)),
]


@pytest.mark.parametrize("op, rule, derivative", RULES, ids=[f"{o}-{r}" for o, r, _ in RULES])
def test_backward_rule_matches_its_formula_and_forward_is_exact(op, rule, derivative):
    m, plain = program(op, rule), program(op, "")
    np.testing.assert_array_equal(m.v(X), plain.v(X))  # bit for bit
    x = X.copy()
    x[np.abs(x) < 1e-6] = 0.3  # the power rule's slope is capped at 0 anyway; keep it finite
    # per entry: a power (log and exp, 8 roundings) or tanh and cosh, a cap, a mask, the
    # product with C, against float64: 16, relative to the largest (swish_sign's derivative
    # decays like e^(-beta |x|), whose relative rounding grows with beta |x|)
    assert_close(m.g(x, C)["x"], C * derivative(x.astype(np.float64)), ops=16)


def test_argmax_with_straight_through_gumbel_uses_the_softmax_jacobian():
    m, plain = program("argmax", "st_gumbel(tau=0.5)"), program("argmax", "")
    np.testing.assert_array_equal(m.v(X), plain.v(X))
    _, vjp = jax.vjp(lambda v: jax.nn.softmax(v / 0.5, axis=-1), X)
    assert_close(m.g(X, C)["x"], vjp(C)[0], ops=2 * (5 + 4 + 5))  # softmax's vjp over 5, both sides
    np.testing.assert_array_equal(program("argmax", "ste").g(X, C)["x"], C)


def test_topk_with_ste_passes_the_gradient_through():
    m = gradlang.compile_source("""
fn f(x: f32[6, 5], c: f32[6, 5]) -> f32 { return sum((topk(x, 2) with ste) * c) }
export g = grad(f, wrt=[x])
""")
    np.testing.assert_array_equal(m.g(X, C)["x"], C)


def test_without_a_rule_the_gradient_is_zero_and_the_compiler_says_where():
    src = """
fn f(w: f32[3], x: f32[4, 3]) -> f32 { return sum(sign(x @ w)) }
export g = grad(f, wrt=[w])
"""
    with pytest.raises(gradlang.CompileError, match=r"2:51: warning: 'sign' has a zero derivative "
                                                    r"almost everywhere.*with ste \| ste\(clip=1.0\)"
                                                    r" \| reste\(power=3\)"):
        gradlang.compile_source(src, strict=True)
    m = gradlang.compile_source(src)
    np.testing.assert_array_equal(m.g(np.ones(3, np.float32), X[:4, :3])["w"], np.zeros(3))


def test_pragma_backward_gives_every_applicable_op_its_rule():
    src = """
pragma backward approx_sign

fn f(w: f32[6, 5], c: f32[6, 5]) -> f32 {
  return sum(sign(w) * c) + sum(round(w) * c)
}
export g = grad(f, wrt=[w])
"""
    m = gradlang.compile_source(src)  # round gets no rule: approx_sign is for signs
    grad = m.g(X, C)["w"]
    want = C * (2 - 2 * np.abs(X)) * (np.abs(X) <= 1)
    assert_close(grad, want, ops=4, scale=np.abs(want))  # per entry: 2 - 2|x|, the mask, C
    with pytest.raises(gradlang.CompileError, match="'round' has a zero derivative"):
        gradlang.compile_source(src, strict=True)


# ---- quantizers


def hadamard_matrix(n: int) -> np.ndarray:
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def np_quantize(x, bits, axis=None, symmetric=True, scale=None):
    red = tuple(range(x.ndim)) if axis is None else tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    if bits == 1:
        s = np.mean(np.abs(x), red, keepdims=True) if scale is None else scale
        return s * np.where(x >= 0, 1.0, -1.0)
    if symmetric:
        n = 2 ** (bits - 1) - 1
        s = np.max(np.abs(x), red, keepdims=True) / n if scale is None else scale
        return np.clip(np.round(x / s), -n, n) * s
    top = 2 ** bits - 1
    lo = np.min(x, red, keepdims=True)
    s = (np.max(x, red, keepdims=True) - lo) / top
    z = np.round(-lo / s)
    return (np.clip(np.round(x / s) + z, 0, top) - z) * s


@pytest.mark.parametrize("call, kwargs", [
    ("quantize(x, 4)", dict(bits=4)),
    ("quantize(x, 2)", dict(bits=2)),
    ("quantize(x, 1)", dict(bits=1)),
    ("quantize(x, 8, axis=0)", dict(bits=8, axis=0)),
    ("quantize(x, 3, symmetric=false)", dict(bits=3, symmetric=False)),
    ("quantize(x, 4, 0.25)", dict(bits=4, scale=0.25)),
])
def test_quantize_matches_numpy(call, kwargs):
    m = gradlang.compile_source(f"fn f(x: f32[6, 5]) -> f32[6, 5] {{ return {call} }}\nexport f = f")
    # the scale (a 30-term mean or a max), x / s, round, clip and * s against float64; no
    # entry of X sits within rounding of a rounding boundary
    assert_close(m.f(X), np_quantize(X.astype(np.float64), **kwargs), ops=32)


def test_hadamard_is_the_orthonormal_walsh_matrix_and_quest_quantizes_in_its_basis():
    x = np.random.default_rng(2).normal(size=(3, 16)).astype(np.float32)
    m = gradlang.compile_source("""
fn h(x: f32[3, 16]) -> f32[3, 16] { return hadamard(x) }
fn q(x: f32[3, 16]) -> f32[3, 16] { return quest(x, 2) }
export h = h
export q = q
""")
    hm = hadamard_matrix(16)
    assert_close(m.h(x), x @ hm.T, ops=16 + 2)  # 16-term products and the 1/4 normalization
    y = x @ hm.T  # QuEST: rotated rows, 4 levels at the Gaussian MSE-optimal spacing
    step = 2 * 1.9911701 * np.sqrt(np.mean(y * y, -1, keepdims=True)) / 4  # test_quant_examples' clip
    levels = np.clip((np.floor(y / step) + 0.5) * step, -1.5 * step, 1.5 * step)
    # the rotation there and back (16-term products), the rows' rms (16 terms, sqrt) and the
    # level's few steps, against float64
    assert_close(m.q(x), levels @ hm, ops=2 * 16 + 16 + 8)
    err = {"quest": np.mean((np.asarray(m.q(x)) - x) ** 2),
           "absmax": np.mean((np_quantize(x.astype(np.float64), 2, axis=0) - x) ** 2)}
    assert err["quest"] < err["absmax"], err  # the point of QuEST at low bit widths


def test_trust_rule_masks_entries_whose_quantization_error_is_too_large():
    m = gradlang.compile_source("""
fn f(x: f32[6, 5], c: f32[6, 5], s: f32) -> f32 { return sum((quantize(x, 2, s) with trust) * c) }
export g = grad(f, wrt=[x, s])
""")
    s = np.float32(0.5)  # levels -0.5, 0, 0.5: entries beyond 0.75 in magnitude are clipped
    g = m.g(X, C, s)
    q = np_quantize(X.astype(np.float64), 2, scale=0.5)
    np.testing.assert_array_equal(g["x"], C * (np.abs(X - q) <= 0.25))  # C times a 0/1 mask
    levels = C * np.clip(np.round(X / 0.5), -1, 1)
    assert_close(g["s"], np.sum(levels), ops=30, scale=np.sum(np.abs(levels)))  # a 30-term sum


def test_stochastic_round_is_unbiased_with_an_identity_backward():
    m = gradlang.compile_source("""
fn f(x: f32[5]) -> f32[5] { return stochastic_round(x) }
fn g(x: f32[5], c: f32[5]) -> f32 { return sum(stochastic_round(x) * c) }
export f = f
export d = grad(g, wrt=[x])
""")
    x = np.array([0.25, -1.5, 2.0, 3.9, -0.01], np.float32)
    keys = jax.random.split(jax.random.key(0), 10_000)
    draws = np.asarray(jax.vmap(lambda k: m.f(x, k))(keys), np.float64)
    assert np.all((draws == np.floor(x)) | (draws == np.ceil(x)))
    se = draws.std(0) / np.sqrt(len(draws))
    assert np.all(np.abs(draws.mean(0) - x) <= 5 * se + 1e-6)
    c = C[0]
    np.testing.assert_array_equal(m.d(x, c, jax.random.key(1))["x"], c)


def test_explain_lists_each_non_smooth_op_with_its_rule():
    from pathlib import Path

    from gradlang.explain import explain

    m = gradlang.compile_file(Path(__file__).parent / "golden" / "nonsmooth.grad")
    text = explain(m.ir)
    assert "w: reverse mode, with the backward rules of the non-smooth operations below" in text
    rows = [line.split() for line in text.splitlines() if line.startswith("    ")]
    assert ["sign", "f,", "line", "7", "reste(power=3.0,", "clip=1.0,", "max_grad=10.0)"] in rows
    assert ["sign", "f,", "line", "8", "approx_sign"] in rows
    assert ["argmax", "f,", "line", "10", "st_gumbel(tau=0.5)"] in rows
