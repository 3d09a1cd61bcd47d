"""The compiler front end: read a file and its imports, build the IR, run the pass pipeline.

Imports (`use a.b`) resolve only inside the standard library (`use std.x` -> stdlib/x.grad) and
the importing file's folder (`use a.b` -> a/b.grad beside it). Nothing else is ever read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from . import ast
from .builder import build_unit, estimator_from_ast
from .diagnostics import Diagnostics, SourceFile, Span
from .ir import Module, Unit
from .ops import Estimator
from .parser import parse


PRAGMAS = ("estimator", "backward")


def stdlib_root() -> Path:
    return Path(str(resources.files("gradlang.stdlib")))


@dataclass
class _Loader:
    diags: Diagnostics
    programs: dict[str, tuple[ast.Program, Unit]] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)

    def load(self, program: ast.Program, unit: str, folder: Path | None,
             stack: tuple[str, ...]) -> Unit:
        imports: list[tuple[str, str]] = []
        for decl in program.decls:
            if not isinstance(decl, ast.Use):
                continue
            target = self.import_unit(decl, folder, stack + (unit,))
            if target is None:
                continue
            alias = decl.path[-1]
            clash = next((u for a, u in imports if a == alias), None)
            if clash is not None and clash != target:
                self.diags.error(f"imports '{clash}' and '{target}' are both named '{alias}'", decl.span)
            elif clash is None:
                imports.append((alias, target))
        pragmas = self.pragmas(program)
        return Unit(unit, program.source.path, tuple(imports), pragmas.get("estimator"),
                    pragmas.get("backward"))

    def pragmas(self, program: ast.Program) -> dict[str, Estimator | None]:
        """The unit's `pragma estimator ...` and `pragma backward ...` (at most one each)."""
        found: dict[str, Estimator | None] = {}
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
                found[decl.key] = estimator_from_ast(decl.value, self.diags)
                lines[decl.key] = decl.span.line
        return found

    def import_unit(self, decl: ast.Use, folder: Path | None, stack: tuple[str, ...]) -> str | None:
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
        if name in stack:
            cycle = " -> ".join(stack[stack.index(name):] + (name,))
            self.diags.error(f"import cycle: {cycle}", decl.span)
            return None
        if name not in self.programs:
            source = SourceFile(str(path), path.read_text())
            program = parse(source, self.diags)
            unit = self.load(program, name, resolved.parent, stack)
            self.programs[name] = (program, unit)
            self.order.append(name)
        return name


def build_module(source: SourceFile, folder: Path | None, diags: Diagnostics) -> Module | None:
    """Parse `source` and its imports and build the unresolved IR; None on syntax errors."""
    program = parse(source, diags)
    loader = _Loader(diags)
    main = loader.load(program, "", folder, ())
    if diags.has_errors:
        return None
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
                   passes=None, after: Callable[[str, Module], None] | None = None) -> Module | None:
    """Front end and pass pipeline; returns None when the program has errors."""
    from gradlang.passes.pipeline import PIPELINE, run_pipeline

    module = build_module(source, folder, diags)
    if module is None:
        return None
    if after is not None:
        after("build", module)
    module = run_pipeline(module, diags, PIPELINE if passes is None else passes, after)
    return None if diags.has_errors else module


def span_of_line(source: SourceFile, line: int) -> Span:
    return Span(source, line, 1, line, len(source.line(line)) + 1)
