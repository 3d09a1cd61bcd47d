"""Source spans, diagnostics and their rendering (`file:line:col: error: msg`, line, caret)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum


@dataclass(frozen=True, eq=False)
class SourceFile:
    """A source text and the path it is reported under."""

    path: str
    text: str

    def line(self, lineno: int) -> str:
        lines = self.text.splitlines()
        return lines[lineno - 1] if 1 <= lineno <= len(lines) else ""


@dataclass(frozen=True)
class Span:
    """A 1-based, end-inclusive-line / end-exclusive-column region of a source file."""

    source: SourceFile
    line: int
    col: int
    end_line: int
    end_col: int

    def __repr__(self) -> str:
        return f"{self.source.path}:{self.line}:{self.col}"

    def to(self, other: Span) -> Span:
        """The span from the start of self to the end of other."""
        return Span(self.source, self.line, self.col, other.end_line, other.end_col)


class Severity(Enum):
    ERROR = "error"
    WARNING = "warning"
    NOTE = "note"


@dataclass(frozen=True)
class Diagnostic:
    severity: Severity
    message: str
    span: Span | None

    def render(self, relative_to: str | None = None) -> str:
        """`file:line:col: severity: message`, the source line and a caret line. With
        `relative_to` (a folder), paths inside it are shown relative to it."""
        if self.span is None:
            return f"gradlang: {self.severity.value}: {self.message}"
        s = self.span
        head = f"{_show_path(s.source.path, relative_to)}:{s.line}:{s.col}: " \
               f"{self.severity.value}: {self.message}"
        text = s.source.line(s.line)
        if not text and s.line > len(s.source.text.splitlines()):
            return head
        width = (s.end_col - s.col) if s.end_line == s.line else len(text) - s.col + 1
        caret = " " * (s.col - 1) + "^" * max(1, width)
        return f"{head}\n  {text}\n  {caret}"


def _show_path(path: str, relative_to: str | None) -> str:
    if relative_to is None or not os.path.isabs(path):
        return path
    rel = os.path.relpath(path, relative_to)
    return path if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel


@dataclass
class Diagnostics:
    """An ordered collection of diagnostics gathered while compiling one program."""

    items: list[Diagnostic] = field(default_factory=list)

    def error(self, message: str, span: Span | None) -> None:
        self.items.append(Diagnostic(Severity.ERROR, message, span))

    def warning(self, message: str, span: Span | None) -> None:
        self.items.append(Diagnostic(Severity.WARNING, message, span))

    def extend(self, other: Diagnostics) -> None:
        self.items.extend(other.items)

    @property
    def has_errors(self) -> bool:
        return any(d.severity is Severity.ERROR for d in self.items)

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.items if d.severity is Severity.ERROR]

    def sorted(self) -> list[Diagnostic]:
        """The diagnostics by file and position, identical ones reported once."""
        def key(d: Diagnostic) -> tuple:
            if d.span is None:
                return ("", 0, 0)
            return (d.span.source.path, d.span.line, d.span.col)

        unique = list(dict.fromkeys(self.items))  # one op per tuple element can repeat an error
        return sorted(unique, key=key)

    def render(self, relative_to: str | None = None) -> str:
        return "\n".join(d.render(relative_to) for d in self.sorted())


class CompileError(Exception):
    """Raised by the Python API when a program has errors; `str()` is the rendered report."""

    def __init__(self, diagnostics: Diagnostics):
        self.diagnostics = diagnostics
        super().__init__(diagnostics.render())
