"""Black-box gradients: gradlang `es` against evosax's OpenES, EGGROLL against full-rank ES as
the matrix grows, and the compiled memory of SPSA against a forward pass and backprop.

    python benchmarks/blackbox.py [--quick] [--rounds 20] [--calls 3] [--json out.json]

Needs evosax (`pip install -e '.[bench]'`). Float32, fixed numpy seed, fixed PRNG key (every call
of a variant does the same work).

1. ES throughput. A 2-layer MLP regressor, loss = mean((tanh(x W1 + b1) W2 + b2 - y)^2), batch
   B=64, three sizes (2,372 / 18,696 / 74,256 parameters), populations 64 and 256, sigma=0.05.
   One step = one antithetic ES gradient estimate (pop / 2 noise draws, pop loss evaluations)
   followed by the same SGD update (lr=0.01), jitted:
   - `evosax Open_ES` (the reference of the ratios): `Open_ES(pop, flat_params,
     use_antithetic_sampling=True, optimizer=optax.sgd(lr), std_schedule=constant(sigma),
     fitness_shaping_fn=identity)`, one `ask` + `vmap` of the loss on the unravelled members
     (`jax.flatten_util.ravel_pytree`) + `tell` per step. With identity shaping its gradient,
     fitness . z / (pop sigma) over the mirrored population [z, -z], is exactly gradlang's
     (f(+) - f(-)) / (2 sigma pop/2) . z; the benchmark checks that both give the same update
     for the same noise (evosax's `tell` also tracks the best member: O(pop + D) extra);
   - `hand JAX (flat, one vmap)`: the same estimator on the flat vector, one normal draw
     [pop/2, D], one `vmap` over the stacked [theta + sigma z; theta - sigma z]; gradlang's
     `es` uses this layout, and the benchmark checks that both give the same update for the
     same key;
   - `gradlang es`: `export g = grad(loss, wrt=[p], by=es(sigma=0.05, pop=P))`, the step
     `p - lr * m.g(p, x, y, key)["p"]` under `jax.jit`.
   Reported: steps/s, throughput relative to evosax (inverse of the median per-round time
   ratio, with p25-p75), and the number of fusions of the compiled HLO that evaluate the
   Gaussian's erf_inv polynomial (at least one per noise array: more means XLA recomputes the
   normal draw inside several consumers).
2. EGGROLL against full-rank ES. loss(W [m, m], x [16, m], y [16, m]) = mean((tanh(x W) - y)^2),
   pop=32, sigma=0.05: `es`, `eggroll` rank 1 and rank 4 (and the forward pass, for scale), as m
   grows. Time per gradient estimate (interleaved) and XLA's compiled memory
   (`jax.jit(f).lower(...).compile().memory_analysis()`: temp bytes; arguments and the [m, m]
   gradient output are the same for all three). Full-rank ES draws pop/2 * m^2 normals and
   evaluates pop perturbed matmuls; EGGROLL draws pop/2 * r * 2m, computes x W once (shared by
   the population) and per member (x A) B^T, and assembles the [m, m] estimate with one
   rank-(pop/2 * r) contraction. Growth exponents d log(cost) / d log(m) are fitted over the
   last three sizes; times are also given relative to the forward pass (x W and the [m, m]
   assembly are the only m^2 terms of EGGROLL).
3. SPSA memory (compile only). A 3-layer MLP (D=512 -> H -> H -> 10, batch 64), H growing:
   the compiled `argument`, `temp`, `output` and `alias` bytes of the forward pass (`export
   forward = loss`), backprop (`grad(loss, wrt=[p])`), the SPSA gradient (`by=spsa(eps=1e-3)`),
   the SPSA gradient followed by an SGD step in one jit with the parameters donated
   (`donate_argnums=0`), gradlang's MeZO step `descend(loss, wrt=[p], lr=0.01,
   by=spsa(eps=1e-3))` (its parameters donated: the target's measure), and, as a diagnostic, a
   hand-written MeZO step (`jax.random.normal` noise; perturb +eps z, then -2 eps z, then
   (eps - lr g) z; parameters donated). total = argument + temp + output - alias; reported
   against the forward pass's total.

Timing is INTERLEAVED (benchmarks/timing.py): each round times every variant once, the order
rotating, a sample being `--calls` consecutive calls each followed by `block_until_ready`.
`--quick` runs smaller sizes and a few rounds only (a smoke test; its ratios are noisy).
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import gradlang
from timing import interleaved, machine, parse_timing_args, timing_args, write_json

SIGMA, LR, B_ES = 0.05, 0.01, 64
ERF_INV = "2.81022636e-08"  # a coefficient of XLA's erf_inv polynomial (one per fusion using it)

MLP2 = """
use std.nn
struct MLP {{ l1: Dense[I=D, O=H], l2: Dense[I=H, O=C] }}
fn loss(p: MLP, x: f32[B, D], y: f32[B, C]) -> f32 {{
  let r = dense(p.l2, dense_tanh(p.l1, x)) - y
  return mean(r * r)
}}
export g = grad(loss, wrt=[p], by=es(sigma={sigma}, pop={pop}))
"""

MATRIX = """
fn loss(w: f32[M, N], x: f32[B, M], y: f32[B, N]) -> f32 {
  let r = tanh(x @ w) - y
  return mean(r * r)
}
export forward = loss
export es = grad(loss, wrt=[w], by=es(sigma=0.05, pop=32))
export eggroll_r1 = grad(loss, wrt=[w], by=eggroll(sigma=0.05, pop=32, rank=1))
export eggroll_r4 = grad(loss, wrt=[w], by=eggroll(sigma=0.05, pop=32, rank=4))
"""

MLP3 = """
use std.nn
struct MLP { l1: Dense[I=D, O=H], l2: Dense[I=H, O=H], l3: Dense[I=H, O=C] }
fn loss(p: MLP, x: f32[B, D], y: f32[B, C]) -> f32 {
  let r = dense(p.l3, dense_tanh(p.l2, dense_tanh(p.l1, x))) - y
  return mean(r * r)
}
export forward = loss
export backprop = grad(loss, wrt=[p])
export spsa = grad(loss, wrt=[p], by=spsa(eps=0.001))
export mezo = descend(loss, wrt=[p], lr=0.01, by=spsa(eps=0.001))
"""


def compiled(fn: Callable, args: tuple, **jit_kw):
    """The XLA executable of jax.jit(fn) for these arguments."""
    return jax.jit(fn, **jit_kw).lower(*args).compile()


def bound(exe, args: tuple) -> Callable[[], object]:
    return lambda: exe(*args)


def mib(n: float) -> float:
    return n / 2**20


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares exponent of y ~ x^k over the points given."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def budgeted_timing(fns: dict, ref: str, rounds: int, calls: int, budget_s: float) -> dict:
    """`interleaved` with the rounds (and calls) cut so that one size takes about budget_s."""
    t = 0.0
    for f in fns.values():
        t0 = time.perf_counter()
        jax.block_until_ready(f())
        t += time.perf_counter() - t0
    calls = 1 if t > 0.5 else calls
    rounds = int(max(3, min(rounds, budget_s / (t * calls))))
    return interleaved(fns, (), ref, rounds, calls, warmup=1)


# ----------------------------------------------------------------------------- 1. ES throughput

def mlp_loss(p, x, y):
    r = jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"]) @ p["l2"]["w"] + p["l2"]["b"] - y
    return jnp.mean(r * r)


def mlp_data(d: int, h: int, c: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    p = {"l1": {"w": rng.normal(size=(d, h)) / np.sqrt(d), "b": np.zeros(h)},
         "l2": {"w": rng.normal(size=(h, c)) / np.sqrt(h), "b": np.zeros(c)}}
    x, y = rng.normal(size=(B_ES, d)), rng.normal(size=(B_ES, c))
    return jax.device_put(jax.tree.map(lambda a: np.asarray(a, np.float32), (p, x, y)))


def es_steps(pop: int, p, x, y, key) -> dict[str, tuple[Callable, tuple]]:
    """Per variant, a jittable step and its arguments (see the module docstring)."""
    import optax
    from evosax.algorithms import Open_ES
    from evosax.core.fitness_shaping import identity_fitness_shaping_fn

    n = pop // 2
    flat, unravel = ravel_pytree(p)
    evaluate = jax.vmap(lambda t, x, y: mlp_loss(unravel(t), x, y), in_axes=(0, None, None))
    es = Open_ES(pop, flat, use_antithetic_sampling=True, optimizer=optax.sgd(LR),
                 std_schedule=optax.constant_schedule(SIGMA),
                 fitness_shaping_fn=identity_fitness_shaping_fn)
    params = es.default_params
    state = es.init(key, flat, params)

    def evosax_step(state, x, y, key):
        k_ask, k_tell = jax.random.split(key)
        members, state = es.ask(k_ask, state, params)
        return es.tell(k_tell, members, evaluate(members, x, y), state, params)[0]

    def hand_flat(t, x, y, key):
        z = jax.random.normal(key, (n, t.size))
        fit = evaluate(jnp.concatenate([t + SIGMA * z, t - SIGMA * z]), x, y)
        return t - LR * ((fit[:n] - fit[n:]) / (pop * SIGMA)) @ z

    m = gradlang.compile_source(MLP2.format(sigma=SIGMA, pop=pop))

    def gradlang_step(p, x, y, key):
        return jax.tree.map(lambda a, g: a - LR * g, p, m.g(p, x, y, key)["p"])

    return {"evosax Open_ES": (evosax_step, (state, x, y, key)),
            "hand JAX (flat, one vmap)": (hand_flat, (flat, x, y, key)),
            "gradlang es": (gradlang_step, (p, x, y, key))}


def rel_diff(a, b, origin) -> float:
    """||(a - origin) - (b - origin)|| / ||b - origin||: two SGD updates compared."""
    a, b, o = (np.asarray(ravel_pytree(t)[0], np.float64) for t in (a, b, origin))
    return float(np.linalg.norm(a - b) / np.linalg.norm(b - o))


def es_throughput(models: list[tuple[int, int, int]], pops: list[int], rounds: int, calls: int,
                  warmup: int) -> list[dict]:

    key = jax.random.key(0)
    rows = []
    print("## 1. ES throughput: gradlang `es` vs evosax Open_ES (same pop, same loss evaluations)\n")
    print("| params | pop | variant | steps/s | ms / step | throughput vs evosax (p25-p75) "
          "| erf_inv fusions |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for d, h, c in models:
        p, x, y = mlp_data(d, h, c)
        nparams = sum(a.size for a in jax.tree.leaves(p))
        for pop in pops:
            steps = es_steps(pop, p, x, y, key)
            exes = {name: compiled(f, a) for name, (f, a) in steps.items()}
            fns = {name: bound(exes[name], a) for name, (_, a) in steps.items()}
            res = interleaved(fns, (), "evosax Open_ES", rounds, calls, warmup)
            flat = steps["hand JAX (flat, one vmap)"][1][0]
            hand = exes["hand JAX (flat, one vmap)"](flat, x, y, jax.random.split(key)[0])  # evosax's ask key
            checks = {"hand flat vs evosax": rel_diff(hand, fns["evosax Open_ES"]().mean, flat),
                      "gradlang vs hand flat": rel_diff(ravel_pytree(fns["gradlang es"]())[0],
                                                        fns["hand JAX (flat, one vmap)"](), flat)}
            for name, r in res.items():
                r.update(erf_inv_fusions=exes[name].as_text().count(ERF_INV),
                         throughput_vs_evosax=1 / r["median_ratio"])
                print(f"| {nparams:,} | {pop} | {name} | {1 / r['median_s']:.1f} | {r['median_s'] * 1e3:.2f} "
                      f"| {1 / r['median_ratio']:.3f} ({1 / r['ratio_p75']:.3f}-{1 / r['ratio_p25']:.3f}) "
                      f"| {r['erf_inv_fusions']} |")
            rows.append({"dims": [d, h, c], "params": nparams, "pop": pop, "variants": res, "checks": checks})
    print()
    for r in rows:
        print(f"- {r['params']:,} params, pop {r['pop']}: same-noise update difference, "
              + ", ".join(f"{k} {v:.1e}" for k, v in r["checks"].items()))
    ratios = [r["variants"]["gradlang es"]["throughput_vs_evosax"] for r in rows]
    print(f"\nTarget `es` throughput >= evosax: {'met' if min(ratios) >= 1 else 'NOT met'} "
          f"(gradlang / evosax steps/s from {min(ratios):.2f} to {max(ratios):.2f})\n")
    return rows


# ----------------------------------------------------------------------------- 2. EGGROLL vs ES

def eggroll_scaling(sizes: list[int], es_max: int, rounds: int, calls: int, budget_s: float) -> dict:
    m = gradlang.compile_source(MATRIX)
    key, rng, b = jax.random.key(0), np.random.default_rng(0), 16
    names = ["es", "eggroll_r1", "eggroll_r4", "forward"]
    rows = []
    for size in sizes:
        w = (rng.normal(size=(size, size)) / np.sqrt(size)).astype(np.float32)
        x, y = (rng.normal(size=(b, size)).astype(np.float32) for _ in range(2))
        fns, mem = {}, {}
        for name in names:
            if name == "es" and size > es_max:
                continue
            args = (w, x, y) if name == "forward" else (w, x, y, key)
            exe = compiled(m[name], args)
            ma = exe.memory_analysis()
            mem[name] = {"temp": ma.temp_size_in_bytes, "argument": ma.argument_size_in_bytes,
                         "output": ma.output_size_in_bytes}
            fns[name] = bound(exe, args)
        t = budgeted_timing(fns, "eggroll_r1", rounds, calls, budget_s)
        rows.append({"m": size, "time_s": {k: v["median_s"] for k, v in t.items()}, "memory": mem})

    def ms(r: dict, n: str) -> str:
        return f"{r['time_s'][n] * 1e3:.3f}" if n in r["time_s"] else "—"

    def tmp(r: dict, n: str) -> str:
        return f"{mib(r['memory'][n]['temp']):.2f}" if n in r["memory"] else "—"

    def ratio(r: dict, key: str) -> str:
        if "es" not in r["time_s"]:
            return "—"
        if key == "time":
            return f"{r['time_s']['es'] / r['time_s']['eggroll_r1']:.1f}"
        return f"{r['memory']['es']['temp'] / r['memory']['eggroll_r1']['temp']:.0f}"

    def per_forward(r: dict, n: str) -> str:
        return f"{r['time_s'][n] / r['time_s']['forward']:.1f}" if n in r["time_s"] else "—"

    print(f"## 2. EGGROLL vs full-rank ES: W [m, m], x [{b}, m], pop=32, sigma=0.05\n")
    print("| m = n | es ms | eggroll r=1 ms | eggroll r=4 ms | forward ms | es / r=1 time "
          "| es / forward | r=1 / forward | r=4 / forward "
          "| es temp MiB | r=1 temp MiB | r=4 temp MiB | forward temp MiB | es / r=1 temp | gradient MiB |")
    print("|---:|" + "---:|" * 14)
    for r in rows:
        print(f"| {r['m']} | " + " | ".join(ms(r, n) for n in names) + f" | {ratio(r, 'time')} | "
              + " | ".join(per_forward(r, n) for n in names[:3]) + " | "
              + " | ".join(tmp(r, n) for n in names)
              + f" | {ratio(r, 'temp')} | {mib(r['memory']['eggroll_r1']['output']):.2f} |")
    fits = {}
    for name in names:
        pts = [r for r in rows if name in r["time_s"]][-3:]
        if len(pts) >= 2:
            ms_ = [r["m"] for r in pts]
            fits[name] = {"sizes": ms_, "time": slope(ms_, [r["time_s"][name] for r in pts]),
                          "temp": slope(ms_, [r["memory"][name]["temp"] for r in pts]) if name != "forward" else None}
    print("\nGrowth exponents k (cost ~ m^k) over the last three sizes of each variant: "
          + "; ".join(f"{n} (m={f['sizes'][0]}..{f['sizes'][-1]}): time {f['time']:.2f}"
                      + (f", temp {f['temp']:.2f}" if f["temp"] is not None else "") for n, f in fits.items()) + "\n")
    if "eggroll_r1" in fits and "es" in fits:
        e, g = fits["es"]["temp"], fits["eggroll_r1"]["temp"]
        last = rows[-1]
        print(f"Target EGGROLL cost ~ r(m+n), not mn: temp memory exponent {g:.2f} (es {e:.2f}); "
              f"time exponent {fits['eggroll_r1']['time']:.2f}, the forward pass's "
              f"{fits['forward']['time']:.2f}. The per-member work is r(m+n); what grows with mn is "
              f"the forward's x @ W (computed once, shared by the population) and the assembly of "
              f"the [m, n] estimate (a rank pop/2 * r product), so EGGROLL costs "
              f"{last['time_s']['eggroll_r1'] / last['time_s']['forward']:.1f}x (r=1) the forward pass "
              f"at m={last['m']}, where full-rank ES costs ~pop forward passes plus pop/2 * m^2 normals\n")
    return {"batch": b, "pop": 32, "rows": rows, "fits": fits}


# ----------------------------------------------------------------------------- 3. SPSA memory

def spsa_memory(hidden: list[int], d: int = 512, c: int = 10, b: int = 64) -> list[dict]:
    m = gradlang.compile_source(MLP3)
    f32 = jnp.float32

    def loss(p, x, y):
        h = jnp.tanh(jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"]) @ p["l2"]["w"] + p["l2"]["b"])
        r = h @ p["l3"]["w"] + p["l3"]["b"] - y
        return jnp.mean(r * r)

    def normals(key, p):
        leaves, tree = jax.tree.flatten(p)
        return tree.unflatten([jax.random.normal(k, a.shape, a.dtype)
                               for k, a in zip(jax.random.split(key, len(leaves)), leaves)])

    def spsa_step(p, x, y, key):
        return jax.tree.map(lambda a, g: a - LR * g, p, m.spsa(p, x, y, key)["p"])

    def mezo_step(p, x, y, key, eps=1e-3):
        p1 = jax.tree.map(lambda a, z: a + eps * z, p, normals(key, p))
        p2 = jax.tree.map(lambda a, z: a - 2 * eps * z, p1, normals(key, p))
        g = (loss(p1, x, y) - loss(p2, x, y)) / (2 * eps)
        return jax.tree.map(lambda a, z: a + (eps - LR * g) * z, p2, normals(key, p))

    rows = []
    print(f"## 3. Memory (XLA compiled memory analysis): SPSA vs forward vs backprop, MLP {d} -> H -> H -> {c}, "
          f"batch {b}\n")
    print("| H | params | variant | argument MiB | temp MiB | output MiB | alias MiB | total MiB "
          "| total / forward | temp / param bytes |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for h in hidden:
        sd = jax.ShapeDtypeStruct
        p = {"l1": {"w": sd((d, h), f32), "b": sd((h,), f32)}, "l2": {"w": sd((h, h), f32), "b": sd((h,), f32)},
             "l3": {"w": sd((h, c), f32), "b": sd((c,), f32)}}
        x, y, key = sd((b, d), f32), sd((b, c), f32), jax.eval_shape(lambda: jax.random.key(0))
        nparams = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(p))
        variants = {"forward": (m.forward, (p, x, y), {}),
                    "backprop grad": (m.backprop, (p, x, y), {}),
                    "SPSA grad (gradlang)": (m.spsa, (p, x, y, key), {}),
                    "SPSA grad + SGD step, donated (gradlang)": (spsa_step, (p, x, y, key), {"donate_argnums": 0}),
                    "SPSA descend step (gradlang)": (m.mezo, (p, x, y, key), {"donate_argnums": 0}),
                    "MeZO step, donated (hand JAX)": (mezo_step, (p, x, y, key), {"donate_argnums": 0})}
        mem = {}
        for name, (f, args, kw) in variants.items():
            ma = compiled(f, args, **kw).memory_analysis()
            mem[name] = {"argument": ma.argument_size_in_bytes, "temp": ma.temp_size_in_bytes,
                         "output": ma.output_size_in_bytes, "alias": ma.alias_size_in_bytes}
            mem[name]["total"] = mem[name]["argument"] + mem[name]["temp"] + mem[name]["output"] - mem[name]["alias"]
        for name, v in mem.items():
            print(f"| {h} | {nparams:,} | {name} | {mib(v['argument']):.2f} | {mib(v['temp']):.2f} "
                  f"| {mib(v['output']):.2f} | {mib(v['alias']):.2f} | {mib(v['total']):.2f} "
                  f"| {v['total'] / mem['forward']['total']:.2f} | {v['temp'] / (4 * nparams):.2f} |")
        rows.append({"hidden": h, "params": nparams, "bytes": mem})
    spsa = [r["bytes"]["SPSA descend step (gradlang)"]["total"] / r["bytes"]["forward"]["total"]
            for r in rows]
    print(f"\nTarget SPSA step memory <= 1.1x forward: {'met' if max(spsa) <= 1.1 else 'NOT met'} "
          f"(`descend(..., by=spsa)` total / forward total from {min(spsa):.2f} to {max(spsa):.2f}, "
          f"H = {rows[0]['hidden']} to {rows[-1]['hidden']})\n")
    return rows


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    timing_args(ap, 20, 3, 3, "small sizes, a few rounds (smoke test)")
    a = parse_timing_args(ap, argv)
    models = [(32, 64, 4), (64, 256, 8)] if a.quick else [(32, 64, 4), (64, 256, 8), (128, 512, 16)]
    pops = [64] if a.quick else [64, 256]
    sizes = [64, 128, 256] if a.quick else [64, 128, 256, 512, 1024, 2048, 4096]
    es_max, budget = (256, 1.0) if a.quick else (2048, 20.0)
    hidden = [256, 512, 1024] if a.quick else [256, 512, 1024, 2048, 4096]

    t0 = time.perf_counter()
    info, line = machine()
    print("# gradlang black-box gradient benchmark\n")
    print(f"{line}; {a.rounds} rounds x {a.calls} calls per variant\n")
    out = {**info, "rounds": a.rounds, "calls": a.calls,
           "es_throughput": es_throughput(models, pops, a.rounds, a.calls, a.warmup),
           "eggroll": eggroll_scaling(sizes, es_max, a.rounds, a.calls, budget),
           "spsa_memory": spsa_memory(hidden)}
    out["wall_s"] = time.perf_counter() - t0
    print(f"total wall time {out['wall_s']:.0f} s")
    write_json(out, a.json)
    return out


if __name__ == "__main__":
    main()
