"""Multi-objective gradients: the cost of each `minimize` rule against the plain weighted-sum
gradient, and the quality of the points each rule reaches.

    python benchmarks/multiobjective.py [--quick] [--tasks 2 4] [--json out.json]

Cost: a multi-task regression network (a shared tanh layer D -> H, one linear head per task,
k tasks; task i's objective is the mean squared error of head i), compiled once with every rule
(`mgda`, `pcgrad`, `weights(1/k, ...)`, `dynamic`) and with the plain estimator, `grad` of the
hand-written mean of the k objectives. Per rule: the median time per step and its ratio to the
plain gradient (interleaved timing, benchmarks/timing.py), and the compiled temporary memory
(XLA's memory analysis) and its ratio. `weights` is the same gradient as the plain one.

Quality: Fonseca & Fleming's problem of examples/pareto.py (concave front), 16 starts, 500 SGD
steps of lr 0.5 with each rule and the plain estimator, weights(0.5, 0.5): the mean distance
of the final points to the front, the number of distinct points of the front reached, their
hypervolume as a share of the whole front's, and the share of steps that raised no objective.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import gradlang
from timing import interleaved, parse_timing_args, timing_args, write_json

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
RULES = ("mgda", "pcgrad", "weights", "dynamic")


def network_source(k: int) -> str:
    """k task objectives on a shared layer, their mean, and every rule's export."""
    lines = ["struct Net { w: f32[D, H], b: f32[H], heads: f32[H, K] }",
             "fn features(p: Net, x: f32[B, D]) -> f32[B, H] { return tanh(x @ p.w + p.b) }"]
    for i in range(k):
        lines.append(f"fn task{i}(p: Net, x: f32[B, D], y: f32[B, K]) -> f32 {{\n"
                     f"  return mean((features(p, x) @ p.heads[:, {i}] - y[:, {i}]) ^ 2)\n}}")
    total = " + ".join(f"task{i}(p, x, y)" for i in range(k))
    lines.append(f"fn total(p: Net, x: f32[B, D], y: f32[B, K]) -> f32 {{ return ({total}) / {k}.0 }}")
    tasks = ", ".join(f"task{i}" for i in range(k))
    weights = ", ".join([f"{1 / k:.6g}"] * k)
    lines += ["export plain = grad(total, wrt=[p])",
              f"export mgda = minimize([{tasks}], wrt=[p], by=mgda)",
              f"export pcgrad = minimize([{tasks}], wrt=[p], by=pcgrad)",
              f"export weights = minimize([{tasks}], wrt=[p], by=weights({weights}))",
              f"export dynamic = minimize([{tasks}], wrt=[p], by=dynamic)"]
    return "\n".join(lines) + "\n"


def temp_bytes(fn, args: tuple) -> int:
    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    return 0 if stats is None else int(stats.temp_size_in_bytes)


def measure_cost(k: int, d: int, h: int, batch: int, args) -> dict:
    m = gradlang.compile_source(network_source(k), name=f"multitask{k}.grad", strict=True)
    rng = np.random.default_rng(0)
    net = {"w": (rng.normal(size=(d, h)) / np.sqrt(d)).astype(np.float32),
           "b": np.zeros(h, np.float32),
           "heads": (rng.normal(size=(h, k)) / np.sqrt(h)).astype(np.float32)}
    x = rng.normal(size=(batch, d)).astype(np.float32)
    y = rng.normal(size=(batch, k)).astype(np.float32)
    inputs = (net, x, y, jax.random.key(0), jnp.ones((2, k)))

    def call(name):
        f = m[name]
        extra = [n for n, _ in f.signature.params[3:]]
        return jax.jit(lambda p, x, y, key, history: f(p, x, y, *[
            {"key": key, "history": history}[n] for n in extra]))

    variants = {name: call(name) for name in ("plain",) + RULES}
    times = interleaved(variants, inputs, "plain", args.rounds, args.calls, args.warmup)
    memory = {n: temp_bytes(f, inputs) for n, f in variants.items()}
    return {n: {"seconds": times[n]["median_s"], "time_ratio": times[n]["median_ratio"],
                "time_ratio_iqr": [times[n]["ratio_p25"], times[n]["ratio_p75"]],
                "temp_bytes": memory[n], "memory_ratio": memory[n] / memory["plain"]}
            for n in variants}


def measure_quality(steps: int, starts: int) -> dict:
    sys.path.insert(0, str(EXAMPLES))
    import pareto

    m = gradlang.compile_file(EXAMPLES / "pareto.grad", strict=True)
    x0 = np.random.default_rng(0).uniform(-1.5, 1.5, (starts, 3)).astype(np.float32)
    front_hv = pareto.hypervolume(pareto.true_front(20_001))
    out = {}
    for name, export in (("plain", "w50"), ("mgda", "mgda"), ("pcgrad", "pcgrad"),
                         ("weights", "w50"), ("dynamic", "dynamic")):
        xs, _, _ = pareto.trajectories(m, export, x0, steps, 0.5, 0)
        r = pareto.measures(xs, front_hv)
        out[name] = {k: r[k] for k in ("front_distance_mean", "distinct_front_points",
                                       "hypervolume_share", "monotone_steps")}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, nargs="+", default=[2, 4], help="numbers of tasks k")
    ap.add_argument("--d", type=int, default=256, help="input width D")
    ap.add_argument("--h", type=int, default=512, help="shared layer width H")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=500, help="SGD steps of the quality runs")
    ap.add_argument("--starts", type=int, default=16, help="starting points of the quality runs")
    timing_args(ap, rounds=15, calls=10, warmup=3, quick="4 rounds of 2 calls, 100 quality steps")
    args = parse_timing_args(ap, argv)
    if args.quick:
        args.steps = 100
    params = args.d * args.h + args.h
    print(f"gradlang minimize rules on {jax.devices()[0].platform}; multi-task network D={args.d}, "
          f"H={args.h}, batch {args.batch} ({params:,} shared parameters + H per task)")
    cost = {k: measure_cost(k, args.d, args.h, args.batch, args) for k in args.tasks}
    quality = measure_quality(args.steps, args.starts)
    print(table(cost, quality, args))
    results = {"cost": cost, "quality": quality, "settings": {
        k: getattr(args, k) for k in ("d", "h", "batch", "steps", "starts", "rounds", "calls")}}
    write_json(results, args.json)
    return results


def table(cost: dict, quality: dict, args) -> str:
    """The results as a markdown table: one row per rule."""
    ks = list(cost)
    head = (["rule"] + [f"time k={k}" for k in ks] + [f"memory k={k}" for k in ks]
            + ["front distance", "front points", "HV share", "monotone"])
    rows = []
    for name in ("plain",) + RULES:
        q = quality[name]
        label = "plain: grad(mean of f_i)" if name == "plain" else name
        rows.append([label]
                    + [f"{cost[k][name]['seconds'] * 1e3:.2f} ms ({cost[k][name]['time_ratio']:.2f}x)"
                       for k in ks]
                    + [f"{cost[k][name]['temp_bytes'] / 2 ** 20:.2f} MiB "
                       f"({cost[k][name]['memory_ratio']:.2f}x)" for k in ks]
                    + [f"{q['front_distance_mean']:.1e}", str(q["distinct_front_points"]),
                       f"{q['hypervolume_share']:.3f}", f"{q['monotone_steps']:.3f}"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines.append(f"\nquality: Fonseca-Fleming, {args.starts} starts, {args.steps} SGD steps of lr "
                 f"0.5; plain = weights = weights(0.5, 0.5)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
