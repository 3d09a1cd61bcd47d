"""The textual IR parses back (`gradlang.ir_parser`): every printed module round-trips, the text
determines the IR, malformed text is reported with its line and column, and a pass can be
tested from hand-written IR."""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest

from gradlang.diagnostics import Diagnostics, SourceFile, Span
from gradlang.driver import compile_module
from gradlang.ir import Module, Value
from gradlang.ir_parser import IRSyntaxError, parse_function, parse_module
from gradlang.passes.estimators import Estimators
from gradlang.passes.gradflow import GradFlow
from gradlang.passes.pipeline import PIPELINE
from gradlang.printer import print_function, print_module
from gradlang.types import DistType, DType, StructType, TensorType
from gradlang.verifier import verify_module

ROOT = Path(__file__).parent.parent
GOLDEN = ROOT / "tests" / "golden"
PROGRAMS = sorted([*ROOT.glob("examples/*.grad"), *ROOT.glob("stdlib/*.grad"),
                   *GOLDEN.glob("*.grad"), *GOLDEN.glob("lib/*.grad")])


def _difference(a: object, b: object, values: dict[Value, Value], at: str) -> str | None:
    """Where two IRs differ, ignoring spans, facts, unit paths and value identity (values are
    matched in order, one to one); None when they are the same."""
    if isinstance(a, Value) and isinstance(b, Value):
        if a in values:
            return None if values[a] is b else f"{at}: a value used where another was"
        values[a] = b
        return _difference((a.type, a.hint), (b.type, b.hint), values, at)
    if isinstance(a, Span):
        return None
    if type(a) is not type(b):
        return f"{at}: {a!r:.60} != {b!r:.60}"
    if is_dataclass(a):
        pairs = [(getattr(a, f.name), getattr(b, f.name), f"{at}.{f.name}") for f in fields(a)
                 if "span" not in f.name and f.name not in ("facts", "path")]
    elif isinstance(a, tuple | list):
        if len(a) != len(b):
            return f"{at}: {len(a)} != {len(b)} items"
        pairs = [(x, y, f"{at}[{i}]") for i, (x, y) in enumerate(zip(a, b))]
    else:
        return None if a == b else f"{at}: {a!r:.60} != {b!r:.60}"
    for x, y, where in pairs:
        found = _difference(x, y, values, where)
        if found is not None:
            return found
    return None


@pytest.mark.parametrize("path", sorted(GOLDEN.glob("*.ir")), ids=lambda p: p.name)
def test_golden_ir_round_trips(path):
    text = path.read_text()
    assert print_module(parse_module(text, str(path))) == text


@pytest.mark.parametrize("path", PROGRAMS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_stage_round_trips_and_determines_the_ir(path):
    """Printed after each pass, the module parses back to the same IR and the same text."""
    modules: dict[str, Module] = {}
    diags = Diagnostics()
    compile_module(SourceFile(str(path), path.read_text()), path.parent, diags,
                   after=lambda name, module: modules.__setitem__(name, module))
    assert not diags.has_errors, diags.render()
    assert list(modules) == ["build", *(p.name for p in PIPELINE)]
    for stage, module in modules.items():
        text = print_module(module)
        parsed = parse_module(text, f"{path.stem}.{stage}.ir", module.name)
        assert print_module(parsed) == text, stage
        assert _difference(module, parsed, {}, stage) is None
        if stage != "build":
            verify_module(parsed, resolved=True, typed=stage != "resolve")


def _error(text: str) -> str:
    with pytest.raises(IRSyntaxError) as e:
        parse_module(text, "bad.ir")
    return str(e.value)


def test_malformed_ir_is_reported_with_line_and_column():
    ok = "func @f(%x: f32) -> f32 {\n  %0 = exp %x : f32\n  return %0\n}\n"
    assert print_module(parse_module(ok)) == ok
    assert _error(ok.replace("exp %x", "exp %y")) == (
        "bad.ir:2:12: %y is not defined before this use")
    assert _error(ok.replace("exp", "expo")) == "bad.ir:2:8: unknown op 'expo'"
    assert _error(ok.replace(": f32\n  return", ": f33\n  return")).startswith(
        "bad.ir:2:17: unknown type 'f33'")
    assert _error(ok.replace("  %0 = exp", "  %x = exp")) == "bad.ir:2:3: %x is defined twice"
    assert _error(ok.replace("}\n", "")) == "bad.ir:4:1: expected '}', found the end of the text"
    assert _error(ok.replace(" : f32\n", "\n")) == "bad.ir:2:14: expected ' : ', found the line's end"
    assert _error("fn f() {}\n") == (
        "bad.ir:1:1: expected 'unit', 'struct', 'func' or 'export', found 'fn f() {}'")
    assert _error(ok.replace("exp %x", "sum %x {axes=None}")) == (
        "bad.ir:2:16: ReduceParams has no param 'axes'")


HAND_WRITTEN = """\
func @f(%l: f32, %v: f32) -> f32 {
  %0 = dist %l {family=Bernoulli, given=('logits',)} : Bernoulli -> f32
  %a = sample %0 {site=a} : f32
  %1 = const 1.0 : f32
  %2 = dist %l, %1 {family=Normal, given=('loc', 'scale')} : Normal -> f32
  %z = sample %2 {site=z} : f32
  %3 = sub %a, %v : f32
  %4 = mul %3, %3 : f32
  %5 = mul %z, %z : f32
  %6 = add %4, %5 : f32
  return %6
}

export @g = grad(expect(@f, samples=4), wrt=[l])
"""
"""A typecheck-stage module written by hand: a Bernoulli and a Normal draw."""


def _estimators(module: Module) -> dict[str, str]:
    diags = Diagnostics()
    module = Estimators().run(module, diags)
    assert not diags.has_errors, diags.render()
    return {s.site: str(s.estimator) for s in module.facts.estimators}


def test_estimators_pass_from_hand_written_ir():
    """The default: the score function for the Bernoulli draw, reparameterization for the
    Normal one; a unit's `pragma estimator` (its `unit` line) is the default instead."""
    assert _estimators(parse_module(HAND_WRITTEN)) == {"a": "score(baseline=auto)",
                                                       "z": "reparam"}
    pragma = 'unit "" estimator=score(baseline=loo)\n\n' + HAND_WRITTEN
    assert _estimators(parse_module(pragma)) == {"a": "score(baseline=loo)",
                                                 "z": "score(baseline=loo)"}


def test_gradflow_pass_from_hand_written_ir():
    """The gradient of w flows through the product, not through the stopped branch."""
    text = """\
func @f(%w: f32[D], %x: f32[D]) -> f32 {
  %0 = mul %w, %x : f32[D]
  %1 = stop_gradient %w : f32[D]
  %2 = add %0, %1 : f32[D]
  %3 = sum %2 {axis=None, keepdims=False} : f32
  %4 = sum %x {axis=None, keepdims=False} : f32
  %5 = add %3, %4 : f32
  return %5
}

export @g = grad(@f, wrt=[w])
"""
    diags = Diagnostics()
    module = GradFlow().run(parse_module(text), diags)
    assert not diags.has_errors, diags.render()
    noted = [line.split(" = ")[0].strip() for line in print_module(module).splitlines()
             if line.endswith("# grad: w")]
    assert noted == ["%0", "%2", "%3", "%5"]
    assert print_module(parse_module(print_module(module))) == print_module(module)


def test_what_the_printer_prints_beyond_messages():
    """A Categorical's event axes, a struct type's dim bindings, an unresolved struct name and
    a function's unit when its name does not imply it parse back."""
    text = """\
unit ""

unit "lib"

struct lib.Pair { a: f32[N], b: f32[N, M] }

func @lib.f(%p: lib.Pair[N=3], %l: f32[B, K]) -> f32 {
  %0 = dist %l {family=Categorical, given=('logits',)} : Categorical[B; K] -> i32[B]
  %c = sample %0 {site=c} : i32[B]
  %1 = getfield b %p : f32[3, M]
  %2 = sum %1 {axis=None, keepdims=False} : f32
  return %2
}

func @g(%q: ?Pair[N=2]) -> f32 in "lib" {
  %0 = const 0.0 : ?
  return %0
}
"""
    module = parse_module(text)
    assert print_module(module) == text
    fn, g = module.functions
    (pair, logits) = (p.value.type for p in fn.params)
    assert pair == StructType("lib.Pair", (("a", TensorType(DType.F32, (3,))),
                                           ("b", TensorType(DType.F32, (3, "M")))))
    dist = fn.body.ops[0].result.type
    assert dist == DistType("Categorical", ("B",), TensorType(DType.I32, ("B",)), ("K",))
    assert (fn.unit, g.unit) == ("lib", "lib")
    assert [u.name for u in module.units] == ["", "lib"]
    assert print_function(parse_function(print_function(g))) == print_function(g)


def test_an_unnamed_option_round_trips_before_its_pass_names_it():
    """`implicit(gmres)` stays unnamed until the hypergradient pass: the build stage prints
    and parses it bare, and the pass names it `method`."""
    source = """
fn f(lam: f32) -> f32 {
  let v = argmin u: f32 = 0.0 { 0.5 * exp(lam) * u ^ 2 - u } via gd() with implicit(gmres, iters=5)
  return v
}
export g = grad(f, wrt=[lam])
"""
    modules: dict[str, Module] = {}
    diags = Diagnostics()
    compile_module(SourceFile("t.grad", source), None, diags,
                   after=lambda name, module: modules.__setitem__(name, module))
    assert not diags.has_errors, diags.render()
    built, typed = print_module(modules["build"]), print_module(modules["hypergrad"])
    assert "implicit(gmres, iters=5)" in built and "implicit(method=gmres" in typed
    for stage in ("build", "hypergrad"):
        text = print_module(modules[stage])
        assert print_module(parse_module(text, f"t.{stage}.ir")) == text


def test_explicit_padding_pairs_round_trip():
    """A padding is a name (SAME, VALID) or (low, high) pairs: both print and parse back."""
    source = """
fn f(x: f32[B, 8, 8, 3], w: f32[3, 3, 3, 4]) -> f32 {
  let h = conv(x, w, padding=[(1, 1), (0, 2)], stride=2)
  return sum(max_pool(h, 2, padding=[(0, 1), (1, 0)])) + sum(conv_transpose(x, w))
}
export g = grad(f, wrt=[w])
"""
    diags = Diagnostics()
    module = compile_module(SourceFile("pad.grad", source), None, diags)
    assert module is not None, diags.render()
    text = print_module(module)
    assert "padding=((1, 1), (0, 2))" in text and "padding=SAME" in text
    assert print_module(parse_module(text, "pad.ir", module.name)) == text
