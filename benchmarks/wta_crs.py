"""Sampled-matmul backward (WTA-CRS) against the exact backward: compiled memory, time and
gradient variance of adapter training through a deep stack.

    python benchmarks/wta_crs.py [--quick] [--rounds 10] [--calls 3] [--json out.json]

The model: L frozen linear layers h_{l+1} = h_l @ W_l + (h_l @ A_l) @ B_l, each with a trainable
rank-8 adapter (A_l, B_l), batch N = 4096 rows of width 512, loss mean((h_L - y)^2). The
adapter's gradient dA_l = h_l^T (dh_{l+1} B_l^T) is the only reason to store h_l: exactly
(`h @ a`), from 128 sampled rows (`(h @ a) with wta_crs(keep=128)`), or not at all (a lower
bound: the adapter's A frozen, `h @ stop_gradient(a)`). Reported per depth L: XLA's compiled
temp memory of one value-and-gradient step (`memory_analysis()`), the time per step
(interleaved, benchmarks/timing.py) relative to the exact backward, and, at the first depth,
the relative variance of the sampled gradient of A (sum of coordinate variances over 200 keys
divided by the squared norm of the exact gradient).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import gradlang
from timing import interleaved, parse_timing_args, timing_args, write_json

N, D, R, KEEP = 4096, 512, 8, 128
PRODUCTS = {"exact": "h{i} @ a{i}.a", "sampled": f"(h{{i}} @ a{{i}}.a) with wta_crs(keep={KEEP})",
            "no adapter input": "h{i} @ stop_gradient(a{i}.a)"}


def source(depth: int, product: str) -> str:
    """The stack of `depth` adapted layers, the adapter input product written as given."""
    adapters = ", ".join(f"a{i}: Adapter" for i in range(depth))
    lines = ["struct Adapter { a: f32[D, R], b: f32[R, D] }",
             f"fn loss(w: f32[{depth}, D, D], {adapters}, x: f32[N, D], y: f32[N, D]) -> f32 {{",
             "  let h0 = x"]
    lines += [f"  let h{i + 1} = h{i} @ w[{i}] + ({product.format(i=i)}) @ a{i}.b" for i in range(depth)]
    lines += [f"  return mean((h{depth} - y) ^ 2)", "}",
              f"export step = value_and_grad(loss, wrt=[{', '.join(f'a{i}' for i in range(depth))}])"]
    return "\n".join(lines)


def arguments(depth: int, keyed: bool) -> tuple:
    rng = np.random.default_rng(0)
    w = (rng.normal(size=(depth, D, D)) / np.sqrt(D)).astype(np.float32)
    adapters = [{"a": (rng.normal(size=(D, R)) / np.sqrt(D)).astype(np.float32),
                 "b": (rng.normal(size=(R, D)) / np.sqrt(R)).astype(np.float32)} for _ in range(depth)]
    x, y = (rng.normal(size=(N, D)).astype(np.float32) for _ in range(2))
    return (w, *adapters, x, y) + ((jax.random.key(0),) if keyed else ())


def relative_variance(step, exact_step, depth: int, keys: int = 200) -> float:
    args = arguments(depth, True)
    exact = exact_step(*args[:-1])[1]["a0"]["a"]
    rest = args[:-1]
    grads = jax.jit(jax.vmap(lambda k, *a: step(*a, k)[1]["a0"]["a"], in_axes=(0,) + (None,) * len(rest)))(
        jax.random.split(jax.random.key(1), keys), *rest)
    return float(jnp.sum(jnp.var(grads, 0)) / jnp.sum(exact ** 2))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    timing_args(ap, 10, 3, 2, "two depths, a few rounds (smoke test)")
    a = parse_timing_args(ap, argv)
    depths = [3, 6] if a.quick else [3, 6, 12, 24]
    print(f"# WTA-CRS: jax {jax.__version__}, {jax.devices()[0].platform}; N={N}, D={D}, "
          f"rank {R}, keep {KEEP}\n")
    print("| depth L | exact temp MiB | sampled temp / exact | no-adapter-input temp / exact "
          "| exact ms | sampled time / exact |")
    print("|---:|---:|---:|---:|---:|---:|")
    rows = []
    for depth in depths:
        steps = {name: jax.jit(gradlang.compile_source(source(depth, p)).step) for name, p in PRODUCTS.items()}
        keyed = {name: name == "sampled" for name in steps}
        temp = {name: f.lower(*arguments(depth, keyed[name])).compile().memory_analysis().temp_size_in_bytes
                for name, f in steps.items()}
        timed = {"exact": lambda f=steps["exact"], x=arguments(depth, False): f(*x),
                 "sampled": lambda f=steps["sampled"], x=arguments(depth, True): f(*x)}
        times = interleaved(timed, (), "exact", a.rounds, a.calls, a.warmup)
        row = {"depth": depth, "temp_bytes": temp, "ms": {k: v["median_s"] * 1e3 for k, v in times.items()},
               "time_ratio": times["sampled"]["median_ratio"]}
        if depth == depths[0]:
            row["relative_variance"] = relative_variance(steps["sampled"], steps["exact"], depth)
        rows.append(row)
        print(f"| {depth} | {temp['exact'] / 2 ** 20:.1f} | {temp['sampled'] / temp['exact']:.3f} | "
              f"{temp['no adapter input'] / temp['exact']:.3f} | {row['ms']['exact']:.1f} | "
              f"{row['time_ratio']:.2f} |")
    print(f"\nrelative variance of the sampled gradient of A_0 at L={depths[0]}: "
          f"{rows[0]['relative_variance']:.3f}")
    out = {"jax": jax.__version__, "rows": rows}
    write_json(out, a.json)
    return out


if __name__ == "__main__":
    main()
