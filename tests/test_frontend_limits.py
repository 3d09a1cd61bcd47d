"""The front end's robustness: nesting at and past the limits of `gradlang.limits` under
Python's default recursion limit, literals too large to convert, imports cached by path, and
source text as the renderer shows it (line endings, a byte order mark, invisible characters).

The diagnostics themselves (exact messages, spans, carets) are in the corpus,
tests/diagnostics/ (nested_too_deeply, blocks_nested_too_deeply, calls_nested_too_deeply,
struct_nested_too_deeply, literal_out_of_range, export_reserved_name, invisible_characters,
cr_line_endings, crlf_and_bom, vertical_tab, import_not_utf8)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import gradlang
from gradlang.builder import MODULE_ATTRIBUTES
from gradlang.cli import main
from gradlang.diagnostics import Diagnostic, Severity, SourceFile, Span
from gradlang.limits import MAX_BLOCKS, MAX_CALLS, MAX_DEPTH

DEFAULT_RECURSION_LIMIT = 1000


@pytest.fixture
def default_recursion_limit():
    """Python's default recursion limit while the test runs (whatever the caller set)."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(DEFAULT_RECURSION_LIMIT)
    yield
    sys.setrecursionlimit(old)


def run(folder: Path, text: str, *command: str, files: dict[str, str] | None = None) -> int:
    """`gradlang COMMAND main.grad` on `text` written to main.grad in `folder` (with `files`
    beside it); the exit status."""
    (folder / "main.grad").write_text(text)
    for name, content in (files or {}).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(content)
    return main([command[0], str(folder / "main.grad"), *command[1:]])


def compile_args(folder: Path) -> tuple[str, ...]:
    return ("compile", "-o", str(folder / "build"), "--emit", "stablehlo")


def fn(name: str, body: str, params: str = "x: f32") -> str:
    return f"fn {name}({params}) -> f32 {{\n  return {body}\n}}\n"


def argmins(n: int) -> str:
    """n inner problems, each in the objective of the next."""
    body = "x"
    for i in range(n):
        body = f"argmin v{i}: f32 = 0.0 {{ (v{i} - {body}) ^ 2 }} via gd(steps=2) with unrolled"
    return body


def expects(n: int) -> str:
    """n Monte Carlo scopes, each in the next: the costliest blocks for the recursion that JAX
    traces in reasonable time (nested argmins cost more frames per level, 27 against 14, but
    take time exponential in their depth to trace: a minute at 9 levels)."""
    return "expect(" * n + "x" + ", samples=2)" * n


def call_chain(n: int, innermost: str) -> str:
    """h0 returns `innermost`; h1 ... h{n} each call the one before: n nested calls."""
    return fn("h0", innermost) + "".join(fn(f"h{i}", f"h{i - 1}(x)") for i in range(1, n + 1))


GRAD = "export g = grad({}, wrt=[x])\n"

AT_THE_LIMITS = {
    # the deepest expression: MAX_DEPTH levels (calls in calls, the name inside)
    "expression": fn("f", "sin(" * (MAX_DEPTH - 1) + "x" + ")" * (MAX_DEPTH - 1)) + GRAD.format("f"),
    # deep blocks at the end of the longest chain of calls
    "blocks in calls": call_chain(MAX_CALLS, expects(MAX_BLOCKS)) + GRAD.format(f"h{MAX_CALLS}"),
    # a tuple type MAX_DEPTH levels deep
    "tuple type": fn("f", "x", "x: f32, t: " + "(" * (MAX_DEPTH - 1) + "f32" + ", f32)" * (MAX_DEPTH - 1))
    + GRAD.format("f"),
    # a struct chain MAX_DEPTH deep read through two field chains
    "struct chain": "struct S1 { a: f32 }\n"
    + "".join(f"struct S{i} {{ a: S{i - 1} }}\n" for i in range(2, MAX_DEPTH + 1))
    + fn("f", "t" + ".a" * (MAX_DEPTH // 2), f"s: S{MAX_DEPTH}").replace(
        "return", "let t = s" + ".a" * (MAX_DEPTH // 2) + "\n  return")
    + "export g = grad(f, wrt=[s])\n",
    # a sum of many terms is no nesting at all
    "long sum": fn("f", " + ".join(["x"] * 3000)) + GRAD.format("f"),
}

PAST_THE_LIMITS = {
    "expression": (fn("f", "sin(" * MAX_DEPTH + "x" + ")" * MAX_DEPTH),
                   f"expression nested too deeply ({MAX_DEPTH + 1} levels; the limit is {MAX_DEPTH})"),
    "blocks": (fn("f", argmins(MAX_BLOCKS + 1)), "blocks nested too deeply: this 'argmin' is level"),
    "blocks in calls": (call_chain(1, argmins(MAX_BLOCKS)) + fn("g", "if x > 0.0 then h1(x) else x"),
                        "blocks nested too deeply: the blocks of 'h1' are at levels up to"),
    "calls": (call_chain(MAX_CALLS + 1, "x"), "calls nested too deeply"),
    "tuple type": (fn("f", "x", "x: f32, t: " + "(" * MAX_DEPTH + "f32" + ", f32)" * MAX_DEPTH),
                   "type nested too deeply"),
    "struct chain": ("struct S1 { a: f32 }\n"
                     + "".join(f"struct S{i} {{ a: S{i - 1} }}\n" for i in range(2, MAX_DEPTH + 2)),
                     f"struct 'S{MAX_DEPTH + 1}' is nested too deeply"),
}


@pytest.mark.parametrize("kind", AT_THE_LIMITS)
def test_nesting_at_the_limits_compiles(kind, tmp_path, default_recursion_limit, capsys):
    assert run(tmp_path, AT_THE_LIMITS[kind], *compile_args(tmp_path)) == 0, capsys.readouterr().err


@pytest.mark.parametrize("kind", PAST_THE_LIMITS)
def test_nesting_past_the_limits_is_a_diagnostic(kind, tmp_path, default_recursion_limit, capsys):
    text, message = PAST_THE_LIMITS[kind]
    for command in (("check",), compile_args(tmp_path)):
        assert run(tmp_path, text, *command) == 1
        assert "main.grad:" in (err := capsys.readouterr().err) and message in err, err


@pytest.mark.parametrize("n", [10, 300, 3000])
def test_nesting_far_past_the_limits_is_a_diagnostic(n, tmp_path, default_recursion_limit, capsys):
    """Every kind of deep nesting the fuzzer found, far past the limits: a diagnostic (or
    nothing, for chains that are not nesting), never an internal error."""
    programs = [fn("f", "(" * n + "x" + ")" * n),
                fn("f", "-" * n + "x"),
                fn("f", "x" + " ^ x" * n),
                fn("f", "if x > 0.0 then " * n + "x" + " else x" * n),
                fn("f", "checkpoint { " * n + "x" + " }" * n),
                fn("f", "x", "x: f32, t: " + "(" * n + "f32" + ", f32)" * n),
                "struct S { a: f32 }\n" + fn("f", "s" + ".a" * n, "s: S"),
                fn("f", "y", "x: f32") .replace("return y", "let " + "(" * n + "y" + ", z)" * n
                                                 + " = " + "(" * n + "x" + ", x)" * n + "\n  return y"),
                call_chain(n, "x")]
    for text in programs:
        assert run(tmp_path, text, "check") in (0, 1), capsys.readouterr().err


def test_a_long_chain_of_imports(tmp_path, default_recursion_limit, capsys):
    """Imports are followed without recursion: 300 files, each importing the next."""
    n = 300
    files = {f"m{i}.grad": f"use m{i + 1}\n" + fn("h", "x") for i in range(1, n)}
    files[f"m{n}.grad"] = fn("h", "2.0 * x")
    assert run(tmp_path, "use m1\n" + fn("f", f"m{n}.h(x)"), "check", files=files) == 1
    assert "unknown function 'm300.h'" in capsys.readouterr().err  # m300 is m299's import only
    assert run(tmp_path, "use m1\n" + fn("f", "m1.h(x)"), "check", files=files) == 0


def test_integer_literals_too_long_to_convert(tmp_path, capsys):
    """Python refuses to convert a string of more than 4300 digits to an int."""
    digits = "9" * 5000
    for text in (fn("f", f"x * f32({digits})"), fn("f", "sum(x)", f"x: f32[{digits}]")):
        assert run(tmp_path, text, "check") == 1
        assert "integer literal 9999999999...9999999999 (5000 digits) does not fit in i64" in \
            capsys.readouterr().err


def test_an_import_is_one_unit_per_file(tmp_path):
    """`use b` in main.grad and in sub/a.grad are two files: each caller gets its own b,
    whichever import comes first."""
    files = {"b.grad": fn("f", "1.0 * x"),
             "sub/b.grad": fn("f", "2.0 * x"),
             "sub/a.grad": "use b\n" + fn("g", "b.f(x)")}
    for order in ("use b\nuse sub.a\n", "use sub.a\nuse b\n"):
        (tmp_path / "main.grad").write_text(order + fn("h", "b.f(x) + 10.0 * a.g(x)") + "export h = h\n")
        for name, text in files.items():
            (tmp_path / name).parent.mkdir(exist_ok=True)
            (tmp_path / name).write_text(text)
        m = gradlang.compile_file(tmp_path / "main.grad")
        assert float(m.h(np.float32(1.0))) == 21.0
        assert sorted(u.name for u in m.ir.units) == ["", "b", "sub.a", "sub.b"]


def test_a_file_imported_twice_is_read_once(tmp_path):
    files = {"b.grad": fn("f", "x"), "a.grad": "use b\n" + fn("g", "b.f(x)"),
             "main.grad": "use a\nuse b\n" + fn("h", "a.g(x) + b.f(x)")}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    m = gradlang.compile_file(tmp_path / "main.grad")
    assert sorted(u.name for u in m.ir.units) == ["", "a", "b"]


def _render(text: str, line: int, col: int, end_col: int) -> str:
    source = SourceFile("f.grad", text)
    return Diagnostic(Severity.ERROR, "m", Span(source, line, col, line, end_col)).render()


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_lines_end_at_lf_crlf_or_cr(newline):
    text = newline.join(["a", "bb", "ccc", ""])
    assert SourceFile("f.grad", text).lines == ("a", "bb", "ccc")
    assert _render(text, 3, 2, 3) == "f.grad:3:2: error: m\n  ccc\n   ^"


def test_other_separators_are_characters_of_the_line():
    text = "a\x0bb\x0cc\u2028d\ne"
    assert SourceFile("f.grad", text).lines == ("a\x0bb\x0cc\u2028d", "e")
    assert _render(text, 1, 7, 8) == "f.grad:1:7: error: m\n  a\\x0bb\\x0cc\\u2028d\n" + \
        "  " + " " * 17 + "^"  # under d, after a, \x0b, b, \x0c, c and \u2028


def test_a_byte_order_mark_is_not_text():
    assert SourceFile("f.grad", "\ufeffab").text == "ab"
    assert _render("\ufeffab", 1, 2, 3) == "f.grad:1:2: error: m\n  ab\n   ^"


def test_carets_line_up_under_tabs_escapes_and_wide_characters():
    assert _render("\tx\x00y", 1, 4, 5) == "f.grad:1:4: error: m\n  \tx\\x00y\n  \t" + " " * 5 + "^"
    assert _render("変数 = \u200bz", 1, 6, 8) == "f.grad:1:6: error: m\n  変数 = \\u200bz\n" + \
        "  " + " " * 7 + "^" * 7


def test_export_names_reserved_are_the_module_attributes(tmp_path):
    """MODULE_ATTRIBUTES lists exactly the public attributes of both kinds of module (an
    export by any other name that does not start with '_' is reachable as m.NAME)."""
    m = gradlang.compile_source(fn("f", "x * x") + "export e = f\n")
    loaded = gradlang.load(m.save(tmp_path / "m.gx"))
    for module in (m, loaded):
        assert getattr(module, "e") is module["e"]
    public = {n for module in (m, loaded) for n in dir(module) if not n.startswith("_")}
    assert public - {"e"} == set(MODULE_ATTRIBUTES)
