"""Dims fixed when compiling (`gradlang.dims`): `compile_source(..., dims={"K": 8})` and
`--dim K=8` fix a dim that no argument of a function binds; the arguments' dims stay theirs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradlang
from gradlang.cli import EXIT_INPUT, main
from gradlang.diagnostics import Diagnostics, SourceFile
from gradlang.dims import DimBindings
from gradlang.driver import build_module
from gradlang.printer import print_module

SAMPLED = """
fn draw(x: f32[B]) -> f32[K] {
  z ~ Normal(zeros([K]) + mean(x), 1.0)
  return z
}
fn f(x: f32[B]) -> f32 {
  return sum(draw(x)) / f32(K) + expect(sum(draw(x)), samples=K)
}
export e = grad(expect(f, samples=K), wrt=[x])
export size = draw
"""


def test_a_fixed_dim_sizes_shapes_values_and_samples():
    m = gradlang.compile_source(SAMPLED, dims={"K": np.int64(3)})
    assert m.size(jnp.ones(2), key=jax.random.key(0)).shape == (3,)
    text = print_module(m.ir)
    assert text.count("samples=3") >= 2 and "K" not in text  # the export's and the body's
    g = m.e(jnp.ones(2), key=jax.random.key(0))["x"]
    assert g.shape == (2,) and np.all(np.isfinite(g))


def test_a_dim_the_arguments_bind_stays_theirs_in_that_function():
    """`count`'s K is its argument's; `f`'s K, which no argument of f binds, is fixed."""
    m = gradlang.compile_source("""
fn count(v: f32[K]) -> f32 {
  return f32(K)
}
fn f(x: f32[B]) -> f32 {
  return count(zeros([K])) + count(x) + f32(K)
}
export f = f
""", dims={"K": 3})
    assert float(m.f(jnp.ones(5))) == 3 + 5 + 3


def test_a_struct_argument_binds_its_dims():
    source = """
struct P { w: f32[K] }
fn f(p: P) -> f32 {
  return f32(K) * sum(p.w)
}
export f = f
"""
    m = gradlang.compile_source(source)
    assert float(m.f({"w": jnp.ones(4)})) == 16
    with pytest.raises(gradlang.CompileError, match=r"dims=\{'K': 2\}: the arguments of export "
                                                    r"'f' bind dim K at each call"):
        gradlang.compile_source(source, dims={"K": 2})


@pytest.mark.parametrize("dims, error, message", [
    ({"K": 3, "Q": 2}, gradlang.CompileError, r"no function of <source> uses a dim 'Q'"),
    ({"K": 3, "B": 2}, gradlang.CompileError, r"the arguments of export 'e' bind dim B"),
    ({"K": 0}, ValueError, r"dims=\{'K': 0\}: a size must be an integer from 1 to 2147483647"),
    ({"K": 2.0}, ValueError, r"a size must be an integer"),
    ({"K": True}, ValueError, r"a size must be an integer"),
    ({"2K": 3}, ValueError, r"'2K' is not a dim name"),
])
def test_bad_bindings_are_refused(dims, error, message):
    with pytest.raises(error, match=message):
        gradlang.compile_source(SAMPLED, dims=dims)


def test_a_value_named_as_a_fixed_dim_shadows_it():
    """`g`'s K is its value, as it would shadow an argument's dim; `f`'s is the fixed dim."""
    m = gradlang.compile_source("""
fn g(x: f32[B]) -> f32 {
  let K = sum(x)
  return K * 2.0
}
fn f(x: f32[B]) -> f32 {
  return g(x) + f32(K)
}
export f = f
""", dims={"K": 3})
    assert float(m.f(jnp.ones(2))) == 2 * 2 + 3


def test_a_long_chain_is_rewritten_without_recursion():
    terms = " + ".join(["x"] * 3000)
    source = SourceFile("<source>", f"fn f(x: f32) -> f32 {{\n  return {terms} + f32(K)\n}}\n")
    dims = DimBindings({"K": 2})
    module = build_module(source, None, Diagnostics(), dims)
    assert dims.used == {"K"} and "const 2" in print_module(module)


def test_imported_files_keep_their_dims(tmp_path):
    (tmp_path / "lib.grad").write_text("fn count(v: f32[K]) -> f32 {\n  return f32(K)\n}\n")
    (tmp_path / "main.grad").write_text(
        "use lib\nfn f(x: f32[B]) -> f32 {\n  return lib.count(zeros([K])) + lib.count(x)\n}\n"
        "export f = f\n")
    m = gradlang.compile_file(tmp_path / "main.grad", dims={"K": 4})
    assert float(m.f(jnp.ones(2))) == 4 + 2


def test_the_cli_fixes_dims_with_dim(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.grad").write_text(SAMPLED)
    assert main(["check", "m.grad"]) == 1
    assert "m.grad:3:21: error: unknown name 'K' in 'draw'; a dim " \
        "is bound by an argument's shape (k: f32[K]) or when compiling (--dim K=SIZE, or " \
        "dims={'K': SIZE} in Python)" in capsys.readouterr().err
    assert main(["check", "m.grad", "--dim", "K=3"]) == 0
    assert main(["explain", "m.grad", "--dim", "K=3"]) == 0
    assert "expect(f, samples=3)" in capsys.readouterr().out
    argv = ["compile", "m.grad", "--emit", "stablehlo", "--dim", "K=3", "--dim", "B=2"]
    assert main(argv) == 0
    assert "tensor<3xf32>" in (tmp_path / "build" / "m.size.mlir").read_text()
    assert main(["check", "m.grad", "--dim", "K=3", "--dim", "Q=1"]) == EXIT_INPUT
    assert "--dim Q=1: no export of m.grad has a symbolic dim 'Q' (its dims: B, K)" \
        in capsys.readouterr().err


def test_wrt_names_parameters_not_dims():
    """`W` in `wrt=[W]` is `loss`'s parameter: neither reported unbound nor replaced. An unknown
    name where no size goes is left to resolve."""
    source = """
fn loss(W: f32[D]) -> f32 {
  return sum(W * W)
}
fn f(x: f32[D]) -> f32 {
  return sum(grad(loss, wrt=[W])(x)) + f32(K)
}
export f = f
"""
    assert float(gradlang.compile_source(source, dims={"K": 2}).f(jnp.ones(3))) == 6 + 2
    with pytest.raises(gradlang.CompileError) as error:
        gradlang.compile_source(source)
    assert "unknown name 'K' in 'f'; a dim is bound" in str(error.value)
    assert "'W'" not in str(error.value)
    with pytest.raises(gradlang.CompileError, match=r"<source>:2:14: error: unknown name 'W'\n"):
        gradlang.compile_source("fn g(Wt: f32[D]) -> f32 {\n  return sum(W)\n}\nexport g = g\n")


def test_verify_compiles_its_variants_with_the_same_dims():
    from gradlang.ir import Module
    from gradlang.passes.overrides import Overrides
    from gradlang.verify.variants import Origin

    source = SourceFile("m.grad", SAMPLED)
    assert isinstance(Origin(source, None, {}, dims={"K": 3}).compile(Overrides()), Module)
    assert "unknown name 'K' in 'draw'" in Origin(source, None, {}).compile(Overrides())
