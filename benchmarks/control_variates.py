"""Variance reduction of each score-function control variate, against closed-form gradients.

    python benchmarks/control_variates.py [--estimates 20000] [--json out.json]

For each stated problem, the same objective is compiled with `score(baseline=none|loo|grpo|ma)`
(S samples per estimate) and estimated `--estimates` times with independent keys. Printed per
baseline: the total variance of the gradient estimate, the reduction factor against `none`,
the relative bias of the mean estimate against the closed-form gradient (with its standard
error; GRPO's scale bias is by design, see the README), the time per estimate and the variance
x time product. The moving average is first run for 300 steps so that its state tracks E[v].
"""

from __future__ import annotations

import argparse
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

import gradlang

PROBLEMS = {
    "bernoulli": dict(
        doc="E[(c + 2)^2], c ~ Bernoulli(logits=t), t = 0.2",
        params="t: f32", body="c ~ Bernoulli(logits=t) with score(baseline=BASE)\n"
                              "return (c + 2.0) * (c + 2.0)",
        args=(np.float32(0.2),),
        truth=lambda t: np.array([5 * _sig(t) * (1 - _sig(t))])),
    "categorical": dict(
        doc="E[v[k] + 5], k ~ Categorical(logits=t), 4 classes",
        params="t: f32[4], v: f32[4]", body="k ~ Categorical(logits=t) with score(baseline=BASE)\n"
                                            "return v[k] + 5.0",
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


def _sig(x):
    return 1 / (1 + math.exp(-float(x)))


def _softmax(x):
    e = np.exp(np.asarray(x, np.float64) - np.max(x))
    return e / e.sum()


def compile_problem(p: dict, baseline: str, samples: int):
    names = [a.split(":")[0] for a in p["params"].split(", ")]
    src = (f"fn f({p['params']}) -> f32 {{\n{p['body'].replace('BASE', baseline)}\n}}\n"
           f"export g = grad(expect(f, samples={samples}), wrt=[{names[0]}])\n")
    return gradlang.compile_source(src), names[0]


def measure(p: dict, baseline: str, samples: int, n: int) -> dict:
    m, wrt = compile_problem(p, baseline, samples)
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
    ap.add_argument("--json", default=None)
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
