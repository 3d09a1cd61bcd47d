"""A bilevel problem with a coupled lower-level constraint, solved with `value_function`.

    python examples/coupled_bilevel.py [--n 16] [--steps 200] [--out examples/out]

Compiles coupled_bilevel.grad (min_x 1/2|x - a|^2 + 1/2|y*(x) - b|^2 with y*(x) = argmin_y
1/2|y - 2x|^2 subject to y <= x + 1), draws targets a, b (fixed seed) so that the constraint
is active at the solution in some coordinates and not in others (none at the kink), and runs outer gradient
descent with three hypergradients: gradlang's `value_function` (first order, Hessian-free),
gradlang's `unrolled` (reverse mode through the primal-dual loop) and, for contrast, a
hand-written one that ignores the constraint (dy*/dx = 2 everywhere). Compares each end point
with the known solution, computed in closed form per coordinate. Writes `coupled_bilevel.png`
(outer objective per step; end points against the solution) and `coupled_bilevel.json`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import gradlang
from progress import ProgressBar

HERE = Path(__file__).resolve().parent


def known_solution(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per coordinate, h(x) = 1/2 (x - a)^2 + 1/2 (min(2x, x + 1) - b)^2 is minimized on the
    active branch (x >= 1, y = x + 1) at (a + b - 1) / 2, on the inactive branch (x <= 1,
    y = 2x) at (a + 2b) / 5, or at the kink x = 1; take the best feasible candidate."""
    def h(x):
        return 0.5 * (x - a) ** 2 + 0.5 * (np.minimum(2 * x, x + 1) - b) ** 2

    cands = np.stack([np.maximum((a + b - 1) / 2, 1.0), np.minimum((a + 2 * b) / 5, 1.0),
                      np.ones_like(a)])
    return cands[np.argmin(h(cands), axis=0), np.arange(a.size)]


def draw_targets(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Targets a, b ~ U[-1, 4] (fixed seed), redrawn where the solution would sit at the kink
    x = 1, where F is not differentiable and a fixed-step descent would bounce."""
    rng = np.random.default_rng(seed)
    a, b = (rng.uniform(-1, 4, n).astype(np.float32) for _ in range(2))
    while np.any(kink := np.abs(known_solution(a, b) - 1) < 1e-3):
        a[kink], b[kink] = (rng.uniform(-1, 4, int(kink.sum())) for _ in range(2))
    return a, b


def objective(x, a, b):
    """F(x) in float64 (the plot's gap to F* is below float32's resolution of F)."""
    x, a, b = (np.asarray(v, np.float64) for v in (x, a, b))
    return float(0.5 * np.sum((x - a) ** 2) + 0.5 * np.sum((np.minimum(2 * x, x + 1) - b) ** 2))


def blind_step(x, a, b):
    """The hypergradient that ignores the constraint: dy*/dx = 2 as if unconstrained."""
    y = np.minimum(2 * x, x + 1)
    return objective(x, a, b), (x - a) + 2 * (y - b)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16, help="dimension of x and y")
    ap.add_argument("--steps", type=int, default=200, help="outer gradient steps")
    ap.add_argument("--lr", type=float, default=0.2, help="outer step size")
    ap.add_argument("--out", type=Path, default=HERE / "out", help="output folder")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    a, b = draw_targets(args.n, args.seed)
    x_star = known_solution(a, b)
    m = gradlang.compile_file(HERE / "coupled_bilevel.grad")

    def gradlang_step(export):
        def step(x, a, b):
            value, grads = export(x, a, b)
            return float(value), np.asarray(grads["x"])
        return step

    methods = {"value_function": gradlang_step(m.step),
               "unrolled": gradlang_step(m.step_unrolled),
               "constraint-blind": blind_step}
    results, curves = {}, {}
    for name, step in methods.items():
        x = np.zeros(args.n, np.float32)
        step(x, a, b)  # compile
        bar, curve, t0 = ProgressBar(args.steps, label=name), [], time.perf_counter()
        for k in range(args.steps):
            value, g = step(x, a, b)
            curve.append(objective(x, a, b))
            x = (x - args.lr * g).astype(np.float32)
            bar.update(k + 1, f"F={value:.5f}")
        bar.close()
        seconds = time.perf_counter() - t0
        y, report = m.solve_lower(x)
        curves[name] = curve
        results[name] = {
            "max_abs_error_x": float(np.max(np.abs(x - x_star))),
            "objective": objective(x, a, b),
            "active_set_matches": bool(np.all((x > 1) == (x_star > 1))),
            "ms_per_outer_step": 1e3 * seconds / args.steps,
            "lower_residual": float(report["residual"]), "lower_steps": int(report["steps"]),
            "x": x.tolist()}
    out = {"n": args.n, "steps": args.steps, "x_star": x_star.tolist(),
           "objective_star": objective(x_star, a, b), "active": int(np.sum(x_star > 1)),
           "methods": results}

    print(f"\nknown solution: F* = {out['objective_star']:.6f}, constraint active in "
          f"{out['active']} of {args.n} coordinates")
    print("| hypergradient | max |x - x*| | F(x) | active set right | ms / outer step |")
    print("|---|---:|---:|---|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['max_abs_error_x']:.2e} | {r['objective']:.6f} | "
              f"{r['active_set_matches']} | {r['ms_per_outer_step']:.2f} |")
    (args.out / "coupled_bilevel.json").write_text(json.dumps(out, indent=2))
    _plot(curves, results, x_star, out["objective_star"], args.out / "coupled_bilevel.png")
    return out


def _plot(curves, results, x_star, f_star, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, c in curves.items():
        ax1.semilogy(np.maximum(np.array(c) - f_star, 1e-14), label=name)
    ax1.set_xlabel("outer step"), ax1.set_ylabel("F(x) - F*"), ax1.legend()
    ax1.set_title("outer objective gap")
    order = np.argsort(x_star)
    ax2.plot(x_star[order], "k-", lw=3, alpha=0.4, label="known solution")
    for name, r in results.items():
        ax2.plot(np.array(r["x"])[order], ".", label=name)
    ax2.axhline(1.0, color="gray", ls=":", label="constraint active above")
    ax2.set_xlabel("coordinate (sorted by x*)"), ax2.set_ylabel("x"), ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
