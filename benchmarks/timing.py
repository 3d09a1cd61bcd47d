"""Interleaved timing shared by the benchmarks: each round times every variant once, in an
order that rotates from round to round, a sample being `calls` consecutive calls each followed
by `block_until_ready`; reported against a reference variant. Also the benchmarks' common
command-line options, compiled memory and JSON output."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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


def compiled_memory(compiled) -> dict:
    """XLA's compiled memory in bytes; total = argument + temp + output - alias."""
    ma = compiled.memory_analysis()
    out = {"argument": ma.argument_size_in_bytes, "temp": ma.temp_size_in_bytes,
           "output": ma.output_size_in_bytes, "alias": ma.alias_size_in_bytes}
    out["total"] = out["argument"] + out["temp"] + out["output"] - out["alias"]
    return out


def timing_args(ap, rounds: int, calls: int, warmup: int, quick: str) -> None:
    """The shared flags: --quick (help `quick`), --rounds, --calls, --warmup, --json."""
    ap.add_argument("--quick", action="store_true", help=quick)
    ap.add_argument("--rounds", type=int, default=rounds, help=f"interleaved rounds (default {rounds})")
    ap.add_argument("--calls", type=int, default=calls, help=f"calls per timed sample (default {calls})")
    ap.add_argument("--warmup", type=int, default=warmup,
                    help=f"warm-up calls per variant (default {warmup})")
    ap.add_argument("--json", type=Path, default=None, help="write the results to this file")


def parse_timing_args(ap, argv):
    """Parse; --quick means 4 rounds of 2 calls after 1 warm-up call."""
    a = ap.parse_args(argv)
    if a.quick:
        a.rounds, a.calls, a.warmup = 4, 2, 1
    return a


def write_json(result: dict, path: Path | None) -> None:
    """Write a benchmark's results to `path` (the `--json` option), when given."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), or the architecture where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.machine()


def commit() -> str | None:
    """The checkout's commit, "+modified" when tracked files differ from it; None outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        head = git("rev-parse", "--short", "HEAD")
        return head + ("+modified" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def machine() -> tuple[dict, str]:
    """The run's provenance for a benchmark's JSON: JAX version, device, CPU model and count,
    date (UTC) and commit; and a line saying them, for the figures quoted from it."""
    import jax

    dev = jax.devices()[0]
    info = {"jax": jax.__version__, "device": f"{dev.platform}:{dev.device_kind}",
            "cpu_count": os.cpu_count(), "cpu": cpu_name(),
            "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
            "commit": commit()}
    return info, (f"jax {info['jax']}, device {info['device']}, {info['cpu_count']} CPUs "
                  f"({info['cpu']}), python {platform.python_version()}, {info['date']}, "
                  f"commit {info['commit']}")
