"""Differentially private gradients: ghost clipping against per-example (vmapped) clipping and
the non-private gradient, as the model widens.

    python benchmarks/dp.py [--quick] [--rounds 20] [--calls 3] [--json out.json]

Float32, fixed numpy seed and PRNG key. The model: a 3-layer MLP regressor, D=256 -> H -> H ->
10 (tanh), loss = mean((f(x) - y)^2), batch B=64 examples, H growing. Four gradlang exports
of the same objective, each jitted, and one hand-written JAX DP-SGD step:

- `non-private`: `grad(loss, wrt=[p])`, reverse mode (the reference of the ratios);
- `dp ghost`: `grad(loss, wrt=[p], by=dp(clip=1.0, noise=1.0))`: the three weight matrices are
  linear layers (ghost norms from each layer's inputs and output cotangents, the clipped sum
  as one product X^T (c G)), the biases get per-example gradients;
- `dp per-example`: the same with `clipping=per_example`: `vmap` of the gradient over the
  examples, [B, ...] per leaf (the textbook DP-SGD implementation, as Opacus and JAX
  tutorials write it), clipped and summed;
- `hand-written jit(vmap(grad)) (dp)`: that textbook implementation written directly in JAX,
  without gradlang: `jax.jit` of `jax.vmap(jax.grad(loss of one example))`, each example's
  gradient clipped by its global norm (all leaves together), summed, Gaussian noise of std
  noise x clip added, divided by B. It draws its noise as gradlang does (one
  `jax.random.normal` over all parameters, in the order of the flattened parameters, from the
  key), so the same key gives the same noise: the row that compares gradlang's per-example
  clipping with the same algorithm written by hand (the other private rows compare clipping
  algorithms);
- `dp ghost, noise=0`: ghost clipping without the noise, to separate the cost of the clipping
  from that of drawing a parameter-sized Gaussian vector (`jax.random.normal`, whose random
  bits XLA on CPU materializes at several times the vector's size).

Every private variant gets the same key, so they draw the same noise: the benchmark reports how
closely their gradients agree (max relative difference, against AGREE_RTOL): ghost against
gradlang's per-example clipping, and the hand-written step against both. Reported per H: the
parameter count, step time (interleaved, `benchmarks/timing.py`), XLA's compiled memory
(`jax.jit(f).lower(...).compile().memory_analysis()`: temp bytes, and total = argument + temp
+ output - alias), and each private variant's ratios to the non-private gradient; then the
growth exponents d log(temp) / d log(H) over the last three sizes (per-example gradients store
B (D H + H^2 + 10 H) floats; ghost clipping stores activation-sized arrays, B (D + 2 H) per
layer input, and the noise a parameter-sized vector).

`--quick` runs smaller widths and a few rounds (a smoke test; its ratios are noisy).
"""

from __future__ import annotations

import argparse
import itertools
import string
import time

import jax
import jax.numpy as jnp
import numpy as np

import gradlang
from timing import interleaved, machine, parse_timing_args, timing_args, write_json

D, C, B = 256, 10, 64
CLIP, NOISE = 1.0, 1.0
MLP3 = string.Template("""
use std.nn
struct MLP { l1: Dense[I=D, O=H], l2: Dense[I=H, O=H], l3: Dense[I=H, O=C] }
fn loss(p: MLP, x: f32[B, D], y: f32[B, C]) -> f32 {
  let r = dense(p.l3, dense_tanh(p.l2, dense_tanh(p.l1, x))) - y
  return mean(r * r)
}
export plain = grad(loss, wrt=[p])
export ghost = grad(loss, wrt=[p], by=dp(clip=$clip, noise=$noise))
export per_example = grad(loss, wrt=[p], by=dp(clip=$clip, noise=$noise, clipping=per_example))
export ghost_noiseless = grad(loss, wrt=[p], by=dp(clip=$clip, noise=0))
""").substitute(clip=CLIP, noise=NOISE)
EXPORTS = {"non-private": "plain", "dp ghost": "ghost", "dp per-example": "per_example",
           "dp ghost, noise=0": "ghost_noiseless"}
HAND = "hand-written jit(vmap(grad)) (dp)"
VARIANTS = (*EXPORTS, HAND)
PRIVATE = ("dp ghost", "dp per-example", HAND)
AGREEMENT = {"ghost_vs_per_example_max_rel_diff": ("dp ghost", "dp per-example"),
             "hand_written_vs_per_example_max_rel_diff": (HAND, "dp per-example"),
             "hand_written_vs_ghost_max_rel_diff": (HAND, "dp ghost")}
"""JSON key: the two private variants whose gradients (same key, same noise) are compared."""
AGREE_RTOL = B * float(np.finfo(np.float32).eps)
"""Bound on the max relative difference of two private gradients with the same noise: each sums
B clipped per-example gradients, every entry at most CLIP, in float32 (rounding at most B eps
CLIP whatever the order), against a leaf maximum of about NOISE CLIP or more (the noise)."""
TIME_LIMIT_BYTES = 3 << 30
"""Variants whose compiled total memory is above this are measured but not timed."""


def mib(n: float) -> float:
    return n / 2**20


def mlp_loss(p: dict, x, y):
    """MLP3's loss, hand-written: mean((f(x) - y)^2) over the batch and the outputs."""
    h = jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"])
    h = jnp.tanh(h @ p["l2"]["w"] + p["l2"]["b"])
    r = h @ p["l3"]["w"] + p["l3"]["b"] - y
    return jnp.mean(r * r)


def hand_written_dp(p: dict, x, y, key) -> dict:
    """DP-SGD by hand (not jitted here): the per-example gradients jax.vmap(jax.grad) of the loss
    on a batch of one (as gradlang's per-example loss), each clipped to global norm CLIP, summed,
    plus N(0, (NOISE CLIP)^2) noise drawn as gradlang draws it (one normal vector over the
    flattened parameters), divided by B."""
    one = jax.grad(lambda p, xi, yi: mlp_loss(p, xi[None], yi[None]))
    leaves, tree = jax.tree.flatten(jax.vmap(one, in_axes=(None, 0, 0))(p, x, y))
    norms = jnp.sqrt(sum(jnp.sum(g.reshape(g.shape[0], -1) ** 2, 1) for g in leaves))
    scale = jnp.minimum(1.0, CLIP / norms)
    summed = [jnp.tensordot(scale, g, axes=1) for g in leaves]
    z = NOISE * CLIP * jax.random.normal(key, (sum(s.size for s in summed),), summed[0].dtype)
    cuts = list(itertools.accumulate(s.size for s in summed))[:-1]
    return tree.unflatten([(s + n.reshape(s.shape)) / x.shape[0]
                           for s, n in zip(summed, jnp.split(z, cuts))])


def max_rel_diff(a, b) -> float:
    """The largest |a - b| of a leaf relative to that leaf's largest |b|, over the leaves."""
    return max(float(np.max(np.abs(u - v)) / (np.max(np.abs(v)) + 1e-30))
               for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


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
    fns = {**{name: m[export] for name, export in EXPORTS.items()}, HAND: hand_written_dp}
    for h in widths:
        p = params(h, rng)
        args = {name: (p, x, y) if name == "non-private" else (p, x, y, key) for name in VARIANTS}
        exe, mem = {}, {}
        for name in VARIANTS:
            exe[name] = jax.jit(fns[name]).lower(*args[name]).compile()
            ma = exe[name].memory_analysis()
            mem[name] = {"argument": ma.argument_size_in_bytes, "temp": ma.temp_size_in_bytes,
                         "output": ma.output_size_in_bytes, "alias": ma.alias_size_in_bytes}
            mem[name]["total"] = (mem[name]["argument"] + mem[name]["temp"] + mem[name]["output"]
                                  - mem[name]["alias"])
        timed = [n for n in VARIANTS if mem[n]["total"] <= TIME_LIMIT_BYTES]
        grads = {n: exe[n](*args[n]) for n in timed if n in PRIVATE}
        agree = {k: max_rel_diff(grads[u], grads[v]) if u in grads and v in grads else None
                 for k, (u, v) in AGREEMENT.items()}
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
        rows.append({"hidden": h, "params": nparams, "bytes": mem, "times": times, **agree})
    print()
    for row in rows:
        for k, (u, v) in AGREEMENT.items():
            if row[k] is not None:
                ok = "yes" if row[k] <= AGREE_RTOL else "NO"
                print(f"H={row['hidden']}: {u} and {v} gradients (same key, same noise) differ by "
                      f"a relative {row[k]:.1e}; within B x float32 eps = {AGREE_RTOL:.1e}: {ok}")
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
    for other in ("dp per-example", HAND):
        other_t = last["times"].get(other)
        if ghost_t and other_t:
            print(f"at H={last['hidden']}: ghost clipping takes "
                  f"{other_t['median_s'] / ghost_t['median_s']:.1f}x less time and "
                  f"{last['bytes'][other]['temp'] / last['bytes']['dp ghost']['temp']:.1f}x less "
                  f"temp memory than {other}")
    hand_t, per_t = last["times"].get(HAND), last["times"].get("dp per-example")
    if hand_t and per_t:
        print(f"at H={last['hidden']}: gradlang's per-example clipping takes "
              f"{per_t['median_s'] / hand_t['median_s']:.2f}x the time and "
              f"{last['bytes']['dp per-example']['total'] / last['bytes'][HAND]['total']:.2f}x the "
              f"total memory of the hand-written jit(vmap(grad))")
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
