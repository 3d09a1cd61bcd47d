"""Sliced Wasserstein estimates with and without Gaussian control variates: variance and time.

    python benchmarks/ot.py [--quick] [--estimates 4000] [--rounds 10] [--calls 5] [--json out.json]

For two pairs of point clouds (N = 256 points in D = 10 dimensions, fixed seeds) and L = 10 and
100 random directions, `sliced_wasserstein(x, y, projections=L)` with each control variate
(none, gaussian_lower, gaussian_upper; `runtime.ot`: coefficient 1 for the lower bound, a
leave-one-out coefficient for the upper one, so that each is unbiased) is
evaluated `--estimates` times with independent keys. Reported: the mean of the estimate and
its standard error, the variance of the estimate and of its gradient in x (summed over
coordinates), their reduction against no control variate, and the time per estimate relative
to it (interleaved timing, benchmarks/timing.py). The pairs:
- "shifted": x a correlated Gaussian cloud, y an isotropic one with scale 1.5 and a shifted
  mean (the means differ: the mean-gap term dominates);
- "centred": the same without the shift (same means, different covariances).
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np

import gradlang
from timing import interleaved, parse_timing_args, timing_args, write_json

N, D = 256, 10
CONTROLS = ("none", "gaussian_lower", "gaussian_upper")


def clouds(shift: float):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D)) @ (rng.normal(size=(D, D)) * 0.5)
    y = rng.normal(size=(N, D)) * 1.5 + shift * rng.normal(size=(1, D))
    return x.astype(np.float32), y.astype(np.float32)


def export(control: str, projections: int):
    return jax.jit(gradlang.compile_source(f"""
fn f(x: f32[N, D], y: f32[N, D]) -> f32 {{
  return sliced_wasserstein(x, y, projections={projections}) with control_variate({control})
}}
export g = value_and_grad(f, wrt=[x])
""").g)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    timing_args(ap, 10, 5, 2, "fewer estimates and rounds (smoke test)")
    ap.add_argument("--estimates", type=int, default=4000)
    a = parse_timing_args(ap, argv)
    n = 200 if a.quick else a.estimates
    keys = jax.random.split(jax.random.key(0), n)
    print(f"# sliced Wasserstein control variates: jax {jax.__version__}, "
          f"{jax.devices()[0].platform}; N={N}, D={D}, {n} estimates per row\n")
    print("| clouds | L | control variate | SW_2^2 (s.e.) | value variance | reduction | gradient variance "
          "| reduction | time / none |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    for pair, shift in (("shifted", 2.0), ("centred", 0.0)):
        x, y = clouds(shift)
        for projections in (10, 100):
            steps = {c: export(c, projections) for c in CONTROLS}
            times = interleaved({c: lambda f=f: f(x, y, keys[0]) for c, f in steps.items()}, (), "none",
                                a.rounds, a.calls, a.warmup)
            stats = {}
            for c, f in steps.items():
                values, grads = jax.jit(jax.vmap(lambda k, f=f: f(x, y, k)))(keys)
                stats[c] = {"mean": float(jnp.mean(values)), "se": float(jnp.std(values)) / math.sqrt(n),
                            "value_var": float(jnp.var(values)),
                            "grad_var": float(jnp.sum(jnp.var(grads["x"], 0))),
                            "time_ratio": times[c]["median_ratio"]}
            for c, s in stats.items():
                print(f"| {pair} | {projections} | {c} | {s['mean']:.4f} ({s['se']:.4f}) | "
                      f"{s['value_var']:.3e} | {stats['none']['value_var'] / s['value_var']:.1f}x | "
                      f"{s['grad_var']:.3e} | {stats['none']['grad_var'] / s['grad_var']:.1f}x | "
                      f"{s['time_ratio']:.2f} |")
            rows.append({"clouds": pair, "projections": projections, "stats": stats})
    write_json({"jax": jax.__version__, "rows": rows}, a.json)
    return {"rows": rows}


if __name__ == "__main__":
    main()
