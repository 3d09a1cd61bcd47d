"""Every builtin and every operator, compiled from a tiny .grad function and checked against NumPy.

Each case also checks that the runtime result has exactly the shape and dtype that the type
checker predicted for the function's result (`m.ir`), derived dims such as `B-1` or `B+B`
included. `test_every_builtin_is_covered` / `test_every_op_is_covered` make sure that a new
builtin or op cannot be added without a case here.
"""

from __future__ import annotations

import ast as pyast
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache

import numpy as np
import pytest

import gradlang
from gradlang.builtins import BUILTINS
from gradlang.ir import walk
from gradlang.ops import OPS
from gradlang.types import DType, StructType, TensorType, TupleType, Type
from stats import assert_close

# A RuntimeWarning from JAX means an op computed in the wrong dtype (e.g. softmax in int32).
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

rng = np.random.default_rng(20240601)


def F(*shape, lo=None, hi=None):
    """float32 test data: standard normal, or uniform in [lo, hi)."""
    if lo is None:
        return rng.normal(size=shape).astype(np.float32)
    return rng.uniform(lo, hi, size=shape).astype(np.float32)


def I(*shape, lo=-5, hi=6):
    return rng.integers(lo, hi, size=shape).astype(np.int32)


def Bo(*shape):
    return rng.random(size=shape) < 0.5


def spd(n):
    a = rng.normal(size=(n, n))
    return (a @ a.T + n * np.eye(n)).astype(np.float32)


# ---- numpy references

def softmax(x, axis=-1):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax(x, axis=-1):
    x = np.asarray(x, np.float64)
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def logsumexp(x, axis=None, keepdims=False):
    x = np.asarray(x, np.float64)
    return np.log(np.exp(x).sum(axis=axis, keepdims=keepdims))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def np_loop(start, stop, init, body):
    state = init
    for i in range(start, stop):
        state = body(i, state)
    return state


# ---- cases


@dataclass
class Case:
    id: str
    tests: tuple[str, ...]
    """Builtin names / IR op names this case is about (checked against the compiled IR)."""
    params: str
    ret: str
    body: str
    """An expression, or statements ending in `return ...`."""
    args: tuple
    expect: Callable
    prelude: str = ""
    ops: float = 32
    """Float results' rounding against the float64 reference, for `assert_close`: one builtin is
    at most a ~16-term sum or a few steps with transcendentals (4 roundings each)."""
    kwargs: dict = field(default_factory=dict)

    @property
    def source(self) -> str:
        body = self.body if "return" in self.body else f"return {self.body}"
        return (f"{self.prelude}\n"
                f"fn f({self.params}) -> {self.ret} {{\n  {body}\n}}\n"
                f"export f = f\n")


CASES: list[Case] = []


def case(id, tests, params, ret, body, args, expect, **kw):
    tests = (tests,) if isinstance(tests, str) else tuple(tests)
    CASES.append(Case(id, tests, params, ret, body, tuple(args), expect, **kw))


# unary float ops, on floats in their domain and on integers (promoted to f32)
UNARY = {
    "exp": (np.exp, (-2, 2)), "log": (np.log, (0.1, 3)), "log1p": (np.log1p, (-0.9, 3)),
    "expm1": (np.expm1, (-2, 2)), "sqrt": (np.sqrt, (0, 4)), "tanh": (np.tanh, (-3, 3)),
    "sigmoid": (sigmoid, (-5, 5)), "softplus": (lambda x: np.log1p(np.exp(x)), (-5, 5)),
    "relu": (lambda x: np.maximum(x, 0), (-2, 2)), "sin": (np.sin, (-3, 3)),
    "cos": (np.cos, (-3, 3)),
    "gelu": (lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))),
             (-4, 4)),
    "silu": (lambda x: x * sigmoid(x), (-5, 5)),
}
for name, (ref, (lo, hi)) in UNARY.items():
    case(f"{name}", name, "x: f32[B, 4]", "f32[B, 4]", f"{name}(x)", [F(3, 4, lo=lo, hi=hi)], ref)
    case(f"{name}-i32", name, "x: i32[3]", "f32[3]", f"{name}(x)", [I(3, lo=1, hi=6)],
         lambda x, ref=ref: ref(x.astype(np.float64)))
case("abs", "abs", "x: f32[3, 4]", "f32[3, 4]", "abs(x)", [F(3, 4)], np.abs)
case("abs-i32", "abs", "x: i32[5]", "i32[5]", "abs(x)", [I(5)], np.abs)
case("unary-scalar-literal", "exp", "x: f32", "f32", "exp(1.5) + x", [np.float32(0.5)],
     lambda x: np.exp(1.5) + x)

# elementwise binary builtins with broadcasting
case("maximum", "maximum", "x: f32[3, 4], y: f32[4]", "f32[3, 4]", "maximum(x, y)",
     [F(3, 4), F(4)], np.maximum)
case("maximum-literal", "maximum", "x: f32[3, 4]", "f32[3, 4]", "maximum(0.25, x)", [F(3, 4)],
     lambda x: np.maximum(0.25, x))
case("maximum-i32", "maximum", "x: i32[6], y: i32[6]", "i32[6]", "maximum(x, y)", [I(6), I(6)],
     np.maximum)
case("minimum", "minimum", "x: f32[2, 1, 3], y: f32[4, 1]", "f32[2, 4, 3]", "minimum(x, y)",
     [F(2, 1, 3), F(4, 1)], np.minimum)
case("minimum-i32-float-literal", "minimum", "x: i32[6]", "f32[6]", "minimum(x, 2.5)", [I(6)],
     lambda x: np.minimum(x, 2.5))
case("where", "where", "c: bool[3, 4], x: f32[3, 4], y: f32[4]", "f32[3, 4]", "where(c, x, y)",
     [Bo(3, 4), F(3, 4), F(4)], np.where)
case("where-literals", "where", "x: f32[5]", "f32[5]", "where(x > 0.0, x, 0.0)", [F(5)],
     lambda x: np.where(x > 0, x, 0.0))
case("where-i32", "where", "c: bool[5], n: i32[5]", "i32[5]", "where(c, n, -1)", [Bo(5), I(5)],
     lambda c, n: np.where(c, n, -1))
case("where-keywords", "where", "c: bool[5], n: i32[5]", "f32[5]", "where(y=n, x=0.5, cond=c)",
     [Bo(5), I(5)], lambda c, n: np.where(c, 0.5, n))
case("clip", "clip", "x: f32[3, 4], hi: f32[4]", "f32[3, 4]", "clip(x, -0.5, hi)",
     [F(3, 4), F(4, lo=0, hi=1)], lambda x, hi: np.minimum(np.maximum(x, -0.5), hi))
case("clip-i32", "clip", "x: i32[8]", "i32[8]", "clip(x, -2, 3)", [I(8)],
     lambda x: np.clip(x, -2, 3))
case("clip-keywords", "clip", "x: f32[8]", "f32[8]", "clip(x, hi=0.5, lo=-0.25)", [F(8)],
     lambda x: np.clip(x, -0.25, 0.5))
case("stop_gradient", "stop_gradient", "x: f32[3, 4]", "f32[3, 4]", "stop_gradient(x) * 2.0",
     [F(3, 4)], lambda x: x * 2)

# reductions: every reduce builtin with every static-argument variant
REDUCE = {"sum": np.sum, "mean": np.mean, "max": np.max, "min": np.min, "logsumexp": logsumexp,
          "var": np.var}
REDUCE_VARIANTS = [
    # (id, args text, output type, numpy kwargs)
    ("all", "", "f32", {}),
    ("axis1", ", axis=1", "f32[2, 4]", {"axis": 1}),
    ("neg-axis-keepdims", ", axis=-1, keepdims=true", "f32[2, 3, 1]", {"axis": -1, "keepdims": True}),
    ("axes-list", ", axis=[0, 2]", "f32[3]", {"axis": (0, 2)}),
    ("axes-list-keepdims", ", axis=[-1, 0], keepdims=true", "f32[1, 3, 1]",
     {"axis": (-1, 0), "keepdims": True}),
    ("keepdims-false", ", keepdims=false", "f32", {}),
]
for name, ref in REDUCE.items():
    for vid, text, ret, kw in REDUCE_VARIANTS:
        case(f"{name}-{vid}", name, "x: f32[2, 3, 4]", ret, f"{name}(x{text})", [F(2, 3, 4)],
             lambda x, ref=ref, kw=kw: ref(np.asarray(x, np.float64), **kw))
    float_valued = name in ("mean", "logsumexp", "var")
    case(f"{name}-i32", name, "x: i32[B, 5]", "f32[B]" if float_valued else "i32[B]",
         f"{name}(x, axis=1)", [I(3, 5)],
         lambda x, ref=ref: ref(np.asarray(x, np.float64), axis=1))
case("sum-symbolic-axis", "sum", "x: f32[B, D]", "f32[D]", "sum(x, axis=0)", [F(5, 2)],
     lambda x: x.sum(0))

# shape ops
case("reshape", "reshape", "x: f32[B, 6]", "f32[B, 2, 3]", "reshape(x, [B, 2, -1])", [F(4, 6)],
     lambda x: x.reshape(4, 2, 3))
case("reshape-flatten-symbolic", "reshape", "x: f32[B, 6]", "f32[N]", "reshape(x, [-1])",
     [F(4, 6)], lambda x: x.reshape(-1))
case("reshape-static", "reshape", "x: f32[2, 6]", "f32[3, 4]", "reshape(x, shape=[3, 4])",
     [F(2, 6)], lambda x: x.reshape(3, 4))
case("reshape-derived-dim", "reshape", "x: f32[B, 2], y: f32[C, 2]", "f32[N]",
     "reshape(concat([x, y]), [-1])", [F(3, 2), F(2, 2)],
     lambda x, y: np.concatenate([x, y]).reshape(-1))  # typed f32[2*(B+C)]
case("reshape-i32", "reshape", "x: i32[2, 3, 2]", "i32[6, 2]", "reshape(x, [-1, 2])", [I(2, 3, 2)],
     lambda x: x.reshape(-1, 2))
case("transpose-default", "transpose", "x: f32[2, 3, 4]", "f32[4, 3, 2]", "transpose(x)",
     [F(2, 3, 4)], lambda x: np.transpose(x))
case("transpose-axes", "transpose", "x: f32[2, 3, 4]", "f32[3, 4, 2]",
     "transpose(x, axes=[1, -1, 0])", [F(2, 3, 4)], lambda x: np.transpose(x, (1, 2, 0)))
case("transpose-symbolic", "transpose", "x: f32[B, D]", "f32[D, B]", "transpose(x)", [F(3, 5)],
     lambda x: x.T)
case("concat", "concat", "x: f32[2, 3], y: f32[4, 3]", "f32[6, 3]", "concat([x, y])",
     [F(2, 3), F(4, 3)], lambda x, y: np.concatenate([x, y]))
case("concat-neg-axis", "concat", "x: f32[2, 3], y: f32[2, 1]", "f32[2, 7]",
     "concat([x, y, x], axis=-1)", [F(2, 3), F(2, 1)], lambda x, y: np.concatenate([x, y, x], -1))
case("concat-symbolic", "concat", "x: f32[B, 3], y: f32[C, 3]", "f32[N, 3]",
     "concat(xs=[x, y], axis=0)", [F(2, 3), F(3, 3)], lambda x, y: np.concatenate([x, y]))
case("concat-i32-f32", "concat", "x: i32[3], y: f32[2]", "f32[5]", "concat([x, y])",
     [I(3), F(2)], lambda x, y: np.concatenate([x, y]))
case("stack", "stack", "x: f32[B, 3], y: f32[B, 3]", "f32[2, B, 3]", "stack([x, y])",
     [F(4, 3), F(4, 3)], lambda x, y: np.stack([x, y]))
case("stack-neg-axis", "stack", "x: f32[2, 3]", "f32[2, 3, 3]", "stack([x, x * 2.0, -x], axis=-1)",
     [F(2, 3)], lambda x: np.stack([x, 2 * x, -x], axis=-1))
case("stack-axis1", "stack", "x: i32[2, 3]", "i32[2, 2, 3]", "stack([x, x + 1], axis=1)",
     [I(2, 3)], lambda x: np.stack([x, x + 1], axis=1))
case("broadcast_to", "broadcast_to", "x: f32[4]", "f32[3, 4]", "broadcast_to(x, [3, 4])", [F(4)],
     lambda x: np.broadcast_to(x, (3, 4)))
case("broadcast_to-symbolic", "broadcast_to", "x: f32[B, 1]", "f32[2, B, 5]",
     "broadcast_to(x, shape=[2, B, 5])", [F(3, 1)], lambda x: np.broadcast_to(x, (2, 3, 5)))

# constructors
case("zeros", "zeros", "x: f32[B, 2]", "f32[B, 3]", "zeros([B, 3])", [F(4, 2)],
     lambda x: np.zeros((4, 3)))
case("zeros-static", "zeros", "x: f32", "f32[2, 2]", "zeros([2, 2]) + x", [np.float32(1.5)],
     lambda x: np.full((2, 2), 1.5))
case("ones", "ones", "x: f32[B]", "f32[2, B]", "ones(shape=[2, B]) * x", [F(3)],
     lambda x: np.ones((2, 3)) * x)
case("full-i32", "full", "x: f32[B]", "i32[2, B]", "full([2, B], 7)", [F(3)],
     lambda x: np.full((2, 3), 7, np.int32))
case("full-f32", "full", "x: f32[B]", "f32[B]", "full([B], 2.5)", [F(3)], lambda x: np.full(3, 2.5))
case("full-tensor-value", "full", "v: f32", "f32[2, 3]", "full([2, 3], v)", [np.float32(-1.25)],
     lambda v: np.full((2, 3), -1.25))
case("full-bool", "full", "x: f32[B]", "bool[B]", "full([B], true)", [F(3)],
     lambda x: np.ones(3, bool))
case("arange", "arange", "x: f32", "i32[5]", "arange(5)", [np.float32(0)], lambda x: np.arange(5))
case("arange-start-stop", "arange", "x: f32", "i32[5]", "arange(2, 7)", [np.float32(0)],
     lambda x: np.arange(2, 7))
case("arange-dim", "arange", "x: f32[B]", "i32[B]", "arange(B)", [F(4)], lambda x: np.arange(4))
case("arange-dim-stop", "arange", "x: f32[B]", "i32[N]", "arange(1, stop=B)", [F(4)],
     lambda x: np.arange(1, 4))
case("eye", "eye", "x: f32", "f32[3, 3]", "eye(3)", [np.float32(0)], lambda x: np.eye(3))
case("eye-dim", "eye", "x: f32[B, D]", "f32[B, D]", "eye(B) @ x", [F(3, 2)], lambda x: x)

# normalization and losses
# non-smooth builtins (forward values; their backward rules are in tests/test_nonsmooth.py)
HALVES = np.array([[-2.5, -1.5, -0.5, 0.0], [0.5, 1.5, 2.5, -0.7]], np.float32)
case("sign", "sign", "x: f32[2, 4]", "f32[2, 4]", "sign(x)", [HALVES], np.sign)
case("sign-i32", "sign", "x: i32[5]", "i32[5]", "sign(x)", [I(5)], np.sign)
case("round", "round", "x: f32[2, 4]", "f32[2, 4]", "round(x)", [HALVES], np.round)
case("floor", "floor", "x: f32[2, 4]", "f32[2, 4]", "floor(x)", [HALVES], np.floor)
case("ceil", "ceil", "x: f32[2, 4]", "f32[2, 4]", "ceil(x)", [HALVES], np.ceil)
case("step", "step", "x: f32[2, 4]", "f32[2, 4]", "step(x)", [HALVES], lambda x: (x > 0).astype(np.float32))
case("binarize", "binarize", "x: f32[2, 4]", "f32[2, 4]", "binarize(x)", [HALVES],
     lambda x: np.where(x >= 0, 1.0, -1.0))
case("argmax", "argmax", "x: f32[3, 4]", "f32[3, 4]", "argmax(x)", [F(3, 4)],
     lambda x: np.eye(4)[np.argmax(x, -1)])
case("argmax-axis0", "argmax", "x: f32[3, 4]", "f32[3, 4]", "argmax(x, axis=0)", [F(3, 4)],
     lambda x: np.eye(3)[np.argmax(x, 0)].T)
case("topk", "topk", "x: f32[3, 5]", "f32[3, 5]", "topk(x, 2)", [F(3, 5)],
     lambda x: (x >= np.sort(x, -1)[:, -2:-1]).astype(np.float32))
case("topk-axis0", "topk", "x: f32[4, 3]", "f32[4, 3]", "topk(x, 3, axis=0)", [F(4, 3)],
     lambda x: (x >= np.sort(x, 0)[-3:-2, :]).astype(np.float32))
case("sort", "sort", "x: f32[3, 5]", "f32[3, 5]", "sort(x)", [F(3, 5)], lambda x: np.sort(x, -1))
case("sort-axis0", "sort", "x: f32[3, 5]", "f32[3, 5]", "sort(x, axis=0)", [F(3, 5)],
     lambda x: np.sort(x, 0))
case("softmax", "softmax", "x: f32[3, 4]", "f32[3, 4]", "softmax(x)", [F(3, 4)], softmax)


def np_layer_norm(x, scale=1.0, offset=0.0):
    x = np.asarray(x, np.float64)
    c = x - x.mean(-1, keepdims=True)
    return c / np.sqrt((c * c).mean(-1, keepdims=True) + 1e-5) * scale + offset


def np_rms_norm(x, scale=1.0):
    x = np.asarray(x, np.float64)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * scale


def np_segment_sum(data, ids, n):
    out = np.zeros((n,) + data.shape[1:], np.float64)
    keep = (ids >= 0) & (ids < n)
    np.add.at(out, ids[keep], data[keep])
    return out


case("layer_norm", "layer_norm", "x: f32[B, 4]", "f32[B, 4]", "layer_norm(x)", [F(3, 4)],
     np_layer_norm)
case("layer_norm-affine", "layer_norm", "x: f32[2, 3, 4], g: f32[4], b: f32[4]",
     "f32[2, 3, 4]", "layer_norm(x, g, b)", [F(2, 3, 4), F(4), F(4)], np_layer_norm)
case("layer_norm-offset-only", "layer_norm", "x: f32[3, 4], b: f32[4]", "f32[3, 4]",
     "layer_norm(x, offset=b)", [F(3, 4), F(4)], lambda x, b: np_layer_norm(x, offset=b))
case("rms_norm", "rms_norm", "x: f32[3, 4]", "f32[3, 4]", "rms_norm(x)", [F(3, 4)], np_rms_norm)
case("rms_norm-scale", "rms_norm", "x: f32[3, 4], g: f32[4]", "f32[3, 4]", "rms_norm(x, g)",
     [F(3, 4), F(4)], np_rms_norm)
def _pads(n, k, s, d, padding):
    """(out, lo): XLA's SAME pads the total (out - 1) s + span - n, the odd one at the end."""
    span = (k - 1) * d + 1
    if padding == "VALID":
        return (n - span) // s + 1, 0
    out = -(-n // s)
    return out, max((out - 1) * s + span - n, 0) // 2


def np_windows(x, k, stride, dilation, padding, fill=0.0):
    """x [B, *S, C] (1-D or 2-D) as windows [B, *out, *k, C] (float64), padded with `fill`."""
    x = np.asarray(x, np.float64)
    one_d = x.ndim == 3
    if one_d:
        x, k, stride, dilation = x[:, None], (1, *k), (1, *stride), (1, *dilation)
    (oh, lh), (ow, lw) = (_pads(n, kk, s, d, padding)
                          for n, kk, s, d in zip(x.shape[1:3], k, stride, dilation))
    big = np.full((x.shape[0], x.shape[1] + 2 * k[0] * dilation[0] + oh * stride[0],
                   x.shape[2] + 2 * k[1] * dilation[1] + ow * stride[1], x.shape[3]), fill)
    big[:, lh:lh + x.shape[1], lw:lw + x.shape[2]] = x
    out = np.empty((x.shape[0], oh, ow, k[0], k[1], x.shape[3]))
    for i in range(oh):
        for j in range(ow):
            rows = i * stride[0] + dilation[0] * np.arange(k[0])
            cols = j * stride[1] + dilation[1] * np.arange(k[1])
            out[:, i, j] = big[:, rows][:, :, cols]
    return out[:, 0, :, 0] if one_d else out


def np_conv(x, w, stride=1, padding="SAME", dilation=1, groups=1):
    n = x.ndim - 2
    k = w.shape[:n]
    stride, dilation = (stride,) * n if np.isscalar(stride) else stride, \
        (dilation,) * n if np.isscalar(dilation) else dilation
    win = np_windows(x, k, stride, dilation, padding)  # [B, *out, *k, C]
    c, o = w.shape[-2], w.shape[-1]
    outs = []
    for g in range(groups):
        part = win[..., g * c:(g + 1) * c]
        wg = np.asarray(w, np.float64)[..., g * (o // groups):(g + 1) * (o // groups)]
        axes = list(range(-n - 1, 0))
        outs.append(np.tensordot(part, wg, axes=(axes, list(range(n + 1)))))
    return np.concatenate(outs, axis=-1)


def np_pool(x, window, stride=None, padding="VALID", kind="max"):
    n = x.ndim - 2
    window = (window,) * n if np.isscalar(window) else window
    stride = window if stride is None else ((stride,) * n if np.isscalar(stride) else stride)
    win = np_windows(x, window, stride, (1,) * n, padding, -np.inf if kind == "max" else 0.0)
    axes = tuple(range(-n - 1, -1))
    return win.max(axis=axes) if kind == "max" else win.sum(axis=axes) / np.prod(window)


case("einsum-matmul", "einsum", "a: f32[3, 4], b: f32[4, 2]", "f32[3, 2]",
     'einsum("ij,jk->ik", a, b)', [F(3, 4), F(4, 2)], lambda a, b: np.einsum("ij,jk->ik", a, b))
case("einsum-attention", "einsum", "q: f32[2, 3, 4], k: f32[2, 5, 4]", "f32[2, 3, 5]",
     'einsum("btd, bsd -> bts", q, k)', [F(2, 3, 4), F(2, 5, 4)],
     lambda q, k: np.einsum("btd,bsd->bts", q, k))
case("einsum-implicit-trace", "einsum", "a: f32[3, 3]", "f32", 'einsum("ii", a)', [F(3, 3)],
     lambda a: np.einsum("ii", a))
case("einsum-implicit-transpose", "einsum", "a: f32[3, 4]", "f32[4, 3]", 'einsum("ji", a)',
     [F(3, 4)], lambda a: np.einsum("ji", a))
case("conv-1d", "conv", "x: f32[2, 9, 3], w: f32[3, 3, 4]", "f32[2, 9, 4]", "conv(x, w)",
     [F(2, 9, 3), F(3, 3, 4)], np_conv)
case("conv-1d-valid-stride-dilation", "conv", "x: f32[2, 9, 3], w: f32[3, 3, 4]",
     "f32[2, 3, 4]", 'conv(x, w, stride=2, padding="VALID", dilation=2)',
     [F(2, 9, 3), F(3, 3, 4)], lambda x, w: np_conv(x, w, 2, "VALID", 2))
case("conv-2d-same-stride", "conv", "x: f32[2, 7, 6, 3], w: f32[3, 2, 3, 4]",
     "f32[2, 4, 3, 4]", "conv(x, w, stride=2)", [F(2, 7, 6, 3), F(3, 2, 3, 4)],
     lambda x, w: np_conv(x, w, 2))
case("conv-2d-groups", "conv", "x: f32[1, 5, 5, 4], w: f32[3, 3, 2, 6]", "f32[1, 5, 5, 6]",
     "conv(x, w, groups=2, dilation=[1, 2])", [F(1, 5, 5, 4), F(3, 3, 2, 6)],
     lambda x, w: np_conv(x, w, 1, "SAME", (1, 2), 2), ops=64)
def np_conv_transpose_1d(x, w, stride, padding, dilation=1):
    """x [B, N, C] dilated by the stride (zeros between entries), padded as
    lax.conv_transpose pads it, correlated with w [K, C, O] dilated: in float64."""
    span = (w.shape[0] - 1) * dilation + 1
    if padding == "SAME":
        total = span + stride - 2
        low = span - 1 if stride > span - 1 else -(-total // 2)
    elif padding == "VALID":
        total, low = span + stride - 2 + max(span - stride, 0), span - 1
    else:
        (low, high), = padding
        total = low + high
    b, n, c = x.shape
    grown = np.zeros((b, (n - 1) * stride + 1 + total, c))
    grown[:, low:low + (n - 1) * stride + 1:stride] = x
    size = grown.shape[1] - span + 1
    taps = [grown[:, k * dilation:k * dilation + size] for k in range(w.shape[0])]
    return sum(np.einsum("bnc,co->bno", t, np.asarray(wk, np.float64)) for t, wk in zip(taps, w))


case("conv_transpose-same-stride", "conv_transpose", "x: f32[2, 5, 3], w: f32[3, 3, 4]",
     "f32[2, 10, 4]", "conv_transpose(x, w, stride=2)", [F(2, 5, 3), F(3, 3, 4)],
     lambda x, w: np_conv_transpose_1d(x, w, 2, "SAME"))
case("conv_transpose-valid-dilation", "conv_transpose", "x: f32[2, 5, 3], w: f32[3, 3, 4]",
     "f32[2, 17, 4]", 'conv_transpose(x, w, stride=3, padding="VALID", dilation=2)',
     [F(2, 5, 3), F(3, 3, 4)], lambda x, w: np_conv_transpose_1d(x, w, 3, "VALID", 2))
case("conv_transpose-explicit", "conv_transpose", "x: f32[2, 5, 3], w: f32[2, 3, 4]",
     "f32[2, 11, 4]", "conv_transpose(x, w, stride=2, padding=[(2, 1)])",
     [F(2, 5, 3), F(2, 3, 4)], lambda x, w: np_conv_transpose_1d(x, w, 2, [(2, 1)]))
case("max_pool", "max_pool", "x: f32[2, 6, 6, 3]", "f32[2, 3, 3, 3]", "max_pool(x, 2)",
     [F(2, 6, 6, 3)], lambda x: np_pool(x, 2))
case("max_pool-1d-same", "max_pool", "x: f32[2, 7, 3]", "f32[2, 4, 3]",
     'max_pool(x, 3, stride=2, padding="SAME")', [F(2, 7, 3)],
     lambda x: np_pool(x, 3, 2, "SAME"))
case("avg_pool", "avg_pool", "x: f32[2, 6, 5, 3]", "f32[2, 3, 2, 3]", "avg_pool(x, [2, 2])",
     [F(2, 6, 5, 3)], lambda x: np_pool(x, 2, kind="avg"))
case("avg_pool-same", "avg_pool", "x: f32[2, 5, 5, 3]", "f32[2, 3, 3, 3]",
     'avg_pool(x, 3, stride=2, padding="SAME")', [F(2, 5, 5, 3)],
     lambda x: np_pool(x, 3, 2, "SAME", kind="avg"))
def np_attention(q, k, v, mask=None, causal=False):
    """Per head, softmax(q k^T / sqrt(D)) v in float64; query head n reads key head n // (H /
    K); masked scores are left out of the softmax."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, h, d = q.shape
    k, v = (np.repeat(a, h // a.shape[2], axis=2) for a in (k, v))
    scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d)
    allowed = np.ones(scores.shape, bool)
    if mask is not None:
        allowed &= mask[:, None, None, :] if mask.ndim == 2 else mask
    if causal:
        allowed &= np.tril(np.ones(scores.shape[-2:], bool))
    scores = np.where(allowed, scores, -np.inf)
    w = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("bhts,bshd->bthd", w / w.sum(-1, keepdims=True), v)


def np_group_norm(x, groups, scale=1.0, offset=0.0):
    x = np.asarray(x, np.float64)
    y = x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)
    axes = tuple(range(1, y.ndim - 2)) + (y.ndim - 1,)
    y = y - y.mean(axes, keepdims=True)
    y = y / np.sqrt((y * y).mean(axes, keepdims=True) + 1e-5)
    return y.reshape(x.shape) * scale + offset


PAD = np.array([[True, True, False, True, True], [True, False, True, True, True]])
case("dot_product_attention", "dot_product_attention",
     "q: f32[2, 3, 4, 8], k: f32[2, 5, 4, 8], v: f32[2, 5, 4, 8]", "f32[2, 3, 4, 8]",
     "dot_product_attention(q, k, v)", [F(2, 3, 4, 8), F(2, 5, 4, 8), F(2, 5, 4, 8)],
     np_attention)
case("dot_product_attention-grouped-padded", "dot_product_attention",
     "q: f32[2, 3, 4, 8], k: f32[2, 5, 2, 8], v: f32[2, 5, 2, 8], m: bool[2, 5]",
     "f32[2, 3, 4, 8]", "dot_product_attention(q, k, v, m)",
     [F(2, 3, 4, 8), F(2, 5, 2, 8), F(2, 5, 2, 8), PAD], np_attention)
case("dot_product_attention-causal", "dot_product_attention",
     "q: f32[2, 4, 2, 8], k: f32[2, 4, 2, 8], v: f32[2, 4, 2, 8]", "f32[2, 4, 2, 8]",
     "dot_product_attention(q, k, v, causal=true)", [F(2, 4, 2, 8), F(2, 4, 2, 8), F(2, 4, 2, 8)],
     lambda q, k, v: np_attention(q, k, v, causal=True))
case("group_norm", "group_norm", "x: f32[2, 3, 3, 6], g: f32[6], b: f32[6]", "f32[2, 3, 3, 6]",
     "group_norm(x, 3, g, b)", [F(2, 3, 3, 6), F(6), F(6)],
     lambda x, g, b: np_group_norm(x, 3, g, b))
case("group_norm-1d", "group_norm", "x: f32[2, 5, 4]", "f32[2, 5, 4]", "group_norm(x, 2)",
     [F(2, 5, 4)], lambda x: np_group_norm(x, 2))
case("leaky_relu", "leaky_relu", "x: f32[3, 4]", "f32[3, 4]", "leaky_relu(x, 0.1)", [F(3, 4)],
     lambda x: np.where(x >= 0, x, 0.1 * np.asarray(x, np.float64)))
case("take_along_axis", "take_along_axis", "x: f32[3, 4], i: i32[3, 2]", "f32[3, 2]",
     "take_along_axis(x, i)", [F(3, 4), np.array([[0, 3], [1, 1], [3, 2]], np.int32)],
     lambda x, i: np.take_along_axis(x, i, axis=-1))
case("take_along_axis-broadcast", "take_along_axis", "x: f32[3, 4], i: i32[1, 4]",
     "f32[1, 4]", "take_along_axis(x, i, axis=0)", [F(3, 4), np.array([[2, 0, 1, 2]], np.int32)],
     lambda x, i: np.take_along_axis(x, i, axis=0))
case("segment_sum", "segment_sum", "x: f32[5, 2], ids: i32[5]", "f32[3, 2]",
     "segment_sum(x, ids, 3)", [F(5, 2), np.array([2, 0, 2, 7, -1], np.int32)],
     lambda x, ids: np_segment_sum(x, ids, 3))
case("softmax-axis0", "softmax", "x: f32[3, 4]", "f32[3, 4]", "softmax(x, axis=0)", [F(3, 4)],
     lambda x: softmax(x, 0))
case("softmax-neg-axis-3d", "softmax", "x: f32[2, 3, 4]", "f32[2, 3, 4]", "softmax(x, axis=-2)",
     [F(2, 3, 4)], lambda x: softmax(x, -2))
case("softmax-i32", "softmax", "x: i32[2, 4]", "f32[2, 4]", "softmax(x)", [I(2, 4)], softmax)
case("log_softmax", "log_softmax", "x: f32[B, 5]", "f32[B, 5]", "log_softmax(x)", [F(3, 5)],
     log_softmax)
case("log_softmax-axis0", "log_softmax", "x: f32[3, 4]", "f32[3, 4]", "log_softmax(x, axis=0)",
     [F(3, 4) * 10], lambda x: log_softmax(x, 0))
case("log_softmax-i32", "log_softmax", "x: i32[4]", "f32[4]", "log_softmax(x)", [I(4)],
     log_softmax)
case("one_hot", "one_hot", "y: i32[B]", "f32[B, 5]", "one_hot(y, 5)", [I(6, lo=0, hi=5)],
     lambda y: np.eye(5)[y])
case("one_hot-dim", "one_hot", "x: f32[B, C], y: i32[B]", "f32[B, C]",
     "one_hot(num_classes=C, labels=y)", [F(4, 3), I(4, lo=0, hi=3)], lambda x, y: np.eye(3)[y])
case("one_hot-2d", "one_hot", "y: i32[2, 3]", "f32[2, 3, 4]", "one_hot(y, 4)", [I(2, 3, lo=0, hi=4)],
     lambda y: np.eye(4)[y])
case("cross_entropy-int", "cross_entropy", "x: f32[B, 5], y: i32[B]", "f32",
     "cross_entropy(x, y)", [F(4, 5), I(4, lo=0, hi=5)],
     lambda x, y: -log_softmax(x)[np.arange(4), y].mean())
case("cross_entropy-probs", "cross_entropy", "x: f32[B, 5], p: f32[B, 5]", "f32",
     "cross_entropy(x, softmax(p))", [F(4, 5), F(4, 5)],
     lambda x, p: -(softmax(p) * log_softmax(x)).sum(-1).mean())
case("mse", "mse", "x: f32[3, 4], y: f32[3, 4]", "f32", "mse(x, y)", [F(3, 4), F(3, 4)],
     lambda x, y: np.mean((np.float64(x) - y) ** 2))
case("mse-broadcast", "mse", "x: f32[3, 4], y: f32[4]", "f32", "mse(pred=x, target=y)",
     [F(3, 4), F(4)], lambda x, y: np.mean((np.float64(x) - y) ** 2))
case("mse-i32", "mse", "x: i32[6]", "f32", "mse(x, 1)", [I(6)],
     lambda x: np.mean((x - 1.0) ** 2))

# linear algebra
case("dot", "dot", "x: f32[D], y: f32[D]", "f32", "dot(x, y)", [F(5), F(5)], np.dot)
case("dot-i32", "dot", "x: i32[4], y: i32[4]", "i32", "dot(x, y)", [I(4), I(4)], np.dot)
case("dot-mixed", "dot", "x: i32[4], y: f32[4]", "f32", "dot(x, y)", [I(4), F(4)],
     lambda x, y: np.dot(x.astype(np.float64), y))
case("outer", "outer", "x: f32[3], y: f32[4]", "f32[3, 4]", "outer(x, y)", [F(3), F(4)], np.outer)
# a solve's rounding (an LU of n^2 steps, n <= 4) is amplified by cond(a); a Cholesky factor's
# by sqrt(cond(a))
A4, B4 = spd(4), F(4)
case("solve-vector", "solve", "a: f32[N, N], b: f32[N]", "f32[N]", "solve(a, b)", [A4, B4],
     lambda a, b: np.linalg.solve(np.float64(a), b), ops=32 * np.linalg.cond(A4))
A3, B3 = spd(3), F(3, 2)
case("solve-matrix", "solve", "a: f32[3, 3], b: f32[3, 2]", "f32[3, 2]", "solve(a, b)",
     [A3, B3], lambda a, b: np.linalg.solve(np.float64(a), b), ops=32 * np.linalg.cond(A3))
A4 = spd(4)
case("cholesky", "cholesky", "a: f32[N, N]", "f32[N, N]", "cholesky(a)", [A4],
     lambda a: np.linalg.cholesky(np.float64(a)), ops=32 * np.sqrt(np.linalg.cond(A4)))

# ---- operators
case("add-broadcast", "add", "x: f32[3, 4], y: f32[4]", "f32[3, 4]", "x + y", [F(3, 4), F(4)],
     np.add)
case("add-i32", "add", "x: i32[5], y: i32[5]", "i32[5]", "x + y", [I(5), I(5)], np.add)
case("add-i32-float-literal", "add", "x: i32[5]", "f32[5]", "x + 0.5", [I(5)], lambda x: x + 0.5)
case("add-i32-f32", "add", "x: i32[5], y: f32[5]", "f32[5]", "x + y", [I(5), F(5)],
     lambda x, y: x + np.float64(y))
case("add-literals", "add", "x: f32", "i32", "1 + 2 * 3", [np.float32(0)], lambda x: np.int32(7))
case("sub", "sub", "x: f32[2, 1], y: f32[3]", "f32[2, 3]", "x - y", [F(2, 1), F(3)], np.subtract)
case("sub-literal-left", "sub", "x: i32[4]", "i32[4]", "10 - x", [I(4)], lambda x: 10 - x)
case("mul", "mul", "x: f32[B, 4], y: f32[B, 1]", "f32[B, 4]", "x * y", [F(3, 4), F(3, 1)],
     np.multiply)
case("mul-weak-int", "mul", "x: i32[4]", "i32[4]", "x * 2", [I(4)], lambda x: x * 2)
case("mul-weak-float", "mul", "x: f32[4]", "f32[4]", "2 * x", [F(4)], lambda x: 2 * x)
case("div", "div", "x: f32[3, 4], y: f32[4]", "f32[3, 4]", "x / y", [F(3, 4), F(4, lo=0.5, hi=2)],
     lambda x, y: np.float64(x) / y)
case("div-i32", "div", "x: i32[5], y: i32[5]", "f32[5]", "x / y", [I(5), I(5, lo=1, hi=4)],
     lambda x, y: x / y)
case("div-literal", "div", "x: i32[5]", "f32[5]", "x / 2", [I(5)], lambda x: x / 2)
case("pow", "pow", "x: f32[3, 4], y: f32[4]", "f32[3, 4]", "x ^ y",
     [F(3, 4, lo=0.5, hi=2), F(4, lo=-2, hi=2)], lambda x, y: np.float64(x) ** y)
case("pow-int-literal", "pow", "x: f32[4]", "f32[4]", "x ^ 3", [F(4)], lambda x: np.float64(x) ** 3)
case("pow-i32", "pow", "x: i32[4]", "i32[4]", "x ^ 2", [I(4)], lambda x: x ** 2)
case("pow-right-assoc", "pow", "x: f32[4]", "f32[4]", "x ^ 2.0 ^ 0.5 - -x ^ 2",
     [F(4, lo=0.5, hi=2)], lambda x: np.float64(x) ** (2.0 ** 0.5) + np.float64(x) ** 2)
case("precedence", ("add", "mul", "neg"), "x: f32[4]", "f32[4]", "-x * 2.0 + x / 4.0 - 1.0",
     [F(4)], lambda x: -x * 2 + x / 4 - 1)
case("neg", "neg", "x: f32[3, 4]", "f32[3, 4]", "-x", [F(3, 4)], np.negative)
case("neg-i32", "neg", "x: i32[4]", "i32[4]", "-(x)", [I(4)], np.negative)
case("neg-nested", "neg", "x: f32[4]", "f32[4]", "-(-(-x))", [F(4)], np.negative)
case("matmul-mat-mat", "matmul", "a: f32[B, D], b: f32[D, H]", "f32[B, H]", "a @ b",
     [F(3, 4), F(4, 2)], np.matmul)
case("matmul-mat-vec", "matmul", "a: f32[3, 4], b: f32[4]", "f32[3]", "a @ b", [F(3, 4), F(4)],
     np.matmul)
case("matmul-vec-mat", "matmul", "a: f32[3], b: f32[3, 4]", "f32[4]", "a @ b", [F(3), F(3, 4)],
     np.matmul)
case("matmul-vec-vec", "matmul", "a: f32[3], b: f32[3]", "f32", "a @ b", [F(3), F(3)], np.matmul)
case("matmul-batched", "matmul", "a: f32[2, 3, 4], b: f32[2, 4, 5]", "f32[2, 3, 5]", "a @ b",
     [F(2, 3, 4), F(2, 4, 5)], np.matmul)
case("matmul-broadcast-batch", "matmul", "a: f32[3, 4], b: f32[2, 4, 5]", "f32[2, 3, 5]", "a @ b",
     [F(3, 4), F(2, 4, 5)], np.matmul)
case("matmul-i32", "matmul", "a: i32[2, 3], b: i32[3]", "i32[2]", "a @ b", [I(2, 3), I(3)],
     np.matmul)
case("matmul-mixed", "matmul", "a: i32[2, 3], b: f32[3, 2]", "f32[2, 2]", "a @ b",
     [I(2, 3), F(3, 2)], lambda a, b: a @ np.float64(b))

for op, sym, ref in [("eq", "==", np.equal), ("ne", "!=", np.not_equal), ("lt", "<", np.less),
                     ("le", "<=", np.less_equal), ("gt", ">", np.greater),
                     ("ge", ">=", np.greater_equal)]:
    y = I(4)
    case(f"{op}-i32", op, "x: i32[3, 4], y: i32[4]", "bool[3, 4]", f"x {sym} y",
         [np.concatenate([y[None], I(2, 4)]), y], ref)  # first row equal to y: ties
    case(f"{op}-float-literal", op, "x: f32[5]", "bool[5]", f"x {sym} 0.25",
         [np.array([-1, 0.25, 0.5, 0.25, 2], np.float32)], lambda x, ref=ref: ref(x, 0.25))
case("eq-bool", "eq", "a: bool[4], b: bool[4]", "bool[4]", "a == b", [Bo(4), Bo(4)], np.equal)
case("and", "and", "a: bool[3, 4], b: bool[4]", "bool[3, 4]", "a and b", [Bo(3, 4), Bo(4)],
     np.logical_and)
case("or", "or", "a: bool[3, 4], b: bool[4]", "bool[3, 4]", "a or b", [Bo(3, 4), Bo(4)],
     np.logical_or)
case("not", "not", "a: bool[5]", "bool[5]", "not a", [Bo(5)], np.logical_not)
case("logic-precedence", ("not", "or", "and", "gt"), "x: f32[6], y: f32[6]", "bool[6]",
     "not x > 0.0 or x < y and y > 0.5", [F(6), F(6)],
     lambda x, y: ~(x > 0) | ((x < y) & (y > 0.5)))
case("logic-literal", ("and", "not"), "a: bool[3]", "bool[3]", "a and not false", [Bo(3)],
     lambda a: a)

# indexing and slicing
X34 = F(3, 4)
case("index-int", "index", "x: f32[3, 4]", "f32[4]", "x[1]", [X34], lambda x: x[1])
case("index-two-ints", "index", "x: f32[3, 4]", "f32", "x[2, 3]", [X34], lambda x: x[2, 3])
case("index-negative", "index", "x: f32[3, 4]", "f32", "x[-1, -2]", [X34], lambda x: x[-1, -2])
case("slice", "index", "x: f32[3, 4]", "f32[2, 2]", "x[1:, 1:3]", [X34], lambda x: x[1:, 1:3])
case("slice-step", "index", "x: f32[5, 4]", "f32[3, 2]", "x[::2, 1::2]", [F(5, 4)],
     lambda x: x[::2, 1::2])
case("slice-negative-bounds", "index", "x: f32[5]", "f32[3]", "x[-4:-1]", [F(5)],
     lambda x: x[-4:-1])
case("slice-symbolic", "index", "x: f32[B, 4]", "f32[N, 4]", "x[1:, :]", [F(5, 4)],
     lambda x: x[1:])
case("slice-symbolic-bounded", "index", "x: f32[B, 4]", "f32[N]", "x[1:3, 0]", [F(5, 4)],
     lambda x: x[1:3, 0])
case("slice-symbolic-both-ends", "index", "x: f32[B, D]", "f32[N, M]", "x[1:-2, :-1]", [F(6, 3)],
     lambda x: x[1:-2, :-1])
case("slice-finite-difference", ("index", "sub"), "x: f32[B]", "f32[N]", "x[1:] - x[:-1]", [F(6)],
     lambda x: np.diff(x))
case("slice-symbolic-step", "index", "x: f32[B]", "f32[N]", "x[::2]", [F(5)], lambda x: x[::2])
case("slice-then-int", "index", "x: f32[3, 4]", "f32[3]", "x[:, -1]", [X34], lambda x: x[:, -1])
case("index-chained", "index", "x: f32[2, 3, 4]", "f32[1]", "x[1][1:, 2][::2]", [F(2, 3, 4)],
     lambda x: x[1][1:, 2][::2])
case("index-fewer-than-rank", "index", "x: f32[2, 3, 4]", "f32[3, 4]", "x[0]", [F(2, 3, 4)],
     lambda x: x[0])
case("index-dynamic", "index", "x: f32[3, 4], i: i32", "f32[4]", "x[i]", [X34, np.int32(2)],
     lambda x, i: x[i])
case("index-dynamic-negative", "index", "x: f32[3, 4], i: i32", "f32[4]", "x[i]",
     [X34, np.int32(-1)], lambda x, i: x[i])
case("index-dynamic-mixed", "index", "x: f32[3, 4], i: i32", "f32[2]", "x[1:, i + 1]",
     [X34, np.int32(1)], lambda x, i: x[1:, i + 1])
case("index-dynamic-two", "index", "x: f32[3, 4], i: i32, j: i32", "f32", "x[i, j]",
     [X34, np.int32(2), np.int32(0)], lambda x, i, j: x[i, j])
case("index-i32-tensor", "index", "x: i32[6]", "i32[2]", "x[4:]", [I(6)], lambda x: x[4:])
# lookups: an integer tensor index, its shape in place of the axis
IDS = np.array([[0, 2, 2], [1, 0, 2]], np.int32)
case("lookup", "index", "t: f32[3, 4], ids: i32[B, T]", "f32[B, T, 4]", "t[ids]", [X34, IDS],
     lambda t, ids: t[ids])
case("lookup-after-slice", "index", "t: f32[3, 4], ids: i32[B, T]", "f32[2, B, T]",
     "t[1:, ids]", [X34, IDS], lambda t, ids: t[1:, ids])
case("lookup-negative", "index", "t: f32[3, 4], ids: i32[3]", "f32[3, 4]", "t[ids]",
     [X34, np.array([-1, 0, -3], np.int32)], lambda t, ids: t[ids])
case("lookup-i32-table", "index", "t: i32[6], ids: i32[2, 2]", "i32[2, 2]", "t[ids]",
     [I(6), np.array([[5, 0], [1, 1]], np.int32)], lambda t, ids: t[ids])

# if-then-else
for cond in (True, False):
    c = f"-{str(cond).lower()}"
    case(f"if-scalar{c}", "if", "x: f32[3], c: bool", "f32[3]", "if c then x * 2.0 else -x",
         [F(3), np.bool_(cond)], lambda x, c: x * 2 if c else -x)
    case(f"if-scalar-broadcast{c}", "if", "x: f32[B, 2], c: bool", "f32[B, 2]",
         "if c then 1.0 else x", [F(3, 2), np.bool_(cond)],
         lambda x, c: np.ones_like(x) if c else x)
    case(f"if-tuple{c}", ("if", "tuple"), "x: f32[3], c: bool", "(f32[3], i32)",
         "if c then (x, 1) else (x + 1.0, 2)", [F(3), np.bool_(cond)],
         lambda x, c: (x, 1) if c else (x + 1, 2))
    case(f"if-derived-dims{c}", "if", "x: f32[B], c: bool", "f32[N]",
         "if c then x[1:] else 0.0", [F(4), np.bool_(cond)],
         lambda x, c: x[1:] if c else np.zeros(3))
case("if-computed-cond", ("if", "gt"), "x: f32[4]", "f32", "if sum(x) > 0.0 then sum(x) else 0.0",
     [F(4)], lambda x: max(np.float64(x).sum(), 0.0))
case("if-tensor-cond", "if", "x: f32[3, 4], y: f32[4]", "f32[3, 4]", "if x > y then x else y",
     [F(3, 4), F(4)], lambda x, y: np.where(x > y, x, y))
case("if-tensor-cond-literals", "if", "x: f32[5]", "i32[5]", "if x > 0.0 then 1 else -1", [F(5)],
     lambda x: np.where(x > 0, 1, -1))
case("if-nested", "if", "x: f32", "f32",
     "if x > 1.0 then 2.0 else if x > 0.0 then x else 0.0", [np.float32(0.5)], lambda x: x)

# for loops
case("for", "for", "x: f32[3]", "f32[3]",
     "for i in range(4) carry (acc = x) { acc * 0.5 + f32(i) }", [F(3)],
     lambda x: np_loop(0, 4, np.float64(x), lambda i, a: a * 0.5 + i))
case("for-start-stop", "for", "x: f32[6]", "f32",
     "for i in range(2, 5) carry (acc = 0.0) { acc + x[i] }", [F(6)], lambda x: x[2:5].sum())
case("for-dim-bound", "for", "x: f32[B, 3]", "f32[3]",
     "for i in range(B) carry (acc = zeros([3])) { maximum(acc, x[i]) }", [F(4, 3)],
     lambda x: np.maximum(x.max(0), 0))
case("for-two-carries", ("for", "tuple"), "x: f32[4]", "(f32, i32)",
     "for i in range(1, 4) carry (s = 0.0, n = 0) { (s + x[i] * x[i], n + i) }", [F(4)],
     lambda x: ((x[1:] ** 2).sum(), 6))
case("for-body-lets", "for", "x: f32[3]", "f32[3]",
     "for k in range(3) carry (v = x) { let w = v * v; let u = w - v; u / 2.0 }", [F(3)],
     lambda x: np_loop(0, 3, np.float64(x), lambda k, v: (v * v - v) / 2))
case("for-zero-trips", "for", "x: f32", "f32", "for i in range(0) carry (a = x) { a * 3.0 }",
     [np.float32(1.5)], lambda x: x)
case("for-nested", "for", "x: f32[2, 3]", "f32",
     "for i in range(2) carry (a = 0.0) { for j in range(3) carry (b = a) { b + x[i, j] * f32(j) } }",
     [F(2, 3)], lambda x: (x * np.arange(3)).sum())

# casts
case("cast-f32-from-i32", "cast", "x: i32[4]", "f32[4]", "f32(x) / 3.0", [I(4)], lambda x: x / 3)
case("cast-i32-from-f32", "cast", "x: f32[6]", "i32[6]", "i32(x * 3.0)", [F(6)],
     lambda x: (x * np.float32(3)).astype(np.int32))
case("cast-f32-from-bool", "cast", "x: f32[5]", "f32", "sum(f32(x > 0.0))", [F(5)],
     lambda x: (x > 0).sum())
case("cast-i32-from-bool", "cast", "c: bool[5]", "i32[5]", "i32(c)", [Bo(5)],
     lambda c: c.astype(np.int32))
case("cast-bool-from-f32", "cast", "x: f32[5]", "bool[5]", "bool(x)",
     [np.array([0, 1.5, -2, 0, 1e-3], np.float32)], lambda x: x != 0)
case("cast-bool-from-i32", "cast", "x: i32[5]", "bool[5]", "bool(x)", [I(5, lo=-1, hi=2)],
     lambda x: x != 0)

# tuples and destructuring
case("tuple-return", "tuple", "x: f32[B, 2]", "(f32, f32[B, 2], i32)", "(sum(x), x * 2.0, B)",
     [F(3, 2)], lambda x: (x.sum(), x * 2, 3))
case("tuple-destructure", ("tuple", "get"), "x: f32[3], y: f32[3]", "f32[3]",
     "let (a, (b, c)) = (x, (y, 2.0)) return a * c - b", [F(3), F(3)],
     lambda x, y: x * 2 - y)
case("tuple-param", "get", "t: (f32[3], i32), s: f32", "f32[3]",
     "let (v, n) = t return v * f32(n) + s", [(F(3), np.int32(4)), np.float32(0.5)],
     lambda t, s: t[0] * 4 + 0.5)
case("tuple-nested-return", "tuple", "x: f32", "((f32, f32), bool)", "((x, -x), x > 0.0)",
     [np.float32(1.25)], lambda x: ((x, -x), True))

# structs
STRUCTS = """
struct P { w: f32[D, H], b: f32[H] }
struct Outer { p: P, scale: f32, count: i32 }
"""
case("struct-param", "getfield", "p: P, x: f32[B, D]", "f32[B, H]", "tanh(x @ p.w + p.b)",
     [{"w": F(3, 2), "b": F(2)}, F(4, 3)], lambda p, x: np.tanh(x @ np.float64(p["w"]) + p["b"]),
     prelude=STRUCTS)
case("struct-new", "struct_new", "w: f32[D, H], b: f32[H]", "P", "P(w=w * 2.0, b=b - 1.0)",
     [F(3, 2), F(2)], lambda w, b: {"w": w * 2, "b": b - 1}, prelude=STRUCTS)
case("struct-nested", ("struct_new", "getfield"), "q: Outer", "Outer",
     "Outer(p=P(b=q.p.b, w=q.p.w * q.scale), scale=q.scale + 1.0, count=q.count + 1)",
     [{"p": {"w": F(2, 2), "b": F(2)}, "scale": np.float32(3), "count": np.int32(4)}],
     lambda q: {"p": {"w": q["p"]["w"] * 3, "b": q["p"]["b"]}, "scale": 4.0, "count": 5},
     prelude=STRUCTS)

# user functions
FUNCS = """
fn sq(v: f32[N]) -> f32 { return sum(v * v) }
fn affine(x: f32[B, D], w: f32[D, H], b: f32[H]) -> f32[B, H] { return x @ w + b }
fn pair(x: f32[N]) -> (f32, f32[N]) { return (sum(x), -x) }
"""
case("call-generic", "call_fn", "x: f32[3], y: f32[5]", "f32", "sq(x) + sq(y)", [F(3), F(5)],
     lambda x, y: (x ** 2).sum() + (y ** 2).sum(), prelude=FUNCS)
case("call-keywords", "call_fn", "x: f32[2, 3], w: f32[3, 4], b: f32[4]", "f32[2, 4]",
     "affine(b=b, x=x, w=w)", [F(2, 3), F(3, 4), F(4)], lambda x, w, b: x @ np.float64(w) + b,
     prelude=FUNCS)
case("call-tuple-result", ("call_fn", "get"), "x: f32[4]", "f32[4]",
     "let (s, n) = pair(x) return n * s", [F(4)], lambda x: -x * x.sum(), prelude=FUNCS)
case("call-weak-literal-arg", "call_fn", "x: f32[2, 3], w: f32[3, 1]", "f32[2, 1]",
     "affine(x, w, ones([1]) * 0.5)", [F(2, 3), F(3, 1)], lambda x, w: x @ np.float64(w) + 0.5,
     prelude=FUNCS)

# dimensions as values
case("dim-as-f32", "dim", "x: f32[B, D]", "f32", "f32(B) * 10.0 + f32(D)", [F(3, 2)],
     lambda x: 32.0)
case("dim-arithmetic", "dim", "x: f32[B, D]", "i32", "B * D - 1", [F(4, 5)], lambda x: 19)
case("dim-mean", ("dim", "div"), "x: f32[B]", "f32", "sum(x) / f32(B)", [F(7)], np.mean)

# constants
case("const-kinds", "const", "x: f32", "(f32, i32, bool, bool)", "(1.5e1, 42, true, false)",
     [np.float32(0)], lambda x: (15.0, 42, True, False))

# keyword arguments for tensor operands of builtins
case("keywords-softmax", "softmax", "x: f32[2, 3]", "f32[2, 3]", "softmax(axis=0, x=x)",
     [F(2, 3)], lambda x: softmax(x, 0))


# ---- machinery


@cache
def compiled(source: str) -> gradlang.CompiledModule:
    return gradlang.compile_source(source, name="case.grad")


def _eval_dim(d, dims: Mapping[str, int]) -> int:
    """The size of a (possibly derived) dim: `B`, `B+C`, `B-1`, `4*B`, `B[1:3]`."""
    if isinstance(d, int):
        return d

    def ev(node):
        if isinstance(node, pyast.Expression):
            return ev(node.body)
        if isinstance(node, pyast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, pyast.Name):
            return dims[node.id]
        if isinstance(node, pyast.UnaryOp) and isinstance(node.op, pyast.USub):
            return -ev(node.operand)
        if isinstance(node, pyast.BinOp):
            a, b = ev(node.left), ev(node.right)
            ops = {pyast.Add: a + b, pyast.Sub: a - b, pyast.Mult: a * b}
            return ops[type(node.op)]
        if isinstance(node, pyast.Subscript) and isinstance(node.slice, pyast.Slice):
            s = node.slice
            bounds = [None if x is None else ev(x) for x in (s.lower, s.upper, s.step)]
            return len(range(ev(node.value))[slice(*bounds)])
        raise ValueError(f"cannot evaluate dim {d!r}")

    return ev(pyast.parse(d, mode="eval"))


def _bind(t: Type, value, dims: dict) -> None:
    if isinstance(t, TensorType):
        for d, n in zip(t.shape, np.shape(value)):
            if isinstance(d, str):
                assert dims.setdefault(d, n) == n
    elif isinstance(t, StructType):
        for name, f in t.fields:
            _bind(f, value[name], dims)
    elif isinstance(t, TupleType):
        for e, v in zip(t.elems, value):
            _bind(e, v, dims)


NP_DTYPES = {DType.F32: np.float32, DType.I32: np.int32, DType.BOOL: np.bool_}


def check_against(t: Type, out, expected, dims, ops, where="result") -> None:
    """`out` has the shape and dtype predicted by type `t` and the values of `expected`."""
    if isinstance(t, TupleType):
        assert isinstance(out, tuple) and len(out) == len(t.elems), where
        for i, (e, o, x) in enumerate(zip(t.elems, out, expected)):
            check_against(e, o, x, dims, ops, f"{where}[{i}]")
        return
    if isinstance(t, StructType):
        assert isinstance(out, dict) and set(out) == {n for n, _ in t.fields}, where
        for name, f in t.fields:
            check_against(f, out[name], expected[name], dims, ops, f"{where}.{name}")
        return
    assert isinstance(t, TensorType), (where, t)
    shape = tuple(_eval_dim(d, dims) for d in t.shape)
    out = np.asarray(out)
    assert out.shape == shape, f"{where}: typechecker predicted {t} = {shape}, got {out.shape}"
    assert out.dtype == NP_DTYPES[t.dtype], f"{where}: typechecker predicted {t}, got {out.dtype}"
    expected = np.asarray(expected)
    assert expected.shape == shape, f"{where}: reference has shape {expected.shape}"
    if t.dtype is DType.F32:
        assert_close(out, expected, ops, where=where)
    else:
        np.testing.assert_array_equal(out, expected, err_msg=where)


def ops_of(source: str) -> set[str]:
    fn = compiled(source).ir.function("f")
    return {op.name for op in walk(fn.body)}


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_case(c: Case):
    m = compiled(c.source)
    fn = m.ir.function("f")
    out = m.f(*c.args)
    dims: dict[str, int] = {}
    for p, a in zip(fn.params, c.args):
        _bind(p.value.type, a, dims)
    predicted = fn.body.results[0].type  # what the type checker inferred, not the declaration
    check_against(predicted, out, c.expect(*c.args), dims, c.ops)


def test_case_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_case_exercises_what_it_claims(c: Case):
    ops = ops_of(c.source)
    for name in c.tests:
        op = BUILTINS[name].op if name in BUILTINS else name
        assert op in ops, f"case '{c.id}' claims to test '{name}' but its IR has only {sorted(ops)}"


RANDOM = {"log_prob", "entropy", "kl"}
QUANTIZERS = {"quantize", "quest", "hadamard", "stochastic_round"}
"""Tested against NumPy references in tests/test_nonsmooth.py."""
"""Distribution builtins and ops: tested against closed forms in tests/test_random.py."""
RANDOM_OPS = {"dist", "sample", "log_prob", "entropy", "kl", "dist_mean", "expect", "samples",
              "surrogate"}
DRAWN = {"dropout"}
"""Builtins that draw a mask: tested statistically in tests/test_nn_builtins.py."""
MONTE_CARLO = {"sliced_wasserstein"}
"""Random estimates, tested for unbiasedness against NumPy in tests/test_ot.py."""
REWRITTEN = {"straight_through", "quantize", "quest", "hadamard", "stochastic_round", "argmin",
             "host_call", "call_jax", "inline", "checkpoint", "sampled_matmul", "sampled_einsum",
             "compose", "grad"}
"""Ops only passes create, the quantizers (tests/test_nonsmooth.py), argmin
(tests/test_bilevel.py), extern bodies (tests/test_blackbox.py), jax fn bodies
(tests/test_jax_functions.py), inlined calls
(tests/test_credit.py), checkpoint blocks (tests/test_checkpoint.py), sampled matmuls and
einsums (tests/test_sampled.py), compositions (tests/test_compose.py) and gradients in bodies
(tests/test_nested_grad.py)."""
TREES = {"sum_squares", "global_norm", "map_leaves"}
"""Builtins on parameter trees: tested against jax in tests/test_trees.py."""


def test_every_builtin_is_covered():
    covered = ({name for c in CASES for name in c.tests} | RANDOM | QUANTIZERS | MONTE_CARLO
               | TREES | DRAWN)
    missing = [name for name in BUILTINS if name not in covered]
    assert not missing, f"builtins without a test case: {missing}"


def test_every_op_is_covered():
    """Every IR op that survives resolution (builtins, operators, control flow, structure)."""
    internal = ({op for op, d in OPS.items() if "unresolved" in d.traits} | {"error"}
                | RANDOM_OPS | REWRITTEN | MONTE_CARLO | TREES | DRAWN)
    covered = {BUILTINS[n].op if n in BUILTINS else n for c in CASES for n in c.tests}
    missing = sorted(set(OPS) - internal - covered)
    assert not missing, f"ops without a test case: {missing}"


def test_builtins_reject_bad_inputs_at_compile_time():
    bad = {
        "sum(x, axis=2)": "axis 2 is out of range",
        "sum(x, axis=[1, -1])": "repeated axis",
        "reshape(x, [5, -1])": "cannot reshape",
        "transpose(x, axes=[0, 0])": "not a permutation",
        "concat([x, transpose(x)], axis=0)": "concat along axis 0",
        "x @ x": "contracted dimensions differ",
        "x + transpose(x)": "cannot broadcast",
        "softmax(x, axis=-3)": "out of range",
        "exp(x > 0.0)": "must be numeric",
        "not x": "'not' needs a bool operand",
        "x[3, 0]": "out of bounds",
        "x[0.5]": "an index must be i32, got f32",
        "sum(x, axis=n)": "must be an integer literal",
        "where(x, x, x)": "condition of where must be bool",
        "cholesky(x)": "square float matrix",
        "one_hot(x, 3)": "integer labels",
        "cross_entropy(x, x[0])": "labels must have",
        "zeros([2, 2])": "declared to return",
        "if x then 1.0 else 0.0": "condition of if must be bool",
    }
    for expr, message in bad.items():
        src = f"fn f(x: f32[2, 3], n: i32) -> f32 {{ return sum({expr}) }}\nexport f = f\n"
        if expr.startswith(("zeros", "if", "not")):
            src = f"fn f(x: f32[2, 3], n: i32) -> f32 {{ return {expr} }}\nexport f = f\n"
        with pytest.raises(gradlang.CompileError, match=message):
            gradlang.compile_source(src)


def test_derived_dims_of_different_sizes_do_not_match():
    # 2*(B+C) entries against 2*B+C entries: a compile-time error, not a failure inside JAX
    src = """
fn f(x: f32[B, 2], y: f32[C, 2]) -> f32[N] {
  return reshape(concat([x, y]), [-1]) + concat([reshape(x, [-1]), y[:, 0]])
}
export f = f
"""
    with pytest.raises(gradlang.CompileError, match=r"cannot broadcast shapes \[2\*\(B\+C\)\]"):
        gradlang.compile_source(src)


def test_a_flattened_symbolic_shape_reshapes_back_into_its_factors():
    """`reshape(x, [-1])` on f32[A, B] infers the dim `A*B`; reshaping it back into [A, B]
    (or [2, A] from `2*A`) is the same size, counted factor by factor. A different size is
    still refused."""
    m = gradlang.compile_source("""
fn f(x: f32[A, B]) -> f32[A, B] { return reshape(reshape(x, [-1]), [A, B]) }
fn g(x: f32[A, B, C]) -> f32[B, A, C] { return reshape(reshape(x, [A, -1]), [B, A, C]) }
fn h(x: f32[2, A]) -> f32[A, 2] { return reshape(reshape(x, [-1]), [A, 2]) }
export f = f
export g = g
export h = h
""")
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    np.testing.assert_array_equal(m.f(x[0]), x[0])  # a reshape moves no value: exact
    np.testing.assert_array_equal(m.g(x), x.reshape(3, 2, 4))
    np.testing.assert_array_equal(m.h(x[:, 0]), x[:, 0].reshape(4, 2))
    with pytest.raises(gradlang.CompileError, match=r"cannot reshape \[A\*B\] into \[A, A\]"):
        gradlang.compile_source("fn f(x: f32[A, B]) -> f32[A, A] "
                                "{ return reshape(reshape(x, [-1]), [A, A]) }\nexport f = f\n")
