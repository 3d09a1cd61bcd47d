"""Source spans, diagnostics and their rendering (`file:line:col: error: msg`, line, caret)."""

from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property


@dataclass(frozen=True, eq=False)
class SourceFile:
    """A source text and the path it is reported under.

    The text is normalized once, here, so that the parser and the renderer count lines alike:
    a leading byte order mark is dropped and every line ends with "\n" (CRLF and a lone CR
    become "\n"). Other separators ("\x0b", "\x0c", U+2028, ...) are ordinary characters."""

    path: str
    text: str

    def __post_init__(self) -> None:
        text = self.text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
        object.__setattr__(self, "text", text)

    @cached_property
    def lines(self) -> tuple[str, ...]:
        """The lines without their "\n" (a final "\n" does not start an empty line)."""
        lines = self.text.split("\n")
        return tuple(lines[:-1] if lines[-1] == "" else lines)

    def line(self, lineno: int) -> str:
        return self.lines[lineno - 1] if 1 <= lineno <= len(self.lines) else ""


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

    @property
    def text(self) -> str:
        """The source text the span covers."""
        lines = list(self.source.lines[self.line - 1:self.end_line])
        lines[-1] = lines[-1][:self.end_col - 1]
        lines[0] = lines[0][self.col - 1:]
        return "\n".join(lines)

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
        if not text and s.line > len(s.source.lines):
            return head
        end = s.end_col - 1 if s.end_line == s.line else len(text)
        before, under = text[:s.col - 1], text[s.col - 1:end]
        # The caret is aligned under the echoed line: tabs stay tabs, escapes and wide
        # characters take their width.
        indent = "".join("\t" if c == "\t" else " " * _width(c) for c in before)
        indent += " " * (s.col - 1 - len(before))  # a span just past the end of the line
        beyond = max(0, end - max(len(text), s.col - 1))  # columns past the end of the line
        caret = "^" * max(1, sum(_width(c) for c in under) + beyond)
        return f"{head}\n  {printable(text)}\n  {indent}{caret}"


def printable(text: str) -> str:
    """`text` with characters that would not show (control and format characters, NUL,
    zero-width and combining marks, separators other than space) escaped as \\xNN or \\uNNNN;
    tabs are kept."""
    return "".join(_show(c) for c in text)


def _show(c: str) -> str:
    if c == "\t" or (c.isprintable() and unicodedata.category(c) not in ("Mn", "Me")):
        return c
    o = ord(c)
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


def _width(c: str) -> int:
    """The columns `c` takes when echoed (East Asian wide characters take two)."""
    shown = _show(c)
    if shown != c:
        return len(shown)
    return 2 if unicodedata.east_asian_width(c) in ("W", "F") else 1


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
