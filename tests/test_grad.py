"""grad / value_and_grad exports against hand-written JAX, and the compiled callables' Python API.

Each program is also written directly in jax.numpy; its `jax.grad` is the reference, compared
by `assert_close` with OPS roundings unless a case says otherwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradlang
from gradlang.runtime.signature import ArgumentError
from stats import assert_close

OPS = 160
"""A program here sums at most 20 terms and chains at most 4 transcendentals (4 roundings each)
and a few arithmetic steps, forward and backward, on both sides: 2 * 2 * (20 + 16 + 4)."""


def rand(seed: int, *shape, scale=1.0):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def labels(seed: int, n: int, classes: int):
    return np.random.default_rng(seed).integers(0, classes, size=n).astype(np.int32)


def assert_tree_close(actual, expected, ops: float = OPS):
    """`assert_close`, the leaves' shapes and dtypes equal too (ops = 0: bitwise)."""
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        a, e = np.asarray(a), np.asarray(e)
        assert a.shape == e.shape and a.dtype == e.dtype, (a.shape, a.dtype, e.shape, e.dtype)
    assert_close(actual, expected, ops)


# ---- programs and their JAX twins

MLP = """
struct Layer { w: f32[I, O], b: f32[O] }
struct MLP { l1: Layer[I=D, O=H], l2: Layer[I=H, O=C] }

fn loss(p: MLP, x: f32[B, D], y: f32[B, C]) -> f32 {
  let h = tanh(x @ p.l1.w + p.l1.b)
  let out = h @ p.l2.w + p.l2.b
  return mean((out - y) ^ 2)
}
export step = value_and_grad(loss, wrt=[p])
export g = grad(loss, wrt=[p, x])
export loss = loss
"""


def mlp_loss(p, x, y):
    h = jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"])
    out = h @ p["l2"]["w"] + p["l2"]["b"]
    return jnp.mean((out - y) ** 2)


def mlp_args(seed=0, batch=5):
    p = {"l1": {"w": rand(seed, 3, 4), "b": rand(seed + 1, 4)},
         "l2": {"w": rand(seed + 2, 4, 2), "b": rand(seed + 3, 2)}}
    return p, rand(seed + 4, batch, 3), rand(seed + 5, batch, 2)


RIDGE = """
fn ridge(w: f32[D], lam: f32, x: f32[N, D], y: f32[N]) -> f32 {
  let r = x @ w - y
  return sum(r * r) / f32(N) + lam * dot(w, w)
}
export g = grad(ridge, wrt=[w, lam])
export vg = value_and_grad(ridge, wrt=[w])
"""


def ridge(w, lam, x, y):
    r = x @ w - y
    return jnp.sum(r * r) / x.shape[0] + lam * jnp.dot(w, w)


HYPER = """
# Closed-form ridge fit, then the validation loss: its derivative wrt the penalty.
fn fit(lam: f32, x: f32[N, D], y: f32[N]) -> f32[D] {
  return solve(transpose(x) @ x + lam * eye(D), transpose(x) @ y)
}
fn outer(lam: f32, x: f32[N, D], y: f32[N], xv: f32[M, D], yv: f32[M]) -> f32 {
  return mse(xv @ fit(lam, x, y), yv)
}
export hyper = value_and_grad(outer, wrt=[lam])
"""


def hyper(lam, x, y, xv, yv):
    w = jnp.linalg.solve(x.T @ x + lam * jnp.eye(x.shape[1]), x.T @ y)
    return jnp.mean((xv @ w - yv) ** 2)


RNN = """
fn rnn(w: f32[H, H], u: f32[D, H], xs: f32[T, D]) -> f32 {
  let (h, steps) = for t in range(T) carry (h = zeros([H]), n = 0) {
    (tanh(h @ w + xs[t] @ u), n + 1)
  }
  return sum(h * h) / f32(steps)
}
export g = grad(rnn, wrt=[w, u, xs])
"""


def rnn(w, u, xs):
    h = jnp.zeros(w.shape[0])
    for t in range(xs.shape[0]):
        h = jnp.tanh(h @ w + xs[t] @ u)
    return jnp.sum(h * h) / xs.shape[0]


BRANCHES = """
fn f(w: f32[D], x: f32[B, D]) -> f32 {
  let s = x @ w
  let hinge = if s > 1.0 then 0.0 else 1.0 - s
  let reg = if sum(w) > 0.0 then sum(w * w) else 2.0 * sum(abs(w))
  return mean(hinge) + reg
}
export g = grad(f, wrt=[w, x])
"""


def branches(w, x):
    s = x @ w
    hinge = jnp.where(s > 1.0, 0.0, 1.0 - s)
    reg = jnp.where(jnp.sum(w) > 0, jnp.sum(w * w), 2.0 * jnp.sum(jnp.abs(w)))
    return jnp.mean(hinge) + reg


SOFTMAX_CE = """
fn ce(w: f32[D, C], b: f32[C], x: f32[B, D], y: i32[B]) -> f32 {
  return cross_entropy(x @ w + b, y)
}
fn ce_by_hand(w: f32[D, C], b: f32[C], x: f32[B, D], y: i32[B]) -> f32 {
  let logp = log_softmax(x @ w + b, axis=-1)
  return -mean(sum(one_hot(y, C) * logp, axis=1))
}
fn ce_soft(w: f32[D, C], b: f32[C], x: f32[B, D], y: i32[B]) -> f32 {
  let p = 0.9 * one_hot(y, C) + 0.1 / f32(C)
  return cross_entropy(x @ w + b, p) + 0.5 * mean(softmax(x @ w, axis=1)[:, 0])
}
export g = grad(ce, wrt=[w, b])
export g_by_hand = grad(ce_by_hand, wrt=[w, b])
export g_soft = value_and_grad(ce_soft, wrt=[w, b])
"""


def ce(w, b, x, y):
    logp = jax.nn.log_softmax(x @ w + b)
    return -jnp.mean(logp[jnp.arange(x.shape[0]), y])


def ce_soft(w, b, x, y):
    c = w.shape[1]
    p = 0.9 * jax.nn.one_hot(y, c) + 0.1 / c
    logp = jax.nn.log_softmax(x @ w + b)
    return -jnp.mean(jnp.sum(p * logp, -1)) + 0.5 * jnp.mean(jax.nn.softmax(x @ w, axis=1)[:, 0])


CALLS = """
fn predict(w: f32[D], x: f32[B, D]) -> f32[B] { return sigmoid(x @ w) }
fn bce(p: f32[B], y: f32[B]) -> f32 {
  return -mean(y * log(p) + (1.0 - y) * log(1.0 - p))
}
fn penalty(v: f32[K]) -> f32 { return sum(softplus(v) - log(2.0)) }
fn loss(w: f32[D], x: f32[B, D], y: f32[B]) -> f32 {
  return bce(predict(w, x), y) + 0.1 * penalty(w) + 0.01 * penalty(reshape(x, [-1]))
}
export g = grad(loss, wrt=[w, x])
"""


def calls(w, x, y):
    p = jax.nn.sigmoid(x @ w)
    bce = -jnp.mean(y * jnp.log(p) + (1 - y) * jnp.log(1 - p))

    def penalty(v):
        return jnp.sum(jax.nn.softplus(v) - jnp.log(2.0))

    return bce + 0.1 * penalty(w) + 0.01 * penalty(x.reshape(-1))


STDLIB = """
use std.nn

struct Net { l1: Dense[I=D, O=H], l2: Dense[I=H, O=C] }

fn loss(net: Net, x: f32[B, D], y: i32[B]) -> f32 {
  let h = dense_relu(net.l1, x)
  let logits = nn.dense(net.l2, h)
  return cross_entropy(logits, y) + 0.001 * (l2(net.l1.w) + nn.l2(net.l2.w)) + 0.0 * accuracy(logits, y)
}
export step = value_and_grad(loss, wrt=[net])
"""


def stdlib_loss(net, x, y):
    h = jax.nn.relu(x @ net["l1"]["w"] + net["l1"]["b"])
    logits = h @ net["l2"]["w"] + net["l2"]["b"]
    reg = jnp.sum(net["l1"]["w"] ** 2) + jnp.sum(net["l2"]["w"] ** 2)
    return ce(jnp.eye(logits.shape[1]), jnp.zeros(logits.shape[1]), logits, y) + 0.001 * reg


@pytest.fixture(scope="module")
def mlp():
    return gradlang.compile_source(MLP, "mlp.grad")


# ---- gradients against jax.grad


def test_mlp_struct_param_value_and_grad(mlp):
    p, x, y = mlp_args()
    value, grads = mlp.step(p, x, y)
    ref_value, ref_grad = jax.value_and_grad(mlp_loss)(p, x, y)
    assert_tree_close(value, ref_value)
    assert_tree_close(grads, {"p": ref_grad})
    g = mlp.g(p, x, y)
    gp, gx = jax.grad(mlp_loss, argnums=(0, 1))(p, x, y)
    assert_tree_close(g, {"p": gp, "x": gx})
    assert set(g) == {"p", "x"} and set(g["p"]) == {"l1", "l2"}


def test_ridge_regression():
    m = gradlang.compile_source(RIDGE)
    w, lam, x, y = rand(1, 3), np.float32(0.3), rand(2, 8, 3), rand(3, 8)
    gw, glam = jax.grad(ridge, argnums=(0, 1))(w, lam, x, y)
    assert_tree_close(m.g(w, lam, x, y), {"w": gw, "lam": glam})
    value, grads = m.vg(w, lam, x, y)
    assert_tree_close((value, grads), (ridge(w, lam, x, y), {"w": gw}))


def test_ridge_gradient_descent_converges_to_the_closed_form():
    m = gradlang.compile_source(RIDGE)
    x, y, lam = rand(4, 20, 3), rand(5, 20), np.float32(0.1)
    w = np.zeros(3, np.float32)
    for _ in range(300):
        w = w - 0.2 * np.asarray(m.g(w, lam, x, y)["w"])
    h = x.T.astype(np.float64) @ x / 20 + lam * np.eye(3)
    closed = np.linalg.solve(h, x.T.astype(np.float64) @ y / 20)
    # a step rounds ~30 times (20- and 3-term products, the update) and contracts errors by
    # rho = max |1 - 0.4 eig(h)|: 30 / (1 - rho) at the fixed point, times cond(h)
    eig = np.linalg.eigvalsh(h)
    rho = np.abs(1 - 0.4 * eig).max()
    assert_close(w, closed, ops=30 / (1 - rho) * eig.max() / eig.min())


def test_hypergradient_through_a_linear_solve():
    m = gradlang.compile_source(HYPER)
    args = (np.float32(0.5), rand(6, 10, 3), rand(7, 10), rand(8, 6, 3), rand(9, 6))
    value, grads = m.hyper(*args)
    ref_value, ref_grad = jax.value_and_grad(hyper)(*args)
    # the solve's rounding is amplified by the condition number, once for w and once for its
    # derivative
    cond = np.linalg.cond(args[1].T.astype(np.float64) @ args[1] + 0.5 * np.eye(3))
    assert_tree_close((value, grads), (ref_value, {"lam": ref_grad}), ops=OPS * cond ** 2)
    assert abs(float(grads["lam"])) > 1e-4  # a meaningful, nonzero hypergradient


def test_loop_with_carried_state():
    m = gradlang.compile_source(RNN)
    w, u, xs = rand(10, 3, 3, scale=0.5), rand(11, 2, 3), rand(12, 4, 2)
    gw, gu, gxs = jax.grad(rnn, argnums=(0, 1, 2))(w, u, xs)
    assert_tree_close(m.g(w, u, xs), {"w": gw, "u": gu, "xs": gxs})
    # a different number of steps (T is symbolic)
    xs6 = rand(13, 6, 2)
    gw, gu, gxs = jax.grad(rnn, argnums=(0, 1, 2))(w, u, xs6)
    assert_tree_close(m.g(w, u, xs6), {"w": gw, "u": gu, "xs": gxs})


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["then", "else"])
def test_if_else_both_branches(sign):
    m = gradlang.compile_source(BRANCHES)
    w = np.abs(rand(14, 4)) * sign
    x = rand(15, 6, 4)
    gw, gx = jax.grad(branches, argnums=(0, 1))(w, x)
    out = m.g(w, x)
    assert_tree_close(out, {"w": gw, "x": gx})
    s = x @ w
    assert (s > 1).any() and (s < 1).any(), "both sides of the tensor condition are exercised"


def test_softmax_cross_entropy():
    m = gradlang.compile_source(SOFTMAX_CE)
    w, b, x, y = rand(16, 3, 4), rand(17, 4), rand(18, 5, 3), labels(19, 5, 4)
    gw, gb = jax.grad(ce, argnums=(0, 1))(w, b, x, y)
    assert_tree_close(m.g(w, b, x, y), {"w": gw, "b": gb})
    assert_tree_close(m.g_by_hand(w, b, x, y), {"w": gw, "b": gb})
    value, (gw, gb) = jax.value_and_grad(ce_soft, argnums=(0, 1))(w, b, x, y)
    assert_tree_close(m.g_soft(w, b, x, y), (value, {"w": gw, "b": gb}))


def test_function_calling_functions():
    m = gradlang.compile_source(CALLS)
    w, x = rand(20, 3), rand(21, 7, 3)
    y = (np.random.default_rng(22).random(7) < 0.5).astype(np.float32)
    gw, gx = jax.grad(calls, argnums=(0, 1))(w, x, y)
    assert_tree_close(m.g(w, x, y), {"w": gw, "x": gx})


def test_stdlib_import():
    m = gradlang.compile_source(STDLIB, "net.grad")
    net = {"l1": {"w": rand(23, 3, 5), "b": rand(24, 5)}, "l2": {"w": rand(25, 5, 4), "b": rand(26, 4)}}
    x, y = rand(27, 6, 3), labels(28, 6, 4)
    value, grads = m.step(net, x, y)
    ref_value, ref_grad = jax.value_and_grad(stdlib_loss)(net, x, y)
    assert_tree_close((value, grads), (ref_value, {"net": ref_grad}))


def test_zero_gradient_paths():
    m = gradlang.compile_source("""
fn f(w: f32[3], x: f32[3]) -> f32 {
  let frozen = stop_gradient(w * w)
  let counted = f32(i32(w * 10.0))
  let mask = f32(w > 0.0)
  return sum(frozen * x) + sum(counted) + sum(mask * x)
}
export g = grad(f, wrt=[w, x])
""")
    w, x = rand(29, 3), rand(30, 3)
    g = m.g(w, x)
    np.testing.assert_array_equal(np.asarray(g["w"]), np.zeros(3, np.float32))
    assert_close(g["x"], w * w + (w > 0), ops=2)  # a square and an add


def test_grad_needs_a_float_scalar_function_and_float_wrt():
    with pytest.raises(gradlang.CompileError, match="returns a float scalar"):
        gradlang.compile_source("fn f(w: f32[3]) -> f32[3] { return w }\nexport g = grad(f, wrt=[w])")
    with pytest.raises(gradlang.CompileError, match="cannot differentiate with respect to 'n'"):
        gradlang.compile_source("fn f(n: i32[3]) -> f32 { return sum(f32(n)) }\n"
                                "export g = grad(f, wrt=[n])")
    with pytest.raises(gradlang.CompileError, match="'v' is not a parameter of 'f'"):
        gradlang.compile_source("fn f(w: f32[3]) -> f32 { return sum(w) }\nexport g = grad(f, wrt=[v])")


# ---- composition with jax transformations


def test_jit_gives_the_same_numbers(mlp):
    p, x, y = mlp_args(seed=31)
    assert_tree_close(jax.jit(mlp.step)(p, x, y), mlp.step(p, x, y))  # fused differently
    assert_tree_close(jax.jit(mlp.loss)(p, x, y), mlp.loss(p, x, y))


def test_vmap_over_datasets(mlp):
    p, _, _ = mlp_args(seed=32)
    xs, ys = rand(33, 4, 5, 3), rand(34, 4, 5, 2)
    batched = jax.vmap(mlp.step, in_axes=(None, 0, 0))(p, xs, ys)
    looped = [mlp.step(p, xs[i], ys[i]) for i in range(4)]
    stacked = jax.tree.map(lambda *leaves: np.stack(leaves), *looped)
    assert_tree_close(batched, stacked)


def test_vmap_per_example_gradients():
    m = gradlang.compile_source(RIDGE)
    w, lam, x, y = rand(35, 3), np.float32(0.2), rand(36, 6, 3), rand(37, 6)
    per_example = jax.vmap(m.g, in_axes=(None, None, 0, 0))(w, lam, x[:, None], y[:, None])
    for i in range(6):
        gw, glam = jax.grad(ridge, argnums=(0, 1))(w, lam, x[i:i + 1], y[i:i + 1])
        assert_tree_close(jax.tree.map(lambda a: a[i], per_example), {"w": gw, "lam": glam})


def test_jax_grad_of_a_compiled_function_matches_the_grad_export(mlp):
    p, x, y = mlp_args(seed=38)
    via_jax = jax.grad(lambda p: mlp.loss(p, x, y))(p)
    assert_tree_close(via_jax, mlp.g(p, x, y)["p"])


# ---- the Python calling convention


def test_keyword_arguments(mlp):
    p, x, y = mlp_args(seed=39)
    expected = mlp.step(p, x, y)
    assert_tree_close(mlp.step(p=p, x=x, y=y), expected, ops=0)
    assert_tree_close(mlp.step(y=y, p=p, x=x), expected, ops=0)
    assert_tree_close(mlp.step(p, y=y, x=x), expected, ops=0)


def test_python_scalars_are_accepted():
    m = gradlang.compile_source(RIDGE)
    w, x, y = rand(40, 3), rand(41, 4, 3), rand(42, 4)
    assert_tree_close(m.g(w, 0.25, x, y), m.g(w, np.float32(0.25), x, y), ops=0)


@pytest.mark.parametrize("call, message", [
    (lambda m, p, x, y: m.step(p, x[:, :2], y), r"argument 'x': expected f32\[B, D\] with D = 3"),
    (lambda m, p, x, y: m.step(p, x, y[:3]), r"argument 'y': expected f32\[B, C\] with B = 5"),
    (lambda m, p, x, y: m.step(p, x[None], y), r"argument 'x': expected f32\[B, D\], got shape "
                                               r"\[1, 5, 3\] \(rank 3\)"),
    (lambda m, p, x, y: m.step({**p, "l2": {**p["l2"], "b": np.zeros(3, np.float32)}}, x, y),
     r"argument 'p'.l2.b: expected f32\[C\] with C = 2"),
    (lambda m, p, x, y: m.step({"l1": p["l1"]}, x, y), r"struct MLP needs keys \['l1', 'l2'\]; "
                                                       r"missing \['l2'\]"),
    (lambda m, p, x, y: m.step({**p, "l3": p["l1"]}, x, y), r"unexpected \['l3'\]"),
    (lambda m, p, x, y: m.step(p["l1"]["w"], x, y), "expected a dict for struct MLP"),
    (lambda m, p, x, y: m.step(p, x > 0, y), "argument 'x': expected f32.*dtype bool"),
    (lambda m, p, x, y: m.step(p, "x", y), "argument 'x': expected a f32\\[B, D\\] array, got str"),
    (lambda m, p, x, y: m.step(p, x), "step\\(\\) is missing 'y'"),
    (lambda m, p, x, y: m.step(p, x, y, y), r"step\(\) takes 3 arguments but 4 were given"),
    (lambda m, p, x, y: m.step(p, x, y, z=y), r"step\(\) has no parameter 'z' \(parameters: p, x, y\)"),
    (lambda m, p, x, y: m.step(p, x, y, x=x), r"step\(\) got two values for 'x'"),
], ids=["static-dim", "symbolic-dim", "rank", "struct-field-shape", "struct-missing",
        "struct-extra", "struct-not-dict", "dtype", "not-an-array", "missing", "too-many",
        "unknown-keyword", "duplicate"])
def test_wrong_arguments_raise_argument_error(mlp, call, message):
    p, x, y = mlp_args()
    mlp.step(p, x, y)  # a good call first: its checked layout must not let a bad one through
    with pytest.raises(ArgumentError, match=message):
        call(mlp, p, x, y)


def test_argument_error_is_a_type_error_and_names_the_export(mlp):
    p, x, y = mlp_args()
    with pytest.raises(TypeError) as info:
        mlp.loss(p, x.T, y)
    assert isinstance(info.value, ArgumentError)
    assert str(info.value).startswith("loss(): argument 'x'")


def test_integer_parameters_reject_floats():
    m = gradlang.compile_source(SOFTMAX_CE)
    w, b, x = rand(43, 3, 4), rand(44, 4), rand(45, 5, 3)
    with pytest.raises(ArgumentError, match=r"argument 'y': expected i32\[B\], got an array of dtype float32"):
        m.g(w, b, x, np.zeros(5, np.float32))


@pytest.mark.parametrize("export", ["l2", "nn.l2", "grad(l2, wrt=[w])", "grad(nn.l2, wrt=[w])"])
def test_exports_can_name_imported_functions(export):
    m = gradlang.compile_source(f"use std.nn\nexport a = {export}\n")
    w = np.ones((2, 3), np.float32)
    out = m.a(w)
    np.testing.assert_array_equal(out["w"] if isinstance(out, dict) else out,  # exact in float32
                                  2 * w if isinstance(out, dict) else 6.0)
