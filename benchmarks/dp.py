"""Differentially private gradients: ghost clipping against per-example (vmapped) clipping and
the non-private gradient, as the model widens.

    python benchmarks/dp.py [--quick] [--rounds 20] [--calls 3] [--json out.json]

Float32, fixed numpy seed and PRNG key. The model: a 3-layer MLP regressor, D=256 -> H -> H ->
10 (tanh), loss = mean((f(x) - y)^2), batch B=64 examples, H growing. Three gradlang exports
of the same objective, each jitted:

- `non-private`: `grad(loss, wrt=[p])`, reverse mode (the reference of the ratios);
- `dp ghost`: `grad(loss, wrt=[p], by=dp(clip=1.0, noise=1.0))`: the three weight matrices are
  linear layers (ghost norms from each layer's inputs and output cotangents, the clipped sum
  as one product X^T (c G)), the biases get per-example gradients;
- `dp per-example`: the same with `clipping=per_example`: `vmap` of the gradient over the
  examples, [B, ...] per leaf (the textbook DP-SGD implementation, as Opacus and JAX
  tutorials write it), clipped and summed;
- `dp ghost, noise=0`: ghost clipping without the noise, to separate the cost of the clipping
  from that of drawing a parameter-sized Gaussian vector (`jax.random.normal`, whose random
  bits XLA on CPU materializes at several times the vector's size).

Both private exports get the same key, so they draw the same noise: the benchmark checks that
their gradients agree (max relative difference). Reported per H: the parameter count, step time
(interleaved, `benchmarks/timing.py`), XLA's compiled memory (`jax.jit(f).lower(...).compile()
.memory_analysis()`: temp bytes, and total = argument + temp + output - alias), and each
private variant's ratios to the non-private gradient; then the growth exponents
d log(temp) / d log(H) over the last three sizes (per-example gradients store B (D H + H^2 +
10 H) floats; ghost clipping stores activation-sized arrays, B (D + 2 H) per layer input, and
the noise a parameter-sized vector).

`--quick` runs smaller widths and a few rounds (a smoke test; its ratios are noisy).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import gradlang
from timing import interleaved, machine, parse_timing_args, timing_args, write_json

D, C, B = 256, 10, 64
MLP3 = """
use std.nn
struct MLP { l1: Dense[I=D, O=H], l2: Dense[I=H, O=H], l3: Dense[I=H, O=C] }
fn loss(p: MLP, x: f32[B, D], y: f32[B, C]) -> f32 {
  let r = dense(p.l3, dense_tanh(p.l2, dense_tanh(p.l1, x))) - y
  return mean(r * r)
}
export plain = grad(loss, wrt=[p])
export ghost = grad(loss, wrt=[p], by=dp(clip=1.0, noise=1.0))
export per_example = grad(loss, wrt=[p], by=dp(clip=1.0, noise=1.0, clipping=per_example))
export ghost_noiseless = grad(loss, wrt=[p], by=dp(clip=1.0, noise=0))
"""
VARIANTS = {"non-private": "plain", "dp ghost": "ghost", "dp per-example": "per_example",
            "dp ghost, noise=0": "ghost_noiseless"}
COMPARED = ("dp ghost", "dp per-example")
TIME_LIMIT_BYTES = 3 << 30
"""Variants whose compiled total memory is above this are measured but not timed."""


def mib(n: float) -> float:
    return n / 2**20


def params(h: int, rng) -> dict:
    def dense(i, o):
        return {"w": (rng.normal(size=(i, o)) / np.sqrt(i)).astype(np.float32),
                "b": (0.1 * rng.normal(size=o)).astype(np.float32)}

    return {"l1": dense(D, h), "l2": dense(h, h), "l3": dense(h, C)}


def width_sweep(widths: list[int], rounds: int, calls: int, warmup: int) -> list[dict]:
    m = gradlang.compile_source(MLP3)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, D)).astype(np.float32)
    y = rng.normal(size=(B, C)).astype(np.float32)
    key = jax.random.key(0)
    print(f"## Ghost clipping vs per-example clipping vs the non-private gradient: MLP {D} -> H "
          f"-> H -> {C}, batch {B}\n")
    print("| H | params | variant | ms / step | time / non-private | temp MiB | total MiB "
          "| temp / non-private | total / non-private |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    for h in widths:
        p = params(h, rng)
        args = {name: (p, x, y) if export == "plain" else (p, x, y, key)
                for name, export in VARIANTS.items()}
        exe, mem = {}, {}
        for name, export in VARIANTS.items():
            exe[name] = jax.jit(m[export]).lower(*args[name]).compile()
            ma = exe[name].memory_analysis()
            mem[name] = {"argument": ma.argument_size_in_bytes, "temp": ma.temp_size_in_bytes,
                         "output": ma.output_size_in_bytes, "alias": ma.alias_size_in_bytes}
            mem[name]["total"] = (mem[name]["argument"] + mem[name]["temp"] + mem[name]["output"]
                                  - mem[name]["alias"])
        timed = [n for n in VARIANTS if mem[n]["total"] <= TIME_LIMIT_BYTES]
        grads = {n: exe[n](*args[n]) for n in timed if n in COMPARED}
        if len(grads) == 2:
            a, b = (jax.tree.leaves(g) for g in grads.values())
            agree = max(float(np.max(np.abs(u - v)) / (np.max(np.abs(v)) + 1e-30))
                        for u, v in zip(a, b))
        else:
            agree = None
        times = interleaved({n: (lambda n=n: exe[n](*args[n])) for n in timed}, (), "non-private",
                            rounds, calls, warmup)
        nparams = sum(int(np.size(leaf)) for leaf in jax.tree.leaves(p))
        ref = mem["non-private"]
        for name in VARIANTS:
            t = times.get(name)
            ms = f"{1e3 * t['median_s']:.2f}" if t else "not timed"
            ratio = f"{t['median_ratio']:.2f}" if t else "-"
            print(f"| {h} | {nparams:,} | {name} | {ms} | {ratio} | {mib(mem[name]['temp']):.2f} "
                  f"| {mib(mem[name]['total']):.2f} | {mem[name]['temp'] / max(ref['temp'], 1):.2f} "
                  f"| {mem[name]['total'] / ref['total']:.2f} |")
        rows.append({"hidden": h, "params": nparams, "bytes": mem, "times": times,
                     "ghost_vs_per_example_max_rel_diff": agree})
    print()
    for row in rows:
        if row["ghost_vs_per_example_max_rel_diff"] is not None:
            print(f"H={row['hidden']}: ghost and per-example gradients (same key, same noise) "
                  f"agree to a relative {row['ghost_vs_per_example_max_rel_diff']:.1e}")
    tail = rows[-3:] if len(rows) >= 3 else rows
    for name in VARIANTS:
        hs = np.log([r["hidden"] for r in tail])
        temps = np.log([max(r["bytes"][name]["temp"], 1) for r in tail])
        slope = float(np.polyfit(hs, temps, 1)[0]) if len(tail) > 1 else float("nan")
        print(f"{name}: temp memory grows as H^{slope:.2f} over H = {tail[0]['hidden']} to "
              f"{tail[-1]['hidden']}")
        for r in rows:
            r.setdefault("temp_growth_exponent", {})[name] = slope
    last = rows[-1]
    ghost_t = last["times"].get("dp ghost")
    per_t = last["times"].get("dp per-example")
    if ghost_t and per_t:
        print(f"at H={last['hidden']}: ghost clipping takes {per_t['median_s'] / ghost_t['median_s']:.1f}x "
              f"less time and {last['bytes']['dp per-example']['temp'] / last['bytes']['dp ghost']['temp']:.1f}x "
              f"less temp memory than per-example clipping")
    print()
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    timing_args(ap, 20, 3, 2, "small widths, a few rounds (smoke test)")
    a = parse_timing_args(ap, argv)
    widths = [64, 128, 256] if a.quick else [64, 128, 256, 512, 1024, 2048]
    t0 = time.perf_counter()
    info, line = machine()
    print("# gradlang differential-privacy benchmark\n")
    print(f"{line}; {a.rounds} rounds x {a.calls} calls per variant\n")
    out = {**info, "rounds": a.rounds, "calls": a.calls,
           "widths": width_sweep(widths, a.rounds, a.calls, a.warmup)}
    out["wall_s"] = time.perf_counter() - t0
    print(f"total wall time {out['wall_s']:.0f} s")
    write_json(out, a.json)
    return out


if __name__ == "__main__":
    main()
