"""`gradlang verify FILE`: the command line's side of verify (inputs, output, exit code)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from gradlang.types import uses_f64
from gradlang.ir import Module

from . import progress
from .inputs import VerifyError, read_npz
from .program import load
from .report import ExportReport, Settings, document, dumps, render
from .run import verify_export
from .variants import Origin

EXIT_INTERRUPTED = 130
"""128 + SIGINT, as a shell reports a command stopped by Ctrl-C."""


def check_options(args) -> str | None:
    """Why the numeric options are unusable (None when they are fine)."""
    if args.samples < 2:
        return f"--samples must be at least 2 (the variance needs two estimates), got {args.samples}"
    if args.reference_samples < 2:
        return f"--reference-samples must be at least 2, got {args.reference_samples}"
    if args.coordinates < 1:
        return f"--coordinates must be at least 1, got {args.coordinates}"
    if not args.smoothing > 0:
        return f"--smoothing must be positive, got {args.smoothing}"
    outputs = [("--json", args.json)] if args.json not in (None, "-") else []
    outputs += [("--plot", args.plot)] if args.plot is not None else []
    for flag, path in outputs:
        problem = _unwritable(Path(path))
        if problem is not None:
            return f"{flag} {path}: cannot write there: {problem}"
    return None


def _unwritable(path: Path) -> str | None:
    """Why a file cannot be written at `path`, as far as can be told before writing it (the
    report is written after the measurements, which take a while)."""
    if path.is_dir():
        return "it is a folder"
    if not path.parent.is_dir():
        return f"there is no folder {path.parent}"
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        return "permission denied"
    return None


@contextmanager
def _writing(path: str) -> Iterator[Path]:
    """The path to write; an OSError while writing it becomes a VerifyError naming it."""
    try:
        yield Path(path)
    except OSError as exc:
        raise VerifyError(f"cannot write {path}: {exc.strerror or exc}") from None


def _arguments(module: Module, names: list[str], at: str | None) -> dict[str, dict | None]:
    """Per export, its arguments from the .npz file (None: generate them); a key that no
    verified export has as a parameter is an error."""
    if at is None:
        return {n: None for n in names}
    given = read_npz(at)
    out, used = {}, set()
    for name in names:
        params = [p for p, _ in load(module, name, {}).params]
        out[name] = {k: v for k, v in given.items() if k in params}
        used.update(params)
    unknown = [k for k in given if k not in used]
    if unknown:
        raise VerifyError(f"{at}: {', '.join(repr(k) for k in unknown)} "
                          f"{'is not a parameter' if len(unknown) == 1 else 'are not parameters'}"
                          f" of {', '.join(names)}")
    return out


def _interrupted(reports: list[ExportReport], names: list[str], tables: bool) -> int:
    """Ctrl-C: the tables of the exports verified before it (`tables`: unless the JSON
    document goes to stdout), and one line saying so."""
    if tables:
        print("\n".join(render(r) for r in reports), end="")
    shown = ", above" if tables else ""
    done = f"; {len(reports)} of {len(names)} exports verified{shown}" if reports else ""
    print(f"gradlang: verify interrupted while verifying '{names[len(reports)]}'{done}",
          file=sys.stderr)
    return EXIT_INTERRUPTED


def run(module: Module, path: Path, dims: dict[str, int], args) -> int:
    """Verify the exports of `module`, compiled from the file at `path` (`args`: the command
    line's options); returns the exit code."""
    import jax

    if any(uses_f64(p.value.type) for fn in module.functions for p in fn.params):
        jax.config.update("jax_enable_x64", True)
    names = args.export or [e.name for e in module.exports if e.transform.kind != "fn"]
    if not names:
        raise VerifyError(f"{path} has no export with a gradient (grad, value_and_grad, "
                          f"descend, minimize or compose) to verify")
    inputs = _arguments(module, names, args.at)
    origin = Origin(module.exports[0].span.source, path.parent, {}, dims=dims)
    settings = Settings(args.samples, args.seed, args.reference_samples, args.coordinates,
                        args.smoothing)
    reports = []
    try:
        with progress.shown(sys.stderr) if args.progress or sys.stderr.isatty() else nullcontext():
            for n in names:
                reports.append(verify_export(origin, module, n, inputs[n], dims, settings,
                                             args.compare))
    except KeyboardInterrupt:
        return _interrupted(reports, names, args.json != "-")
    doc = document(str(path), reports)
    if args.json == "-":
        print(dumps(doc))
    else:
        print("\n".join(render(r) for r in reports), end="")
        if args.json is not None:
            with _writing(args.json) as target:
                target.write_text(dumps(doc) + "\n")
            print(f"wrote {target}")
    if args.plot is not None:
        from .plot import plot

        with _writing(args.plot) as target:
            plot(reports, target)
        print(f"wrote {target}", file=sys.stderr if args.json == "-" else sys.stdout)
    return doc["exit_code"]
