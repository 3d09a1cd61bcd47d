"""Progress of a `verify` run on stderr, for long runs: the export, the phase and how many of
its entries are done, one line per step (rewritten in place on a terminal). Off unless a run
asks for it (`gradlang verify` on a terminal or with `--progress`; `shown` from Python)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TextIO


@dataclass
class Progress:
    """Where progress goes and what it last wrote."""

    stream: TextIO
    export: str = ""
    """The export being verified ("": none yet)."""
    start: float = field(default_factory=time.perf_counter)
    written: float = float("-inf")
    """When the last line was written."""
    width: int = 0
    """The length of the line last written in place (0: none is)."""

    def write(self, line: str, last: bool = True) -> None:
        """Writes `line`; one that is not the `last` of its step only a second or more after
        the line before it."""
        now = time.perf_counter()
        if not last and now - self.written < 1:
            return
        self.written = now
        line = f"verify {self.export}: {line}" if self.export else f"verify: {line}"
        line = f"{line} ({now - self.start:.0f} s)"
        if self.stream.isatty():
            self.stream.write("\r" + line.ljust(self.width))
            self.width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def clear(self) -> None:
        """Ends the line written in place (the report follows on its own lines)."""
        if self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0


_SHOWN: ContextVar[Progress | None] = ContextVar("verify_progress", default=None)


@contextmanager
def shown(stream: TextIO) -> Iterator[None]:
    """Progress of the verify runs inside the block is written to `stream`."""
    token = _SHOWN.set(Progress(stream))
    try:
        yield
    finally:
        progress = _SHOWN.get()
        if progress is not None:
            progress.clear()
        _SHOWN.reset(token)


@contextmanager
def exporting(name: str) -> Iterator[None]:
    """The steps inside the block are those of export `name`."""
    progress = _SHOWN.get()
    if progress is None:
        yield
        return
    outer, progress.export = progress.export, name
    try:
        yield
    finally:
        progress.export = outer


def note(what: str) -> None:
    """A step without a count (a compilation)."""
    progress = _SHOWN.get()
    if progress is not None:
        progress.write(what)


def counter(what: str, total: int) -> Callable[[int], None]:
    """done -> None: reports that `done` of the `total` entries of `what` are done."""
    progress = _SHOWN.get()
    if progress is None:
        return lambda done: None
    return lambda done: progress.write(f"{what} {done}/{total}", done == total)
