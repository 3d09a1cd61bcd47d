"""Artifacts: save a compiled module with symbolic dims, load it in a fresh process, compare.

The fresh process gets only the artifact and an .npz of inputs (no source, no compiler call);
its outputs come back through another .npz and are compared with the in-process results.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import gradlang
from gradlang.runtime.artifact import MAGIC, ArtifactError
from gradlang.runtime.signature import ArgumentError

SOURCE = """
struct Net { w1: f32[D, H], b1: f32[H], w2: f32[H, C] }

fn logits(net: Net, x: f32[B, D]) -> f32[B, C] {
  return tanh(x @ net.w1 + net.b1) @ net.w2
}

fn loss(net: Net, x: f32[B, D], y: i32[B]) -> f32 {
  let z = logits(net, x)
  let smooth = for i in range(3) carry (acc = 0.0) { acc + 0.1 * mean(z[:, 0]) }
  let scale = if sum(z) > 0.0 then 1.0 else 2.0
  return cross_entropy(z, y) * scale + smooth / f32(B)
}

fn running_max(x: f32[B, D]) -> f32[D] {
  return for i in range(B) carry (m = x[0]) { maximum(m, x[i]) }
}

export predict = logits
export step = value_and_grad(loss, wrt=[net])
export running_max = running_max
"""

BATCHES = (3, 7)

CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import gradlang
    import jax

    artifact, inputs, outputs, modules = sys.argv[1:5]
    m = gradlang.load(artifact)
    data = np.load(inputs)
    net = {k: data[k] for k in ("w1", "b1", "w2")}
    results = {}
    for batch in (3, 7):
        x, y = data[f"x{batch}"], data[f"y{batch}"]
        calls = {"predict": m.predict(net, x), "step": m.step(net, x=x, y=y),
                 "running_max": m.running_max(x)}
        for name, out in calls.items():
            for path, leaf in jax.tree_util.tree_flatten_with_path(out)[0]:
                results[f"{batch}/{name}{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
    np.savez(outputs, **results)
    with open(modules, "w") as f:
        json.dump(sorted(sys.modules), f)
""")


def inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    data = {"w1": rng.normal(size=(4, 5)), "b1": rng.normal(size=5), "w2": rng.normal(size=(5, 3))}
    for batch in BATCHES:
        data[f"x{batch}"] = rng.normal(size=(batch, 4))
        data[f"y{batch}"] = rng.integers(0, 3, size=batch).astype(np.int32)
    return {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in data.items()}


def in_process_results(m, data) -> dict[str, np.ndarray]:
    net = {k: data[k] for k in ("w1", "b1", "w2")}
    results = {}
    for batch in BATCHES:
        x, y = data[f"x{batch}"], data[f"y{batch}"]
        calls = {"predict": m.predict(net, x), "step": m.step(net, x, y),
                 "running_max": m.running_max(x)}
        for name, out in calls.items():
            for path, leaf in jax.tree_util.tree_flatten_with_path(out)[0]:
                results[f"{batch}/{name}{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
    return results


@pytest.fixture(scope="module")
def compiled():
    return gradlang.compile_source(SOURCE, "net.grad")


@pytest.fixture(scope="module")
def artifact(compiled, tmp_path_factory):
    path = tmp_path_factory.mktemp("artifact") / "net.gx"
    assert compiled.save(path) == path
    return path


@pytest.fixture(scope="module")
def child(artifact, tmp_path_factory):
    """Run the fresh process once; its outputs and the modules it imported."""
    folder = tmp_path_factory.mktemp("child")
    data = inputs()
    np.savez(folder / "inputs.npz", **data)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(artifact), str(folder / "inputs.npz"),
         str(folder / "outputs.npz"), str(folder / "modules.json")],
        capture_output=True, text=True, timeout=120, cwd=folder)
    assert proc.returncode == 0, proc.stderr
    with np.load(folder / "outputs.npz") as out:
        outputs = {k: out[k] for k in out.files}
    return data, outputs, json.loads((folder / "modules.json").read_text())


def test_fresh_process_matches_in_process_results(compiled, child):
    data, loaded, _ = child
    expected = in_process_results(compiled, data)
    assert sorted(loaded) == sorted(expected)
    for batch in BATCHES:  # every export, at both batch sizes
        for name in ("predict", "step", "running_max"):
            assert any(k.startswith(f"{batch}/{name}") for k in loaded), (batch, name)
    for key, value in expected.items():
        assert loaded[key].shape == value.shape and loaded[key].dtype == value.dtype, key
        np.testing.assert_allclose(loaded[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    assert loaded["3/predict"].shape == (3, 3) and loaded["7/predict"].shape == (7, 3)
    assert loaded["7/step[1]['net']['w1']"].shape == (4, 5)


def test_fresh_process_results_are_right(child):
    """Independently of the compiler: the loaded predict is the formula in the source."""
    data, loaded, _ = child
    for batch in BATCHES:
        x = data[f"x{batch}"].astype(np.float64)
        expected = np.tanh(x @ data["w1"] + data["b1"]) @ data["w2"]
        np.testing.assert_allclose(loaded[f"{batch}/predict"], expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(loaded[f"{batch}/running_max"], x.max(0), rtol=1e-6)


def test_fresh_process_used_the_front_end_free_runtime(child):
    _, _, modules = child
    assert "gradlang.runtime.artifact" in modules
    assert "gradlang.passes.typecheck" not in modules
    assert "gradlang.runtime.lower" not in modules


def test_fresh_process_never_imported_the_parser(child):
    _, _, modules = child
    assert not [m for m in modules if m == "gradlang.parser" or m == "lark" or m.startswith("lark.")]


def test_loaded_module_in_process(compiled, artifact):
    loaded = gradlang.load(artifact)
    assert set(loaded.exports) == {"predict", "step", "running_max"}
    assert loaded.header["module"] == "net"
    assert loaded.header["gradlang_version"] == gradlang.__version__
    for name in loaded.exports:
        assert loaded[name].signature == compiled[name].signature
    assert "stablehlo." in loaded.stablehlo("step")
    with pytest.raises(ArgumentError, match=r"argument 'x': expected f32\[B, D\] with D = 4"):
        data = inputs()
        loaded.predict({k: data[k] for k in ("w1", "b1", "w2")}, data["x3"][:, :2])


def test_loaded_module_composes_with_jit(compiled, artifact):
    loaded = gradlang.load(artifact)
    data = inputs()
    net = {k: data[k] for k in ("w1", "b1", "w2")}
    jitted = jax.jit(loaded.step)(net, data["x7"], data["y7"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 jitted, compiled.step(net, data["x7"], data["y7"]))


def test_loaded_module_composes_with_vmap(artifact):
    loaded = gradlang.load(artifact)
    data = inputs()
    net = {k: data[k] for k in ("w1", "b1", "w2")}
    xs = np.stack([data["x3"], 2 * data["x3"]])
    out = jax.vmap(loaded.predict, in_axes=(None, 0))(net, xs)
    for i in range(2):
        np.testing.assert_allclose(out[i], loaded.predict(net, xs[i]), rtol=1e-5)


def test_loaded_module_vmaps_a_grad_export_on_any_axis_and_nested(compiled, artifact):
    loaded = gradlang.load(artifact)
    data = inputs()
    net = {k: data[k] for k in ("w1", "b1", "w2")}
    xs = np.stack([data["x7"], 0.5 * data["x7"], -data["x7"]], axis=1)  # batch on axis 1
    loss, grads = jax.jit(jax.vmap(loaded.step, in_axes=(None, 1, None)))(net, xs, data["y7"])
    for i in range(3):
        want_loss, want_grads = compiled.step(net, xs[:, i], data["y7"])
        np.testing.assert_allclose(loss[i], want_loss, rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a[i], b, rtol=1e-4, atol=1e-6),
                     grads, want_grads)
    nested = jax.vmap(jax.vmap(loaded.predict, in_axes=(None, 0)), in_axes=(None, 0))
    xss = np.stack([np.stack([data["x3"], 2 * data["x3"]])] * 2)
    np.testing.assert_allclose(nested(net, xss)[1, 1], loaded.predict(net, 2 * data["x3"]),
                               rtol=1e-5)


def test_stablehlo_text_keeps_symbolic_dims(compiled):
    text = compiled.stablehlo("step")
    assert "stablehlo." in text and "func.func public @main" in text
    assert "tensor<?x?xf32>" in text  # x: f32[B, D]
    assert "tensor<?xi32>" in text  # y: i32[B]


def test_stablehlo_text_with_fixed_dims(compiled):
    text = compiled.stablehlo("predict", dims={"B": 4})
    assert "tensor<4x?xf32>" in text  # x: f32[4, D] and the result f32[4, C]
    assert "tensor<?x?xf32>" in text  # net.w1: f32[D, H] stays symbolic
    assert "tensor<4x?xf32>" not in compiled.stablehlo("predict")
    fixed = compiled.stablehlo("predict", dims={"B": 4, "D": 3, "H": 5, "C": 2})
    assert "?" not in fixed
    assert "tensor<4x3xf32>" in fixed and "tensor<4x2xf32>" in fixed
    assert "stablehlo.tanh" in fixed and "stablehlo.dot_general" in fixed


def test_artifact_with_fixed_dims(compiled, tmp_path):
    path = compiled.save(tmp_path / "fixed.gx", dims={"B": 3})
    loaded = gradlang.load(path)
    data = inputs()
    net = {k: data[k] for k in ("w1", "b1", "w2")}
    np.testing.assert_allclose(loaded.predict(net, data["x3"]), compiled.predict(net, data["x3"]),
                               rtol=1e-6)
    with pytest.raises(ArgumentError, match=r"argument 'x': expected f32\[3, D\], got shape \[7, 4\]"):
        loaded.predict(net, data["x7"])


# ---- ops whose lowering depends on symbolic dims

SYMBOLIC = {
    "eye": ("x: f32[B, D]", "f32[B, B]", "eye(B) * sum(x)"),
    "arange": ("x: f32[B, D]", "i32[N]", "arange(1, B)"),
    "one_hot": ("x: f32[B, C], y: i32[B]", "f32[B, C]", "one_hot(y, C) * x"),
    "full": ("x: f32[B, D]", "f32[D, B]", "full([D, B], 1.5) + zeros([D, B])"),
    "reshape": ("x: f32[B, 6]", "f32[N, 3]", "reshape(x, [-1, 3])"),
    "concat-stack": ("x: f32[B, D]", "f32[N, 2, D]", "stack([concat([x, x]), concat([x, -x])], axis=1)"),
    "slices": ("x: f32[B, D]", "f32[N, D]", "x[1:] * x[:-1] + x[::2][0]"),
    "dynamic-index": ("x: f32[B, D], i: i32", "f32[D]", "x[i] + x[-1]"),
    "dim-value": ("x: f32[B, D]", "f32", "sum(x) / f32(B * D)"),
    "loop-over-dim": ("x: f32[B, D]", "f32[D]", "for i in range(1, B) carry (a = x[0]) { a * x[i] }"),
    "if-derived-dims": ("x: f32[B, D]", "f32[N, D]", "if sum(x) > 0.0 then x[1:] else 0.0"),
    "cross-entropy": ("x: f32[B, C], y: i32[B]", "f32", "cross_entropy(x, y) + mean(softmax(x, axis=0))"),
    "solve": ("a: f32[N, N], b: f32[N]", "f32[N]", "solve(a, b) + cholesky(a)[0]"),
}


def symbolic_args(params: str, b: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    sizes = {"B": b, "N": b, "D": 3, "C": 4}
    args = []
    for name, t in re.findall(r"(\w+): (\w+(?:\[[^\]]*\])?)", params):
        if t == "i32":
            args.append(np.int32(b - 2))
            continue
        dtype, dims = t.rstrip("]").split("[")
        shape = [sizes[d.strip()] if d.strip() in sizes else int(d) for d in dims.split(",")]
        if dtype == "i32":
            args.append(rng.integers(0, sizes["C"], size=shape).astype(np.int32))
        elif name == "a":
            z = rng.normal(size=shape)
            args.append((z @ z.T + b * np.eye(b)).astype(np.float32))
        else:
            args.append(rng.normal(size=shape).astype(np.float32))
    return args


@pytest.mark.parametrize("name", list(SYMBOLIC))
def test_symbolic_ops_round_trip(name, tmp_path):
    params, ret, body = SYMBOLIC[name]
    m = gradlang.compile_source(f"fn f({params}) -> {ret} {{ return {body} }}\nexport f = f\n")
    assert "?" in m.stablehlo("f")
    loaded = gradlang.load(m.save(tmp_path / "f.gx"))
    for b in (3, 5):
        args = symbolic_args(params, b, seed=b)
        expected = np.asarray(m.f(*args))
        got = np.asarray(loaded.f(*args))
        assert got.shape == expected.shape and got.dtype == expected.dtype
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


# ---- unreadable files


def corrupt_variants(good: bytes) -> dict[str, bytes]:
    n = struct.unpack_from("<I", good, len(MAGIC))[0]
    start = len(MAGIC) + 4
    header = json.loads(good[start:start + n])
    body = good[start + n:]

    def with_header(h: dict) -> bytes:
        text = json.dumps(h).encode()
        return MAGIC + struct.pack("<I", len(text)) + text + body

    flipped = bytearray(good)
    flipped[-100] ^= 0xFF
    return {
        "empty": b"",
        "wrong-magic": b"NOT-GRADLANG" + good[len(MAGIC):],
        "pickle": b"\x80\x04\x95" + good[3:],
        "truncated-after-magic": good[:len(MAGIC) + 2],
        "corrupt-header-json": good[:start + 5] + b"\xff\xfe" + good[start + 7:],
        "header-not-object": MAGIC + struct.pack("<I", 2) + b"[]" + body,
        "future-format": with_header({**header, "format_version": 99}),
        "no-exports": with_header({k: v for k, v in header.items() if k != "exports"}),
        "bad-export-entry": with_header({**header, "exports": [{"name": "f"}]}),
        "flipped-byte-in-body": bytes(flipped),
        "truncated-body": good[:-10],
    }


VARIANTS = ["empty", "wrong-magic", "pickle", "truncated-after-magic", "corrupt-header-json",
            "header-not-object", "future-format", "no-exports", "bad-export-entry",
            "flipped-byte-in-body", "truncated-body"]


def test_variant_list_is_complete(artifact):
    assert sorted(corrupt_variants(artifact.read_bytes())) == sorted(VARIANTS)


@pytest.mark.parametrize("variant", VARIANTS)
def test_unreadable_artifacts_raise_artifact_error(artifact, tmp_path, variant):
    bad = tmp_path / "bad.gx"
    bad.write_bytes(corrupt_variants(artifact.read_bytes())[variant])
    with pytest.raises(ArtifactError, match="bad.gx"):
        gradlang.load(bad)


def test_error_messages_say_what_is_wrong(artifact, tmp_path):
    variants = corrupt_variants(artifact.read_bytes())
    expectations = {"wrong-magic": "not a gradlang artifact", "future-format": "format 99 is not supported",
                    "flipped-byte-in-body": "checksum mismatch", "corrupt-header-json": "corrupt header"}
    for variant, message in expectations.items():
        bad = tmp_path / f"{variant}.gx"
        bad.write_bytes(variants[variant])
        with pytest.raises(ArtifactError, match=message):
            gradlang.load(bad)


@pytest.mark.xfail(strict=True, raises=ValueError, reason=(
    "a loop over a symbolic range lowers to lax.fori_loop with symbolic bounds, i.e. a "
    "while_loop, which JAX cannot differentiate in reverse mode; saving a grad export of such a "
    "loop with symbolic dims fails inside jax.export"))
def test_grad_of_a_loop_over_a_symbolic_range_can_be_saved(tmp_path):
    m = gradlang.compile_source("""
fn f(w: f32[D], x: f32[B, D]) -> f32 {
  return for i in range(B) carry (acc = 0.0) { acc + tanh(dot(x[i], w)) }
}
export g = grad(f, wrt=[w])
""")
    m.save(tmp_path / "loop.gx")
