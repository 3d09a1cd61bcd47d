"""`jax fn` declarations: JAX functions bound from Python and traced inline into exports.

Gradients through them match `jax.grad` of the same Python code; draws through them get
pathwise and score-function estimators; forward mode, `jax.vmap` and `jax.jit` of the exports
go through them; an artifact runs in a fresh process without the function; every bad binding
is a clear error."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradlang
from gradlang.cli import main
from gradlang.explain import explain
from gradlang.runtime.jax_functions import JaxFunctionError
from stats import assert_close, assert_unbiased, estimates

B, D, H, C = 32, 8, 16, 4
RNG = np.random.default_rng(0)
X = RNG.normal(size=(B, D)).astype(np.float32)
Y = RNG.integers(0, C, size=B).astype(np.int32)
PARAMS = {"w1": (RNG.normal(size=(D, H)) / np.sqrt(D)).astype(np.float32),
          "b1": (0.1 * RNG.normal(size=H)).astype(np.float32),
          "w2": (RNG.normal(size=(H, C)) / np.sqrt(H)).astype(np.float32),
          "b2": (0.1 * RNG.normal(size=C)).astype(np.float32)}


def mlp(p, x):
    """A two-layer MLP in plain JAX (the binding)."""
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def cross_entropy(logits, y):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


MLP = """
struct Mlp { w1: f32[D, H], b1: f32[H], w2: f32[H, C], b2: f32[C] }
jax fn mlp(p: Mlp, x: f32[B, D]) -> f32[B, C]

fn loss(p: Mlp, x: f32[B, D], y: i32[B]) -> f32 {
  return cross_entropy(mlp(p, x), y) + 0.01 * sum(p.w1 * p.w1)
}
export value = loss
export step = value_and_grad(loss, wrt=[p])
"""


def reference_loss(p, x, y):
    return cross_entropy(mlp(p, x), y) + 0.01 * jnp.sum(p["w1"] * p["w1"])


# Both sides are float32 and compute the same algebra in a different order. One side's error
# per entry: the forward pass's sums over D, H and C terms and three transcendentals (tanh,
# exp, log: 4 each), the backward pass's sums over C and H, and the weight gradients' sum over
# the batch (B terms): D + 2H + 2C + B + 12 roundings; doubled for the two sides.
OPS = 2 * (D + 2 * H + 2 * C + B + 12)


@pytest.fixture(scope="module")
def compiled():
    return gradlang.compile_source(MLP, "mlp.grad", functions={"mlp": mlp})


def test_the_gradient_through_a_jax_function_is_jax_grad_of_the_same_code(compiled):
    value, grads = compiled.step(PARAMS, X, Y)
    want_value, want_grads = jax.value_and_grad(reference_loss)(PARAMS, X, Y)
    assert_close(value, want_value, ops=OPS)
    assert_close(grads["p"], want_grads, ops=OPS)


def test_a_flax_layer_with_its_params_as_separate_arrays():
    flax = pytest.importorskip("flax")
    model = flax.linen.Dense(C)
    params = model.init(jax.random.key(0), X)["params"]

    def dense(kernel, bias, x):
        return model.apply({"params": {"kernel": kernel, "bias": bias}}, x)

    m = gradlang.compile_source("""
jax fn dense(kernel: f32[D, C], bias: f32[C], x: f32[B, D]) -> f32[B, C]
fn loss(kernel: f32[D, C], bias: f32[C], x: f32[B, D], y: i32[B]) -> f32 {
  return cross_entropy(dense(kernel, bias, x), y)
}
export g = grad(loss, wrt=[kernel, bias])
""", functions={"dense": dense})
    got = m.g(params["kernel"], params["bias"], X, Y)
    want = jax.grad(lambda p: cross_entropy(model.apply({"params": p}, X), Y))(params)
    # one side: the sum over D, log-softmax over C (a sum and 2 transcendentals) and its
    # backward sum over C, then the kernel's sum over the batch; doubled for the two sides
    ops = 2 * (D + 2 * C + 8 + B)
    assert_close(got, {"kernel": want["kernel"], "bias": want["bias"]}, ops=ops)


DRAWS = """
jax fn policy(w: f32[D, K], x: f32[D]) -> f32[K]
fn scored(w: f32[D, K], x: f32[D], r: f32[K]) -> f32 {
  a ~ Categorical(logits = policy(w, x)) with score(baseline=none)
  return sum(one_hot(a, K) * r)
}
fn reparam(w: f32[D, K], x: f32[D]) -> f32 {
  z ~ Normal(policy(w, x), 1.0)
  return sum(z * z)
}
export g_score = grad(expect(scored, samples=1), wrt=[w])
export g_reparam = grad(expect(reparam, samples=1), wrt=[w])
"""
K = 3
W = (RNG.normal(size=(D, K)) / np.sqrt(D)).astype(np.float32)
XD = RNG.normal(size=D).astype(np.float32)
R = np.array([1.0, -0.5, 2.0], np.float32)


def policy(w, x):
    return jnp.tanh(x @ w) * 2


def test_draws_through_a_jax_function_get_unbiased_estimators():
    """E[r_a] = softmax(policy) . r and E[sum z^2] = sum(policy^2) + K: the score-function and
    the pathwise (chosen automatically: the JAX function is differentiable) estimates average
    to jax.grad of those closed forms."""
    m = gradlang.compile_source(DRAWS, functions={"policy": policy})
    chosen = {s.site: s.estimator.name for s in m.ir.facts.estimators}
    assert chosen == {"a": "score", "z": "reparam"}
    exact_score = jax.grad(lambda w: jax.nn.softmax(policy(w, XD)) @ R)(W)
    exact_reparam = jax.grad(lambda w: jnp.sum(policy(w, XD) ** 2))(W)
    assert_unbiased(estimates(m.g_score, (W, XD, R))["w"].reshape(-1, D * K), exact_score.ravel())
    assert_unbiased(estimates(m.g_reparam, (W, XD))["w"].reshape(-1, D * K), exact_reparam.ravel())


def test_forward_mode_vmap_and_jit_go_through_the_function(compiled):
    tangent = jax.tree.map(np.ones_like, PARAMS)
    value, slope = jax.jvp(lambda p: compiled.value(p, X, Y), (PARAMS,), (tangent,))
    want_value, want_slope = jax.jvp(lambda p: reference_loss(p, X, Y), (PARAMS,), (tangent,))
    assert_close(value, want_value, ops=OPS)
    # the directional derivative sums the D * H + H + H * C + C gradient entries it contracts
    assert_close(slope, want_slope, ops=OPS + D * H + H + H * C + C)
    stacked = jax.tree.map(lambda a: np.stack([a, 2 * a]), PARAMS)
    values = jax.vmap(compiled.value, in_axes=(0, None, None))(stacked, X, Y)
    for i in range(2):
        one = jax.tree.map(lambda a: a[i], stacked)
        assert_close(values[i], reference_loss(one, X, Y), ops=OPS)
    jitted = jax.jit(compiled.step)(PARAMS, X, Y)
    assert_close(jitted, compiled.step(PARAMS, X, Y), ops=OPS)


def test_explain_lists_the_jax_functions_called(compiled):
    text = explain(compiled.ir)
    assert ("  JAX functions called: mlp (traced inline, differentiated by JAX; gradflow could "
            "not analyse them: each call's result is taken to depend on all its arguments, "
            "differentiably)") in text.splitlines()


CHILD = """
import json, sys
import numpy as np
import gradlang
m = gradlang.load(sys.argv[1])
with np.load(sys.argv[2]) as f:
    p = {k: f[k] for k in ("w1", "b1", "w2", "b2")}
    x, y = f["x"], f["y"]
value, grads = m.step(p, x, y)
np.savez(sys.argv[3], value=value, **{k: np.asarray(v) for k, v in grads["p"].items()})
print(json.dumps(m.header["jax_functions"]))
"""


def test_an_artifact_runs_in_a_fresh_process_without_the_function(compiled, tmp_path):
    path = compiled.save(tmp_path / "mlp.gx")
    np.savez(tmp_path / "in.npz", x=X, y=Y, **PARAMS)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), str(tmp_path / "in.npz"),
                           str(tmp_path / "out.npz")], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == ["mlp"]
    value, grads = compiled.step(PARAMS, X, Y)
    with np.load(tmp_path / "out.npz") as out:
        np.testing.assert_array_equal(out["value"], value)
        for k in PARAMS:
            np.testing.assert_array_equal(out[k], grads["p"][k])


# ---- bad bindings

STATIC = """
jax fn net(w: f32[3, 4], x: f32[2, 3]) -> f32[2, 4]
fn f(w: f32[3, 4], x: f32[2, 3]) -> f32 { return sum(net(w, x)) }
export g = grad(f, wrt=[w])
"""
DECLARATION = "jax fn net(w: f32[3, 4], x: f32[2, 3]) -> f32[2, 4]"
HEAD = "net.grad:2:1: error: "
LINE = f"\n  {DECLARATION}\n  " + "^" * len(DECLARATION)  # the declaration
RESULT = f"\n  {DECLARATION}\n  " + " " * 42 + "^" * 9  # its result type, column 43


def bind_error(functions, externs=None) -> str:
    with pytest.raises(gradlang.CompileError) as info:
        gradlang.compile_source(STATIC, "net.grad", functions=functions, externs=externs)
    return str(info.value)


def boom(w, x):
    raise ValueError("boom\nsecond line")


@pytest.mark.parametrize("functions, message", [
    ({}, HEAD + "jax fn 'net' is not bound: pass functions={'net': fn} to "
     "gradlang.compile_file / compile_source" + LINE),
    ({"net": 3}, HEAD + "functions['net'] is not callable (got int)" + LINE),
    ({"net": lambda w, x: x}, "net.grad:2:43: error: jax fn 'net' returns f32[2, 3], "
     "declared f32[2, 4]" + RESULT),
    ({"net": lambda w, x: jnp.int32(x @ w)}, "net.grad:2:43: error: jax fn 'net' returns "
     "i32[2, 4], declared f32[2, 4]" + RESULT),
    ({"net": lambda w, x: (x @ w, x)}, "net.grad:2:43: error: jax fn 'net' returns "
     "(f32[2, 4], f32[2, 3]), declared f32[2, 4]" + RESULT),
    ({"net": boom}, HEAD + "jax fn 'net' failed to trace on its declared argument types (w: "
     "f32[3, 4], x: f32[2, 3]): ValueError: boom" + LINE),
    ({"net": lambda w, x: w @ x}, HEAD + "jax fn 'net' failed to trace on its declared "
     "argument types (w: f32[3, 4], x: f32[2, 3]): TypeError: dot_general requires contracting "
     "dimensions to have the same shape, got (4,) and (2,)." + LINE),
])
def test_a_bad_binding_is_an_error_at_the_declaration(functions, message):
    assert bind_error(functions) == message


STRUCT = """
struct Out { a: f32[2], s: f32 }
jax fn stats(x: f32[2, 3]) -> Out
fn f(x: f32[2, 3]) -> f32 {
  let o = stats(x)
  return sum(o.a) * o.s
}
export g = grad(f, wrt=[x])
"""


def test_a_struct_result_is_a_dict_with_its_fields():
    def stats(x):
        return {"s": jnp.max(x), "a": jnp.sum(x * x, 1)}

    x = np.arange(6, dtype=np.float32).reshape(2, 3) / 6
    got = gradlang.compile_source(STRUCT, functions={"stats": stats}).g(x)["x"]
    want = jax.grad(lambda x: jnp.sum(stats(x)["a"]) * stats(x)["s"])(x)
    assert_close(got, want, ops=2 * 8)  # a sum of 6 squares, a product, a max: 8 per side
    pair = collections.namedtuple("Pair", "a s")
    with pytest.raises(gradlang.CompileError) as info:
        gradlang.compile_source(STRUCT, "stats.grad",
                                functions={"stats": lambda x: pair(jnp.sum(x, 1), jnp.max(x))})
    assert str(info.value) == (
        "stats.grad:3:31: error: jax fn 'stats' returns (f32[2], f32), declared Out (a dict "
        "{a: f32[2], s: f32})\n  jax fn stats(x: f32[2, 3]) -> Out\n" + " " * 32 + "^^^")


def test_bindings_for_names_the_file_does_not_declare_are_refused():
    net = {"net": lambda w, x: x @ w}
    assert bind_error({**net, "nett": np.sin}) == (
        "gradlang: error: functions={'nett': ...}: unknown jax fn 'nett'; did you mean 'net'?")
    assert bind_error({**net, "other": np.sin}) == (
        "gradlang: error: functions={'other': ...}: unknown jax fn 'other' (jax fns: net)")
    assert bind_error({}, externs={"net": np.sin}) == (
        "gradlang: error: externs={'net': ...}: 'net' is a jax fn, traced inline: bind it with "
        "functions={'net': fn}\n" + HEAD + "jax fn 'net' is not bound: pass functions={'net': "
        "fn} to gradlang.compile_file / compile_source" + LINE)
    with pytest.raises(gradlang.CompileError) as info:
        gradlang.compile_source("extern fn sim(x: f32) -> f32\n", functions={"sim": np.sin})
    assert str(info.value) == ("gradlang: error: functions={'sim': ...}: 'sim' is an extern fn, "
                               "called through a host callback: bind it with externs={'sim': fn}")


def test_with_symbolic_dims_the_check_is_at_the_call():
    def wrong(p, x):  # drops the last layer: [B, H] where [B, C] is declared
        return jnp.tanh(x @ p["w1"] + p["b1"])

    m = gradlang.compile_source(MLP, "mlp.grad", functions={"mlp": wrong})
    with pytest.raises(gradlang.ArgumentError) as info:
        m.value(PARAMS, X, Y)
    assert isinstance(info.value, JaxFunctionError)
    assert str(info.value) == ("jax fn 'mlp' returns f32[32, 16], declared f32[B, C], i.e. "
                               "f32[32, 4] for these arguments")

    def failing(p, x):
        return x @ p["w2"]

    m = gradlang.compile_source(MLP, "mlp.grad", functions={"mlp": failing})
    with pytest.raises(JaxFunctionError) as info:
        m.value(PARAMS, X, Y)
    assert str(info.value) == (
        "jax fn 'mlp' failed to trace on arguments ({w1: f32[8, 16], b1: f32[16], w2: f32[16, 4], "
        "b2: f32[4]}, f32[32, 8]): TypeError: dot_general requires contracting dimensions "
        "to have the same shape, got (8,) and (16,).")


def test_the_command_line_says_how_to_bind_and_binds_with_functions(tmp_path, monkeypatch,
                                                                     capsys):
    (tmp_path / "net.grad").write_text(STATIC)
    (tmp_path / "jax_fn_models.py").write_text("import jax.numpy as jnp\n"
                                               "FUNCTIONS = {'net': lambda w, x: jnp.tanh(x @ w)}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setitem(sys.modules, "jax_fn_models", None)  # so that teardown removes it...
    del sys.modules["jax_fn_models"]  # ...once --functions has imported it
    assert main(["compile", "net.grad", "-o", "out"]) == 1
    assert capsys.readouterr().err == (
        HEAD + "jax fn 'net' needs a JAX function from Python, which gradlang compile cannot "
        "bind: pass --functions MODULE:ATTR (a dict of functions by name), or compile from "
        "Python: gradlang.compile_file(path, functions={'net': fn}).save(...)" + LINE + "\n")
    assert main(["compile", "net.grad", "-o", "out", "--functions", "jax_fn_models:MISSING"]) == 2
    assert capsys.readouterr().err == ("gradlang: error: --functions jax_fn_models:MISSING: "
                                       "jax_fn_models.MISSING must be a dict of JAX functions by jax fn "
                                       "name, got nothing\n")
    assert main(["compile", "net.grad", "-o", "out", "--functions", "jax_fn_models:FUNCTIONS"]) == 0
    loaded = gradlang.load(tmp_path / "out" / "net.gx")
    w, x = np.ones((3, 4), np.float32), np.ones((2, 3), np.float32)
    # each entry: 1 - tanh(3)^2 summed over the 2 rows (tanh and its square: 4 + 2 roundings)
    assert_close(loaded.g(w, x)["w"], jax.grad(lambda w: jnp.sum(jnp.tanh(x @ w)))(w), ops=12)


def test_the_example_trains_a_jax_model_and_its_artifact_runs_alone(tmp_path):
    """examples/jax_model/classifier.py, shortened: it checks itself that the artifact (loaded
    without the function) gives the compiled module's accuracy, and exits non-zero if not."""
    script = Path(__file__).parent.parent / "examples" / "jax_model" / "classifier.py"
    proc = subprocess.run([sys.executable, str(script), "--steps", "100", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "jax_model.json").read_text())
    assert summary["artifact_jax_functions"] == ["mlp"]
    assert summary["artifact_test_accuracy"] == summary["test_accuracy"] > 1 / 3  # above chance
    assert (tmp_path / "jax_model_loss.png").is_file()
