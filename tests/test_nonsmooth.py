"""Non-smooth operators: exact forward values, each backward rule against its formula, and the
gradient-flow warnings where a rule-less non-smooth op cuts a gradient."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import gradlang

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
    np.testing.assert_allclose(m.g(x, C)["x"], C * derivative(x.astype(np.float64)), rtol=2e-5,
                               atol=1e-6)


def test_argmax_with_straight_through_gumbel_uses_the_softmax_jacobian():
    m, plain = program("argmax", "st_gumbel(tau=0.5)"), program("argmax", "")
    np.testing.assert_array_equal(m.v(X), plain.v(X))
    _, vjp = jax.vjp(lambda v: jax.nn.softmax(v / 0.5, axis=-1), X)
    np.testing.assert_allclose(m.g(X, C)["x"], vjp(C)[0], rtol=1e-5, atol=1e-6)
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
    np.testing.assert_allclose(grad, C * (2 - 2 * np.abs(X)) * (np.abs(X) <= 1), rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(gradlang.CompileError, match="'round' has a zero derivative"):
        gradlang.compile_source(src, strict=True)
