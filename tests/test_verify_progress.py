"""`gradlang verify` on long runs: batches run in pieces traced once and compiled at level 0,
then at level 1 when the first two show that the rest would take longer than that
compilation (the lbfgs argmin under ES of issue 23); progress on stderr when asked; Ctrl-C
stops it with exit status 130, one line and the reports finished before it."""

from __future__ import annotations

import io
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradlang
from gradlang.cli import main
from gradlang.verify import progress
from gradlang.verify import program as verify_program
from gradlang.verify.program import (FAST_COMPILE, OPTIMIZED, PIECES, batched, draw_estimates,
                                     load)

TWO = """
fn f(w: f32[2]) -> f32 { return sum(w * w * w) }
export a = grad(f, wrt=[w])
export b = grad(f, wrt=[w])
"""
REFERENCE = "reference (finite differences)"


@pytest.fixture
def compiles(monkeypatch) -> list[dict]:
    """The options of every XLA compilation from a lowered program, in order."""
    seen = []
    compile_ = jax.stages.Lowered.compile

    def spy(self, compiler_options=None):
        seen.append(compiler_options)
        return compile_(self, compiler_options)

    monkeypatch.setattr(jax.stages.Lowered, "compile", spy)
    return seen


def _cube(x, c):
    return jnp.sum(x) ** 3 * c


def _batch(monkeypatch, again: bool) -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
    """`batched` over 40 rows with the level decided `again` (the first pieces' timing
    replaced), the rows computed one by one, how many times the function was traced and the
    rows done after each piece."""
    traced, done = [], []

    def fn(x, c):
        traced.append(1)
        return _cube(x, c)

    monkeypatch.setattr(verify_program, "recompile", lambda *timing: again)
    monkeypatch.setattr(progress, "counter", lambda what, total: done.append)
    xs = np.linspace(0.1, 1, 120, dtype=np.float32).reshape(40, 3)
    got = batched(fn, (xs,), 40, 1024, (np.float32(0.5),))
    want = np.array([jax.jit(_cube)(x, np.float32(0.5)) for x in xs])
    return got, want, traced, done


def test_a_batch_runs_in_pieces_traced_once_and_recompiled_at_level_1_when_worth_it(
        monkeypatch, compiles):
    # each within 4 eps of the exact value: a sum of 3 positive numbers (2 roundings of eps / 2,
    # in any order) cubed (tripling them, and 2 products of eps / 2), times 0.5 (exact)
    rtol = 8 * np.finfo(np.float32).eps
    pieces = [*range(3, 40, 3), 40]  # ceil(40 / PIECES) = 3 rows a piece, the last one padded
    got, want, traced, done = _batch(monkeypatch, again=True)
    assert len(traced) == 1 and compiles == [FAST_COMPILE, OPTIMIZED] and done == pieces
    np.testing.assert_allclose(got, want, rtol=rtol)
    compiles.clear()
    got, want, traced, done = _batch(monkeypatch, again=False)
    assert len(traced) == 1 and compiles == [FAST_COMPILE] and done == pieces
    np.testing.assert_allclose(got, want, rtol=rtol)


def test_a_moving_average_chain_runs_in_pieces_bit_for_bit_one_chain(monkeypatch):
    """baseline=ma's state is threaded from piece to piece: the estimates are those of one
    scan over every key."""
    m = gradlang.compile_source("""
fn f(t: f32) -> f32 {
  c ~ Bernoulli(logits=t) with score(baseline=ma)
  return (c - 0.3) ^ 2
}
export g = grad(expect(f, samples=1), wrt=[t])
""")
    chain = load(m.ir, "g", {})
    args, key = chain.arguments({"t": np.float32(0.2)}), jax.random.key(3)
    done = []
    monkeypatch.setattr(progress, "counter", lambda what, total: done.append)
    (pieces,) = draw_estimates(chain, args, 37, key, 1024)
    assert done == [*range(3, 37, 3), 37]
    monkeypatch.setattr(verify_program, "PIECES", 1)
    (whole,) = draw_estimates(chain, args, 37, key, 1024)
    assert np.array_equal(pieces, whole) and len(np.unique(pieces)) > 2


def test_the_level_is_decided_by_the_first_pieces_against_the_compilation():
    rest = PIECES - 2
    assert verify_program.recompile(1.0, 3.1 / rest, rest)
    assert not verify_program.recompile(1.0, 2.9 / rest, rest)


def _untimed(report: str) -> list[str]:
    return [line for line in report.splitlines()
            if "evaluations," not in line and "cost per estimate" not in line]


def test_progress_is_shown_when_asked_and_only_then(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "two.grad").write_text(TWO)
    assert main(["verify", "two.grad", "--export", "a"]) == 0
    quiet = capsys.readouterr()
    assert quiet.err == ""
    assert main(["verify", "two.grad", "--export", "a", "--progress"]) == 0
    shown = capsys.readouterr()
    assert _untimed(shown.out) == _untimed(quiet.out)  # the report itself is unchanged
    lines = shown.err.splitlines()
    assert lines[0].startswith("verify a: compiling the gradient (")
    assert any(line.startswith(f"verify a: {REFERENCE} 2/2 (") for line in lines)
    assert all(line.startswith("verify a: ") and line.endswith(" s)") for line in lines)


def test_on_a_terminal_progress_is_one_line_rewritten_then_cleared():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    with progress.shown(stream), progress.exporting("g"):
        step = progress.counter("estimates", 2)
        step(1)
        step(2)
    text = stream.getvalue()
    assert "\n" not in text and text.count("\r") == 4
    assert "verify g: estimates 2/2 (0 s)" in text and text.endswith("\r")


def test_ctrl_c_stops_verify_with_130_one_line_and_the_reports_done(tmp_path, monkeypatch,
                                                                   capsys):
    """Ctrl-C (simulated) after the first piece of export b's reference: a's report, then one
    line; with --json to stdout no table is printed, which would not be JSON."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "two.grad").write_text(TWO)
    counter = progress.counter

    def interrupted(what: str, total: int):
        if progress._SHOWN.get().export != "b" or what != REFERENCE:
            return counter(what, total)

        def done(count: int):
            raise KeyboardInterrupt

        return done

    monkeypatch.setattr(progress, "counter", interrupted)
    assert main(["verify", "two.grad", "--progress"]) == 130
    captured = capsys.readouterr()
    assert "export a = grad(" in captured.out and "export b" not in captured.out
    assert captured.err.splitlines()[-1] == ("gradlang: verify interrupted while verifying 'b'; "
                                             "1 of 2 exports verified, above")
    assert "Traceback" not in captured.err
    assert main(["verify", "two.grad", "--progress", "--json"]) == 130
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines()[-1] == ("gradlang: verify interrupted while verifying 'b'; "
                                             "1 of 2 exports verified")


ES_LBFGS = """
fn val_loss(lam: f32[D], x: f32[N, D], y: f32[N], xv: f32[M, D], yv: f32[M]) -> f32 {
  let w = argmin v: f32[D] = zeros([D]) {
            0.5 * mean((x @ v - y) ^ 2) + 0.5 * sum(exp(lam) * v * v)
          } via lbfgs(steps=50)
  return 0.5 * mean((xv @ w - yv) ^ 2)
}
export hyper = grad(val_loss, wrt=[lam], by=es(sigma=0.1, pop=16))
"""


@pytest.mark.slow
def test_a_real_sigint_stops_a_long_verify_run(tmp_path):
    """The reproducer of issue 23 (an ES export through an lbfgs argmin), interrupted by
    SIGINT once its estimates are under way: exit 130, one line, no traceback."""
    (tmp_path / "es.grad").write_text(ES_LBFGS)
    # Python's own SIGINT handler, even where this process was started with SIGINT ignored
    # (a background job of a shell), which the child would inherit
    cli = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
           "sys.argv = ['gradlang', *sys.argv[1:]]; runpy.run_module('gradlang.cli', "
           "run_name='__main__')")
    argv = [sys.executable, "-c", cli, "verify", "es.grad", "--dim", "N=64", "--dim", "M=32",
            "--dim", "D=16", "--progress"]
    child = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    lines = []
    for line in child.stderr:  # the first piece of the estimates is done: Python runs
        lines.append(line)
        if line.startswith("verify hyper: estimates ") and "/1000" in line:
            break
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 130 and out == ""
    assert err.splitlines()[-1] == "gradlang: verify interrupted while verifying 'hyper'"
    assert "Traceback" not in "".join(lines) + err
