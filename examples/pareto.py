"""Pareto fronts by multi-objective gradients: run `examples/pareto.grad`'s rules from the same starting points.

    python examples/pareto.py [--steps 500] [--lr 0.5] [--starts 16] [--out examples/out]

The problem: Fonseca & Fleming's two objectives in three variables, whose Pareto set is the
segment x = t (1, 1, 1), |t| <= 1/sqrt(3), and whose front is concave (see pareto.grad). From
the same starting points (uniform in [-1.5, 1.5]^3, fixed seed), each rule's export gives a
direction d per step and optax's SGD takes x <- x - lr d: MGDA, PCGrad, Dynamic Weight Average,
and fixed weights (0.1, 0.9) ... (0.9, 0.1).

Reported per rule, over the final points: the distance to the true front in objective space
(resolved to ~1e-6) and to the Pareto set in x; the spread, the share of the front's
range of t that the final points span; the number of distinct final points on the front; the
hypervolume they dominate up to the reference point (1, 1), as a share of the whole front's;
and the share of steps after which neither objective increased. Writes `pareto_front.png`
(trajectories in objective space with the true front, and the mean distance to the front per
step) and `pareto.json` to the output folder.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradlang
from progress import ProgressBar

HERE = Path(__file__).resolve().parent
EDGE = 1 / np.sqrt(3)
RULES = {"mgda": "MGDA", "pcgrad": "PCGrad", "dynamic": "dynamic (DWA)", "w50": "weights(0.5, 0.5)"}
SWEEP = {"w10": 0.1, "w30": 0.3, "w50": 0.5, "w70": 0.7, "w90": 0.9}
"""The fixed weightings, by export: the weight of f1."""


def objectives(x: np.ndarray) -> np.ndarray:
    """(f1, f2) at each row of x, in float64."""
    return np.stack([1 - np.exp(-np.sum((x - EDGE) ** 2, -1)),
                     1 - np.exp(-np.sum((x + EDGE) ** 2, -1))], -1)


def true_front(n: int) -> np.ndarray:
    """n points of the Pareto front, the images of x = t (1, 1, 1), t from -1/sqrt(3) to 1/sqrt(3)."""
    return front_at(np.linspace(-EDGE, EDGE, n))


def front_at(t: np.ndarray) -> np.ndarray:
    """The front's points (f1, f2) at parameters t (any shape) of the Pareto set."""
    return objectives(t[..., None] * np.ones(3))


def front_distance(points: np.ndarray, n: int = 2001) -> np.ndarray:
    """The distance of each point (f1, f2) to the front: to the nearest of n points of it, then
    to the nearest of n points between that one's neighbours (resolution ~1e-6)."""
    t = np.linspace(-EDGE, EDGE, n)
    nearest = np.argmin(np.linalg.norm(points[:, None] - front_at(t)[None], axis=-1), axis=1)
    lo, hi = t[np.maximum(nearest - 1, 0)], t[np.minimum(nearest + 1, n - 1)]
    fine = front_at(lo[:, None] + (hi - lo)[:, None] * np.linspace(0, 1, n))
    return np.min(np.linalg.norm(points[:, None] - fine, axis=-1), axis=1)


def hypervolume(points: np.ndarray, ref=(1.0, 1.0)) -> float:
    """The area dominated by 2-D points (minimization) inside the box up to `ref`."""
    pts = points[np.all(points < ref, axis=1)]
    pts = pts[np.argsort(pts[:, 0])]
    area, best_f2 = 0.0, ref[1]
    for a, b in pts:
        if b < best_f2:
            area += (ref[0] - a) * (best_f2 - b)
            best_f2 = b
    return float(area)


def label(name: str) -> str:
    """The rule of export `name`, as printed."""
    return RULES[name] if name in RULES else f"weights({SWEEP[name]:g}, {1 - SWEEP[name]:g})"


def trajectories(m, name: str, x0: np.ndarray, steps: int, lr: float, seed: int):
    """SGD on export `name` from every start at once (vmap), the steps in one `lax.scan`:
    the iterates [steps + 1, S, 3], the combination weights [steps, S, 2] and the seconds of
    the compiled run."""
    f = m[name]
    opt = optax.sgd(lr)
    stateful = f.signature.stateful
    keyed = f.signature.params[-1][0] == "key"

    def one(x):
        def step(carry, i):
            x, state, history = carry
            extra = (history,) if stateful else ()
            extra += (jax.random.fold_in(jax.random.key(seed), i),) if keyed else ()
            out = f(x, *extra)
            _, direction, weights = out[:3]
            updates, state = opt.update(direction["x"], state)
            return (optax.apply_updates(x, updates), state, out[3] if stateful else history), (x, weights)

        carry = (x, opt.init(x), jnp.zeros((2, 2)))
        (last, _, _), (xs, weights) = jax.lax.scan(step, carry, jnp.arange(steps))
        return jnp.concatenate([xs, last[None]]), weights

    run = jax.jit(jax.vmap(one, out_axes=1))
    jax.block_until_ready(run(jnp.asarray(x0)))
    t0 = time.perf_counter()
    xs, weights = jax.block_until_ready(run(jnp.asarray(x0)))
    return np.asarray(xs, np.float64), np.asarray(weights, np.float64), time.perf_counter() - t0


def measures(xs: np.ndarray, front_hv: float) -> dict:
    """The figures of one rule's final points (see the module docstring)."""
    values = objectives(xs)
    final, last_x = values[-1], xs[-1]
    dist = front_distance(final)
    t = np.clip(last_x.mean(1), -EDGE, EDGE)
    to_set = np.linalg.norm(last_x - t[:, None], axis=1)
    on_front = dist < 1e-3
    rises = np.any(np.diff(values, axis=0) > 1e-6, axis=-1)
    return {"front_distance_mean": float(dist.mean()), "front_distance_max": float(dist.max()),
            "pareto_set_distance_max": float(to_set.max()),
            "on_front": int(on_front.sum()),
            "spread": float((t[on_front].max() - t[on_front].min()) / (2 * EDGE)) if on_front.any() else 0.0,
            "distinct_front_points": int(len(np.unique(np.round(t[on_front], 2)))),
            "hypervolume": hypervolume(final),
            "hypervolume_share": hypervolume(final) / front_hv,
            "monotone_steps": float(1 - rises.mean()),
            "final_t": t.tolist()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=500, help="SGD steps per start (default 500)")
    ap.add_argument("--lr", type=float, default=0.5, help="SGD learning rate (default 0.5)")
    ap.add_argument("--starts", type=int, default=16, help="starting points (default 16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "out", help="output folder (default examples/out)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    m = gradlang.compile_file(HERE / "pareto.grad", strict=True)
    compile_s = time.perf_counter() - t0
    print(f"compiled pareto.grad in {compile_s * 1e3:.1f} ms; exports: {', '.join(m.exports)}")
    x0 = np.random.default_rng(args.seed).uniform(-1.5, 1.5, (args.starts, 3)).astype(np.float32)
    front = true_front(20_001)
    front_hv = hypervolume(front)

    names = list(RULES) + [n for n in SWEEP if n not in RULES]
    runs, results = {}, {}
    bar = ProgressBar(len(names), label="pareto ")
    for i, name in enumerate(names):
        xs, weights, seconds = trajectories(m, name, x0, args.steps, args.lr, args.seed)
        runs[name] = xs
        results[name] = measures(xs, front_hv) | {
            "seconds": seconds, "final_weights_mean": weights[-1].mean(0).tolist()}
        bar.update(i + 1, name)
    bar.close()

    print(f"{args.starts} starts, {args.steps} SGD steps of lr {args.lr}; front hypervolume "
          f"{front_hv:.4f} (reference point (1, 1))")
    header = ["rule", "mean dist", "max dist", "on front", "distinct", "spread", "HV share",
              "monotone"]
    rows = [[label(n),
             f"{r['front_distance_mean']:.2e}", f"{r['front_distance_max']:.2e}",
             f"{r['on_front']}/{args.starts}", str(r["distinct_front_points"]),
             f"{r['spread']:.2f}", f"{r['hypervolume_share']:.3f}", f"{r['monotone_steps']:.3f}"]
            for n, r in results.items()]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    for r in [header] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))

    fig_path = args.out / "pareto_front.png"
    _plot(runs, front, fig_path, args)
    summary = {
        "example": "pareto",
        "problem": "Fonseca-Fleming, 3 variables: f1 = 1 - exp(-|x - a|^2), f2 = 1 - exp(-|x + a|^2), "
                   "a = (1, 1, 1)/sqrt(3); concave front",
        "starts": args.starts,
        "start_box": [-1.5, 1.5],
        "steps": args.steps,
        "optimizer": "sgd",
        "learning_rate": args.lr,
        "front_hypervolume": front_hv,
        "rules": results,
        "compile_s": compile_s,
        "plot": str(fig_path),
    }
    (args.out / "pareto.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {fig_path} and {args.out / 'pareto.json'}")
    return summary


def _plot(runs: dict, front: np.ndarray, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 9))
    panels = [(name, [name]) for name in RULES] + [("sweep", list(SWEEP))]
    colors = plt.get_cmap("viridis")
    for ax, (title, names) in zip(axes.flat, panels):
        ax.plot(front[:, 0], front[:, 1], "k-", lw=2.5, label="true Pareto front", zorder=3)
        for name in names:
            values = objectives(runs[name])
            color = colors(SWEEP[name]) if title == "sweep" else None
            for s in range(values.shape[1]):
                line, = ax.plot(values[:, s, 0], values[:, s, 1], lw=0.8, alpha=0.6,
                                color=color or f"C{s % 10}")
                ax.plot(*values[0, s], "o", ms=3, color=line.get_color(), alpha=0.6)
                ax.plot(*values[-1, s], "*", ms=9, color=line.get_color(), zorder=4)
            if title == "sweep":
                ax.plot([], [], color=color, label=label(name))
        ax.set_title("fixed weights, five weightings" if title == "sweep" else RULES[title])
        ax.set_xlabel("f1")
        ax.set_ylabel("f2")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=8, loc="upper right")
    ax = axes.flat[5]
    for name in list(RULES) + ["w10", "w90"]:
        steps = np.unique(np.linspace(0, args.steps, 101).astype(int))
        values = objectives(runs[name][steps])
        dist = front_distance(values.reshape(-1, 2)).reshape(values.shape[:2])
        ax.semilogy(steps, np.maximum(dist.mean(1), 1e-8), label=label(name))
    ax.set_xlabel("SGD step")
    ax.set_ylabel("mean distance to the front (objective space)")
    ax.set_title(f"{args.starts} starts, lr {args.lr}")
    ax.legend(fontsize=8)
    fig.suptitle("Fonseca-Fleming: trajectories in objective space (o start, * end)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
