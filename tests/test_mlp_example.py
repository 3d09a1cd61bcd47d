"""The Quickstart's two steps: `gradlang compile examples/mlp.grad -o build --emit
stablehlo,artifact`, then `examples/mlp.py --artifact build/mlp.gx` trains from the artifact
alone (fewer steps here)."""

from __future__ import annotations

import sys
from pathlib import Path

from gradlang.cli import main as gradlang_main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_mlp_trains_from_the_quickstart_artifact(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert gradlang_main(["compile", str(EXAMPLES / "mlp.grad"), "-o", "build",
                          "--emit", "stablehlo,artifact"]) == 0
    assert (tmp_path / "build" / "mlp.gx").is_file()
    assert (tmp_path / "build" / "mlp.step.mlir").is_file()
    monkeypatch.syspath_prepend(str(EXAMPLES))
    sys.modules.pop("mlp", None)
    import mlp

    summary = mlp.main(["--artifact", "build/mlp.gx", "--steps", "30", "--eval-every", "30",
                        "--out", str(tmp_path / "out")])
    assert summary["artifact"] == "build/mlp.gx"
    # three balanced classes: chance is 1/3; 30 Adam steps already separate part of the arms
    assert summary["test_accuracy"] > 0.4
    assert (tmp_path / "out" / "mlp.json").is_file()
