"""gradlang verify on `examples/verify_demo.grad`: every estimator of each random choice,
measured on the same inputs against the same reference.

    python examples/verify_demo.py [--samples 1000] [--seed 0] [--out examples/out]

Compiles verify_demo.grad, verifies the gradient of `step` (the compiler's own choice: score
function with leave-one-out for the discrete draw c, pathwise for z) and, with --compare, every
estimator that applies at c and at z, ranked by variance x time. Prints the report and writes
`verify_demo.json` (the `gradlang.verify/1` document) and `verify_demo_variance.png` (variance
against time per estimate) to the output folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import gradlang
from gradlang.verify import document
from gradlang.verify.plot import plot

HERE = Path(__file__).resolve().parent
ARGS = {"logits": np.array([0.5, -0.3, 0.1, 0.8], np.float32), "mu": np.float32(0.4),
        "cost": np.array([1.0, -2.0, 3.0, 0.5], np.float32)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1000, help="estimates per estimator (default 1000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "out", help="output folder (default examples/out)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    m = gradlang.compile_file(HERE / "verify_demo.grad")
    report = m.verify("step", ARGS, samples=args.samples, seed=args.seed, compare=True)
    print(report)
    best = {c.site: c.ranked()[0].annotation for c in report.compare}
    summary = {"example": "verify_demo", "verdict": report.verdict, "best": best,
               **document("verify_demo.grad", [report])}
    (args.out / "verify_demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot([report], args.out / "verify_demo_variance.png")
    print(f"best per site: {best}; wrote {args.out / 'verify_demo.json'} and "
          f"{args.out / 'verify_demo_variance.png'}")
    return summary


if __name__ == "__main__":
    main()
