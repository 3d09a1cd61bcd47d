"""Diagnostics corpus: bad programs and the exact report of `gradlang check` on each.

Each `tests/diagnostics/NAME.grad` (top level only; sub-folders hold modules that the corpus
imports) has its expected stderr in `NAME.err`: every diagnostic with its source line and caret.
The check runs in-process from inside `tests/diagnostics/` with the bare file name, so paths in
the report are stable. Messages of the import resolver that name a looked-up file by absolute
path are normalized to paths relative to the corpus folder.

The exit status must be 1 when the report has an error, 0 when it only has warnings, and never
EXIT_INTERNAL (3, an internal compiler error) or EXIT_INPUT (2: the corpus's files are readable).

Regenerate the expected files after an intended change with

    python tests/test_diagnostics.py --update

and review the diff: the expected files are the specification of the messages, not a record of
what the compiler happens to print.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from pathlib import Path

import pytest

from gradlang.cli import EXIT_INPUT, EXIT_INTERNAL, main

CORPUS = Path(__file__).parent / "diagnostics"
_ERROR_LINE = re.compile(r"^(\S+:\d+:\d+|gradlang): error: ", re.MULTILINE)


def programs() -> list[Path]:
    return sorted(CORPUS.glob("*.grad"))


def normalize(text: str) -> str:
    return text.replace(str(CORPUS.resolve()) + os.sep, "")


def expected_status(report: str) -> int:
    return 1 if _ERROR_LINE.search(report) else 0


def check(name: str) -> tuple[int, str, str]:
    """Run `gradlang check NAME` from inside the corpus folder: (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(CORPUS)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main(["check", name])
    finally:
        os.chdir(cwd)
    return status, out.getvalue(), normalize(err.getvalue())


def test_the_corpus_is_large_enough():
    assert len(programs()) >= 40


def test_every_program_has_an_expected_report():
    missing = [p.name for p in programs() if not p.with_suffix(".err").is_file()]
    stray = [p.name for p in CORPUS.glob("*.err") if not p.with_suffix(".grad").is_file()]
    assert not missing and not stray, (missing, stray)


@pytest.mark.parametrize("path", programs(), ids=lambda p: p.stem)
def test_diagnostics(path: Path, monkeypatch, capsys):
    expected = path.with_suffix(".err").read_text()
    monkeypatch.chdir(CORPUS)
    status = main(["check", path.name])
    captured = capsys.readouterr()
    assert status not in (EXIT_INPUT, EXIT_INTERNAL), captured.err
    assert captured.out == ""
    assert normalize(captured.err) == expected
    assert status == expected_status(expected)


def _update() -> None:
    for path in programs():
        status, _, err = check(path.name)
        if status in (EXIT_INPUT, EXIT_INTERNAL):
            raise SystemExit(f"{path.name}: exit status {status}, not a diagnostic:\n{err}")
        target = path.with_suffix(".err")
        if not target.is_file() or target.read_text() != err:
            target.write_text(err)
            print(f"wrote {target.relative_to(Path.cwd()) if target.is_relative_to(Path.cwd()) else target}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        raise SystemExit("usage: python tests/test_diagnostics.py --update")
    _update()
