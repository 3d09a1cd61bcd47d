"""Scaling out: a data-parallel and an FSDP training step of an MLP as the devices go 1 -> 8.

    python benchmarks/scaling.py [--quick] [--devices 1,2,4,8] [--rounds 10] [--calls 3] [--json out.json]

Runs on CPU: each device count n in its own process with
XLA_FLAGS=--xla_force_host_platform_device_count=n (JAX reads the flag when it starts), so n
"devices" share this machine's cores: the memory and the communication are those of n real
devices, the times are not (n devices on a few cores run no faster than one).

The step: `export step = value_and_grad(loss, wrt=[p])` of a 2-layer tanh MLP classifier
(std.nn, cross entropy), B examples of D features, H hidden units, C classes (float32, fixed
numpy seed). Three variants per n, on a mesh `("data",)` of the n devices:

- `one device`: compiled without `shard=` (everything on device 0), the reference;
- `data parallel`: `shard={"B": "data"}`: the batch split n ways, the parameters replicated;
- `fsdp`: `shard={"B": "data", "H": "data"}`: also every parameter holding H (l1.w [D, H],
  l1.b [H], l2.w [H, C]) split n ways along H, gathered where it is used.

Reported per n and variant: XLA's compiled memory per device
(`lower(...).compile().memory_analysis()`: argument and temp bytes; the targets: arguments and
activations 1/n for data parallelism, parameters 1/n for FSDP); the collectives of the
compiled HLO (`gradlang.runtime.sharding.collectives`: ops and bytes of their results)
against the minimum (data parallel: one all-reduce of the loss and the gradient; FSDP: one
all-gather of the split parameters, one reduce-scatter of their gradients, one all-reduce of
the other gradients and the loss); the largest difference of the loss and gradient from the
n = 1 run's one-device result, relative to the largest gradient entry; and the time per step,
timed interleaved (`benchmarks/timing.py`) with arguments already placed on the mesh
(`gradlang.runtime.sharding.place`), median, and its ratio to `one device`.

`--quick` runs small sizes and a few rounds (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from timing import ROOT, machine, parse_timing_args, timing_args, write_json

MLP = """
use std.nn
struct MLP { l1: Dense[I=D, O=H], l2: Dense[I=H, O=C] }

fn loss(p: MLP, x: f32[B, D], y: i32[B]) -> f32 {
  return cross_entropy(dense(p.l2, dense_tanh(p.l1, x)), y)
}

export step = value_and_grad(loss, wrt=[p])
"""
SIZES = {"full": {"B": 1024, "D": 256, "H": 1024, "C": 16},
         "quick": {"B": 64, "D": 16, "H": 64, "C": 8}}
SHARD = {"one device": None, "data parallel": {"B": "data"},
         "fsdp": {"B": "data", "H": "data"}}
JSON = ROOT / "benchmarks" / "out" / "scaling.json"


def _arguments(s: dict):
    import numpy as np

    rng = np.random.default_rng(0)
    f32 = np.float32
    params = {"l1": {"w": (rng.normal(size=(s["D"], s["H"])) / s["D"] ** 0.5).astype(f32),
                     "b": np.zeros(s["H"], f32)},
              "l2": {"w": (rng.normal(size=(s["H"], s["C"])) / s["H"] ** 0.5).astype(f32),
                     "b": np.zeros(s["C"], f32)}}
    x = rng.normal(size=(s["B"], s["D"])).astype(f32)
    y = rng.integers(0, s["C"], size=s["B"]).astype(np.int32)
    return params, x, y


def _minimum(variant: str, n: int, params: dict) -> dict:
    """The fewest collectives a step needs (ops, bytes of their results per device)."""
    if n == 1 or variant == "one device":
        return {"ops": 0, "bytes": 0}
    total = 4 * sum(v.size for layer in params.values() for v in layer.values())
    if variant == "data parallel":
        return {"ops": 1, "bytes": total + 4}
    split = 4 * (params["l1"]["w"].size + params["l1"]["b"].size + params["l2"]["w"].size)
    return {"ops": 3, "bytes": split + split // n + (total - split) + 4}


def worker(n: int, sizes: dict, rounds: int, calls: int, warmup: int, save: Path) -> dict:
    """One device count, in a process started with n host devices: every variant's memory,
    collectives and time; its results saved to `save` (npz) for the comparison with n = 1."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    import gradlang
    from gradlang.runtime.sharding import collectives, lower, place
    from timing import compiled_memory, interleaved

    assert len(jax.devices()) == n, f"expected {n} devices, got {len(jax.devices())}"
    mesh = Mesh(np.array(jax.devices()), ("data",))
    params, x, y = _arguments(sizes)
    steps, rows, results = {}, {}, {}
    for variant, shard in SHARD.items():
        m = gradlang.compile_source(MLP, **({} if shard is None else {"mesh": mesh, "shard": shard}))
        compiled = lower(m.step, params, x, y).compile()
        found = collectives(compiled.as_text())
        args = (params, x, y) if shard is None else place(m.step, params, x, y)
        steps[variant] = (lambda step, args: lambda: step(*args))(m.step, args)
        loss, grads = m.step(*args)
        results[variant] = [np.asarray(loss)] + [np.asarray(g) for g in jax.tree.leaves(grads)]
        rows[variant] = {"memory": compiled_memory(compiled),
                         "collectives": {"ops": len(found), "bytes": sum(c.bytes for c in found),
                                         "by_op": _by_op(found)},
                         "minimum": _minimum(variant, n, params)}
    np.savez(save, **{f"{v}/{i}": a for v, arrays in results.items() for i, a in enumerate(arrays)})
    times = interleaved(steps, (), "one device", rounds, calls, warmup)
    for variant in rows:
        rows[variant]["time"] = times[variant]
    return rows


def _by_op(found: list) -> dict:
    out: dict = {}
    for c in found:
        ops, size = out.get(c.op, (0, 0))
        out[c.op] = (ops + 1, size + c.bytes)
    return {op: {"ops": k, "bytes": b} for op, (k, b) in out.items()}


def _run(n: int, a, sizes: dict, save: Path) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}",
               JAX_PLATFORMS="cpu")
    cmd = [sys.executable, __file__, "--worker", str(n), "--save", str(save),
           "--rounds", str(a.rounds), "--calls", str(a.calls), "--warmup", str(a.warmup),
           *(["--quick"] if a.quick else [])]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"n={n} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _differences(rows: dict, saved: dict, reference) -> None:
    """Each variant's largest difference from the n = 1 one-device result, relative to the
    largest gradient entry (the loss included, against the loss)."""
    import numpy as np

    want = [reference[f"one device/{i}"] for i in range(len(reference.files) // len(SHARD))]
    for n, variants in rows.items():
        for variant, row in variants.items():
            got = [saved[n][f"{variant}/{i}"] for i in range(len(want))]
            grad_scale = max(float(np.abs(w).max()) for w in want[1:])
            row["max_rel_diff"] = {
                "loss": float(abs(got[0] - want[0]) / abs(want[0])),
                "grads": max(float(np.abs(g - w).max()) for g, w in zip(got[1:], want[1:]))
                / grad_scale}


def _mib(b: int) -> str:
    return f"{b / 2**20:.3f}"


def table(rows: dict) -> str:
    lines = ["| n | variant | argument MiB/device | temp MiB/device | collectives (ops, KiB) | "
             "minimum (ops, KiB) | max rel. diff vs n=1 (loss, grads) | ms/step (median) | "
             "vs one device |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n, variants in rows.items():
        for variant, r in variants.items():
            c, m, t = r["collectives"], r["minimum"], r["time"]
            ops = ", ".join(f"{k} {op}" for op, k in ((op, v["ops"]) for op, v in c["by_op"].items()))
            d = r["max_rel_diff"]
            lines.append(
                f"| {n} | {variant} | {_mib(r['memory']['argument'])} | {_mib(r['memory']['temp'])} "
                f"| {ops or '0'}; {c['bytes'] / 1024:.1f} | {m['ops']}; {m['bytes'] / 1024:.1f} "
                f"| {d['loss']:.1e}, {d['grads']:.1e} | {1e3 * t['median_s']:.2f} "
                f"| {t['median_ratio']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    timing_args(ap, 10, 3, 2, "small sizes, a few rounds (smoke test)")
    ap.add_argument("--devices", default="1,2,4,8",
                    help="device counts, comma-separated (default 1,2,4,8; 1 comes first)")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--save", type=Path, default=None, help=argparse.SUPPRESS)
    a = parse_timing_args(ap, argv)
    sizes = SIZES["quick" if a.quick else "full"]
    if a.worker is not None:
        rows = worker(a.worker, sizes, a.rounds, a.calls, a.warmup, a.save)
        print(json.dumps(rows))
        return rows
    import numpy as np

    counts = sorted({1, *(int(c) for c in a.devices.split(","))})
    t0 = time.perf_counter()
    info, line = machine()
    print("# gradlang scaling benchmark (CPU, host devices)\n")
    print(f"{line}; sizes {sizes}; {a.rounds} rounds x {a.calls} calls per variant\n")
    rows, saved = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            path = Path(tmp) / f"n{n}.npz"
            rows[n] = _run(n, a, sizes, path)
            saved[n] = np.load(path)
        _differences(rows, saved, saved[1])
    print(table(rows))
    out = {**info, "sizes": sizes, "rounds": a.rounds, "calls": a.calls,
           "devices": {str(n): r for n, r in rows.items()},
           "wall_s": time.perf_counter() - t0}
    print(f"\ntotal wall time {out['wall_s']:.0f} s")
    write_json(out, JSON if a.json is None else a.json)
    return out


if __name__ == "__main__":
    main()
