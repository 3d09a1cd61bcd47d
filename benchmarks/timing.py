"""Interleaved timing shared by the benchmarks: each round times every variant once, in an
order that rotates from round to round, a sample being `calls` consecutive calls each followed
by `block_until_ready`; reported against a reference variant."""

from __future__ import annotations

import statistics
import time


def interleaved(variants: dict, args: tuple, ref: str, rounds: int, calls: int, warmup: int) -> dict:
    """Median time per call and median per-round ratio to `ref`, timed interleaved."""
    import jax
    import numpy as np

    names = list(variants)
    for n in names:
        for _ in range(warmup):
            jax.block_until_ready(variants[n](*args))
    samples = {n: [] for n in names}
    perf, block = time.perf_counter, jax.block_until_ready
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            f = variants[n]
            t0 = perf()
            for _ in range(calls):
                block(f(*args))
            samples[n].append((perf() - t0) / calls)
    out = {}
    for n in names:
        s = samples[n]
        ratios = [a / b for a, b in zip(s, samples[ref])]
        q = np.percentile(s, [25, 75])
        out[n] = {"median_s": statistics.median(s), "p25_s": float(q[0]), "p75_s": float(q[1]),
                  "median_ratio": statistics.median(ratios),
                  "ratio_p25": float(np.percentile(ratios, 25)),
                  "ratio_p75": float(np.percentile(ratios, 75))}
    return out
