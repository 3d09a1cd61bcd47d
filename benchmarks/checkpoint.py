"""Memory and time of backpropagating through a sampling chain: full reverse mode against
`checkpoint { ... }` steps and `with truncated(k=10)`, as the chain grows.

    python benchmarks/checkpoint.py [--quick] [--rounds 10] [--calls 3] [--json out.json]

The model is examples/alignprop.grad (a 3 -> H -> H -> 2 tanh drift network steering an
Euler-Maruyama chain of S steps over N samples in 2-D; the loss is the negative mean reward of
the final samples), H = 128, N = 256, S from 25 to 200. Reported per S: XLA's compiled temp
memory of one value-and-gradient step (`jax.jit(f).lower(...).compile().memory_analysis()`)
and its time per call (interleaved rounds, benchmarks/timing.py), each relative to full
backpropagation, and the cosine of each gradient to the full one (checkpointing is exact;
truncation is biased by design).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

import gradlang
from timing import interleaved, parse_timing_args, timing_args, write_json

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
from alignprop import init_drift  # noqa: E402  (examples/ is not a package)

METHODS = ("full", "checkpointed", "truncated")


def measure(m, s: int, n: int, hidden: int, rounds: int, calls: int, warmup: int) -> dict:
    params = init_drift(hidden, 0)
    x0 = np.random.default_rng(1).normal(size=(n, 2)).astype(np.float32)
    chain, key = np.zeros(s, np.float32), jax.random.key(0)
    steps = {name: jax.jit(m[name]) for name in METHODS}
    temp = {name: f.lower(params, x0, chain, key).compile().memory_analysis().temp_size_in_bytes
            for name, f in steps.items()}
    grads = {name: jax.flatten_util.ravel_pytree(f(params, x0, chain, key)[1])[0]
             for name, f in steps.items()}
    cosine = {name: float(g @ grads["full"] / (jnp.linalg.norm(g) * jnp.linalg.norm(grads["full"])))
              for name, g in grads.items()}
    times = interleaved(steps, (params, x0, chain, key), "full", rounds, calls, warmup)
    return {"chain": s, "temp_bytes": temp, "cosine": cosine,
            "ms": {k: v["median_s"] * 1e3 for k, v in times.items()},
            "time_ratio": {k: v["median_ratio"] for k, v in times.items()}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    timing_args(ap, 10, 3, 2, "two chain lengths, a few rounds (smoke test)")
    a = parse_timing_args(ap, argv)
    lengths = [25, 50] if a.quick else [25, 50, 100, 200]
    m = gradlang.compile_file(ROOT / "examples" / "alignprop.grad")
    print(f"# backpropagation through a sampling chain: jax {jax.__version__}, "
          f"{jax.devices()[0].platform}; H=128, N=256\n")
    print("| chain S | full temp MiB | checkpoint temp / full | truncated(k=10) temp / full "
          "| full ms | checkpoint time / full | truncated time / full | truncated cosine |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for s in lengths:
        r = measure(m, s, 256, 128, a.rounds, a.calls, a.warmup)
        rows.append(r)
        t = r["temp_bytes"]
        print(f"| {s} | {t['full'] / 2 ** 20:.2f} | {t['checkpointed'] / t['full']:.3f} | "
              f"{t['truncated'] / t['full']:.3f} | {r['ms']['full']:.2f} | "
              f"{r['time_ratio']['checkpointed']:.2f} | {r['time_ratio']['truncated']:.2f} | "
              f"{r['cosine']['truncated']:.4f} |")
    assert all(abs(r["cosine"]["checkpointed"] - 1) < 1e-5 for r in rows), "checkpointing changed a gradient"
    out = {"jax": jax.__version__, "rows": rows}
    write_json(out, a.json)
    return out


if __name__ == "__main__":
    main()
