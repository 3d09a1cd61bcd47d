"""The character-level text of the language-model examples (flax_mezo, tiny_lm): texts that
ship in the repository, coded as V = 96 symbols and split into training and held-out blocks."""

from __future__ import annotations

from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
V = 96  # printable ASCII (95) and the newline
SOURCES = {"readme": [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))],
           "stdlib": sorted((ROOT / "stdlib").glob("*.grad"))}
"""The documentation, README.md and docs/ (English and code; the README held all of it until
the docs site was split out of it), and the standard library's `.grad` sources (gradlang code
and its comments): two domains."""


def encode(text: str) -> np.ndarray:
    """Character codes: printable ASCII 32..126 -> 0..94, newline -> 95, anything else -> 0."""
    b = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
    return np.where((b >= 32) & (b < 127), b - 32, np.where(b == 10, V - 1, 0)).astype(np.int32)


def split(codes: np.ndarray, block: int = 256, every: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(train, held out): the text cut into blocks, every `every`-th block held out."""
    blocks = [codes[i:i + block] for i in range(0, len(codes), block)]
    held = np.arange(len(blocks)) % every == every - 1
    return (np.concatenate([b for b, h in zip(blocks, held) if not h]),
            np.concatenate([b for b, h in zip(blocks, held) if h]))


def texts() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each source's (train, held-out) codes."""
    return {name: split(encode("\n".join(p.read_text() for p in paths)))
            for name, paths in SOURCES.items()}
