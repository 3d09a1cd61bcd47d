"""Golden tests: source -> printed IR after a named pass.

Each program `tests/golden/NAME.grad` starts with a line `# golden: PASS, PASS, ...` naming the
passes (`build`, `resolve`, `typecheck`, `gradflow`) whose output is checked against
`tests/golden/NAME.PASS.ir`. Programs in sub-folders (`tests/golden/lib/`) are only imported.

Regenerate the expected files after an intended change with

    python tests/test_golden.py --update

and review the diff: the expected files are the specification, not a record of the output.
Entries of KNOWN_WRONG are hand-written (the compiler prints something else because of a
known bug); `--update` leaves them alone.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from gradlang.diagnostics import Diagnostics, Severity, SourceFile
from gradlang.driver import compile_module
from gradlang.passes.pipeline import PASSES
from gradlang.printer import print_module

GOLDEN = Path(__file__).parent / "golden"
STAGES = ("build", *PASSES)
HEADER = re.compile(r"#\s*golden:\s*(.*)")

KNOWN_WRONG: dict[tuple[str, str], str] = {}


def programs() -> list[Path]:
    return sorted(GOLDEN.glob("*.grad"))


def stages_of(path: Path) -> list[str]:
    first = path.read_text().splitlines()[0]
    match = HEADER.fullmatch(first.strip())
    assert match, f"{path.name}: the first line must be '# golden: PASS, ...'"
    stages = [s.strip() for s in match.group(1).split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    assert not unknown, f"{path.name}: unknown pass {unknown}; passes: {', '.join(STAGES)}"
    return stages


def expected_path(path: Path, stage: str) -> Path:
    return path.with_name(f"{path.stem}.{stage}.ir")


def printed_after_each_pass(path: Path) -> tuple[dict[str, str], Diagnostics]:
    """The printed module after each pass that ran, and the diagnostics."""
    diags = Diagnostics()
    printed: dict[str, str] = {}
    compile_module(SourceFile(path.name, path.read_text()), path.parent, diags,
                   after=lambda name, module: printed.__setitem__(name, print_module(module)))
    return printed, diags


def cases():
    out = []
    for path in programs():
        for stage in stages_of(path):
            reason = KNOWN_WRONG.get((path.stem, stage))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            out.append(pytest.param(path, stage, id=f"{path.stem}.{stage}", marks=marks))
    return out


def test_there_are_enough_golden_programs():
    assert len(programs()) >= 5
    stages = {s for p in programs() for s in stages_of(p)}
    assert stages == set(STAGES), "every pass should be covered by some golden program"


@pytest.mark.parametrize("path", programs(), ids=lambda p: p.stem)
def test_golden_programs_compile_without_diagnostics(path):
    printed, diags = printed_after_each_pass(path)
    errors = [d for d in diags.items if d.severity is Severity.ERROR]
    assert not errors, diags.render()
    assert set(printed) == set(STAGES)


@pytest.mark.parametrize("path", programs(), ids=lambda p: p.stem)
def test_no_stale_or_missing_expected_files(path):
    have = {p.name for p in GOLDEN.glob(f"{path.stem}.*.ir")}
    want = {expected_path(path, s).name for s in stages_of(path)}
    assert have == want, "run `python tests/test_golden.py --update`"


@pytest.mark.parametrize("path, stage", cases())
def test_golden(path, stage):
    expected = expected_path(path, stage)
    assert expected.exists(), f"missing {expected.name}: run `python tests/test_golden.py --update`"
    printed, diags = printed_after_each_pass(path)
    assert stage in printed, diags.render()
    assert printed[stage] == expected.read_text(), (
        f"IR after '{stage}' differs from {expected.name}; if the change is intended, run "
        f"`python tests/test_golden.py --update` and review the diff")


def update() -> None:
    """Rewrite every expected file from the current compiler (except KNOWN_WRONG ones)."""
    for path in programs():
        printed, diags = printed_after_each_pass(path)
        if diags.has_errors:
            raise SystemExit(f"{path.name} does not compile:\n{diags.render()}")
        stages = stages_of(path)
        for stale in GOLDEN.glob(f"{path.stem}.*.ir"):
            if stale.name.split(".")[-2] not in stages:
                stale.unlink()
                print(f"removed {stale.relative_to(GOLDEN.parent)}")
        for stage in stages:
            target = expected_path(path, stage)
            if (path.stem, stage) in KNOWN_WRONG:
                print(f"kept    {target.relative_to(GOLDEN.parent)} (hand-written: known bug)")
                continue
            old = target.read_text() if target.exists() else None
            if old != printed[stage]:
                target.write_text(printed[stage])
                print(f"wrote   {target.relative_to(GOLDEN.parent)}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--update"]:
        update()
    else:
        raise SystemExit(f"usage: python {Path(__file__).name} --update  "
                         f"(run the tests themselves with pytest)")
