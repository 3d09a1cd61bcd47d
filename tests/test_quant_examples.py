"""The quantization library (`std.quant`) and the quantized-training examples built on it.

- std.quant compiles strictly (no warnings): every function exported, and the gradient of
  every quantizer and layer (no rule-less non-smooth op on a gradient path);
- each quantizer's and each layer's forward value equals a NumPy reference; the backward rules
  (ReSTE on binary weights, ReSTE's staircase at b bits, QuEST's trust mask) match their
  formulas;
- training (small, fixed seed): the binary MLP with ReSTE beats a stated test accuracy, the
  4-bit QuEST MLP lands within a stated gap of its float32 twin;
- the examples (binary_mlp, qat_mlp) run end to end with a few steps and write their summary;
  with their default settings (marked slow) they reach the accuracies stated below.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradlang
from gradlang.runtime.quantizers import gaussian_clip
from stats import EPS32, assert_close

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
QUANT = ROOT / "stdlib" / "quant.grad"

SIGNATURE = re.compile(r"^fn (\w+)\((.*?)\) -> (.*?) \{", re.M)


def _functions() -> list[tuple[str, list[tuple[str, str]], str]]:
    """(name, [(param, type)], return type) of every function in stdlib/quant.grad."""
    out = []
    for name, params, ret in SIGNATURE.findall(QUANT.read_text()):
        ps = [tuple(s.strip() for s in p.split(":", 1)) for p in re.split(r",\s*(?![^\[]*\])", params)]
        out.append((name, ps, ret.strip()))
    return out


def _has_gradient(name: str) -> bool:
    """Quantizers and layers: every function but the stop_gradient-ed scales."""
    return not name.startswith("channel_")


def _wrapper_source() -> str:
    """Exports can only name functions of the exporting file: wrap each std.quant function as
    `f_<name>` (exported as `<name>`), and export the gradient of sum(f(...) * c) wrt its first
    argument as `d_<name>`."""
    lines = ["use std.quant"]
    for name, params, ret in _functions():
        decl = ", ".join(f"{p}: {t}" for p, t in params)
        call = f"{name}({', '.join(p for p, _ in params)})"
        lines.append(f"fn f_{name}({decl}) -> {ret} {{ return {call} }}")
        lines.append(f"export {name} = f_{name}")
        if _has_gradient(name):
            lines.append(f"fn g_{name}({decl}, c: {ret}) -> f32 {{ return sum({call} * c) }}")
            lines.append(f"export d_{name} = grad(g_{name}, wrt=[{params[0][0]}])")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def quant():
    return gradlang.compile_source(_wrapper_source(), name="quant_wrappers.grad", strict=True)


def test_std_quant_compiles_strictly_with_every_function_and_gradient(quant):
    names = [n for n, _, _ in _functions()]
    assert len(names) == len(re.findall(r"^fn ", QUANT.read_text(), re.M)) >= 50
    for n in names:
        assert n in quant.exports
        assert (f"d_{n}" in quant.exports) == _has_gradient(n)


# ---- NumPy references

RNG = np.random.default_rng(0)
W = (RNG.normal(size=(64, 16)) * 0.2).astype(np.float32)         # [I, O], I a power of two
X = RNG.uniform(-1.4, 1.4, size=(8, 64)).astype(np.float32)      # [B, I], some beyond +-1
BIAS = (0.1 * RNG.normal(size=16)).astype(np.float32)
C = RNG.normal(size=(8, 16)).astype(np.float32)                  # a cotangent for layer outputs


def sign1(x):
    return np.where(x >= 0, 1.0, -1.0)


def ref_binary_w(w):
    return sign1(w) * np.mean(np.abs(w), axis=0, keepdims=True)


def ref_ste_w(w, bits):
    if bits == 1:
        return ref_binary_w(w)
    n = 2 ** (bits - 1) - 1
    s = np.max(np.abs(w), axis=0, keepdims=True) / n
    return np.clip(np.round(w / s), -n, n) * s


def ref_ste_act(x, bits):
    x = np.clip(x, -1, 1)
    if bits == 1:
        return sign1(x)
    n = 2 ** (bits - 1) - 1
    return np.round(x * n) / n


def ref_reste_w(w, bits):  # the same grid, halves rounded up
    if bits == 1:
        return ref_binary_w(w)
    n = 2 ** (bits - 1) - 1
    s = np.max(np.abs(w), axis=0, keepdims=True) / n
    return np.floor(w / s + 0.5) * s


def ref_reste_act(x, bits):
    x = np.clip(x, -1, 1)
    if bits == 1:
        return sign1(x)
    n = 2 ** (bits - 1) - 1
    return np.floor(x * n + 0.5) / n


def hadamard_matrix(n: int) -> np.ndarray:
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def ref_quest_rows(x, bits):
    """QuEST on each row: rotate, 2^bits midrise levels on [-c sigma, c sigma], rotate back
    (c: the runtime's Gaussian MSE-optimal clip, checked against SciPy below)."""
    h = hadamard_matrix(x.shape[-1])
    y = x @ h.T
    sigma = np.sqrt(np.mean(y * y, -1, keepdims=True))
    c = gaussian_clip(bits) * sigma
    step = 2 * c / 2 ** bits
    q = np.clip((np.floor(y / step) + 0.5) * step, -c + step / 2, c - step / 2)
    return q @ h, np.abs(y - q) <= step / 2


def ref_quest_act(x, bits):
    return ref_quest_rows(x, bits)[0]


def ref_quest_w(w, bits):
    return ref_quest_rows(w.T, bits)[0].T


REF_W = {"ste": ref_ste_w, "reste": ref_reste_w, "quest": ref_quest_w}
REF_ACT = {"ste": ref_ste_act, "reste": ref_reste_act, "quest": ref_quest_act}
CELLS = [(r, b) for r in ("ste", "reste", "quest") for b in (1, 2, 4, 8)]


def _f64(a):
    return np.asarray(a, np.float64)


@pytest.mark.parametrize("rule, bits", CELLS, ids=[f"{r}{b}" for r, b in CELLS])
def test_quantizers_and_layers_match_numpy(quant, rule, bits):
    w, x = _f64(W), _f64(X)
    layer = {"w": W, "b": BIAS}
    name = f"{rule}{bits}"
    qw, qa = REF_W[rule](w, bits), REF_ACT[rule](x, bits)
    # against float64: a channel's scale (a 64-term mean or a max), x / s, round, * s; QuEST
    # rotates there and back (64-term products) and takes the rows' rms (64 terms); no entry
    # sits within rounding of a rounding boundary. The layer adds a 64-term product.
    ops = 3 * 64 + 8 if rule == "quest" else 64 + 8
    assert_close(getattr(quant, f"{name}_w")(W), qw, ops=ops)
    assert_close(getattr(quant, f"{name}_act")(X), qa, ops=ops)
    assert_close(getattr(quant, f"{name}_dense")(layer, X), qa @ qw + BIAS, ops=2 * ops + 64 + 1)
    levels = len(np.unique(np.round(_f64(getattr(quant, f"{name}_w")(W))[:, 0], 6)))
    if rule != "quest":  # QuEST's grid lives in the rotated basis
        assert levels <= max(2, 2 ** bits - 1)


def test_named_layers_match_numpy(quant):
    layer, w, x = {"w": W, "b": BIAS}, _f64(W), _f64(X)
    expected = {
        "binary_dense": x @ ref_binary_w(w) + BIAS,
        "binary_dense_reste": x @ ref_binary_w(w) + BIAS,
        "xnor_dense": sign1(x) @ ref_binary_w(w) + BIAS,
        "xnor_dense_reste": sign1(x) @ ref_binary_w(w) + BIAS,
        "q2_dense": ref_ste_act(x, 2) @ ref_ste_w(w, 2) + BIAS,
        "q4_dense": ref_ste_act(x, 4) @ ref_ste_w(w, 4) + BIAS,
        "q8_dense": ref_ste_act(x, 8) @ ref_ste_w(w, 8) + BIAS,
        "float_dense": x @ w + BIAS,
    }
    for name, value in expected.items():  # as in test_quantizers_and_layers_match_numpy
        assert_close(getattr(quant, name)(layer, X), value, ops=2 * (64 + 8) + 64 + 1, where=name)
    np.testing.assert_array_equal(quant.hardtanh(X), np.clip(x, -1, 1))  # a clip is exact
    np.testing.assert_array_equal(np.unique(quant.binary_act_reste(X)), [-1.0, 1.0])


KERNEL = (RNG.normal(size=(4, 4, 4, 16)) * 0.2).astype(np.float32)  # 64 weights a channel
HEADS_IN = (RNG.normal(size=(64, 2, 8)) * 0.2).astype(np.float32)    # [D, N, K]
HEADS_OUT = (RNG.normal(size=(2, 32, 16)) * 0.2).astype(np.float32)  # [N, K, D], N K = 64


@pytest.mark.parametrize("name, value, ref", [
    ("binary_kernel_ste", KERNEL, lambda w: ref_binary_w(w)),
    ("ste4_kernel", KERNEL, lambda w: ref_ste_w(w, 4)),
    ("ste8_kernel", KERNEL, lambda w: ref_ste_w(w, 8)),
    ("quest4_kernel", KERNEL, lambda w: ref_quest_w(w, 4)),
    ("quest8_kernel", KERNEL, lambda w: ref_quest_w(w, 8)),
    ("ste4_heads_in", HEADS_IN, lambda w: ref_ste_w(w, 4)),
    ("ste8_heads_in", HEADS_IN, lambda w: ref_ste_w(w, 8)),
    ("quest4_heads_in", HEADS_IN, lambda w: ref_quest_w(w, 4)),
    ("ste4_heads_out", HEADS_OUT, lambda w: ref_ste_w(w, 4)),
    ("ste8_heads_out", HEADS_OUT, lambda w: ref_ste_w(w, 8)),
    ("quest4_heads_out", HEADS_OUT, lambda w: ref_quest_w(w, 4)),
])
def test_kernel_and_projection_quantizers_are_per_output_channel(quant, name, value, ref):
    """A conv kernel [KH, KW, C, O] is the weight matrix [KH KW C, O] quantized per column;
    input projections [D, N, K] the matrix [D, N K]; output projections [N, K, D] the matrix
    [N K, D] (the NumPy weight references on that matrix)."""
    outputs = value.shape[-1] if name.endswith(("kernel", "out")) else value.shape[1] * value.shape[2]
    matrix = _f64(value).reshape(-1, outputs)
    ops = 3 * 64 + 8 if "quest" in name else 64 + 8  # as test_quantizers_and_layers_match_numpy
    assert_close(getattr(quant, name)(value), ref(matrix).reshape(value.shape), ops=ops)


def reste_slope(u):
    return np.minimum(np.abs(u) ** (-2 / 3) / 3, 10.0) * (np.abs(u) <= 1)


def test_binary_weights_reste_backward(quant):
    c = RNG.normal(size=W.shape).astype(np.float32)
    alpha = np.mean(np.abs(_f64(W)), axis=0, keepdims=True)  # the scale carries no gradient
    # a 64-term mean, a power (8 roundings), the products
    assert_close(quant.d_binary_w_reste(W, c)["w"], c * alpha * reste_slope(_f64(W)), ops=64 + 12)
    assert_close(quant.d_binary_w_ste(W, c)["w"], c * alpha * (np.abs(W) <= 1), ops=64 + 2)


def reste_slope_rounding(u, z):
    """How far reste_slope(u) can move, in eps32, when u = 2 (z - floor(z)) - 1 is computed in
    float32: z rounds ~4 times (z = w / s, s = max / 7), so u moves by 8 eps32 |z|, and the slope
    by |d slope / du| = (2/9) |u|^(-5/3) times that below its cap (flat at the cap; a floor that
    flips at a level moves u between -1 and 1, where the slope is the same); plus the slope's own
    16 roundings (a power, the cap, the mask)."""
    capped = np.abs(u) ** (-2 / 3) / 3 >= 10
    return np.where(capped, 0.0, 2 / 9 * np.abs(u) ** (-5 / 3)) * 8 * np.abs(z) + 16 * reste_slope(u)


def test_multibit_reste_backward_is_the_reste_kernel_at_each_threshold(quant):
    c = RNG.normal(size=W.shape).astype(np.float32)
    z = _f64(W) / (np.max(np.abs(_f64(W)), axis=0, keepdims=True) / 7)
    u = 2 * (z - np.floor(z)) - 1  # -1 at a level, 0 at the threshold between two levels
    assert_close(quant.d_reste4_w(W, c)["w"], c * reste_slope(u), ops=1,
                 scale=np.abs(c) * reste_slope_rounding(u, z))
    # activations: the hardtanh clip cuts the gradient beyond +-1
    ca = RNG.normal(size=X.shape).astype(np.float32)
    za = np.clip(_f64(X), -1, 1) * 7
    ua = 2 * (za - np.floor(za)) - 1
    assert_close(quant.d_reste4_act(X, ca)["x"], ca * reste_slope(ua) * (np.abs(X) < 1), ops=1,
                 scale=np.abs(ca) * reste_slope_rounding(ua, za))


def test_quest_trust_backward_masks_in_the_rotated_basis(quant):
    ca = RNG.normal(size=X.shape).astype(np.float32)
    h = hadamard_matrix(64)
    _, trusted = ref_quest_rows(_f64(X), 4)
    # the rotation there and back (64-term products) of the cotangent, against float64
    assert_close(quant.d_quest4_act(X, ca)["x"], ((ca @ h.T) * trusted) @ h, ops=2 * 64 + 8)


def test_quest_clip_constants_are_gaussian_mse_optimal():
    """The grids std.quant documents: c minimizes E[(y - Q(y))^2], y ~ N(0, 1), computed in
    closed form per cell with SciPy (the runtime finds c numerically on a grid)."""
    stats = pytest.importorskip("scipy.stats")
    optimize = pytest.importorskip("scipy.optimize")

    def mse(c, levels):
        step = 2 * c / levels
        edges = np.concatenate([[-np.inf], -c + step * np.arange(1, levels), [np.inf]])
        lv = -c + step * (np.arange(levels) + 0.5)
        a, b = edges[:-1], edges[1:]
        pa, pb = stats.norm.pdf(a), stats.norm.pdf(b)
        aa, bb = np.nan_to_num(a, posinf=0, neginf=0), np.nan_to_num(b, posinf=0, neginf=0)
        p = stats.norm.cdf(b) - stats.norm.cdf(a)
        return float(np.sum(p + aa * pa - bb * pb - 2 * lv * (pa - pb) + lv * lv * p))

    for bits in (1, 2, 4, 8):
        best = optimize.minimize_scalar(lambda c: mse(c, 2 ** bits), bounds=(0.1, 8.0),
                                        method="bounded", options={"xatol": 1e-10}).x
        # the runtime's MSE is a sum on a grid of spacing h = 1e-3 whose points cross the level
        # edges as c moves: its minimizer is off by up to about h / 2
        assert gaussian_clip(bits) == pytest.approx(best, abs=0.5e-3), bits
    # one bit: the edge sits at 0 whatever c, the MSE is 1 - c E|y| + c^2 / 4, and the grid's sum
    # for E|y| is off by O(h^2) = 1e-6 relative
    assert gaussian_clip(1) / 2 == pytest.approx(np.sqrt(2 / np.pi), rel=1e-6)


# ---- training (small, fixed seed)

def _train(m, variant: str, hidden: int, steps: int, seed: int = 0, lr: float = 1e-2) -> float:
    """Adam on `step_<variant>` for `steps` minibatches of 128 (one jitted scan); returns the
    test accuracy from `accuracy_<variant>`."""
    import optax

    from binary_mlp import init_params, load_digits_01

    x_train, x_test, y_train, y_test = (jnp.asarray(a) for a in load_digits_01(0))
    step = getattr(m, f"step_{variant}")
    opt = optax.adam(optax.cosine_decay_schedule(lr, steps, 0.01))

    @jax.jit
    def run(params, key):
        def body(carry, k):
            p, s = carry
            idx = jax.random.choice(k, len(x_train), (128,), replace=False)
            _, grads = step(p, x_train[idx], y_train[idx])
            updates, s = opt.update(grads["p"], s, p)
            return (optax.apply_updates(p, updates), s), None
        return jax.lax.scan(body, (params, opt.init(params)), jax.random.split(key, steps))[0][0]

    params = run(jax.tree.map(jnp.asarray, init_params(64, hidden, 10, seed)), jax.random.key(seed))
    return float(getattr(m, f"accuracy_{variant}")(params, x_test, y_test))


def test_binary_mlp_with_reste_learns_digits(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    m = gradlang.compile_file(EXAMPLES / "binary_mlp.grad", strict=True)
    # Measured 0.972 (H=128, 300 steps, seed 0); chance is 0.10.
    assert _train(m, "reste", hidden=128, steps=300) >= 0.94


def test_quest_4bit_mlp_is_within_a_stated_gap_of_float32(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    m = gradlang.compile_file(EXAMPLES / "qat_mlp.grad", strict=True)
    float_acc = _train(m, "float", hidden=64, steps=300)
    q4_acc = _train(m, "q4", hidden=64, steps=300)
    # Measured: float32 0.978, QuEST 4-bit 0.978 (H=64, 300 steps, seed 0).
    assert float_acc >= 0.94
    assert q4_acc >= float_acc - 0.03, (q4_acc, float_acc)


# ---- the examples

KEYS = {
    "binary_mlp": {"test_accuracy_ste", "test_accuracy_reste", "test_accuracy_float32", "results",
                   "deployment_check", "steps", "plot"},
    "qat_mlp": {"test_accuracy_float32", "test_accuracy_q4", "test_accuracy_q1",
                "test_accuracy_q4_input_quantized", "results", "q4_weight_levels_per_channel",
                "steps", "plot"},
}


def _run(name, args, run_example) -> dict:
    summary, written = run_example(name, args, KEYS[name])
    return summary


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) for n in KEYS])
# the default suite's time; fast twins: the QuEST accuracy test above, tests/test_nonsmooth.py
def test_example_runs_with_a_few_steps(name, run_example):
    """qat_mlp's few steps are slow (40 s on 2 cores: five QuEST variants to compile); its
    fast twins are test_quest_4bit_mlp_is_within_a_stated_gap_of_float32 (the same export,
    float32 and 4-bit) and binary_mlp's run here (the same driver, train_variants)."""
    s = _run(name, ["--steps", "20", "--eval-every", "10", "--hidden", "64"], run_example)
    if name == "binary_mlp":
        d = s["deployment_check"]
        assert d["max_distinct_weights_per_channel"] == 2 and d["hidden_values"] == [-1.0, 1.0]
        # the same count of correct predictions (prediction_agreement), over the same n
        assert d["numpy_test_accuracy"] == pytest.approx(d["compiled_test_accuracy"], abs=EPS32)
        assert d["prediction_agreement"] == 1.0
    else:
        assert max(s["q4_weight_levels_per_channel"].values()) <= 16


@pytest.mark.slow
@pytest.mark.parametrize("name", list(KEYS))
def test_example_learns_with_default_settings(name, run_example):
    s = _run(name, [], run_example)
    if name == "binary_mlp":
        # Measured (seed 0): float32 0.983, STE 0.978, ReSTE 0.981.
        assert s["test_accuracy_float32"] >= 0.96
        assert s["test_accuracy_reste"] >= 0.955 and s["test_accuracy_ste"] >= 0.955
    else:
        # Measured (seed 0): float32 0.978, 4-bit 0.972, 1-bit 0.961, 4-bit with input 0.967.
        f = s["test_accuracy_float32"]
        assert f >= 0.96
        assert s["test_accuracy_q4"] >= f - 0.02
        assert s["test_accuracy_q1"] >= 0.93
        assert s["test_accuracy_q4_input_quantized"] >= f - 0.03
