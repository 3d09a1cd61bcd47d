"""The `gradlang` command line: check, explain, compile, verify.

Exit codes: 0 success, 1 errors in the program (or warnings under --strict; for verify, a
gradient biased beyond tolerance or zero), 2 internal compiler error or bad command-line
usage (verify: bad inputs).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from .diagnostics import Diagnostics, SourceFile
from .driver import compile_module
from .explain import explain
from .ir import Module
from .printer import print_module

EMITS = ("artifact", "stablehlo", "ir")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gradlang", description="Compile gradients of .grad programs.")
    p.add_argument("--traceback", action="store_true",
                   help="on an internal compiler error, also print the Python traceback")
    sub = p.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", help="report errors and warnings")
    check.add_argument("file")
    check.add_argument("--strict", action="store_true", help="treat warnings as errors")

    explain = sub.add_parser("explain", help="show how each export's gradient is computed")
    explain.add_argument("file")

    comp = sub.add_parser("compile", help="compile exports to StableHLO, IR text or an artifact")
    comp.add_argument("file")
    comp.add_argument("-o", "--out", default="build", help="output folder (default: build)")
    comp.add_argument("--emit", action="append", default=None,
                      help=f"what to write: {', '.join(EMITS)} (repeatable or comma-separated; "
                           f"default: artifact)")
    comp.add_argument("--print-after", metavar="PASS", action="append", default=[],
                      help="print the IR after PASS (build, resolve, typecheck, gradflow, "
                           "estimators, surrogate)")
    comp.add_argument("--dim", action="append", default=[], metavar="NAME=SIZE",
                      help="fix a symbolic dim to a size (else it stays symbolic)")
    comp.add_argument("--debug-info", action="store_true",
                      help="keep source locations in emitted StableHLO")
    comp.add_argument("--strict", action="store_true", help="treat warnings as errors")

    ver = sub.add_parser("verify", help="check gradients against references: bias, variance, cost")
    ver.add_argument("file")
    ver.add_argument("--export", action="append", default=[], metavar="NAME",
                     help="the export to verify (repeatable; default: every export with a gradient)")
    ver.add_argument("--at", metavar="FILE.npz",
                     help="the arguments by parameter name (struct fields as name.field keys); "
                          "default: generated from the declared types")
    ver.add_argument("--dim", action="append", default=[], metavar="NAME=SIZE",
                     help="the size of a symbolic dim, for generated arguments")
    ver.add_argument("--samples", type=int, default=1000, help="estimates drawn (default 1000)")
    ver.add_argument("--seed", type=int, default=0, help="seed of the keys and inputs (default 0)")
    ver.add_argument("--reference-samples", type=int, default=4096, metavar="M",
                     help="samples of a statistical reference (default 4096)")
    ver.add_argument("--coordinates", type=int, default=32, metavar="K",
                     help="coordinates per leaf checked by finite differences (default 32)")
    ver.add_argument("--smoothing", type=float, default=0.05,
                     help="Gaussian smoothing of non-smooth references, relative to each "
                          "parameter's RMS (default 0.05)")
    ver.add_argument("--compare", action="store_true",
                     help="also measure every estimator applicable at each site, ranked")
    ver.add_argument("--json", nargs="?", const="-", metavar="PATH",
                     help="write the JSON report to PATH (no PATH: to stdout, instead of the table)")
    ver.add_argument("--plot", metavar="PNG", help="plot variance against time per estimate")
    return p


def _front_end(path: Path, diags: Diagnostics, after=None) -> Module | None:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        diags.error(f"cannot read {path}: {exc.strerror if isinstance(exc, OSError) else exc}", None)
        return None
    return compile_module(SourceFile(str(path), text), path.parent, diags, after=after)


def _report(diags: Diagnostics, strict: bool) -> int:
    if diags.items:  # imported files are found by absolute path; show them as relative
        print(diags.render(relative_to=os.getcwd()), file=sys.stderr)
    return 1 if diags.has_errors or (strict and diags.items) else 0


def _parse_dims(items: list[str]) -> dict[str, int] | None:
    """`["B=32"]` -> {"B": 32}; None (after a message) when an item is malformed."""
    dims = {}
    for item in items:
        name, _, size = item.partition("=")
        if not name.isidentifier() or not size.isdigit():
            print(f"gradlang: error: --dim expects NAME=SIZE, e.g. --dim B=32; got {item!r}",
                  file=sys.stderr)
            return None
        dims[name] = int(size)
    return dims


def cmd_check(args) -> int:
    diags = Diagnostics()
    _front_end(Path(args.file), diags)
    return _report(diags, args.strict)


def cmd_explain(args) -> int:
    diags = Diagnostics()
    module = _front_end(Path(args.file), diags)
    status = _report(diags, False)
    if module is not None:
        print(explain(module), end="")
    return status


def cmd_compile(args) -> int:
    emits = [e.strip() for item in (args.emit or ["artifact"]) for e in item.split(",") if e.strip()]
    bad = [e for e in emits if e not in EMITS]
    if bad:
        print(f"gradlang: error: unknown --emit {bad[0]!r}; choose from {', '.join(EMITS)}",
              file=sys.stderr)
        return 2
    from gradlang.passes.pipeline import PASSES

    known = ["build", *PASSES]
    for name in args.print_after:
        if name not in known:
            print(f"gradlang: error: unknown pass {name!r} for --print-after; passes: "
                  f"{', '.join(known)}", file=sys.stderr)
            return 2
    dims = _parse_dims(args.dim)
    if dims is None:
        return 2
    path = Path(args.file)
    out = Path(args.out)
    snapshots: dict[str, str] = {}

    def after(name: str, module: Module) -> None:
        snapshots[name] = print_module(module)
        if name in args.print_after:
            print(f"// IR after {name}\n{snapshots[name]}")

    diags = Diagnostics()
    module = _front_end(path, diags, after)
    status = _report(diags, args.strict)  # once: errors, or warnings that --strict fails on
    if module is None or status:
        return status or 1
    out.mkdir(parents=True, exist_ok=True)
    stem = path.stem
    if "ir" in emits:
        for name, text in snapshots.items():
            (out / f"{stem}.{name}.ir").write_text(text)
            print(f"wrote {out / f'{stem}.{name}.ir'}")
    if "stablehlo" in emits or "artifact" in emits:
        return _emit_backend(module, stem, out, emits, dims, args.debug_info)
    return 0


def _emit_backend(module: Module, stem: str, out: Path, emits: list[str], dims: dict[str, int],
                  debug_info: bool) -> int:
    import jax

    from .api import CompiledModule, _uses_f64

    if any(_uses_f64(p.value.type) for fn in module.functions for p in fn.params):
        jax.config.update("jax_enable_x64", True)
    compiled = CompiledModule(module)
    for export in module.exports:
        if "stablehlo" in emits:
            try:
                text = compiled.stablehlo(export.name, dims, debug_info)
            except Exception as exc:  # JAX refuses some programs with symbolic dims
                return _backend_error(export.name, exc)
            target = out / f"{stem}.{export.name}.mlir"
            target.write_text(text)
            print(f"wrote {target}")
    if "artifact" in emits:
        from gradlang.runtime.split import SplitError

        try:
            target = compiled.save(out / f"{stem}.gx", dims)
        except SplitError as exc:
            print(f"gradlang: error: {exc}\n  hint: an artifact can cut extern calls out only at "
                  f"the top level of an export (by=es / eggroll, spsa with samples=1)",
                  file=sys.stderr)
            return 1
        except Exception as exc:
            return _backend_error("(artifact)", exc)
        print(f"wrote {target}")
    return 0


def _backend_error(name: str, exc: Exception) -> int:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    print(f"gradlang: error: export {name} could not be lowered: {first}\n"
          f"  hint: fix symbolic dims to sizes with --dim NAME=SIZE", file=sys.stderr)
    return 1


def cmd_verify(args) -> int:
    from .verify import VerifyError
    from .verify.command import check_options, run

    problem = check_options(args)
    dims = _parse_dims(args.dim)
    if problem is not None or dims is None:
        if problem is not None:
            print(f"gradlang: error: {problem}", file=sys.stderr)
        return 2
    path = Path(args.file)
    if not path.is_file():
        print(f"gradlang: error: cannot read {path}: no such file", file=sys.stderr)
        return 2
    diags = Diagnostics()
    module = _front_end(path, diags)
    status = _report(diags, False)
    if module is None:
        return status or 1
    try:
        return run(module, path, dims, args)
    except VerifyError as exc:
        print(f"gradlang: error: {exc}", file=sys.stderr)
        return 2


COMMANDS = {"check": cmd_check, "explain": cmd_explain, "compile": cmd_compile,
            "verify": cmd_verify}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # never a bare traceback for users
        print(f"gradlang: internal compiler error: {type(exc).__name__}: {exc}\n"
              f"This is a bug in gradlang. Please report it with the .grad file that triggered "
              f"it (run with --traceback for details).", file=sys.stderr)
        if args.traceback:
            traceback.print_exc()
        return 2


if __name__ == "__main__":
    sys.exit(main())
