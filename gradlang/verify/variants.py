"""Variants of a program: its source compiled with other annotations (`passes.overrides`) at
a random choice, an `argmin`, an export or a composition, as a user would write them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gradlang.diagnostics import Diagnostics, SourceFile, Span
from gradlang.dims import DimBindings
from gradlang.driver import compile_module
from gradlang.ir import Module
from gradlang.passes.overrides import Overrides


@dataclass(frozen=True)
class Origin:
    """Where a compiled module came from, so that variants of its source can be compiled."""

    source: SourceFile
    """The SourceFile the module was compiled from (its spans key the overrides)."""
    root: Path | None
    externs: Mapping[str, object]
    mesh: object = None
    dims: Mapping[str, int] = field(default_factory=dict)
    """The dims it was compiled with (`gradlang.dims`)."""

    def owns(self, span: Span | None) -> bool:
        """The span is in the main source file (annotations of imported files are not
        overridden)."""
        return span is not None and span.source is self.source

    def compile(self, overrides: Overrides) -> Module | str:
        """The IR of the source compiled with `overrides`, or the compiler's first error."""
        diags = Diagnostics()
        module = compile_module(self.source, self.root, diags, overrides=overrides,
                                dims=DimBindings(self.dims))
        return diags.errors[0].message if module is None else module
