"""Bilevel hypergradients: gradlang `argmin` against JAXopt `custom_root` and hand-written JAX.

    python benchmarks/bilevel.py [--quick] [--rounds 100] [--calls 5] [--json out.json]

Three synthetic problems (fixed numpy seed, float32; N=1000 training / M=500 validation rows,
D=100 features with scales decaying from 1 to 0.1: x^T x / N has condition ~130, the inner
Hessians ~20). The inner problem is min_v L(v; x, y) + 0.5 sum(exp(lam) * v * v); the
hypergradient is that of the validation loss of its solution w.r.t. the log-penalty lam:

1. ridge, scalar lam: L = 0.5 mean((x v - y)^2), outer = 0.5 mean((xv w - yv)^2);
2. ridge, per-feature lam: f32[D];
3. L2-regularized logistic regression, scalar lam: L = mean(softplus(x v) - t * (x v)),
   outer = the validation logistic loss.

Every variant runs the SAME inner solver (gradient descent from zeros, `STEPS` steps of size
`lr`, a `lax.fori_loop`) and the SAME adjoint solve (conjugate gradients, `CG_ITERS`
iterations, tol=0 so no early stop), and is `jax.jit`-ed returning (value, hypergradient):

- `JAXopt`: `jaxopt.implicit_diff.custom_root(grad_v f, solve=solve_cg(maxiter, tol=0))` on the
  gd solver, then `jax.value_and_grad` of the outer loss (the reference of the time ratios);
- `hand JAX`: a `jax.custom_vjp` with the same gd forward and, backward, `jax.scipy` CG on
  Hessian-vector products (`jax.jvp` of `jax.grad`) and -d/dtheta <grad_v f, u>;
- `gradlang`: `gradlang.compile_source` of the `.grad` program `argmin ... via gd(...) with
  implicit(cg, iters=K)` and `export g = value_and_grad(f, wrt=[lam])`, timed as `jax.jit(m.g)`;
- `gradlang unrolled` (context only): the same with `with unrolled` (reverse mode through the
  loop).

The JAX variants write the same formulas as the `.grad` source; their softplus is gradlang's
(max(z, 0) + log1p(exp(-|z|)), derivative sigmoid): with `jax.nn.softplus` (a `logaddexp`) the
logistic rows of JAXopt and hand JAX run about 1.25x slower on CPU, which is not what is
measured here. Likewise the `.grad` program names z = x @ v once with `let`, as the JAX code
does: written twice, the backward keeps two transposed matmuls where JAX has one (gradlang does
not merge repeated expressions before differentiating), about 1% slower here.

Error: ||g - g_ref|| / ||g_ref|| against an exact float64 reference computed in NumPy by the
implicit function theorem at the exact inner solution: for ridge the solution of the normal
equations (x^T x / N + diag(exp lam)) w = x^T y / N; for logistic regression Newton's method
run to machine precision. With H the inner Hessian at w and g_out = d outer / dw,
d outer / d lam = -exp(lam) * w * (H^-1 g_out) (summed over the features for a scalar lam).
The error thus includes the finite gd / CG truncation, which is the same for every implicit
variant: the target is the same error as JAXopt, not zero.

Timing is INTERLEAVED (benchmarks/timing.py): each round times every variant once, the order
rotating, a sample being `--calls` consecutive calls each followed by `block_until_ready`.
Reported: median time per hypergradient, the median over rounds of the per-round ratio to
JAXopt (with its p25-p75), and the ratio of median times to hand JAX. `--quick` runs a few
rounds only (a smoke test; its ratios are noisy).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np

from timing import interleaved, machine, parse_timing_args, timing_args, write_json

N, M, D = 1000, 500, 100
STEPS, CG_ITERS = 300, 30


@dataclass
class Problem:
    name: str
    kind: str           # "ridge" or "logistic"
    lam: np.ndarray     # float32 scalar or [D]
    lr: float
    data: tuple         # x, y, xv, yv (float32)


# ----------------------------------------------------------------------------- data and reference

def make_problems(seed: int = 0) -> list[Problem]:
    rng = np.random.default_rng(seed)
    scale = np.logspace(0, -1, D)
    x, xv = (rng.normal(size=(n, D)) * scale for n in (N, M))
    w_true = rng.normal(size=D)
    y, yv = (a @ w_true + 0.5 * rng.normal(size=len(a)) for a in (x, xv))
    t, tv = (y > 0), (yv > 0)
    ridge, logistic = (tuple(np.asarray(a, np.float32) for a in d) for d in ((x, y, xv, yv), (x, t, xv, tv)))
    lam_vec = (np.log(0.05) + 0.5 * rng.normal(size=D)).astype(np.float32)
    return [Problem("ridge, scalar lam", "ridge", np.float32(np.log(0.05)), 0.5, ridge),
            Problem("ridge, per-feature lam [D]", "ridge", lam_vec, 0.5, ridge),
            Problem("logistic, scalar lam", "logistic", np.float32(np.log(0.02)), 2.0, logistic)]


def reference(p: Problem) -> tuple[float, np.ndarray]:
    """Exact (value, hypergradient) in float64 by the implicit function theorem."""
    x, y, xv, yv = (a.astype(np.float64) for a in p.data)
    reg = np.exp(p.lam.astype(np.float64)) * np.ones(D)
    if p.kind == "ridge":
        h = x.T @ x / N + np.diag(reg)
        w = np.linalg.solve(h, x.T @ y / N)
        r = xv @ w - yv
        value, g_out = 0.5 * np.mean(r * r), xv.T @ r / M
    else:
        w = np.zeros(D)
        for _ in range(50):  # Newton
            s = 1 / (1 + np.exp(-(x @ w)))
            h = (x.T * (s * (1 - s))) @ x / N + np.diag(reg)
            w -= np.linalg.solve(h, x.T @ (s - y) / N + reg * w)
        z = xv @ w
        value, g_out = np.mean(np.logaddexp(0, z) - yv * z), xv.T @ (1 / (1 + np.exp(-z)) - yv) / M
    grad = -reg * w * np.linalg.solve(h, g_out)
    return value, (grad.sum() if p.lam.ndim == 0 else grad)


# ----------------------------------------------------------------------------- the variants

def jax_losses(kind: str) -> tuple[Callable, Callable]:
    """inner(v, lam, x, y) and outer(w, xv, yv), the same formulas as the .grad source."""
    import jax
    import jax.numpy as jnp

    def penalty(v, lam):
        return 0.5 * jnp.sum(jnp.exp(lam) * v * v)

    if kind == "ridge":
        def inner(v, lam, x, y):
            return 0.5 * jnp.mean((x @ v - y) ** 2) + penalty(v, lam)

        def outer(w, xv, yv):
            return 0.5 * jnp.mean((xv @ w - yv) ** 2)
    else:
        @jax.custom_jvp
        def softplus(z):  # gradlang's formula; jax.nn.softplus (a logaddexp) is slower on CPU
            return jnp.maximum(z, 0) + jnp.log1p(jnp.exp(-jnp.abs(z)))

        softplus.defjvp(lambda z, dz: (softplus(z[0]), jax.nn.sigmoid(z[0]) * dz[0]))

        def inner(v, lam, x, t):
            z = x @ v
            return jnp.mean(softplus(z) - t * z) + penalty(v, lam)

        def outer(w, xv, tv):
            z = xv @ w
            return jnp.mean(softplus(z) - tv * z)
    return inner, outer


def gd(grad_v: Callable, lr: float, lam, x, y, v0):
    from jax import lax
    return lax.fori_loop(0, STEPS, lambda _, v: v - lr * grad_v(v, lam, x, y), v0)


def jaxopt_variant(p: Problem) -> Callable:
    import jax
    import jax.numpy as jnp
    from jaxopt.implicit_diff import custom_root
    from jaxopt.linear_solve import solve_cg

    inner, outer = jax_losses(p.kind)
    grad_v = jax.grad(inner)
    solver = custom_root(grad_v, solve=partial(solve_cg, maxiter=CG_ITERS, tol=0.0))(
        lambda v0, lam, x, y: gd(grad_v, p.lr, lam, x, y, v0))

    def f(lam, x, y, xv, yv):
        return outer(solver(jnp.zeros(D, jnp.float32), lam, x, y), xv, yv)

    return jax.jit(jax.value_and_grad(f))


def hand_variant(p: Problem) -> Callable:
    import jax
    import jax.numpy as jnp

    inner, outer = jax_losses(p.kind)
    grad_v = jax.grad(inner)

    @jax.custom_vjp
    def solve(lam, x, y):
        return gd(grad_v, p.lr, lam, x, y, jnp.zeros(D, jnp.float32))

    def fwd(lam, x, y):
        w = solve(lam, x, y)
        return w, (w, lam, x, y)

    def bwd(res, g):
        w, *thetas = res

        def hvp(u):
            return jax.jvp(lambda v: grad_v(v, *thetas), (w,), (u,))[1]

        u = jax.scipy.sparse.linalg.cg(hvp, g, maxiter=CG_ITERS, tol=0.0)[0]
        _, cross = jax.vjp(lambda *th: grad_v(w, *th), *thetas)
        return tuple(-c for c in cross(u))

    solve.defvjp(fwd, bwd)

    def f(lam, x, y, xv, yv):
        return outer(solve(lam, x, y), xv, yv)

    return jax.jit(jax.value_and_grad(f))


def grad_source(p: Problem, method: str, solver: str = "") -> str:
    lam_t = "f32" if p.lam.ndim == 0 else "f32[D]"
    if p.kind == "ridge":
        loss, out = "0.5 * mean((z - y) ^ 2)", "0.5 * mean((zv - yv) ^ 2)"
    else:
        loss, out = "mean(softplus(z) - y * z)", "mean(softplus(zv) - yv * zv)"
    return f"""
fn f(lam: {lam_t}, x: f32[N, D], y: f32[N], xv: f32[M, D], yv: f32[M]) -> f32 {{
  let w = argmin v: f32[D] = zeros([D]) {{
            let z = x @ v
            {loss} + 0.5 * sum(exp(lam) * v * v)
          }} via {solver or f"gd(steps={STEPS}, lr={p.lr})"} with {method}
  let zv = xv @ w
  return {out}
}}
export g = value_and_grad(f, wrt=[lam])
"""


def gradlang_variant(p: Problem, method: str, solver: str = "") -> Callable:
    import jax

    import gradlang

    return jax.jit(gradlang.compile_source(grad_source(p, method, solver)).g)


def variants(p: Problem) -> dict[str, Callable]:
    return {"JAXopt": jaxopt_variant(p),
            "hand JAX": hand_variant(p),
            "gradlang": gradlang_variant(p, f"implicit(cg, iters={CG_ITERS})"),
            "gradlang unrolled": gradlang_variant(p, "unrolled")}


def as_pair(out) -> tuple[float, np.ndarray]:
    """(value, hypergradient) from a variant's output: gradlang's grads come as {"lam": ...}."""
    value, grad = out
    return float(value), np.asarray(grad["lam"] if isinstance(grad, dict) else grad, np.float64)


# ----------------------------------------------------------------------------- run and report

def run_problem(p: Problem, rounds: int, calls: int, warmup: int) -> dict:
    import jax

    fns = variants(p)
    args = jax.device_put((p.lam, *p.data))
    ref_value, ref_grad = reference(p)
    rows = interleaved(fns, args, "JAXopt", rounds, calls, warmup)
    hand = rows["hand JAX"]["median_s"]
    for name, fn in fns.items():
        value, grad = as_pair(fn(*args))
        rows[name].update(value=value, ratio_vs_hand=rows[name]["median_s"] / hand,
                          value_rel_error=abs(value - ref_value) / abs(ref_value),
                          grad_rel_error=float(np.linalg.norm(grad - ref_grad) / np.linalg.norm(ref_grad)))
    return {"problem": p.name, "lr": p.lr, "reference_value": float(ref_value),
            "reference_grad_norm": float(np.linalg.norm(ref_grad)), "variants": rows}


def print_table(res: dict) -> None:
    print(f"### {res['problem']} (gd lr={res['lr']}; reference value {res['reference_value']:.6g}, "
          f"|hypergradient| {res['reference_grad_norm']:.4g})\n")
    print("| variant | time / hypergradient (ms) | ratio vs JAXopt (p25-p75) | ratio vs hand JAX "
          "| value | rel. error value | rel. error hypergradient |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in res["variants"].items():
        print(f"| {name} | {r['median_s'] * 1e3:.3f} | {r['median_ratio']:.3f} "
              f"({r['ratio_p25']:.3f}-{r['ratio_p75']:.3f}) | {r['ratio_vs_hand']:.3f} "
              f"| {r['value']:.6g} | {r['value_rel_error']:.1e} | {r['grad_rel_error']:.1e} |")
    print()


GRADLANG_METHODS = {  # (solver or "" for the shared gd, method)
    "gd + implicit(cg)": ("", f"implicit(cg, iters={CG_ITERS})"),
    "gd + implicit(gmres)": ("", f"implicit(gmres, iters={CG_ITERS})"),
    "gd + implicit(neumann, 300)": ("", "implicit(neumann, iters=300)"),
    "gd + value_function": ("", "value_function(sigma=0.01)"),
    "gd + unrolled": ("", "unrolled"),
    "gd + truncated(30)": ("", "truncated(30)"),
    "lbfgs(30) + implicit(cg)": ("lbfgs(steps=30)", f"implicit(cg, iters={CG_ITERS})"),
    "newton_cg(5) + implicit(cg)": ("newton_cg(steps=5, iters=30)", f"implicit(cg, iters={CG_ITERS})"),
    "adam(1000) + implicit(cg)": ("adam(steps=1000, lr=0.05)", f"implicit(cg, iters={CG_ITERS})"),
}


def method_table(p: Problem, rounds: int, calls: int, warmup: int) -> dict:
    """Every gradlang solver / hypergradient method on one problem: error and time, interleaved
    (ratios against gd + implicit(cg))."""
    import jax

    fns = {name: gradlang_variant(p, method, solver)
           for name, (solver, method) in GRADLANG_METHODS.items()}
    args = jax.device_put((p.lam, *p.data))
    ref_value, ref_grad = reference(p)
    rows = interleaved(fns, args, "gd + implicit(cg)", rounds, calls, warmup)
    for name, fn in fns.items():
        _, grad = as_pair(fn(*args))
        rows[name]["grad_rel_error"] = float(np.linalg.norm(grad - ref_grad) / np.linalg.norm(ref_grad))
    print(f"### every gradlang method on {p.name}\n")
    print("| solver + method | time / hypergradient (ms) | ratio vs gd + implicit(cg) | rel. error hypergradient |")
    print("|---|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['median_s'] * 1e3:.3f} | {r['median_ratio']:.3f} | {r['grad_rel_error']:.1e} |")
    print()
    return rows


def memory_curve(p: Problem, steps: tuple[int, ...]) -> dict:
    """Temporary bytes of the compiled hypergradient (XLA's memory analysis) as the inner
    solver's steps grow, per method."""
    import jax

    import gradlang

    methods = {"implicit(cg)": f"implicit(cg, iters={CG_ITERS})", "value_function": "value_function",
               "unrolled": "unrolled", "truncated(10)": "truncated(10)"}
    args = (p.lam, *p.data)
    table = {}
    for name, method in methods.items():
        table[name] = []
        for n in steps:
            src = grad_source(p, method, f"gd(steps={n}, lr={p.lr})")
            compiled = jax.jit(gradlang.compile_source(src).g).lower(*args).compile()
            table[name].append(int(compiled.memory_analysis().temp_size_in_bytes))
    print(f"### temporary memory (bytes, XLA memory analysis) vs inner steps, {p.name}\n")
    print("| method | " + " | ".join(str(n) for n in steps) + " |")
    print("|---|" + "---:|" * len(steps))
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{b:,}" for b in row) + " |")
    print()
    return {"steps": list(steps), "temp_bytes": table}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    timing_args(ap, 100, 5, 5, "a few rounds only (smoke test)")
    a = parse_timing_args(ap, argv)

    t0 = time.perf_counter()
    info, line = machine()
    print(f"# gradlang bilevel benchmark: N={N} M={M} D={D}, gd {STEPS} steps, CG {CG_ITERS} "
          f"iterations (tol=0)\n")
    print(f"{line}; {a.rounds} rounds x {a.calls} calls per variant, "
          f"{a.warmup} warm-up calls\n")
    results = []
    for p in make_problems():
        results.append(run_problem(p, a.rounds, a.calls, a.warmup))
        print_table(results[-1])
    ridge = make_problems()[0]
    methods = method_table(ridge, a.rounds // 4 or 1, a.calls, a.warmup)
    memory = memory_curve(ridge, (10, 100, 1000) if a.quick else (10, 100, 1000, 3000))
    total = time.perf_counter() - t0
    print(f"total wall time {total:.0f} s")
    out = {"dims": {"N": N, "M": M, "D": D}, "steps": STEPS, "cg_iters": CG_ITERS,
           "rounds": a.rounds, "calls": a.calls, **info,
           "problems": results, "methods": methods, "memory": memory, "wall_s": total}
    write_json(out, a.json)
    return out


if __name__ == "__main__":
    main()
