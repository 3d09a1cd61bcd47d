"""A minimal text progress bar shared by the examples.

`examples/` is not a package: each example runs as `python examples/X.py`, which puts this
folder first on `sys.path`, so the examples import it as `from progress import ProgressBar`.
"""

from __future__ import annotations

import sys
import time


class ProgressBar:
    """A minimal text progress bar on stderr (carriage returns, redrawn at most ~20 times/s)."""

    def __init__(self, total: int, width: int = 30, label: str = ""):
        self.total, self.width, self.label = total, width, label
        self.start = time.perf_counter()
        self.last_draw = 0.0
        self.last_len = 0

    def update(self, done: int, info: str = "") -> None:
        now = time.perf_counter()
        if done < self.total and now - self.last_draw < 0.05:
            return
        self.last_draw = now
        frac = done / self.total
        filled = int(round(self.width * frac))
        elapsed = now - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        bar = "#" * filled + "-" * (self.width - filled)
        line = f"{self.label}[{bar}] {done}/{self.total} {rate:7.1f} it/s {info}"
        # Pad with spaces so that a shorter line fully overwrites the previous one.
        sys.stderr.write("\r" + line.ljust(self.last_len))
        self.last_len = len(line)
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()
