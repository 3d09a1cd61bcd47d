"""Shared fixtures."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def load_example(monkeypatch):
    """A loader of examples/NAME.py as a module (its folder first on sys.path, as when it
    runs)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def run_example(load_example, tmp_path):
    """A runner of examples/NAME.py's main(args) writing into tmp_path: checks that its summary
    and its JSON file have `keys` and that it wrote its plot (NAME_loss.png unless `plot`
    names it); returns (summary, the JSON)."""

    def run(name: str, args: list[str], keys: set[str],
            plot: str | None = None) -> tuple[dict, dict]:
        summary = load_example(name).main([*args, "--out", str(tmp_path)])
        assert keys <= set(summary)
        written = json.loads((tmp_path / f"{name}.json").read_text())
        assert written["example"] == name and keys <= set(written)
        assert (tmp_path / (plot or f"{name}_loss.png")).stat().st_size > 0
        return summary, written

    return run
