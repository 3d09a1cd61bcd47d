"""Overhead of gradlang's compiled MLP step against the same function hand-written in JAX.

    python benchmarks/overhead.py [--rounds 300] [--calls 10] [--json results.json]

Steady state: the `step` export of examples/mlp.grad (value_and_grad of the loss wrt the
params struct) against `jax.jit(jax.value_and_grad(loss))` of an equivalent hand-written JAX
function, on the same device-resident inputs (default B=256, D=64, H=256, C=10). Every variant
is warmed up, then timed INTERLEAVED: each round times every variant once (the order rotates
from round to round), each sample being `--calls` consecutive calls, each followed by
`block_until_ready`. Reported: the median time per call of each variant and the median over
rounds of the per-round ratio variant / hand-written. Variants:

- `hand-written jax.jit`: the reference.
- `gradlang m.step (direct)`: calling the export as users do; the full argument check
  (runtime/signature.py) runs once per argument layout (tree structure, shapes, dtypes), later
  calls with the same layout pay only for computing that layout.
- `gradlang jax.jit(m.step)`: the export wrapped in jax.jit; the checks run once, at trace time.
- `gradlang inner jit (no checks)`: diagnostic only, the export's own jitted function called
  without the Python-side checks (a private attribute), to separate check cost from HLO cost.
- `control: hand + m.step.bind`: diagnostic only, the hand-written function preceded by
  gradlang's full argument binding/checking (result discarded): the per-call cost the layout
  cache saves.

Compile latency, measured in fresh Python processes (median of `--latency-repeats`):
source -> executable = `gradlang.compile_file` + the first call of `m.step` (trace, lowering,
XLA compile, run); and a breakdown: parse + passes (`gradlang.driver.compile_module`), module
construction, JAX tracing, lowering to StableHLO, XLA compile. The hand-written function's
first call is measured the same way for reference.

Also asserts that every variant produces the same loss and gradients (allclose).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from timing import interleaved, write_json

ROOT = Path(__file__).resolve().parent.parent
MLP = ROOT / "examples" / "mlp.grad"


# ----------------------------------------------------------------------------- shared setup

def make_inputs(b: int, d: int, h: int, c: int, seed: int = 0):
    """NumPy params (a dict per struct) and a batch, as in examples/mlp.py."""
    import numpy as np

    rng = np.random.default_rng(seed)
    params = {
        "l1": {"w": (rng.normal(size=(d, h)) * np.sqrt(2.0 / d)).astype(np.float32),
               "b": (0.1 * rng.normal(size=h)).astype(np.float32)},
        "l2": {"w": (rng.normal(size=(h, c)) * np.sqrt(2.0 / (h + c))).astype(np.float32),
               "b": (0.1 * rng.normal(size=c)).astype(np.float32)},
    }
    x = rng.normal(size=(b, d)).astype(np.float32)
    y = rng.integers(0, c, size=b).astype(np.int32)
    wd = np.float32(1e-4)
    return params, x, y, wd


def hand_loss(p, x, y, wd):
    """examples/mlp.grad's `loss`, written directly in JAX."""
    import jax
    import jax.numpy as jnp

    h = jax.nn.relu(x @ p["l1"]["w"] + p["l1"]["b"])
    logits = h @ p["l2"]["w"] + p["l2"]["b"]
    logp = jax.nn.log_softmax(logits, axis=-1)
    ce = -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0])
    penalty = jnp.sum(p["l1"]["w"] ** 2) + jnp.sum(p["l2"]["w"] ** 2)
    return ce + 0.5 * wd * penalty


# ----------------------------------------------------------------------------- latency (child)

def latency_child(kind: str, dims: tuple[int, int, int, int]) -> dict:
    """Runs in a fresh interpreter; returns timings in seconds."""
    t0 = time.perf_counter()
    import jax
    import jax.numpy as jnp

    import gradlang
    from gradlang.api import CompiledModule, _check_x64
    from gradlang.diagnostics import CompileError, Diagnostics, SourceFile
    from gradlang.driver import compile_module

    out = {"import_s": time.perf_counter() - t0}
    params, x, y, wd = make_inputs(*dims)
    args = jax.device_put((params, x, y, wd))
    jax.block_until_ready(args)

    if kind == "end_to_end":
        # What a user pays: source file -> first result.
        t0 = time.perf_counter()
        m = gradlang.compile_file(MLP)
        t1 = time.perf_counter()
        jax.block_until_ready(m.step(*args))
        t2 = time.perf_counter()
        out.update(compile_file_s=t1 - t0, first_call_s=t2 - t1, total_s=t2 - t0)
        t0 = time.perf_counter()
        jax.block_until_ready(m.step(*args))
        out["second_call_s"] = time.perf_counter() - t0
    elif kind == "breakdown":
        t0 = time.perf_counter()
        try:  # the Lark LALR parser is built once per process, on the first parse
            from gradlang.parser import _parser
            _parser()
        except ImportError:
            pass
        out["lark_build_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        diags = Diagnostics()
        source = SourceFile(str(MLP), MLP.read_text())
        ir = compile_module(source, MLP.parent, diags)
        if ir is not None:
            _check_x64(ir, diags)
        if diags.has_errors:
            raise CompileError(diags)
        t1 = time.perf_counter()
        m = CompiledModule(ir)
        t2 = time.perf_counter()
        jitted = m.step._fn  # the export's jax.jit-ed function (what m.step calls)
        traced = jitted.trace(*m.step.bind(args, {}))
        t3 = time.perf_counter()
        lowered = traced.lower()
        t4 = time.perf_counter()
        compiled = lowered.compile()
        t5 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        t6 = time.perf_counter()
        out.update(parse_passes_s=t1 - t0, module_s=t2 - t1, trace_s=t3 - t2,
                   lower_s=t4 - t3, xla_compile_s=t5 - t4, first_run_s=t6 - t5)
    elif kind == "hand":
        f = jax.jit(jax.value_and_grad(hand_loss))
        t0 = time.perf_counter()
        traced = f.trace(*args)
        t1 = time.perf_counter()
        lowered = traced.lower()
        t2 = time.perf_counter()
        compiled = lowered.compile()
        t3 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        t4 = time.perf_counter()
        out.update(trace_s=t1 - t0, lower_s=t2 - t1, xla_compile_s=t3 - t2, first_run_s=t4 - t3)
        g = jax.jit(jax.value_and_grad(hand_loss))  # a fresh jit: plain first call
        t0 = time.perf_counter()
        jax.block_until_ready(g(*args))
        out["first_call_s"] = time.perf_counter() - t0  # (tracing caches partly warm here)
        del jnp
    else:
        raise ValueError(kind)
    return out


def measure_latency(dims, repeats: int) -> dict:
    """Median over `repeats` fresh processes of each latency measurement."""
    results: dict[str, dict[str, float]] = {}
    for kind in ("end_to_end", "breakdown", "hand"):
        runs = []
        for _ in range(repeats):
            cmd = [sys.executable, __file__, "--_latency-child", kind,
                   "--B", str(dims[0]), "--D", str(dims[1]), "--H", str(dims[2]), "--C", str(dims[3])]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                raise RuntimeError(f"latency child {kind} failed:\n{proc.stderr}")
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        results[kind] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    return results


# ----------------------------------------------------------------------------- steady state

def measure_steady(dims, rounds: int, calls: int, warmup: int) -> dict:
    import jax
    import numpy as np

    import gradlang

    m = gradlang.compile_file(MLP)
    params, x, y, wd = make_inputs(*dims)
    args = jax.device_put((params, x, y, wd))  # device-resident inputs, as in a training loop
    jax.block_until_ready(args)

    hand = jax.jit(jax.value_and_grad(hand_loss))
    bind = m.step.bind

    def hand_after_check(*a):
        bind(a, {})  # gradlang's per-call argument check, result discarded
        return hand(*a)

    variants = {
        "hand-written jax.jit": hand,
        "gradlang m.step (direct)": m.step,
        "gradlang jax.jit(m.step)": jax.jit(m.step),
        "gradlang inner jit (no checks)": m.step._fn,
        "control: hand + m.step.bind": hand_after_check,
    }
    ref_name = "hand-written jax.jit"

    # Same numbers from every variant (loss and every gradient leaf).
    ref_v, ref_g = hand(*args)
    checks = {}
    for name, f in variants.items():
        if name == ref_name or name.startswith("control"):
            continue
        v, g = f(*args)
        g = g["p"]
        np.testing.assert_allclose(np.asarray(v), np.asarray(ref_v), rtol=1e-5, atol=1e-6)
        errs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), g, ref_g)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
        assert jax.tree.structure(g) == jax.tree.structure(ref_g)
        checks[name] = {"loss_abs_diff": float(abs(v - ref_v)),
                        "grad_max_abs_diff": max(jax.tree.leaves(errs))}

    table = interleaved(variants, args, ref_name, rounds, calls, warmup)
    perf = time.perf_counter

    # Python-only cost of binding + checking the arguments (what the direct call adds).
    bind_samples = []
    for _ in range(rounds):
        t0 = perf()
        for _ in range(calls):
            bind(args, {})
        bind_samples.append((perf() - t0) / calls)

    hlo = {}
    for n, f in [(ref_name, hand), ("gradlang (export's jit)", m.step._fn)]:
        text = f.lower(*args).compile().as_text()
        lines = [ln for ln in text.splitlines() if " = " in ln and not ln.lstrip().startswith("//")]
        hlo[n] = {"instructions": len(lines), "fusions": text.count(" fusion("),
                  "dots": sum(" dot(" in ln for ln in lines)}
    return {"variants": table, "bind_check_median_s": statistics.median(bind_samples),
            "numerics": checks, "optimized_hlo": hlo}


# ----------------------------------------------------------------------------- report

def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=256)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--H", type=int, default=256)
    ap.add_argument("--C", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=300, help="interleaved rounds (default 300)")
    ap.add_argument("--calls", type=int, default=10, help="calls per timed sample (default 10)")
    ap.add_argument("--warmup", type=int, default=50, help="warm-up calls per variant")
    ap.add_argument("--latency-repeats", type=int, default=3,
                    help="fresh processes per latency measurement (0 skips latency)")
    ap.add_argument("--json", type=Path, default=None, help="write the results to this file")
    ap.add_argument("--_latency-child", dest="latency_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    dims = (args.B, args.D, args.H, args.C)

    if args.latency_child:
        print(json.dumps(latency_child(args.latency_child, dims)))
        return None

    import jax

    dev = jax.devices()[0]
    print(f"gradlang overhead benchmark: examples/mlp.grad step, B={args.B} D={args.D} "
          f"H={args.H} C={args.C}")
    print(f"jax {jax.__version__}, device {dev.platform}:{dev.device_kind}, "
          f"{os.cpu_count()} CPUs, python {platform.python_version()}")
    print(f"interleaved timing: {args.rounds} rounds x {args.calls} calls per variant, "
          f"{args.warmup} warm-up calls\n")

    steady = measure_steady(dims, args.rounds, args.calls, args.warmup)
    rows = steady["variants"]
    w = max(len(n) for n in rows) + 2
    print(f"{'variant':<{w}}{'median/call':>14}{'p25-p75':>22}{'ratio vs hand':>15}{'ratio p25-p75':>16}")
    for n, r in rows.items():
        iqr = f"{r['p25_s'] * 1e6:.1f}-{r['p75_s'] * 1e6:.1f} us"
        riqr = f"{r['ratio_p25']:.3f}-{r['ratio_p75']:.3f}"
        print(f"{n:<{w}}{r['median_s'] * 1e6:>11.1f} us{iqr:>22}{r['median_ratio']:>15.3f}{riqr:>16}")
    print(f"\nPython-side bind + type/shape check alone (m.step.bind): "
          f"{steady['bind_check_median_s'] * 1e6:.1f} us per call")
    for n, c in steady["numerics"].items():
        print(f"numerics ok: {n}: |loss diff| {c['loss_abs_diff']:.1e}, "
              f"max |grad diff| {c['grad_max_abs_diff']:.1e}")
    for n, h in steady["optimized_hlo"].items():
        print(f"optimized HLO, {n}: {h['instructions']} instructions, {h['fusions']} fusions, "
              f"{h['dots']} dots")

    latency = None
    if args.latency_repeats > 0:
        print(f"\ncompile latency (fresh process each, median of {args.latency_repeats}):")
        latency = measure_latency(dims, args.latency_repeats)
        e2e, bd, hd = latency["end_to_end"], latency["breakdown"], latency["hand"]
        ms = lambda s: f"{s * 1e3:8.1f} ms"  # noqa: E731
        print(f"  source -> first result (compile_file + first m.step call) {ms(e2e['total_s'])}")
        print(f"    gradlang.compile_file                                  {ms(e2e['compile_file_s'])}")
        print(f"    first m.step call (trace + lower + XLA compile + run)  {ms(e2e['first_call_s'])}")
        print(f"    (second call, for scale                                {ms(e2e['second_call_s'])})")
        print("  breakdown:")
        print(f"    building the Lark LALR parser (once per process)       {ms(bd['lark_build_s'])}")
        print(f"    parse + passes (driver.compile_module)                 {ms(bd['parse_passes_s'])}")
        print(f"    module construction (CompiledModule)                   {ms(bd['module_s'])}")
        print(f"    JAX tracing of the lowered IR                          {ms(bd['trace_s'])}")
        print(f"    lowering to StableHLO                                  {ms(bd['lower_s'])}")
        print(f"    XLA compile                                            {ms(bd['xla_compile_s'])}")
        print(f"    first run                                              {ms(bd['first_run_s'])}")
        print("  hand-written JAX, for reference:")
        print(f"    trace {hd['trace_s'] * 1e3:.1f} ms, lower {hd['lower_s'] * 1e3:.1f} ms, "
              f"XLA compile {hd['xla_compile_s'] * 1e3:.1f} ms, first run {hd['first_run_s'] * 1e3:.1f} ms")
        print(f"  (python + jax + gradlang import in a fresh process: {e2e['import_s'] * 1e3:.0f} ms, "
              f"not counted above)")

    result = {"dims": dict(zip("BDHC", dims)), "rounds": args.rounds, "calls": args.calls,
              "jax": jax.__version__, "device": f"{dev.platform}:{dev.device_kind}",
              "cpu_count": os.cpu_count(), "steady": steady, "latency": latency}
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
