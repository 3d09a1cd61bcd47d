"""Variants of a program made by editing its source at a span: the annotation of a random
choice, the hypergradient method or solver of an `argmin`, the `by=` of an export. The edits
are exactly what a user would write, so a comparison can show them."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from gradlang.diagnostics import CompileError, SourceFile, Span
from gradlang.ir import Export
from gradlang.passes.estimators import SiteChoice
from gradlang.passes.hypergrad import InnerProblem


@dataclass(frozen=True)
class Edit:
    """Replace the text from (line, col) to (end_line, end_col) (1-based, end exclusive)."""

    line: int
    col: int
    end_line: int
    end_col: int
    text: str

    @staticmethod
    def at(span: Span, text: str) -> Edit:
        return Edit(span.line, span.col, span.end_line, span.end_col, text)

    @staticmethod
    def after(span: Span, text: str) -> Edit:
        return Edit(span.end_line, span.end_col, span.end_line, span.end_col, text)


@dataclass(frozen=True)
class Origin:
    """Where a compiled module came from, so that variants of its source can be compiled."""

    source: SourceFile
    root: Path | None
    externs: Mapping[str, object]
    mesh: object = None

    def owns(self, span: Span | None) -> bool:
        """The span is in the main source file (imported files are not edited)."""
        return span is not None and span.source.path == self.source.path

    def edited(self, edits: Sequence[Edit]) -> str:
        starts = [0]
        for line in self.source.lines:  # each ends with "\n" (SourceFile's line model)
            starts.append(starts[-1] + len(line) + 1)

        def offset(line: int, col: int) -> int:
            return starts[line - 1] + col - 1

        text = self.source.text
        for e in sorted(edits, key=lambda e: (e.line, e.col), reverse=True):
            text = text[:offset(e.line, e.col)] + e.text + text[offset(e.end_line, e.end_col):]
        return text

    def compile(self, edits: Sequence[Edit]):
        """The CompiledModule of the edited source, or the compiler's first error message."""
        from gradlang.api import compile_source

        try:
            return compile_source(self.edited(edits), self.source.path, self.root,
                                  externs=self.externs, mesh=self.mesh)
        except CompileError as exc:
            errors = exc.diagnostics.errors
            return errors[0].message if errors else str(exc)


def annotate(span: Span, annotated: bool, annotation: Span | None, body: str) -> Edit:
    """Give the statement or expression at `span` the annotation `with body`, replacing the
    one it ends with when it has one."""
    if annotated:
        if annotation is not None and (annotation.end_line, annotation.end_col) == \
                (span.end_line, span.end_col):
            return Edit.at(annotation, body)
        text = span.text
        found = list(re.finditer(r"\bwith\b\s*", text))
        if found:  # the annotation's own span is not kept (`with auto(...)`): find its text
            prefix = text[:found[-1].end()].split("\n")
            line = span.line + len(prefix) - 1
            col = (span.col if len(prefix) == 1 else 1) + len(prefix[-1])
            return Edit(line, col, span.end_line, span.end_col, body)
    return Edit.after(span, f" with {body}")


def annotate_site(site: SiteChoice, body: str) -> Edit:
    return annotate(site.span, site.annotated, site.estimator.span, body)


def annotate_argmin(problem: InnerProblem, body: str) -> Edit:
    annotated = problem.why == "annotated in the source"
    return annotate(problem.span, annotated, problem.method.span, body)


def tighter_solver(problem: InnerProblem, factor: int) -> Edit:
    """The argmin's solver with `factor` times its steps and, when it stops at a tolerance,
    a factor^2 smaller one (other options as written)."""
    span = problem.solver.span
    text = span.text
    options = {"steps": str(int(problem.solver.option("steps")) * factor)}
    if problem.solver.option("tol"):
        options["tol"] = repr(float(problem.solver.option("tol")) / factor ** 2)
    for k, v in options.items():
        pattern = rf"\b{k}\s*=\s*[-+0-9.eE]+"
        if re.search(pattern, text):
            text = re.sub(pattern, f"{k}={v}", text)
        elif text.endswith("()"):
            text = f"{text[:-1]}{k}={v})"
        elif text.endswith(")"):
            text = f"{text[:-1]}, {k}={v})"
        else:
            text = f"{text}({k}={v})"
    return Edit.at(span, text)


def black_box(export: Export, by: str | None) -> Edit:
    """The export with `by=<by>`, or without `by=` (reverse mode) when `by` is None."""
    span = export.transform.by.span
    if by is not None:
        return Edit.at(span, by)
    head = "".join(line + "\n" for line in span.source.lines[:span.line - 1]) + \
        span.source.line(span.line)[:span.col - 1]
    found = re.search(r",\s*by\s*=\s*$", head)
    assert found is not None, "the grammar puts by= after the function and wrt="
    start = len(head) - (found.end() - found.start())
    line = head[:start].count("\n") + 1
    col = start - (head[:start].rfind("\n") + 1) + 1
    return Edit(line, col, span.end_line, span.end_col, "")
