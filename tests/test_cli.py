"""The command line: check, explain, compile, usage errors and the internal-error path."""

from __future__ import annotations

from pathlib import Path

import pytest

import gradlang.cli as cli
from gradlang.cli import main

PROGRAM = """\
fn f(x: f32[B, D], w: f32[D]) -> f32 {
  let h = tanh(x @ w)
  return sum(h * h)
}

export loss = f
export g = grad(f, wrt=[w])
"""

WARNS = """\
fn f(w: f32[N], x: f32[N]) -> f32 {
  return sum(stop_gradient(w) * x)
}

export g = grad(f, wrt=[w, x])
"""

BAD = """\
fn f(x: f32[N]) -> f32 {
  return sum(y)
}
"""


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.grad").write_text(PROGRAM)
    (tmp_path / "warns.grad").write_text(WARNS)
    (tmp_path / "bad.grad").write_text(BAD)
    return tmp_path


def test_check_a_valid_program(folder, capsys):
    assert main(["check", "model.grad"]) == 0
    assert capsys.readouterr() == ("", "")


def test_check_reports_errors_with_exit_status_1(folder, capsys):
    assert main(["check", "bad.grad"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("bad.grad:2:14: error: unknown name 'y'\n  ")
    assert err.endswith("\n  " + " " * 13 + "^\n")


def test_warnings_fail_only_under_strict(folder, capsys):
    assert main(["check", "warns.grad"]) == 0
    assert "warning: the gradient of 'f' with respect to 'w' is always zero" in capsys.readouterr().err
    assert main(["check", "warns.grad", "--strict"]) == 1
    assert capsys.readouterr().err.count("warning:") == 1


def test_explain(folder, capsys):
    assert main(["explain", "warns.grad"]) == 0
    out = capsys.readouterr().out
    assert "export g = grad(f, wrt=[w, x])" in out
    assert "w: gradient is identically zero" in out
    assert "x: exact reverse-mode gradient" in out
    assert main(["explain", "model.grad"]) == 0
    out = capsys.readouterr().out
    assert "export loss = f: no gradient requested" in out


def test_explain_a_bad_program(folder, capsys):
    assert main(["explain", "bad.grad"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "unknown name 'y'" in captured.err


def test_compile_everything(folder, capsys):
    status = main(["compile", "model.grad", "-o", "out", "--emit", "ir,stablehlo,artifact",
                   "--print-after", "typecheck", "--dim", "B=4"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    out = folder / "out"
    names = ["model.build.ir", "model.resolve.ir", "model.typecheck.ir", "model.gradflow.ir",
             "model.loss.mlir", "model.g.mlir", "model.gx"]
    for name in names:
        assert (out / name).is_file(), name
        assert f"wrote {Path('out') / name}" in captured.out
    assert "// IR after typecheck" in captured.out
    assert "// IR after resolve" not in captured.out
    assert "func @f(%x: f32[B, D], %w: f32[D]) -> f32" in (out / "model.typecheck.ir").read_text()
    assert "stablehlo" in (out / "model.g.mlir").read_text()
    assert (out / "model.gx").read_bytes().startswith(b"GRADLANG-GX\0")


def test_compile_repeatable_emit_and_default_output_folder(folder, capsys):
    assert main(["compile", "model.grad", "--emit", "ir", "--emit", "ir"]) == 0
    assert (folder / "build" / "model.gradflow.ir").is_file()
    assert not (folder / "build" / "model.gx").exists()


def test_compile_a_bad_program_reports_and_writes_nothing(folder, capsys):
    assert main(["compile", "bad.grad", "-o", "out", "--emit", "ir"]) == 1
    assert "unknown name 'y'" in capsys.readouterr().err
    assert not (folder / "out").exists()


def test_compile_strict_reports_warnings_once(folder, capsys):
    assert main(["compile", "warns.grad", "-o", "out", "--emit", "ir", "--strict"]) == 1
    assert capsys.readouterr().err.count("warning:") == 1
    assert not (folder / "out").exists()


def test_bad_emit(folder, capsys):
    assert main(["compile", "model.grad", "--emit", "ir,llvm"]) == 2
    err = capsys.readouterr().err
    assert "gradlang: error: unknown --emit 'llvm'; choose from artifact, stablehlo, ir" in err
    assert not (folder / "build").exists()


def test_unknown_print_after_pass(folder, capsys):
    assert main(["compile", "model.grad", "--print-after", "optimize"]) == 2
    err = capsys.readouterr().err
    assert "gradlang: error: unknown pass 'optimize' for --print-after" in err
    assert "build, resolve, typecheck, compose, zeroth_order, multiobjective, gradflow" in err


def test_bad_dim(folder, capsys):
    assert main(["compile", "model.grad", "--dim", "B"]) == 2
    assert "--dim expects NAME=SIZE" in capsys.readouterr().err


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate", "model.grad"])
    assert exc.value.code == 2


@pytest.mark.parametrize("command", ["check", "explain", "compile"])
def test_missing_file(folder, capsys, command):
    assert main([command, "nowhere.grad"]) == 1
    captured = capsys.readouterr()
    assert captured.err == "gradlang: error: cannot read nowhere.grad: No such file or directory\n"
    assert "Traceback" not in captured.err


def test_unreadable_files(folder, capsys):
    (folder / "folder.grad").mkdir()
    assert main(["check", "folder.grad"]) == 1
    assert "gradlang: error: cannot read folder.grad: Is a directory" in capsys.readouterr().err
    (folder / "binary.grad").write_bytes(b"fn \xff\xfe(")
    assert main(["check", "binary.grad"]) == 1
    assert "gradlang: error: cannot read binary.grad: 'utf-8' codec can't decode" in capsys.readouterr().err


def _boom(*args, **kwargs):
    raise RuntimeError("boom")


@pytest.mark.parametrize("command", [["check", "model.grad"], ["explain", "model.grad"],
                                     ["compile", "model.grad", "--emit", "ir"]])
def test_internal_compiler_error(folder, capsys, monkeypatch, command):
    monkeypatch.setattr(cli, "compile_module", _boom)
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err.startswith("gradlang: internal compiler error: RuntimeError: boom\n")
    assert "This is a bug in gradlang" in err
    assert "Traceback" not in err


def test_internal_compiler_error_with_traceback(folder, capsys, monkeypatch):
    monkeypatch.setattr(cli, "compile_module", _boom)
    assert main(["--traceback", "check", "model.grad"]) == 2
    err = capsys.readouterr().err
    assert "internal compiler error: RuntimeError: boom" in err
    assert "Traceback (most recent call last)" in err


def test_internal_error_in_a_pass(folder, capsys, monkeypatch):
    from gradlang.passes import typecheck

    monkeypatch.setitem(typecheck.RULES, "tanh", lambda ctx, op, args: 1 / 0)
    assert main(["check", "model.grad"]) == 2
    err = capsys.readouterr().err
    assert "internal compiler error: ZeroDivisionError" in err and "Traceback" not in err
