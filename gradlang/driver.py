"""The compiler front end: read a file and its imports, build the IR, run the pass pipeline.

Imports (`use a.b`) resolve only inside the standard library (`use std.x` -> stdlib/x.grad) and
the importing file's folder (`use a.b` -> a/b.grad beside it). Nothing else is ever read. A
file is one unit however it is imported: units are keyed by the file's resolved path and named
by it (`std.nn`; `sub.b` for sub/b.grad beside the main file), so `use b` in main.grad and in
sub/a.grad are two units when they are two files. Imports are followed without recursion, so
a chain of imports can be as long as the file system allows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from . import ast
from .builder import build_unit, annotation_from_ast
from .diagnostics import Diagnostics, SourceFile, Span
from .dims import DimBindings, bind_dims
from .ir import Module, Unit
from .ops import Annotation
from .parser import parse

if TYPE_CHECKING:
    from gradlang.passes.overrides import Overrides


PRAGMAS = ("estimator", "backward")


def stdlib_root() -> Path:
    return Path(str(resources.files("gradlang.stdlib")))


def read_source(path: Path, diags: Diagnostics, span: Span | None) -> SourceFile | None:
    """The file as source text; None after a diagnostic (at `span`, the `use` that names it,
    when it cannot be read; at the first byte that is not UTF-8 when it is not UTF-8 text)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        diags.error(f"cannot read {path}: {exc.strerror or exc}", span)
        return None
    try:
        return SourceFile(str(path), data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        lines = SourceFile(str(path), data[:exc.start].decode("utf-8")).text.split("\n")
        line, col = len(lines), len(lines[-1]) + 1
        diags.error(f"this file is not UTF-8 text: byte {exc.start} is {data[exc.start]:#04x}; "
                    f"save it as UTF-8", Span(SourceFile(str(path), data.decode("utf-8", "replace")),
                                              line, col, line, col + 1))
        return None


@dataclass
class _Unit:
    """A unit being loaded: its imports are followed one at a time."""

    program: ast.Program
    name: str
    path: Path
    folder: Path | None
    via: ast.Use | None
    """The `use` that imported it (None for the main file)."""
    uses: list[ast.Use] = field(init=False)
    """Its `use` declarations still to follow, the next one last."""
    imports: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.uses = [d for d in reversed(self.program.decls) if isinstance(d, ast.Use)]


@dataclass
class _Loader:
    diags: Diagnostics
    root: Path | None
    """The main file's folder (resolved): local units are named by their path in it."""
    programs: dict[Path, tuple[ast.Program, Unit]] = field(default_factory=dict)
    order: list[Path] = field(default_factory=list)
    """The imported files, each after the files it imports."""

    def load(self, program: ast.Program, folder: Path | None) -> Unit:
        """Load the imports of the main file, depth first; returns its unit."""
        loading = [_Unit(program, "", Path(program.source.path).resolve(), folder, None)]
        while True:
            top = loading[-1]
            if top.uses:
                self.follow(top.uses.pop(), loading)
                continue
            pragmas = self.pragmas(top.program)
            unit = Unit(top.name, top.program.source.path, tuple(top.imports),
                        pragmas.get("estimator"), pragmas.get("backward"))
            loading.pop()
            if top.via is None:
                return unit
            self.programs[top.path] = (top.program, unit)
            self.order.append(top.path)
            self.add_import(loading[-1], top.via, top.name)

    def follow(self, decl: ast.Use, loading: list[_Unit]) -> None:
        """Import `decl` of the unit on top of `loading`: from the cache, or by starting to
        load its file."""
        top = loading[-1]
        found = self.find(decl, top.folder)
        if found is None:
            return
        shown, path = found
        if path in self.programs:
            self.add_import(top, decl, self.programs[path][1].name)
            return
        on_stack = [u.path for u in loading]
        if path in on_stack:
            names = [u.name or Path(u.path).stem for u in loading[on_stack.index(path):]]
            self.diags.error(f"import cycle: {' -> '.join(names + [names[0]])}", decl.span)
            return
        source = read_source(shown, self.diags, decl.span)
        if source is not None:
            loading.append(_Unit(parse(source, self.diags), self.unit_name(path, decl), path,
                                 path.parent, decl))

    def add_import(self, unit: _Unit, decl: ast.Use, target: str) -> None:
        alias = decl.path[-1]
        clash = next((u for a, u in unit.imports if a == alias), None)
        if clash is not None and clash != target:
            self.diags.error(f"imports '{clash}' and '{target}' are both named '{alias}'", decl.span)
        elif clash is None:
            unit.imports.append((alias, target))

    def unit_name(self, path: Path, decl: ast.Use) -> str:
        """`std.a.b` for stdlib/a/b.grad, `a.b` for a/b.grad in the main file's folder."""
        for prefix, base in (("std", stdlib_root().resolve()), (None, self.root)):
            if base is not None and path.is_relative_to(base):
                parts = path.relative_to(base).with_suffix("").parts
                return ".".join(parts if prefix is None else (prefix, *parts))
        return ".".join(decl.path)  # not reached: an import stays inside its importer's folder

    def pragmas(self, program: ast.Program) -> dict[str, Annotation | None]:
        """The unit's `pragma estimator ...` and `pragma backward ...` (at most one each)."""
        found: dict[str, Annotation | None] = {}
        lines: dict[str, int] = {}
        for decl in program.decls:
            if not isinstance(decl, ast.Pragma):
                continue
            if decl.key not in PRAGMAS:
                self.diags.error(f"unknown pragma '{decl.key}'; pragmas: 'pragma estimator "
                                 f"NAME(options)' (random choices), 'pragma backward NAME(options)' "
                                 f"(non-smooth ops)", decl.span)
            elif decl.key in found:
                self.diags.error(f"a second 'pragma {decl.key}' (the first is at line "
                                 f"{lines[decl.key]})", decl.span)
            else:
                found[decl.key] = annotation_from_ast(decl.value, self.diags)
                lines[decl.key] = decl.span.line
        return found

    def find(self, decl: ast.Use, folder: Path | None) -> tuple[Path, Path] | None:
        """The file `decl` imports from a file in `folder`, as the path it is shown by and its
        resolved path; None after a diagnostic."""
        name = ".".join(decl.path)
        if decl.path[0] == "std":
            root, rel = stdlib_root(), decl.path[1:]
        else:
            root, rel = folder, decl.path
        if root is None:
            self.diags.error(f"cannot import '{name}': source text has no folder to import from; "
                             f"only std.* modules are available", decl.span)
            return None
        if not rel:
            self.diags.error("'use std' needs a module name, e.g. use std.nn", decl.span)
            return None
        path = root.joinpath(*rel).with_suffix(".grad")
        resolved = path.resolve()
        if not resolved.is_relative_to(root.resolve()) or not resolved.is_file():
            self.diags.error(f"cannot find module '{name}' (looked for {path}); imports resolve "
                             f"only in the standard library and this file's folder", decl.span)
            return None
        return path, resolved


def build_module(source: SourceFile, folder: Path | None, diags: Diagnostics,
                 dims: DimBindings | None = None) -> Module | None:
    """Parse `source` and its imports and build the unresolved IR, the dims of `source` fixed
    by `dims` (`gradlang.dims`); None on syntax errors."""
    program = parse(source, diags)
    loader = _Loader(diags, None if folder is None else folder.resolve())
    main = loader.load(program, folder)
    if diags.has_errors:
        return None
    program = bind_dims(program, [loader.programs[n][0] for n in loader.order],
                        DimBindings() if dims is None else dims, diags)
    units = [main] + [loader.programs[n][1] for n in loader.order]
    structs, functions, exports = [], [], []
    for unit, prog in [(main, program)] + [(loader.programs[n][1], loader.programs[n][0])
                                           for n in loader.order]:
        built = build_unit(prog, unit.name, diags)
        structs += built.structs
        functions += built.functions
        if unit is main:
            exports = built.exports
    name = Path(source.path).stem
    return Module(name, tuple(units), tuple(structs), tuple(functions), tuple(exports))


def compile_module(source: SourceFile, folder: Path | None, diags: Diagnostics,
                   passes=None, after: Callable[[str, Module], None] | None = None,
                   overrides: Overrides | None = None,
                   dims: DimBindings | None = None) -> Module | None:
    """Front end and pass pipeline; returns None when the program has errors. `overrides`
    (spans of this `source`'s IR -> annotations) are compiled as though the source had them
    written (`passes.overrides`: they run before the pipeline); `dims` fixes the dims that no
    argument binds (`gradlang.dims`)."""
    from gradlang.passes.overrides import ApplyOverrides
    from gradlang.passes.pipeline import PIPELINE, run_pipeline

    module = build_module(source, folder, diags, dims)
    if module is None:
        return None
    if after is not None:
        after("build", module)
    passes = PIPELINE if passes is None else passes
    if overrides is not None:
        passes = (ApplyOverrides(overrides), *passes)
    module = run_pipeline(module, diags, passes, after)
    return None if diags.has_errors else module
