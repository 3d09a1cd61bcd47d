"""Variance reduction of each score-function control variate, against closed-form gradients.

    python benchmarks/control_variates.py [--estimates 20000] [--json out.json]

For each stated problem, the same objective is compiled with `score(baseline=none|loo|grpo|ma)`
(S samples per estimate) and estimated `--estimates` times with independent keys. Printed per
baseline: the total variance of the gradient estimate, the reduction factor against `none`,
the relative bias of the mean estimate against the closed-form gradient (with its standard
error; GRPO's scale bias is by design, see docs/reference/random.md), the time per estimate and the variance
x time product. The moving average is first run for 300 steps so that its state tracks E[v].

Then, for models with several draws, the variance of the default downstream credit (each draw's
score multiplies only the costs that depend on it; per step of a loop, reward-to-go; per element
of a batched draw) against `score(credit=whole)` (the whole objective), with baseline none (S=1)
and leave-one-out (S samples), and the downstream estimator's relative bias against the closed
form.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import gradlang
from timing import write_json

PROBLEMS = {
    "bernoulli": dict(
        doc="E[(c + 2)^2], c ~ Bernoulli(logits=t), t = 0.2",
        params="t: f32", body="c ~ Bernoulli(logits=t) with score(baseline=BASE)\n"
                              "return (c + 2.0) * (c + 2.0)",
        args=(np.float32(0.2),),
        truth=lambda t: np.array([5 * _sig(t) * (1 - _sig(t))])),
    "categorical": dict(
        doc="E[|v[k] + 5|] = E[v[k] + 5], k ~ Categorical(logits=t), 4 classes (abs keeps the offset "
            "in the one cost term the draw is credited with)",
        params="t: f32[4], v: f32[4]", body="k ~ Categorical(logits=t) with score(baseline=BASE)\n"
                                            "return abs(v[k] + 5.0)",
        args=(np.array([0.3, -1.0, 0.8, 0.1], np.float32), np.array([1.0, -2.0, 0.5, 3.0], np.float32)),
        truth=lambda t, v: _softmax(t) * (v - _softmax(t) @ v)),
    "trajectory": dict(
        doc="E[(heads of 5 flips)^2], each flip ~ Bernoulli(logits=t), t = -0.4 (draws in a loop)",
        params="t: f32",
        body="let h = for i in range(5) carry (n = 0.0) {\n"
             "  c ~ Bernoulli(logits=t) with score(baseline=BASE)\n  n + c\n}\nreturn h * h",
        args=(np.float32(-0.4),),
        truth=lambda t: np.array([(5 * (1 - 2 * _sig(t)) + 50 * _sig(t)) * _sig(t) * (1 - _sig(t))])),
}
BASELINES = ("none", "loo", "grpo", "ma")

_T10 = np.linspace(-1.5, 1.5, 10).astype(np.float32)
_V10 = np.linspace(0.9, -0.6, 10).astype(np.float32)
CREDIT = {
    "three sites": dict(
        doc="E[(a - v0)^2 + (b - v1)^2 + 3 c v2 + a b], a, b, c ~ Bernoulli(logits=t_i)",
        params="t: f32[3], v: f32[3]",
        body="a ~ Bernoulli(logits=t[0]) with score(baseline=BASE CREDIT)\n"
             "b ~ Bernoulli(logits=t[1]) with score(baseline=BASE CREDIT)\n"
             "c ~ Bernoulli(logits=t[2]) with score(baseline=BASE CREDIT)\n"
             "return (a - v[0]) ^ 2 + (b - v[1]) ^ 2 + 3.0 * c * v[2] + a * b",
        args=(np.array([0.4, -0.8, 1.1], np.float32), np.array([0.2, 0.9, -0.5], np.float32)),
        truth=lambda t, v: np.array([_sig(t[0]) * (1 - _sig(t[0])) * (1 - 2 * v[0] + _sig(t[1])),
                                     _sig(t[1]) * (1 - _sig(t[1])) * (1 - 2 * v[1] + _sig(t[0])),
                                     _sig(t[2]) * (1 - _sig(t[2])) * 3 * v[2]])),
    "ten calls": dict(
        doc="E[sum_i flip(t_i, v_i)], flip = (a - v)^2 with a ~ Bernoulli(logits=t) drawn in the "
            "called function (10 sites, independent costs)",
        prelude="fn flip(t: f32, v: f32) -> f32 {\n"
                "  a ~ Bernoulli(logits=t) with score(baseline=BASE CREDIT)\n"
                "  return (a - v) ^ 2\n}\n",
        params="t: f32[10], v: f32[10]",
        body="return " + " + ".join(f"flip(t[{i}], v[{i}])" for i in range(10)),
        args=(_T10, _V10),
        truth=lambda t, v: np.array([_sig(a) * (1 - _sig(a)) * (1 - 2 * b) for a, b in zip(t, v)])),
    "bandit sequence": dict(
        doc="E[sum_t v[a_t]] over T=30 pulls a_t ~ Categorical(logits=t), 4 arms, drawn in a loop "
            "whose carry adds each pull's reward (downstream credit: reward-to-go)",
        params="t: f32[4], v: f32[4]",
        body="let total = for i in range(30) carry (total = 0.0) {\n"
             "  a ~ Categorical(logits=t) with score(baseline=BASE CREDIT);\n"
             "  total + v[a]\n}\nreturn total",
        args=(np.array([0.3, -1.0, 0.8, 0.1], np.float32), np.array([1.0, -2.0, 0.5, 3.0], np.float32)),
        truth=lambda t, v: 30 * _softmax(t) * (v - _softmax(t) @ v)),
    "batch of 16": dict(
        doc="E[mean_b (z_b - v_b)^2], z ~ Bernoulli(logits=t), t: f32[16], one batched draw "
            "(downstream credit: per element of the batch)",
        params="t: f32[16], v: f32[16]",
        body="z ~ Bernoulli(logits=t) with score(baseline=BASE CREDIT)\n"
             "return mean((z - v) ^ 2)",
        args=(np.linspace(-1.5, 1.5, 16).astype(np.float32), np.linspace(0.9, -0.6, 16).astype(np.float32)),
        truth=lambda t, v: np.array([_sig(a) * (1 - _sig(a)) * (1 - 2 * b) / 16 for a, b in zip(t, v)])),
}
"""Models with several draws: downstream credit (the default) against `credit=whole`."""


def _sig(x):
    return 1 / (1 + math.exp(-float(x)))


def _softmax(x):
    e = np.exp(np.asarray(x, np.float64) - np.max(x))
    return e / e.sum()


def compile_problem(p: dict, baseline: str, samples: int, credit: str = ""):
    names = [a.split(":")[0] for a in p["params"].split(", ")]
    src = (f"{p.get('prelude', '')}fn f({p['params']}) -> f32 {{\n{p['body']}\n}}\n"
           f"export g = grad(expect(f, samples={samples}), wrt=[{names[0]}])\n")
    src = src.replace("BASE", baseline).replace(" CREDIT", f", credit={credit}" if credit else "")
    return gradlang.compile_source(src), names[0]


def measure(p: dict, baseline: str, samples: int, n: int, credit: str = "") -> dict:
    m, wrt = compile_problem(p, baseline, samples, credit)
    args = p["args"]
    if baseline == "ma":
        state = jnp.float32(0.0)
        for i in range(300):
            _, state = m.g(*args, state, jax.random.key(10_000 + i))
        args = args + (state,)
    keys = jax.random.split(jax.random.key(0), n)
    run = jax.jit(jax.vmap(lambda k: m.g(*args, k)))
    out = run(keys)
    grads = np.asarray((out[0] if baseline == "ma" else out)[wrt], np.float64).reshape(n, -1)
    t0 = time.perf_counter()
    jax.block_until_ready(run(keys))
    per_estimate = (time.perf_counter() - t0) / n
    truth = p["truth"](*p["args"])
    mean, se = grads.mean(0), grads.std(0, ddof=1) / math.sqrt(n)
    norm = np.linalg.norm(truth)
    return {"variance": float(grads.var(0).sum()), "rel_bias": float(np.linalg.norm(mean - truth) / norm),
            "rel_se": float(np.linalg.norm(se) / norm), "cosine": float(mean @ truth / (np.linalg.norm(mean) * norm)),
            "seconds_per_estimate": per_estimate}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--estimates", type=int, default=20_000)
    ap.add_argument("--samples", type=int, default=8, help="S, samples per estimate")
    ap.add_argument("--json", type=Path, default=None, help="write the results to this file")
    args = ap.parse_args(argv)
    print(f"gradlang control variates: {args.estimates} estimates per row, S={args.samples} samples "
          f"per estimate; jax {jax.__version__}, {jax.devices()[0].platform}")
    results = {}
    for name, p in PROBLEMS.items():
        rows = {b: measure(p, b, args.samples, args.estimates) for b in BASELINES}
        results[name] = rows
        print(f"\n{name}: {p['doc']}")
        print(f"  {'baseline':9} {'total var':>11} {'reduction':>10} {'rel. bias':>10} {'+- s.e.':>8} "
              f"{'cosine':>7} {'us/estimate':>12} {'var x time':>11}")
        for b, r in rows.items():
            print(f"  {b:9} {r['variance']:11.4g} {rows['none']['variance'] / r['variance']:9.1f}x "
                  f"{r['rel_bias']:10.4f} {r['rel_se']:8.4f} {r['cosine']:7.4f} "
                  f"{r['seconds_per_estimate'] * 1e6:12.2f} {r['variance'] * r['seconds_per_estimate']:11.3g}")
    print("\ncredit assignment: each draw credited with the costs downstream of it (default) or "
          "with the whole objective (`score(credit=whole)`)")
    for name, p in CREDIT.items():
        print(f"\n{name}: {p['doc']}")
        print(f"  {'baseline':9} {'S':>2} {'var whole':>11} {'var downstream':>15} {'reduction':>10} "
              f"{'rel. bias':>10} {'+- s.e.':>8}")
        for b, s in (("none", 1), ("loo", args.samples)):
            rows = {c: measure(p, b, s, args.estimates, c) for c in ("whole", "downstream")}
            results[f"credit: {name}, {b}"] = rows
            w, d = rows["whole"], rows["downstream"]
            print(f"  {b:9} {s:>2} {w['variance']:11.4g} {d['variance']:15.4g} "
                  f"{w['variance'] / d['variance']:9.1f}x {d['rel_bias']:10.4f} {d['rel_se']:8.4f}")
    write_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
