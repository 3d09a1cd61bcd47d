"""The `gradlang` command line: check, explain, compile, verify, lsp (the language server).

Exit codes: 0 success; 1 the program has errors (or warnings under --strict), an export cannot
be lowered (compile), or a gradient is biased beyond tolerance or zero (verify); 2 bad input: a
command line argparse or the options' checks refuse, an input file that cannot be read, an
output that cannot be written, verify's arguments; 3 an internal compiler error (a bug).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import traceback
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from .diagnostics import Diagnostic, Diagnostics, Severity, SourceFile, Span
from .dims import DimBindings
from .driver import compile_module
from .explain import explain
from .ir import Export, Module
from .limits import I32_MAX
from .printer import print_module
from .version import __version__

if TYPE_CHECKING:
    from gradlang.runtime.symbolic import SymbolicDimError

EMITS = ("artifact", "stablehlo", "ir")
EXIT_OK, EXIT_ERRORS, EXIT_INPUT, EXIT_INTERNAL = 0, 1, 2, 3
"""The exit codes (see the module's docstring); argparse's usage errors exit with 2 too."""
TRACEBACK_HELP = "on an internal compiler error, also print the Python traceback"
DIM_HELP = "the size of a dim (repeatable): one no argument binds is fixed when compiling"
MAX_DIM = I32_MAX
"""The largest size `--dim` accepts: a dim's size is an i32 value in programs (`range(T)`,
`f32(T)`)."""


class InputError(Exception):
    """Bad input (a command-line value, an unreadable or unwritable file): its message is
    printed as `gradlang: error: ...` and the command exits with EXIT_INPUT."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gradlang", description="Compile gradients of .grad programs.")
    p.add_argument("--version", action="version", version=f"gradlang {__version__}")
    p.add_argument("--traceback", action="store_true", help=TRACEBACK_HELP)
    sub = p.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", help="report errors and warnings")
    check.add_argument("file")
    check.add_argument("--strict", action="store_true", help="treat warnings as errors")
    check.add_argument("--dim", action="append", default=[], metavar="NAME=SIZE", help=DIM_HELP)

    explain = sub.add_parser("explain", help="show how each export's gradient is computed")
    explain.add_argument("file")
    explain.add_argument("--dim", action="append", default=[], metavar="NAME=SIZE", help=DIM_HELP)

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
                      help=DIM_HELP + "; one an export's arguments bind is fixed in StableHLO "
                           "and artifacts (else it stays symbolic)")
    comp.add_argument("--debug-info", action="store_true",
                      help="keep source locations in emitted StableHLO")
    comp.add_argument("--platforms", type=_platforms, default=None, metavar="P[,P...]",
                      help="platforms the artifact runs on, from cpu, cuda, rocm, tpu "
                           "(default: cpu,cuda)")
    comp.add_argument("--strict", action="store_true", help="treat warnings as errors")
    comp.add_argument("--shard", action="append", default=[], metavar="DIM=AXIS",
                      help="record in the artifact that dim DIM is split over mesh axis AXIS "
                           "(repeatable; needs --mesh; gradlang.load(path, mesh=...) places it)")
    comp.add_argument("--mesh", action="append", default=[], metavar="AXIS=SIZE",
                      help="an axis of the mesh the artifact is for, in order (repeatable)")
    comp.add_argument("--functions", metavar="MODULE:ATTR",
                      help="bind the file's jax fn declarations to the JAX functions in the "
                           "dict ATTR of the Python module MODULE (imported from the current "
                           "folder)")

    ver = sub.add_parser("verify", help="check gradients against references: bias, variance, cost")
    ver.add_argument("file")
    ver.add_argument("--export", action="append", default=[], metavar="NAME",
                     help="the export to verify (repeatable; default: every export with a gradient)")
    ver.add_argument("--at", metavar="FILE.npz",
                     help="the arguments by parameter name (struct fields as name.field keys); "
                          "default: generated from the declared types")
    ver.add_argument("--dim", action="append", default=[], metavar="NAME=SIZE",
                     help=DIM_HELP + "; one the arguments bind sizes the generated arguments")
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
    ver.add_argument("--progress", action="store_true",
                     help="show progress on stderr (the default when it is a terminal)")

    sub.add_parser("lsp", help="run the language server on stdio (needs pip install 'gradlang[lsp]')")
    for command in sub.choices.values():  # also after the command (SUPPRESS: keeps one before)
        command.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS,
                             help=TRACEBACK_HELP)
    return p


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"cannot read {path}: it is not UTF-8 text (byte {exc.start} is "
                         f"{exc.object[exc.start]:#04x})") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None


def _front_end(path: Path, diags: Diagnostics, after=None,
               dims: DimBindings | None = None) -> Module | None:
    return compile_module(SourceFile(str(path), _read(path)), path.parent, diags, after=after,
                          dims=dims)


def _report(diags: Diagnostics, strict: bool) -> int:
    if diags.items:  # imported files are found by absolute path; show them as relative
        print(diags.render(relative_to=os.getcwd()), file=sys.stderr)
    return EXIT_ERRORS if diags.has_errors or (strict and diags.items) else EXIT_OK


def _parse_dims(items: list[str]) -> dict[str, int]:
    """`["B=32"]` -> {"B": 32}."""
    dims: dict[str, int] = {}
    for item in items:
        name, eq, size = item.partition("=")
        if not (eq and name.isidentifier() and re.fullmatch(r"[+-]?[0-9]+", size.strip())):
            raise InputError(f"--dim expects NAME=SIZE, e.g. --dim B=32; got {item!r}")
        n = int(size)
        if not 1 <= n <= MAX_DIM:
            raise InputError(f"--dim {item}: a size must be from 1 to {MAX_DIM} (2^31 - 1)")
        if dims.setdefault(name, n) != n:
            raise InputError(f"--dim {name} is given twice, as {dims[name]} and {n}")
    return dims


def _check_dim_names(dims: DimBindings, module: Module, path: Path) -> None:
    """Every `--dim` names a symbolic dim of an export's parameters or a dim the compile fixed
    (`gradlang.dims`)."""
    if not dims.sizes:
        return
    from gradlang.runtime.execute import signature_of

    exports = [d for e in module.exports for d in signature_of(module, e).dims]
    known = list(dict.fromkeys([*exports, *sorted(dims.used)]))
    for name, size in dims.sizes.items():
        if name not in known:
            raise InputError(f"--dim {name}={size}: no export of {path} has a symbolic dim "
                             f"'{name}' ({'its dims: ' + ', '.join(known) if known else 'none has any'})")


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the output folder {folder}: {exc.strerror or exc} "
                         f"(-o names a folder)") from None


def _write(target: Path, data: str | bytes) -> None:
    try:
        if isinstance(data, bytes):
            target.write_bytes(data)
        else:
            target.write_text(data, encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot write {target}: {exc.strerror or exc}") from None
    print(f"wrote {target}")


def _functions(spec: str) -> dict[str, object]:
    """The dict of JAX functions `--functions MODULE:ATTR` names, imported from the current
    folder as `python -m` would."""
    import importlib

    name, colon, attr = spec.partition(":")
    if not (colon and all(p.isidentifier() for p in name.split(".")) and attr.isidentifier()):
        raise InputError(f"--functions expects MODULE:ATTR, e.g. --functions models:FUNCTIONS; "
                         f"got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - the user's module: any failure is bad input
        raise InputError(f"--functions {spec}: cannot import {name}: {type(exc).__name__}: "
                         f"{exc}") from None
    found = getattr(module, attr, None)
    if not isinstance(found, Mapping):
        raise InputError(f"--functions {spec}: {name}.{attr} must be a dict of JAX functions by "
                         f"jax fn name, got " + ("nothing" if found is None else type(found).__name__))
    return dict(found)


def _unbindable(module: Module, command: str) -> Diagnostics:
    """An error at each jax fn declaration: `command` cannot bind Python functions."""
    from gradlang.runtime.jax_functions import declared

    diags = Diagnostics()
    for fn in declared(module):
        diags.error(f"jax fn '{fn.name}' needs a JAX function from Python, which gradlang "
                    f"{command} cannot bind: {_BIND_HINT[command].format(name=fn.name)}", fn.span)
    return diags


_BIND_HINT = {
    "compile": "pass --functions MODULE:ATTR (a dict of functions by name), or compile from "
               "Python: gradlang.compile_file(path, functions={{'{name}': fn}}).save(...)",
    "verify": "verify from Python: gradlang.compile_file(path, functions={{'{name}': fn}})"
              ".verify(export)",
}


def cmd_check(args) -> int:
    dims = DimBindings(_parse_dims(args.dim))
    diags = Diagnostics()
    module = _front_end(Path(args.file), diags, dims=dims)
    status = _report(diags, args.strict)
    if module is not None:
        _check_dim_names(dims, module, Path(args.file))
    return status


def cmd_explain(args) -> int:
    dims = DimBindings(_parse_dims(args.dim))
    diags = Diagnostics()
    module = _front_end(Path(args.file), diags, dims=dims)
    status = _report(diags, False)
    if module is not None:
        _check_dim_names(dims, module, Path(args.file))
    if module is not None:
        print(explain(module), end="")
    return status


def cmd_compile(args) -> int:
    emits = [e.strip() for item in (args.emit or ["artifact"]) for e in item.split(",") if e.strip()]
    bad = [e for e in emits if e not in EMITS]
    if bad:
        raise InputError(f"unknown --emit {bad[0]!r}; choose from {', '.join(EMITS)}")
    from gradlang.passes.pipeline import PASSES

    known = ["build", *PASSES]
    for name in args.print_after:
        if name not in known:
            raise InputError(f"unknown pass {name!r} for --print-after; passes: {', '.join(known)}")
    dims = DimBindings(_parse_dims(args.dim))
    path = Path(args.file)
    out = Path(args.out)
    snapshots: dict[str, str] = {}

    def after(name: str, module: Module) -> None:
        snapshots[name] = print_module(module)
        if name in args.print_after:
            print(f"// IR after {name}\n{snapshots[name]}")

    diags = Diagnostics()
    module = _front_end(path, diags, after, dims)
    status = _report(diags, args.strict)  # once: errors, or warnings that --strict fails on
    if module is None or status:
        return status or EXIT_ERRORS
    _check_dim_names(dims, module, path)
    backend = "stablehlo" in emits or "artifact" in emits
    functions = _functions(args.functions) if args.functions else {}
    unbound = _unbindable(module, "compile") if backend and not args.functions else Diagnostics()
    if unbound.items:
        return _report(unbound, False)
    _make_folder(out)
    stem = path.stem
    if "ir" in emits:
        for name, text in snapshots.items():
            _write(out / f"{stem}.{name}.ir", text)
    if backend:
        return _emit_backend(module, stem, out, emits, dict(dims.sizes), args.debug_info,
                             args.platforms, functions, _placement(args.mesh, args.shard))
    return EXIT_OK


def _pairs(items: list[str], flag: str, value: str) -> dict[str, str]:
    """`["B=data"]` -> {"B": "data"} for `flag`, each name given once."""
    out: dict[str, str] = {}
    for item in items:
        name, eq, v = item.partition("=")
        if not (eq and name.isidentifier() and v.strip()):
            raise InputError(f"{flag} expects NAME={value}; got {item!r}")
        if name in out:
            raise InputError(f"{flag} {name} is given twice")
        out[name] = v.strip()
    return out


def _placement(mesh: list[str], shard: list[str]) -> dict | None:
    """--mesh and --shard as compile_source's `mesh=` (an AbstractMesh: sizes, no devices) and
    `shard=`; None without them."""
    if not mesh and not shard:
        return None
    if not (mesh and shard):
        raise InputError("--shard and --mesh go together: --mesh AXIS=SIZE for each mesh "
                         "axis, --shard DIM=AXIS for each split dim")
    sizes = _pairs(mesh, "--mesh", "SIZE")
    bad = [f"{a}={n}" for a, n in sizes.items() if not (n.isdigit() and int(n) >= 1)]
    if bad:
        raise InputError(f"--mesh {bad[0]}: a size must be a positive integer")
    split = _pairs(shard, "--shard", "AXIS")
    if "pop" in split:
        raise InputError("--shard pop=...: a black-box population's placement is part of the "
                         "computation; shard it from Python (compile_file(..., mesh=, shard=))")
    from jax.sharding import AbstractMesh

    return {"mesh": AbstractMesh(tuple(int(n) for n in sizes.values()), tuple(sizes)),
            "shard": split}


def _platforms(text: str) -> tuple[str, ...]:
    """The value of --platforms (a comma-separated list), checked."""
    from gradlang.runtime.artifact import ArtifactError, platform_list

    try:
        return platform_list([p.strip() for p in text.split(",")])
    except ArtifactError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _emit_backend(module: Module, stem: str, out: Path, emits: list[str], dims: dict[str, int],
                  debug_info: bool, platforms: tuple[str, ...] | None,
                  functions: dict[str, object], placement: dict | None = None) -> int:
    """Write the StableHLO of each export and the artifact; exports that cannot be lowered get
    a diagnostic each (the others are still written). `functions` binds the jax fns;
    `placement` (`mesh` and `shard`) is recorded in the artifact."""
    import jax

    from .api import CompiledModule
    from .diagnostics import CompileError
    from .types import uses_f64

    if any(uses_f64(p.value.type) for fn in module.functions for p in fn.params):
        jax.config.update("jax_enable_x64", True)
    from gradlang.runtime.communication import ShardingWarning, costs, diagnostics
    from gradlang.runtime.sharding import ShardingError

    try:
        with warnings.catch_warnings():  # reported below, in bytes for the --dim sizes
            warnings.simplefilter("ignore", ShardingWarning)
            compiled = CompiledModule(module, functions=functions, **(placement or {}))
    except CompileError as exc:  # the bindings of --functions do not fit the declarations
        return _report(exc.diagnostics, False)
    except ShardingError as exc:
        raise InputError(f"--shard: {exc}") from None
    if compiled._sharding is not None:
        _report(diagnostics(costs(module, compiled._sharding), dims), False)
    failures: list[tuple[Diagnostic, ...]] = []
    for export in module.exports if "stablehlo" in emits else ():
        try:
            text = compiled.stablehlo(export.name, dims, debug_info)
        except Exception as exc:  # a limit of symbolic dims gets a diagnostic; a bug, raised again
            failures.append(_cannot_lower(module, export, dims, exc, functions, stablehlo=True))
            continue
        _write(out / f"{stem}.{export.name}.mlir", text)
    if "artifact" in emits:
        try:
            artifact = compiled.artifact(dims, platforms)
        except Exception as exc:
            failures += _artifact_failures(module, dims, platforms, exc, functions)
        else:
            _write(out / f"{stem}.gx", artifact)
    for group in dict.fromkeys(failures):  # an export failing both emits is reported once
        print("\n".join(d.render(relative_to=os.getcwd()) for d in group), file=sys.stderr)
    return EXIT_ERRORS if failures else EXIT_OK


def _artifact_failures(module: Module, dims: dict[str, int], platforms: tuple[str, ...] | None,
                       exc: Exception, functions: dict[str, object]) -> list[tuple[Diagnostic, ...]]:
    """The artifact holds every export: which of them cannot be saved, and why (`exc` raised
    again when each can be on its own)."""
    from .api import CompiledModule

    failures = []
    for export in module.exports:
        try:
            CompiledModule(dataclasses.replace(module, exports=(export,)),
                           functions=functions).artifact(dims, platforms)
        except Exception as one:
            failures.append(_cannot_lower(module, export, dims, one, functions, stablehlo=False))
    if not failures:
        raise exc
    return failures


def _cannot_lower(module: Module, export: Export, dims: dict[str, int], exc: Exception,
                  functions: dict[str, object], stablehlo: bool) -> tuple[Diagnostic, ...]:
    """The diagnostic (and notes) for an export that could not be lowered (to StableHLO, whose
    host callbacks need static shapes, or into an artifact, which cuts them out), when the
    program asks for what lowering cannot do: dims that must be fixed, an extern an artifact
    cannot cut out. Sizes from --dim that the program refuses are an InputError; anything else
    (a bug) is raised again."""
    import jax

    from gradlang.runtime.artifact import ArtifactError
    from gradlang.runtime.execute import export_function
    from gradlang.runtime.jax_functions import JaxFunctionError
    from gradlang.runtime.signature import ArgumentError
    from gradlang.runtime.split import SplitError
    from gradlang.runtime.symbolic import SymbolicDimError, inconclusive, symbolic_callback

    if isinstance(exc, JaxFunctionError):  # found once the dims were sized
        return (Diagnostic(Severity.ERROR, f"export '{export.name}': {exc}", export.span),)
    if isinstance(exc, ArgumentError):
        raise InputError(f"the sizes given with --dim do not fit export '{export.name}': {exc}") from None
    if isinstance(exc, ArtifactError):  # an op that lowers for some of the --platforms only
        return (Diagnostic(Severity.ERROR, str(exc), export.span),)
    if isinstance(exc, SplitError):
        return (Diagnostic(Severity.ERROR, f"{exc}; an artifact can cut extern calls out only at "
                                           f"the top level of an export (by=es / eggroll, spsa "
                                           f"with samples=1)", export.span),)
    if isinstance(exc, jax.errors.InconclusiveDimensionOperation):
        exc = inconclusive(exc)
    if isinstance(exc, SymbolicDimError):
        return _needs_dims(export, exc, _where(export, exc.spans))
    signature, fn = export_function(module, export, functions)
    symbolic = [d for d in signature.dims if d not in dims]
    if not symbolic:
        raise exc
    found = symbolic_callback(fn, signature.specs(dims)) if stablehlo and signature.externs else None
    if found is not None:
        name, error = found
        note = Diagnostic(Severity.NOTE, f"extern '{name}' is declared here",
                          module.function(name).span)
        return _needs_dims(export, error, (note,))
    first = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
    return (Diagnostic(Severity.ERROR, f"export '{export.name}' could not be lowered while its "
                                       f"dims {', '.join(symbolic)} are symbolic ({first}); fix "
                                       f"those it needs with --dim NAME=SIZE", export.span),)


def _needs_dims(export: Export, error: SymbolicDimError,
                notes: tuple[Diagnostic, ...]) -> tuple[Diagnostic, ...]:
    """`export 'E' needs dim 'B' fixed to lower: why; pass --dim B=SIZE`, at the export."""
    names = ", ".join(f"'{d}'" for d in error.dims)
    flags = " ".join(f"--dim {d}=SIZE" for d in error.dims)
    message = (f"export '{export.name}' needs {'dims' if len(error.dims) > 1 else 'dim'} {names} "
               f"fixed to lower: {error.why}; pass {flags}")
    return (Diagnostic(Severity.ERROR, message, export.span), *notes)


def _where(export: Export, spans: tuple[Span, ...]) -> tuple[Diagnostic, ...]:
    """Notes at the op that needs the dims (innermost first in `spans`) and, when it is in
    another file (the standard library), at the op of the export's file it is reached from."""
    if not spans:
        return ()
    notes = [Diagnostic(Severity.NOTE, "in this operation", spans[0])]
    own = next((s for s in spans if s.source.path == export.span.source.path), None)
    if own is not None and own is not spans[0]:
        notes.append(Diagnostic(Severity.NOTE, "reached from here", own))
    return tuple(notes)


def cmd_verify(args) -> int:
    from .verify import VerifyError
    from .verify.command import check_options, run

    problem = check_options(args)
    if problem is not None:
        raise InputError(problem)
    dims = DimBindings(_parse_dims(args.dim))
    path = Path(args.file)
    diags = Diagnostics()
    module = _front_end(path, diags, dims=dims)
    status = _report(diags, False)
    if module is None:
        return status or EXIT_ERRORS
    _check_dim_names(dims, module, path)
    unbound = _unbindable(module, "verify")
    if unbound.items:
        return _report(unbound, False)
    try:
        return run(module, path, dict(dims.sizes), args)
    except VerifyError as exc:
        raise InputError(str(exc)) from None


def cmd_lsp(args) -> int:
    try:
        from .lsp import serve
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in ("pygls", "lsprotocol"):
            raise
        raise InputError("gradlang lsp needs pygls: pip install 'gradlang[lsp]'") from None
    serve()
    return EXIT_OK


COMMANDS = {"check": cmd_check, "explain": cmd_explain, "compile": cmd_compile,
            "verify": cmd_verify, "lsp": cmd_lsp}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except InputError as exc:
        print(f"gradlang: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except Exception as exc:  # never a bare traceback for users
        print(f"gradlang: internal compiler error: {type(exc).__name__}: {exc}\n"
              f"This is a bug in gradlang. Please report it with the .grad file that triggered "
              f"it (run with --traceback for details).", file=sys.stderr)
        if args.traceback:
            traceback.print_exc()
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
