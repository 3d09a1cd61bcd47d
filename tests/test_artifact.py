"""Artifacts: save a compiled module with symbolic dims, load it in a fresh process, compare.

The fresh process gets only the artifact and an .npz of inputs (no source, no compiler call);
its outputs come back through another .npz and are compared with the in-process results.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import struct
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradlang
from gradlang.cli import main
from gradlang.runtime.artifact import DEFAULT_PLATFORMS, MAGIC, MAX_DEPTH, ArtifactError, serialize
from gradlang.runtime.signature import ArgumentError, Signature, casting
from gradlang.types import DType, TensorType

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


def test_jax_grad_of_a_loaded_export_says_to_export_the_gradient(artifact):
    """An artifact holds computations, not derivatives: jax.grad / jax.jvp through a loaded
    export raise an ArtifactError that says what to export instead (not JAX's "linearization
    failed" message)."""
    loaded = gradlang.load(artifact)
    data = inputs()
    net = {k: data[k] for k in ("w1", "b1", "w2")}
    with pytest.raises(gradlang.ArtifactError, match=r"export 'predict' was loaded from an "
                       r"artifact.*export g = grad"):
        jax.grad(lambda x: loaded.predict(net, x).sum())(data["x3"])
    with pytest.raises(gradlang.ArtifactError, match="export 'step'"):
        jax.jvp(lambda x: loaded.step(net, x, data["y7"])[0], (data["x7"],),
                (np.ones_like(data["x7"]),))


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


def test_a_piece_after_an_extern_call_keeps_the_dims_only_its_own_values_have(tmp_path):
    """SPSA's noise of shape [D] is drawn after the extern returns a scalar: the piece that
    draws it gets an argument of shape [D] too, so D stays symbolic in the artifact."""
    m = gradlang.compile_source("""
extern fn score(y: f32[B]) -> f32
fn f(w: f32[D], x: f32[B, D]) -> f32 { return score(x @ w) }
export g = grad(f, wrt=[w], by=spsa(eps=0.01))
""", externs={"score": lambda y: np.float32(np.sum(np.sin(y)))})
    loaded = gradlang.load(m.save(tmp_path / "m.gx"), externs={"score": lambda y: np.float32(
        np.sum(np.sin(y)))})
    for b, d in [(2, 3), (4, 5)]:
        w, x = np.ones(d, np.float32), np.linspace(-1, 1, b * d, dtype=np.float32).reshape(b, d)
        key = jax.random.key(b)
        # the same noise: only f's float32 rounding differs between the fused and the split
        # program, B sines of scale 1 (<= B eps32), divided by 2 eps and times |z| <= 4
        atol = b * np.finfo(np.float32).eps / (2 * 0.01) * 4
        np.testing.assert_allclose(loaded.g(w, x, key=key)["w"], m.g(w, x, key=key)["w"],
                                   rtol=0, atol=atol)


LOOPS = """
fn chain(w: f32[D], x: f32[D], s: f32[T]) -> f32 {
  let y = for i in range(T) carry (h = x) { tanh(w * h + f32(i) * 0.1) }
  return sum(y * y)
}
fn cut(w: f32[D], x: f32[D], s: f32[T]) -> f32 {
  let y = for i in range(T) carry (h = x) { tanh(w * h + f32(i) * 0.1) } with truncated(k=3)
  return sum(y * y)
}
fn late(w: f32[D], x: f32[D], s: f32[T]) -> f32 {
  let y = for i in range(2, T) carry (h = x) { tanh(w * h + f32(i) * 0.1) }
  return sum(y * y)
}
export full = grad(chain, wrt=[w])
export truncated = grad(cut, wrt=[w])
export late = grad(late, wrt=[w])
"""


@pytest.mark.parametrize("steps", [2, 3, 7])
def test_loops_of_symbolic_length_are_differentiated_in_artifacts(tmp_path, steps):
    """A loop over `range(T)` with T symbolic lowers as a scan (reverse mode cannot go through
    a while loop of symbolic length), truncated to its last K steps, and to fewer when T < K,
    or starting later (no step when T = 2): the artifact agrees with the program compiled at
    each T."""
    m = gradlang.compile_source(LOOPS)
    loaded = gradlang.load(m.save(tmp_path / "loops.gx"))
    w, x = np.linspace(0.5, 1.5, 4, dtype=np.float32), np.linspace(-1, 1, 4, dtype=np.float32)
    s = np.zeros(steps, np.float32)
    for name in ("full", "truncated", "late"):
        # the same float32 operations in another loop construct: a few roundings per step of
        # values of scale 1, compounded over T steps
        np.testing.assert_allclose(getattr(loaded, name)(w, x, s)["w"],
                                   getattr(m, name)(w, x, s)["w"],
                                   rtol=0, atol=8 * steps * np.finfo(np.float32).eps)


# ---- tampered artifacts: every edit is an ArtifactError at load, saying what is wrong

TAMPER = """
extern fn score(z: f32[B]) -> f32
fn loss(w: f32[D], x: f32[B, D]) -> f32 { return sum(tanh(x @ w)) }
fn predict(w: f32[D], x: f32[B, D]) -> f32[B] { return tanh(x @ w) }
fn scored(w: f32[D], x: f32[B, D]) -> f32 { return score(tanh(x @ w)) + sum(w * w) }
export predict = predict
export fit = descend(loss, wrt=[w], lr=0.1)
export g = grad(loss, wrt=[w])
export es = grad(scored, wrt=[w], by=es(sigma=0.1, pop=4))
"""


def score(z):
    return np.float32(np.mean(z))


@pytest.fixture(scope="module")
def tamper_module():
    return gradlang.compile_source(TAMPER, "tamper.grad", externs={"score": score})


@pytest.fixture(scope="module")
def tamper_file(tamper_module):
    """The artifact as (header, blobs by export name), to edit and lay out again."""
    good = tamper_module.artifact()
    n = struct.unpack_from("<I", good, len(MAGIC))[0]
    start = len(MAGIC) + 4
    header = json.loads(good[start:start + n])
    body = good[start + n:]
    blobs = {e["name"]: [body[p["offset"]:p["offset"] + p["size"]] for p in e.get("pieces", [e])]
             for e in header["exports"]}
    return header, blobs


def laid_out(header: dict, blobs: dict[str, list[bytes]]) -> bytes:
    """The file of `header` with `blobs` written after it, offsets and checksums made to match
    (an edit that only a schema or signature check can catch, not the checksums). The blobs
    go by export position: `blobs` in the order the unedited header names them."""
    header, body = json.loads(json.dumps(header)), b""
    for e, pieces in zip(header["exports"], blobs.values()):
        for place, blob in zip(e.get("pieces", [e]), pieces):
            place |= {"offset": len(body), "size": len(blob),
                      "sha256": hashlib.sha256(blob).hexdigest()}
            body += blob
    return written(header, body)


def written(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return MAGIC + struct.pack("<I", len(text)) + text + body


def edited(header: dict, name: str, edit) -> dict:
    """A copy of `header` with `edit(entry)` applied to export `name`'s entry."""
    header = json.loads(json.dumps(header))
    edit(next(e for e in header["exports"] if e["name"] == name))
    return header


def nested(depth: int) -> bytes:
    text = b"[" * depth + b"]" * depth
    return MAGIC + struct.pack("<I", len(text)) + text


def tampered(header: dict, blobs: dict[str, list[bytes]]) -> dict[str, tuple[bytes, str]]:
    """Each edit of the artifact, and a fragment of the ArtifactError it must raise."""
    def entry(name: str, edit) -> bytes:
        return laid_out(edited(header, name, edit), blobs)

    body = b"".join(b for pieces in blobs.values() for b in pieces)

    def place(name: str, **fields) -> bytes:
        """`fields` of the blob's place edited after laying out."""
        return written(edited(header, name, lambda e: e.update(fields)), body)

    def param(i: int, **fields):
        return lambda e: e["params"][i]["type"].update(fields)

    def step(k: int, **fields):
        return lambda e: e["plan"]["steps"][k].update(fields)

    def plan(**fields):
        return lambda e: e["plan"].update(fields)

    extern_step = next(k for k, s in enumerate(header["exports"][3]["plan"]["steps"])
                       if "extern" in s)
    swapped = {**blobs, "predict": blobs["g"], "g": blobs["predict"]}
    es_pieces = blobs["es"]
    rng = np.random.default_rng(0)
    size = len(blobs["predict"][0])
    return {
        # the JSON itself
        "deeply-nested-json": (nested(200_000), "nested too deeply"),
        "nested-json": (nested(MAX_DEPTH + 1), f"nested more than {MAX_DEPTH} levels"),
        "header-length-beyond-file": (MAGIC + struct.pack("<I", 10**6) + b"{}",
                                      "the header is 1000000 bytes"),
        "wrong-format-name": (laid_out({**header, "format": "onnx"}, blobs), "format"),
        "format-version-as-string": (laid_out({**header, "format_version": "3"}, blobs),
                                     "format '3' is not supported"),
        "module-not-string": (laid_out({**header, "module": 7}, blobs), "module: expected a string"),
        "exports-not-list": (laid_out({**header, "exports": {}}, blobs), "exports: expected a list"),
        # export entries
        "non-string-export-name": (entry("predict", lambda e: e.update(name=5)),
                                   "name: expected an identifier, got 5"),
        "export-name-not-identifier": (entry("predict", lambda e: e.update(name="a b")),
                                       "expected an identifier, got 'a b'"),
        "duplicate-export-name": (entry("g", lambda e: e.update(name="predict")),
                                  "a second export named 'predict'"),
        "unknown-kind": (entry("g", lambda e: e.update(kind="hessian")),
                         "kind: expected one of fn, grad"),
        "unknown-dtype": (entry("predict", param(0, dtype="f16")), "unknown dtype 'f16'"),
        "dtype-not-string": (entry("predict", param(0, dtype=["f32"])), "unknown dtype ['f32']"),
        "negative-dim": (entry("predict", param(0, shape=[-3])), "bad shape [-3]"),
        "dim-not-a-name": (entry("predict", param(0, shape=["D + 1"])), "bad shape ['D + 1']"),
        "bool-dim": (entry("predict", param(0, shape=[True])), "bad shape [True]"),
        "type-not-a-type": (entry("predict", lambda e: e["params"][0].update(type=[1])),
                            "expected a type, got [1]"),
        "param-name-not-identifier": (entry("g", lambda e: e["params"][0].update(name="w.x")),
                                      "expected {name, type}"),
        "duplicate-param": (entry("g", lambda e: e["params"][1].update(name="w")),
                            "a second parameter named 'w'"),
        "unknown-wrt-in-descend": (entry("fit", lambda e: e.update(wrt=["v"])),
                                   "export 'fit'.wrt: 'v' is not a parameter (parameters: w, x)"),
        "wrt-not-names": (entry("g", lambda e: e.update(wrt="w")), "expected a list of parameter"),
        "stateful-not-bool": (entry("g", lambda e: e.update(stateful="no")),
                              "stateful: expected true or false"),
        "externs-not-names": (entry("es", lambda e: e.update(externs=[1])),
                              "externs: expected a list of names"),
        "sha256-not-hex": (place("g", sha256="xyz"), "sha256: expected 64 hex digits"),
        "size-not-int": (place("g", size="12"), "size: expected a byte count"),
        "blob-beyond-the-end": (laid_out(header, blobs)[:-100], "truncated?"),
        # platforms
        "unknown-platform": (laid_out({**header, "platforms": ["cpu", "gpu"]}, blobs),
                             "unknown platform 'gpu'"),
        "module-externs-not-names": (laid_out({**header, "externs": ["score", "1x"]}, blobs),
                                     "externs: expected a list of names"),
        "no-platforms": (laid_out({k: v for k, v in header.items() if k != "platforms"}, blobs),
                         "platforms: platforms must be a non-empty list"),
        "platforms-not-those-of-the-blobs": (laid_out({**header, "platforms": ["cpu"]}, blobs),
                                             "was lowered for cpu, cuda, but the header lists cpu"),
        # blobs (checksums made to match)
        "blob-replaced-by-a-pickle": (
            laid_out(header, {**blobs, "g": [pickle.dumps({"fn": "g"})]}),
            "export 'g' is not a jax.export serialization"),
        "blob-of-random-bytes": (
            laid_out(header, {**blobs, "g": [rng.integers(0, 256, size, np.uint8).tobytes()]}),
            "export 'g' is not a jax.export serialization"),
        "blob-of-zeros": (laid_out(header, {**blobs, "g": [bytes(size)]}),
                          "export 'g' is not a jax.export serialization"),
        "empty-blob": (laid_out(header, {**blobs, "g": [b""]}),
                       "export 'g' is not a jax.export serialization"),
        "blobs-of-two-exports-swapped": (laid_out(header, swapped),
                                         "export 'predict': its blob holds the function 'g'"),
        "export-renamed": (entry("predict", lambda e: e.update(name="predicts")),
                           "export 'predicts': its blob holds the function 'predict'"),
        "param-type-edited": (entry("predict", param(1, shape=["B"])),
                              "its blob takes (float32[D], float32[B, D]), but the header declares "
                              "predict(w: f32[D], x: f32[B])"),
        "param-dtype-edited": (entry("predict", param(0, dtype="f64")),
                               "but the header declares predict(w: f64[D], x: f32[B, D])"),
        "param-dropped": (entry("g", lambda e: e["params"].pop()), "its blob takes"),
        # split plans (export 'es' calls extern 'score')
        "plan-not-object": (entry("es", lambda e: e.update(plan=[])),
                            "expected {inputs, outputs, out_tree, steps}"),
        "plan-reads-undefined-value": (entry("es", step(0, **{"in": [999]})),
                                       "reads value 999 before it is defined"),
        "plan-runs-missing-piece": (entry("es", step(0, run=7)), "runs piece 7, but there are"),
        "plan-calls-undeclared-extern": (entry("es", step(extern_step, extern="system")),
                                         "calls 'system', which the export does not declare"),
        "plan-extern-dtype-unknown": (entry("es", step(extern_step, result={"dtype": "c64",
                                                                             "shape": []})),
                                      "unknown dtype 'c64'"),
        "plan-output-undefined": (entry("es", plan(outputs=[12345])),
                                  "returns a value no step defines"),
        "plan-out-tree-beyond-outputs": (entry("es", plan(out_tree={"dict": {"w": 9}})),
                                         "names output 9, but there are"),
        "plan-out-tree-not-a-tree": (entry("es", plan(out_tree={"list": []})),
                                     "expected an output number"),
        "plan-input-added": (entry("es", lambda e: e["plan"]["inputs"].append(999)),
                             "its plan takes 4 values, but the header declares es(w: f32[D], "
                             "x: f32[B, D], key: key) (3 arrays)"),
        "plan-extern-arguments-edited": (
            entry("es", lambda e: e["plan"]["steps"][extern_step].update(
                {"in": e["plan"]["inputs"][:2]})),
            f"plan step {extern_step} passes"),
        "plan-pieces-swapped": (laid_out(header, {**blobs, "es": es_pieces[::-1]}), "passes ("),
    }


TAMPERS = ["deeply-nested-json", "nested-json", "header-length-beyond-file", "wrong-format-name",
           "format-version-as-string", "module-not-string", "exports-not-list",
           "non-string-export-name", "export-name-not-identifier", "duplicate-export-name",
           "unknown-kind", "unknown-dtype", "dtype-not-string", "negative-dim", "dim-not-a-name",
           "bool-dim", "type-not-a-type", "param-name-not-identifier", "duplicate-param",
           "unknown-wrt-in-descend", "wrt-not-names", "stateful-not-bool", "externs-not-names",
           "module-externs-not-names",
           "sha256-not-hex", "size-not-int", "blob-beyond-the-end", "unknown-platform",
           "no-platforms", "platforms-not-those-of-the-blobs", "blob-replaced-by-a-pickle",
           "blob-of-random-bytes", "blob-of-zeros", "empty-blob", "blobs-of-two-exports-swapped",
           "export-renamed", "param-type-edited", "param-dtype-edited",
           "param-dropped", "plan-not-object", "plan-reads-undefined-value",
           "plan-runs-missing-piece", "plan-calls-undeclared-extern", "plan-extern-dtype-unknown",
           "plan-output-undefined", "plan-out-tree-beyond-outputs", "plan-out-tree-not-a-tree",
           "plan-input-added", "plan-extern-arguments-edited", "plan-pieces-swapped"]


def test_tamper_list_is_complete(tamper_file):
    assert sorted(tampered(*tamper_file)) == sorted(TAMPERS)


def test_the_untampered_layout_loads_and_runs(tamper_module, tamper_file, tmp_path):
    """The re-laid-out file is sound, so each tampered case fails for its edit alone."""
    path = tmp_path / "tamper.gx"
    path.write_bytes(laid_out(*tamper_file))
    loaded = gradlang.load(path, externs={"score": score})
    w, x = np.ones(3, np.float32), np.eye(2, 3, dtype=np.float32)
    np.testing.assert_allclose(loaded.predict(w, x), tamper_module.predict(w, x), rtol=1e-6)
    key = jax.random.key(0)
    np.testing.assert_allclose(loaded.es(w, x, key)["w"], tamper_module.es(w, x, key)["w"],
                               rtol=1e-5)


@pytest.mark.parametrize("case", TAMPERS)
def test_tampered_artifacts_raise_artifact_error_at_load(tamper_file, tmp_path, case):
    data, message = tampered(*tamper_file)[case]
    path = tmp_path / "tampered.gx"
    path.write_bytes(data)
    with pytest.raises(gradlang.ArtifactError) as info:
        gradlang.load(path, externs={"score": score})
    assert str(info.value).startswith(f"{path}: "), info.value
    assert message in str(info.value), info.value


# ---- platforms


def test_artifacts_are_lowered_for_cpu_and_cuda_by_default(tamper_module, tmp_path):
    loaded = gradlang.load(tamper_module.save(tmp_path / "m.gx"), externs={"score": score})
    assert loaded.header["platforms"] == list(DEFAULT_PLATFORMS) == ["cpu", "cuda"]
    for name in loaded.exports:
        pieces = loaded.exported(name)
        assert [p.platforms for p in pieces] == [("cpu", "cuda")] * len(pieces), name
    assert len(loaded.exported("es")) == 2  # split at its extern call


def test_artifacts_lowered_for_several_platforms_run_here(tamper_module, tmp_path):
    path = tamper_module.save(tmp_path / "m.gx", platforms=("cpu", "cuda", "rocm"))
    loaded = gradlang.load(path, externs={"score": score})
    assert loaded.header["platforms"] == ["cpu", "cuda", "rocm"]
    assert loaded.exported("g")[0].platforms == ("cpu", "cuda", "rocm")
    assert all(p.platforms == ("cpu", "cuda", "rocm") for p in loaded.exported("es"))
    w, x = np.ones(3, np.float32), np.eye(2, 3, dtype=np.float32)
    np.testing.assert_allclose(loaded.g(w, x)["w"], tamper_module.g(w, x)["w"], rtol=1e-6)


def test_loading_on_a_platform_the_artifact_was_not_lowered_for(tamper_module, tmp_path):
    here = jax.export.default_export_platform()
    other = next(p for p in ("cuda", "rocm") if p != here)
    path = tamper_module.save(tmp_path / "m.gx", platforms=(other,))
    with pytest.raises(gradlang.ArtifactError,
                       match=f"the artifact was lowered for {other}, not for {here}, the "
                             f"platform JAX runs on here"):
        gradlang.load(path, externs={"score": score})


@pytest.mark.parametrize("platforms, message", [
    (("cpu", "gpu"), "unknown platform 'gpu': choose from cpu, cuda, rocm, tpu"),
    ((), "platforms must be a non-empty list"),
    ("cpu", "platforms must be a non-empty list"),
    (("cpu", "cpu"), "name one twice"),
])
def test_bad_platform_lists(tamper_module, platforms, message):
    with pytest.raises(gradlang.ArtifactError, match=message):
        tamper_module.artifact(platforms=platforms)


def test_an_op_that_lowers_for_cpu_only_is_named():
    """Nonsymmetric eig has no CUDA lowering with a compatibility guarantee (gradlang has no
    such builtin today, so the export is written by hand)."""
    sig = Signature("spectrum", "fn", "spectrum", (("a", TensorType(DType.F32, (3, 3))),),
                    TensorType(DType.F32, (3,)))
    fn = casting(sig, lambda a: jnp.linalg.eig(a)[0].real)
    assert serialize("m", "0", [(sig, fn)], platforms=("cpu",))
    with pytest.raises(gradlang.ArtifactError,
                       match=r"export 'spectrum' cannot be lowered for cuda \(custom call "
                             r"cuhybrid_eig_real\).*\n  hint: save it for cpu only"):
        serialize("m", "0", [(sig, fn)], platforms=("cpu", "cuda"))


def test_cli_platforms_option(tmp_path, capsys):
    source = tmp_path / "m.grad"
    source.write_text("fn f(x: f32[B]) -> f32 { return sum(x * x) }\nexport g = grad(f, wrt=[x])\n")
    assert main(["compile", str(source), "-o", str(tmp_path), "--platforms", "cpu,rocm"]) == 0
    loaded = gradlang.load(tmp_path / "m.gx")
    assert loaded.header["platforms"] == ["cpu", "rocm"]
    assert loaded.exported("g")[0].platforms == ("cpu", "rocm")
    with pytest.raises(SystemExit) as info:
        main(["compile", str(source), "-o", str(tmp_path), "--platforms", "cpu,gpu"])
    assert info.value.code == 2
    assert "argument --platforms: unknown platform 'gpu'" in capsys.readouterr().err


# ---- StableHLO free of JAX-only constructs, where it can be


def test_stablehlo_of_a_drawing_export_has_no_shardy_ops():
    """A key parameter is lowered as raw uint32[2] data; a typed key would add a Shardy
    sharding constraint."""
    m = gradlang.compile_source("""
fn f(mu: f32[D]) -> f32 { z ~ Normal(mu, 1.0); return sum(z * z) }
export g = grad(expect(f, samples=4), wrt=[mu])
""")
    text = m.stablehlo("g", dims={"D": 3})
    assert "sdy." not in text and "custom_call" not in text
    assert "tensor<2xui32>" in text  # the key
    key = jax.random.key(1)
    assert float(m.g(np.ones(3, np.float32), key)["mu"].sum()) != 0.0


def test_stablehlo_of_solve_keeps_lapack_custom_calls():
    """What remains (documented in docs/reference/artifacts.md): JAX lowers solve and cholesky on CPU to LAPACK
    custom calls, which carry Shardy sharding rules as attributes."""
    m = gradlang.compile_source(f"fn f({SYMBOLIC['solve'][0]}) -> {SYMBOLIC['solve'][1]} "
                                f"{{ return {SYMBOLIC['solve'][2]} }}\nexport f = f\n")
    text = m.stablehlo("f", dims={"N": 3})
    assert sorted(set(re.findall(r"custom_call @(\w+)", text))) == [
        "lapack_sgetrf_ffi", "lapack_spotrf_ffi", "lapack_strsm_ffi"]
    assert "sdy.sharding_rule" in text and "sdy.sharding_constraint" not in text



def test_format_2_artifacts_still_load(tamper_module, tmp_path):
    """Format 2 listed no platforms (its blobs were lowered for the machine's, cpu here); the
    loader reads them from the blobs."""
    good = tamper_module.artifact(platforms=("cpu",))
    n = struct.unpack_from("<I", good, len(MAGIC))[0]
    start = len(MAGIC) + 4
    header = json.loads(good[start:start + n])
    assert header["format_version"] == 3 and header.pop("platforms") == ["cpu"]
    path = tmp_path / "old.gx"
    path.write_bytes(written({**header, "format_version": 2}, good[start + n:]))
    loaded = gradlang.load(path, externs={"score": score})
    assert loaded.header["platforms"] == ["cpu"]
    w, x = np.ones(3, np.float32), np.eye(2, 3, dtype=np.float32)
    np.testing.assert_allclose(loaded.fit(w.copy(), x)["w"], tamper_module.fit(w.copy(), x)["w"],
                               rtol=1e-6)


def test_f64_artifacts_need_64_bit_mode_to_load(tmp_path):
    before = jax.config.jax_enable_x64
    try:
        jax.config.update("jax_enable_x64", True)
        m = gradlang.compile_source("fn f(x: f64[B]) -> f64 { return sum(x * x) }\nexport f = f\n")
        path = m.save(tmp_path / "f64.gx")
        assert float(gradlang.load(path).f(np.ones(3))) == 3.0
        jax.config.update("jax_enable_x64", False)
        with pytest.raises(gradlang.ArtifactError, match="export 'f' takes or returns float64 "
                                                         "values, which need JAX's 64-bit mode"):
            gradlang.load(path)
    finally:
        jax.config.update("jax_enable_x64", before)
