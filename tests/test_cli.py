"""The command line: check, explain, compile, their exit codes (0 ok, 1 errors in the program,
2 bad input, 3 internal compiler error), input errors and lowering with symbolic dims."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import gradlang.cli as cli
from gradlang.cli import EXIT_ERRORS, EXIT_INPUT, EXIT_INTERNAL, MAX_DIM, main

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
    assert "build, resolve, typecheck, aux, compose, zeroth_order, multiobjective, gradflow" in err


@pytest.mark.parametrize("command", ["compile", "verify"])
@pytest.mark.parametrize("dims, message", [
    (["B"], "--dim expects NAME=SIZE, e.g. --dim B=32; got 'B'"),
    (["B=x"], "--dim expects NAME=SIZE, e.g. --dim B=32; got 'B=x'"),
    (["2=4"], "--dim expects NAME=SIZE, e.g. --dim B=32; got '2=4'"),
    (["B=0"], f"--dim B=0: a size must be from 1 to {MAX_DIM} (2^31 - 1)"),
    (["B=-3"], f"--dim B=-3: a size must be from 1 to {MAX_DIM} (2^31 - 1)"),
    ([f"B={MAX_DIM + 1}"], f"--dim B={MAX_DIM + 1}: a size must be from 1"),
    (["B=99999999999999999999"], "--dim B=99999999999999999999: a size must be from 1"),
    (["B=4", "B=5"], "--dim B is given twice, as 4 and 5"),
    (["B=4", "Q=3"], "--dim Q=3: no export of model.grad has a symbolic dim 'Q' (its dims: B, D)"),
])
def test_bad_dim_is_an_input_error(folder, capsys, command, dims, message):
    argv = [command, "model.grad", "-o", "out"] if command == "compile" else [command, "model.grad"]
    assert main([*argv, *(f"--dim={d}" for d in dims)]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert err.startswith(f"gradlang: error: {message}") and err.count("\n") == 1, err
    assert not (folder / "out").exists()


def test_dim_names_of_a_module_without_symbolic_dims(folder, capsys):
    (folder / "fixed.grad").write_text("fn f(w: f32[3]) -> f32 { return sum(w * w) }\n"
                                       "export g = grad(f, wrt=[w])\n")
    assert main(["compile", "fixed.grad", "--dim", "B=3"]) == EXIT_INPUT
    assert capsys.readouterr().err == ("gradlang: error: --dim B=3: no export of fixed.grad has a "
                                       "symbolic dim 'B' (none has any)\n")


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate", "model.grad"])
    assert exc.value.code == 2


@pytest.mark.parametrize("command", ["check", "explain", "compile", "verify"])
def test_unreadable_files_are_input_errors(folder, capsys, command):
    (folder / "folder.grad").mkdir()
    (folder / "binary.grad").write_bytes(b"fn \xff\xfe(")
    for name, reason in [("nowhere.grad", "No such file or directory"),
                         ("folder.grad", "Is a directory"),
                         ("binary.grad", "it is not UTF-8 text (byte 3 is 0xff)")]:
        assert main([command, name]) == EXIT_INPUT
        captured = capsys.readouterr()
        assert captured.err == f"gradlang: error: cannot read {name}: {reason}\n"
    assert not (folder / "build").exists()


def test_compile_output_folder_that_cannot_be_made(folder, capsys):
    (folder / "taken").write_text("a file")
    for out, reason in [("taken", "File exists"), ("taken/sub", "Not a directory"),
                        ("model.grad", "File exists")]:
        assert main(["compile", "model.grad", "-o", out, "--emit", "ir"]) == EXIT_INPUT
        assert capsys.readouterr().err == (f"gradlang: error: cannot create the output folder "
                                           f"{out}: {reason} (-o names a folder)\n")
    assert (folder / "taken").read_text() == "a file"


def test_compile_output_file_that_cannot_be_written(folder, capsys):
    (folder / "out" / "model.loss.mlir").mkdir(parents=True)
    assert main(["compile", "model.grad", "-o", "out", "--emit", "stablehlo"]) == EXIT_INPUT
    target = Path("out") / "model.loss.mlir"
    assert capsys.readouterr().err == f"gradlang: error: cannot write {target}: Is a directory\n"


@pytest.mark.parametrize("flag, path, reason", [
    ("--json", "nowhere/r.json", "there is no folder nowhere"),
    ("--json", ".", "it is a folder"),
    ("--plot", "model.grad/r.png", "there is no folder model.grad"),
])
def test_verify_outputs_that_cannot_be_written_fail_before_measuring(folder, capsys, monkeypatch,
                                                                    flag, path, reason):
    monkeypatch.setattr(cli, "compile_module", _boom)  # refused before reading the program
    assert main(["verify", "model.grad", flag, path]) == EXIT_INPUT
    assert capsys.readouterr().err == f"gradlang: error: {flag} {path}: cannot write there: {reason}\n"


def test_verify_output_that_fails_while_written(folder, capsys, monkeypatch):
    from gradlang.verify import command

    monkeypatch.setattr(command, "_unwritable", lambda path: None)  # as if it vanished since
    argv = ["verify", "model.grad", "--dim", "B=2", "--dim", "D=3", "--samples", "2"]
    assert main([*argv, "--json", "nowhere/r.json"]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert err == "gradlang: error: cannot write nowhere/r.json: No such file or directory\n"


def _boom(*args, **kwargs):
    raise RuntimeError("boom")


@pytest.mark.parametrize("command", [["check", "model.grad"], ["explain", "model.grad"],
                                     ["compile", "model.grad", "--emit", "ir"],
                                     ["verify", "model.grad"]])
def test_internal_compiler_error(folder, capsys, monkeypatch, command):
    monkeypatch.setattr(cli, "compile_module", _boom)
    assert main(command) == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert err.startswith("gradlang: internal compiler error: RuntimeError: boom\n")
    assert "This is a bug in gradlang" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv", [["--traceback", "check", "model.grad"],
                                  ["check", "--traceback", "model.grad"],
                                  ["check", "model.grad", "--traceback"]])
def test_internal_compiler_error_with_traceback(folder, capsys, monkeypatch, argv):
    monkeypatch.setattr(cli, "compile_module", _boom)
    assert main(argv) == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert "internal compiler error: RuntimeError: boom" in err
    assert "Traceback (most recent call last)" in err


def test_internal_error_in_a_pass(folder, capsys, monkeypatch):
    from gradlang.passes import typecheck

    monkeypatch.setitem(typecheck.RULES, "tanh", lambda ctx, op, args: 1 / 0)
    assert main(["check", "model.grad"]) == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert "internal compiler error: ZeroDivisionError" in err and "Traceback" not in err


# ---- lowering with symbolic dims

EXTERN = """\
extern fn score(logits: f32[B, C], labels: i32[B]) -> f32

fn f(w: f32[D, C], x: f32[B, D], y: i32[B]) -> f32 {
  return score(x @ w, y)
}

export g = f
"""

SAMPLED = """\
fn f(w: f32[D, H], x: f32[B, D]) -> f32 {
  return sum(tanh((x @ w) with wta_crs(keep=4)))
}

fn plain(w: f32[D, H], x: f32[B, D]) -> f32 {
  return sum(tanh(x @ w))
}

export sampled = grad(f, wrt=[w])
export exact = grad(plain, wrt=[w])
"""


def test_a_callback_needs_static_shapes_in_stablehlo(folder, capsys):
    (folder / "extern.grad").write_text(EXTERN)
    assert main(["compile", "extern.grad", "-o", "out", "--emit", "stablehlo"]) == EXIT_ERRORS
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == """\
extern.grad:7:1: error: export 'g' needs dims 'B', 'C' fixed to lower: it calls extern 'score', \
a Python callback, and StableHLO passes a callback only arrays of static shapes (here \
score(float32[B,C], int32[B]) -> float32[]); pass --dim B=SIZE --dim C=SIZE
  export g = f
  ^^^^^^^^^^^^
extern.grad:1:1: note: extern 'score' is declared here
  extern fn score(logits: f32[B, C], labels: i32[B]) -> f32
  ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
"""
    # the artifact cuts the callback out: its dims stay symbolic
    assert main(["compile", "extern.grad", "-o", "out"]) == 0
    assert main(["compile", "extern.grad", "-o", "out", "--emit", "stablehlo",
                 "--dim", "B=8", "--dim", "C=3"]) == 0
    assert "func.func public @main" in (folder / "out" / "extern.g.mlir").read_text()


@pytest.mark.parametrize("emit", ["stablehlo", "artifact"])
def test_an_undecidable_size_comparison_names_the_dim_and_the_operation(folder, capsys, emit):
    (folder / "sampled.grad").write_text(SAMPLED)
    assert main(["compile", "sampled.grad", "-o", "out", "--emit", emit]) == EXIT_ERRORS
    captured = capsys.readouterr()
    assert captured.err == """\
sampled.grad:9:1: error: export 'sampled' needs dim 'B' fixed to lower: an operation compares \
sizes ('B' <= '4'), which JAX cannot decide for every value of a symbolic dim; pass --dim B=SIZE
  export sampled = grad(f, wrt=[w])
  ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
sampled.grad:2:20: note: in this operation
    return sum(tanh((x @ w) with wta_crs(keep=4)))
                     ^^^^^
"""
    if emit == "stablehlo":  # the other export is still written
        assert captured.out == f"wrote {Path('out') / 'sampled.exact.mlir'}\n"
    else:
        assert captured.out == "" and not (folder / "out" / "sampled.gx").exists()
    assert main(["compile", "sampled.grad", "-o", "out", "--emit", emit, "--dim", "B=16"]) == 0


def test_a_note_leads_from_the_standard_library_to_the_call(folder, capsys):
    (folder / "quant.grad").write_text("use std.quant\n"
                                       "fn f(w: f32[D, 4]) -> f32 { return sum(quest4_w(w)) }\n"
                                       "export g = grad(f, wrt=[w])\n")
    assert main(["compile", "quant.grad", "-o", "out", "--emit", "stablehlo"]) == EXIT_ERRORS
    err = capsys.readouterr().err
    assert err.startswith("quant.grad:3:1: error: export 'g' needs dim 'D' fixed to lower: an "
                          "operation compares sizes ('D' > '1')")
    assert "quant.grad:" in err.split("\n")[3] and ": note: in this operation" in err
    assert err.endswith("quant.grad:2:40: note: reached from here\n"
                        "  fn f(w: f32[D, 4]) -> f32 { return sum(quest4_w(w)) }\n"
                        "                                         ^^^^^^^^^^^\n")


def _refuse(ctx, op, x):
    raise ValueError("JAX refuses this.\nMore details.")


def test_other_lowering_failures(folder, capsys, monkeypatch):
    """With symbolic dims left, a failure JAX explains is reported at the export with the dims
    that may need fixing; with every dim fixed it is a bug (an internal compiler error)."""
    from gradlang.runtime.rules import LOWERINGS

    monkeypatch.setitem(LOWERINGS, "tanh", _refuse)
    argv = ["compile", "model.grad", "-o", "out", "--emit", "stablehlo", "--dim", "D=3"]
    assert main(argv) == EXIT_ERRORS
    assert capsys.readouterr().err == """\
model.grad:6:1: error: export 'loss' could not be lowered while its dims B are symbolic (JAX \
refuses this); fix those it needs with --dim NAME=SIZE
  export loss = f
  ^^^^^^^^^^^^^^^
model.grad:7:1: error: export 'g' could not be lowered while its dims B are symbolic (JAX refuses \
this); fix those it needs with --dim NAME=SIZE
  export g = grad(f, wrt=[w])
  ^^^^^^^^^^^^^^^^^^^^^^^^^^^
"""
    assert main([*argv, "--dim", "B=2"]) == EXIT_INTERNAL
    assert "internal compiler error: ValueError: JAX refuses this." in capsys.readouterr().err


def test_sizes_the_program_refuses_are_input_errors(folder, capsys, monkeypatch):
    from gradlang.runtime.rules import LOWERINGS
    from gradlang.runtime.signature import ArgumentError

    def refuse(ctx, op, x):
        raise ArgumentError("tanh at model.grad:2:11 wants D even, but the arguments make D = 3")

    monkeypatch.setitem(LOWERINGS, "tanh", refuse)
    assert main(["compile", "model.grad", "-o", "out", "--emit", "artifact", "--dim", "D=3"]) == 2
    assert capsys.readouterr().err == (
        "gradlang: error: the sizes given with --dim do not fit export 'loss': tanh at "
        "model.grad:2:11 wants D even, but the arguments make D = 3\n")


def test_an_op_that_lowers_for_some_platforms_only(folder, capsys, monkeypatch):
    """The artifact's refusal (an op with no lowering for one of --platforms) is an error at
    each export it names, with its hint, not an internal error or a --dim hint."""
    from gradlang.runtime.artifact import ArtifactError
    from gradlang.runtime.rules import LOWERINGS

    def refuse(ctx, op, x):
        raise ArtifactError("tanh has no lowering for cuda\n  hint: save it for cpu only")

    monkeypatch.setitem(LOWERINGS, "tanh", refuse)
    argv = ["compile", "model.grad", "-o", "out", "--emit", "artifact", "--dim", "B=2", "--dim",
            "D=3", "--platforms", "cpu,cuda"]
    assert main(argv) == EXIT_ERRORS
    err = capsys.readouterr().err
    assert err.count("error: tanh has no lowering for cuda") == 2, err
    assert "model.grad:6:1: error: tanh" in err and "hint: save it for cpu only" in err
    assert "--dim" not in err and not (folder / "out" / "model.gx").exists()


def test_an_extern_in_a_loop_cannot_be_cut_out_of_an_artifact(folder, capsys):
    (folder / "loop.grad").write_text(
        "extern fn score(w: f32[3]) -> f32\n"
        "fn f(w: f32[3]) -> f32 {\n"
        "  let s = for i in range(2) carry (s = 0.0) { s + score(w) }\n"
        "  return s\n"
        "}\n"
        "export value = f\n")
    assert main(["compile", "loop.grad", "-o", "out"]) == EXIT_ERRORS
    err = capsys.readouterr().err
    assert err.startswith("loop.grad:6:1: error: export 'value' calls extern 'score' and cannot be "
                          "saved as an artifact: ")
    assert "an artifact can cut extern calls out only at the top level of an export" in err


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NEED_DIMS = {
    "mezo_mlp": {e: "B, C" for e in ("mezo_error", "mezo_error_wide", "error")},
    "qat_mlp": {e: "D" for e in ("step_q4", "step_q1", "step_q4_in", "step_q1_in", "accuracy_q4",
                                 "accuracy_q1", "accuracy_q4_in", "accuracy_q1_in", "logits_q4",
                                 "weights_q4")},
    "wta_crs": {"sampled": "B"},
}
"""Per example, the exports whose StableHLO needs dims fixed, with the dims the report names
(alignprop's and cartpole's loops of symbolic length lower as scans, which reverse mode
differentiates)."""
REPORTED = re.compile(r"^\S+: error: export '(\w+)' (?:needs dims? (.+?) fixed to lower|could "
                      r"not be lowered while its dims (.+?) are symbolic)", re.M)


@pytest.mark.parametrize("name", [n if n in ("mlp", "mezo_mlp", "wta_crs") else
                                  pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(p.stem for p in EXAMPLES.glob("*.grad"))])
def test_examples_lower_with_symbolic_dims_or_say_which_to_fix(name, tmp_path, capsys):
    status = main(["compile", str(EXAMPLES / f"{name}.grad"), "-o", str(tmp_path),
                   "--emit", "stablehlo"])
    err = capsys.readouterr().err
    reported = {e: (named or every).replace("'", "") for e, named, every in REPORTED.findall(err)}
    assert reported == NEED_DIMS.get(name, {}), err
    assert status == (EXIT_ERRORS if reported else 0) and "internal compiler error" not in err


@pytest.mark.parametrize("message, dims, why", [
    ("Symbolic dimension comparison 'S - 10' > '0' is inconclusive.\nThis error arises ...",
     ("S",), "an operation compares sizes ('S - 10' > '0'), which JAX cannot decide for every "
             "value of a symbolic dim"),
    ("Symbolic dimension 'max(0, T - K)' used in a context that requires a constant\nThis ...",
     ("T", "K"), "an operation needs a size as a constant (Symbolic dimension 'max(0, T - K)' "
                 "used in a context that requires a constant)"),
])
def test_the_dims_of_jax_inconclusive_operations(message, dims, why):
    import jax

    from gradlang.runtime.symbolic import inconclusive

    error = inconclusive(jax.errors.InconclusiveDimensionOperation(message))
    assert (error.dims, error.why, error.spans) == (dims, why, ())
