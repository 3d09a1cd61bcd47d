"""Bias, variance and time of the gradient of a compositional objective f(E[g]): SCGD against
the plug-in, at a few inner sample counts.

    python benchmarks/compose.py [--quick] [--estimates 4000] [--rounds 10] [--calls 20] [--json out.json]

The problem has a closed form: log E[exp(t . z)], z ~ N(0, I_4), equals |t|^2 / 2, whose
gradient is t (here t = (0.5, -0.3, 0.8, 0.2)). Both exports are
`grad(compose(lg, expect(g, samples=N), by=...), wrt=[t])` with lg = log and g = exp(t . z):
`by=plugin` differentiates log of this call's mean of N draws (a self-normalized estimate,
biased: at N = 1 its mean is 0), `by=scgd(beta=0.1)` tracks the inner mean across calls and
differentiates J^T / u. Per N: the relative bias |mean - t| / |t| of M independent estimates
(plug-in: M keys; SCGD: M independent chains, each run for 50 calls at t from zeros, the last
call's gradient), with its standard error, the variance (trace of the covariance), and the time
per call of SCGD relative to the plug-in (interleaved rounds, benchmarks/timing.py).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import gradlang
from timing import interleaved, parse_timing_args, timing_args, write_json

SRC = """
fn g(t: f32[4]) -> f32 {{
  z ~ Normal(zeros([4]), 1.0)
  return exp(sum(t * z))
}}
fn lg(u: f32) -> f32 {{ return log(u) }}
export scgd = grad(compose(lg, expect(g, samples={n}), by=scgd(beta={beta})), wrt=[t])
export plugin = grad(compose(lg, expect(g, samples={n}), by=plugin), wrt=[t])
"""
THETA = np.array([0.5, -0.3, 0.8, 0.2], np.float32)
CALLS = 50
"""Calls of each SCGD chain before its gradient is taken."""


def statistics(estimates: np.ndarray) -> dict:
    """Relative bias against t with its standard error, and the variance (trace)."""
    m = len(estimates)
    diff = estimates.mean(0) - THETA
    norm = float(np.linalg.norm(THETA))
    cov = np.cov(estimates, rowvar=False)
    return {"relative_bias": float(np.linalg.norm(diff)) / norm,
            "bias_se": float(np.sqrt(np.trace(cov) / m)) / norm,
            "variance": float(np.trace(cov))}


def measure(n: int, beta: float, estimates: int, rounds: int, calls: int, warmup: int) -> dict:
    m = gradlang.compile_source(SRC.format(n=n, beta=beta), name=f"compose_{n}.grad")
    keys = jax.random.split(jax.random.key(n), (CALLS, estimates))

    @jax.jit
    def scgd_chains(keys):
        def call(state, ks):
            grads, state = jax.vmap(m.scgd, in_axes=(None, 0, 0))(THETA, state, ks)
            return state, grads["t"]

        init = (jnp.zeros(estimates), jnp.zeros(estimates))
        return jax.lax.scan(call, init, keys)[1][-1]

    plugin = jax.jit(jax.vmap(lambda k: m.plugin(THETA, k)["t"]))
    out = {"scgd": statistics(np.asarray(scgd_chains(keys), np.float64)),
           "plugin": statistics(np.asarray(plugin(keys[0]), np.float64))}
    state, key = (jnp.float32(1.0), jnp.float32(5.0)), jax.random.key(0)
    variants = {"plugin": jax.jit(lambda s, k: m.plugin(THETA, k)),
                "scgd": jax.jit(lambda s, k: m.scgd(THETA, s, k))}
    timing = interleaved(variants, (state, key), "plugin", rounds, calls, warmup)
    out["time_ratio"] = timing["scgd"]["median_ratio"]
    out["plugin_us"] = timing["plugin"]["median_s"] * 1e6
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--estimates", type=int, default=4000)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--samples", type=int, nargs="+", default=[1, 4, 16, 64])
    timing_args(ap, rounds=10, calls=20, warmup=3, quick="1,000 estimates, 4 rounds of 2 calls")
    args = parse_timing_args(ap, argv)
    if args.quick:
        args.estimates = 1000
    rows = {n: measure(n, args.beta, args.estimates, args.rounds, args.calls, args.warmup)
            for n in args.samples}
    print(f"\nd/dt log E[exp(t . z)] = t, |t| = {np.linalg.norm(THETA):.3f}; {args.estimates} "
          f"estimates; SCGD beta = {args.beta:g}, gradient at call {CALLS} of each chain")
    print("| inner samples N | plug-in rel. bias | SCGD rel. bias | plug-in variance | "
          "SCGD variance | time SCGD / plug-in |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n, r in rows.items():
        p, s = r["plugin"], r["scgd"]
        print(f"| {n} | {p['relative_bias']:.3f} +- {p['bias_se']:.3f} | "
              f"{s['relative_bias']:.3f} +- {s['bias_se']:.3f} | {p['variance']:.3g} | "
              f"{s['variance']:.3g} | {r['time_ratio']:.2f}x ({r['plugin_us']:.0f} us) |")
    result = {"benchmark": "compose", "theta": THETA.tolist(), "beta": args.beta,
              "estimates": args.estimates, "calls_per_chain": CALLS,
              "rows": {str(n): r for n, r in rows.items()}}
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
