"""Quantized training with std.quant: step time against hand-written JAX, and accuracy by rule and bit width.

    python benchmarks/quant.py [--rounds 200] [--calls 10] [--steps 600] [--seeds 5] [--json out.json]

(a) Step time. The `value_and_grad` step of two quantized MLPs compiled by gradlang, against
the same networks hand-written in JAX with the same backward rules as `jax.custom_vjp`s:

- `qat_q4`: examples/qat_mlp.grad's `step_q4`, QuEST 4-bit weights (both layers) and hidden
  activations, `quest(x, 4) with trust`; by hand: a fast Walsh-Hadamard transform, the
  Gaussian-optimal grid, the trust mask applied in the rotated space;
- `binary_reste`: examples/binary_mlp.grad's `step_reste`, +-mean|w| weights and sign
  activations with ReSTE (power 3); by hand: a sign with ReSTE's backward.

Default shapes B=256, D=64, H=256, C=10. Every variant is warmed up and timed INTERLEAVED as in
benchmarks/overhead.py: each round times every variant once (the order rotates from round to
round), a sample being `--calls` consecutive calls each followed by `block_until_ready`.
Reported: the median time per call and the median over rounds of the per-round ratio to the
hand-written step. Variants: the hand-written `jax.jit(jax.value_and_grad(loss))`; gradlang's
export called directly (`m.step_q4(...)`, what users call: argument checks cached per layout);
`jax.jit(m.step_q4)`; and, diagnostic only for QuEST: a hand-written variant that rotates with
a dense n x n Hadamard matrix (a matmul) instead of the O(n log n) butterflies. Also checks
that gradlang's and the hand-written steps agree (loss and every gradient leaf, allclose).

(b) Accuracy. Test accuracy on scikit-learn's 8x8 digits (pixels / 16, 80/20 split, fixed
seed) of the MLP 64 -> H -> 10 whose two weight matrices and hidden activations are quantized
at 1, 2, 4 and 8 bits by std.quant under three rules: STE (`quantize(...) with ste`; 1 bit:
`binarize with ste(clip=1)`), ReSTE (1 bit: `binarize with reste(power=3)`; b bits: ReSTE's
kernel at each rounding threshold, std.quant's `reste<b>_w` / `reste<b>_act`) and QuEST
(`quest(x, b) with trust`), next to the float32 twin. Input pixels stay real-valued. Short
training (Adam, cosine schedule, `--steps` steps, batch 128), the same initial weights and
minibatches for every cell; mean and standard deviation over `--seeds` seeds.
Note the grids differ by rule at a given width: symmetric STE / ReSTE use 2^b - 1 levels with
a zero (2 bits: ternary), QuEST's midrise grid 2^b levels.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

from timing import interleaved, write_json

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
RULES = ("ste", "reste", "quest")
BITS = (1, 2, 4, 8)


# ----------------------------------------------------------------------------- hand-written JAX

def hand_networks():
    """The two quantized MLP losses written directly in JAX, with their rules as custom_vjps."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    # QuEST's clipping constant for 4 bits (a number, computed once; not timed).
    from gradlang.runtime.quantizers import gaussian_clip

    def fwht(x):
        """Orthonormal fast Walsh-Hadamard transform of the last axis (Sylvester order)."""
        n = x.shape[-1]
        y, h = x, 1
        while h < n:
            y = y.reshape(x.shape[:-1] + (n // (2 * h), 2, h))
            a, b = y[..., 0, :], y[..., 1, :]
            y = jnp.stack([a + b, a - b], axis=-2).reshape(x.shape)
            h *= 2
        return y * np.float32(1 / np.sqrt(n))

    def make_quest(bits: int, rotate):
        clip_c = np.float32(gaussian_clip(bits))

        def grid(y):
            sigma = lax.stop_gradient(jnp.sqrt(jnp.mean(y * y, -1, keepdims=True)) + 1e-12)
            c = clip_c * sigma
            step = 2 * c / 2 ** bits
            q = jnp.clip((jnp.floor(y / step) + 0.5) * step, -c + step / 2, c - step / 2)
            return q, jnp.abs(y - q) <= step / 2

        @jax.custom_vjp
        def quest(x):
            return rotate(grid(rotate(x))[0])

        def fwd(x):
            q, trusted = grid(rotate(x))
            return rotate(q), trusted

        def bwd(trusted, g):  # the trust estimator, masked in the rotated space
            return (rotate(rotate(g) * trusted),)

        quest.defvjp(fwd, bwd)
        return quest

    def cross_entropy(logits, y):
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0])

    def qat_loss(quest):
        def loss(p, x, y):
            w1 = quest(p["l1"]["w"].T).T  # rotate along the contraction axis
            h = jnp.clip(x @ w1 + p["l1"]["b"], -1.0, 1.0)
            w2 = quest(p["l2"]["w"].T).T
            return cross_entropy(quest(h) @ w2 + p["l2"]["b"], y)
        return loss

    @jax.custom_vjp
    def sign_reste(x):
        return jnp.where(x >= 0, 1.0, -1.0).astype(x.dtype)

    def sign_fwd(x):
        return sign_reste(x), x

    def sign_bwd(x, g):  # ReSTE(power=3, clip=1, max_grad=10)
        a = jnp.abs(x)
        slope = jnp.minimum(jnp.power(jnp.maximum(a, 1e-12), -2.0 / 3.0) / 3.0, 10.0)
        return (g * slope * (a <= 1.0),)

    sign_reste.defvjp(sign_fwd, sign_bwd)

    def binary_w(w):
        return sign_reste(w) * lax.stop_gradient(jnp.mean(jnp.abs(w), axis=0, keepdims=True))

    def binary_loss(p, x, y):
        h = x @ binary_w(p["l1"]["w"]) + p["l1"]["b"]
        return cross_entropy(sign_reste(h) @ binary_w(p["l2"]["w"]) + p["l2"]["b"], y)

    def hadamard_by_matrix(n_values):
        mats = {}
        for n in n_values:
            h = np.array([[1.0]])
            while h.shape[0] < n:
                h = np.block([[h, h], [h, -h]])
            mats[n] = jnp.asarray(h / np.sqrt(n), jnp.float32)
        return lambda x: x @ mats[x.shape[-1]]

    return {"qat_q4": qat_loss(make_quest(4, fwht)), "binary_reste": binary_loss, "fwht": fwht,
            "qat_q4_matrix": lambda dims: qat_loss(make_quest(4, hadamard_by_matrix(dims)))}


def make_inputs(b: int, d: int, h: int, c: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    params = {
        "l1": {"w": (rng.normal(size=(d, h)) * np.sqrt(2.0 / d)).astype(np.float32),
               "b": (0.1 * rng.normal(size=h)).astype(np.float32)},
        "l2": {"w": (rng.normal(size=(h, c)) * np.sqrt(2.0 / (h + c))).astype(np.float32),
               "b": (0.1 * rng.normal(size=c)).astype(np.float32)},
    }
    x = rng.uniform(0.0, 1.0, size=(b, d)).astype(np.float32)
    y = rng.integers(0, c, size=b).astype(np.int32)
    return params, x, y


# ----------------------------------------------------------------------------- (a) step time

def measure_steps(dims, rounds: int, calls: int, warmup: int) -> dict:
    import jax

    import gradlang

    b, d, h, c = dims
    hand = hand_networks()
    qat = gradlang.compile_file(EXAMPLES / "qat_mlp.grad", strict=True)
    binary = gradlang.compile_file(EXAMPLES / "binary_mlp.grad", strict=True)
    params, x, y = make_inputs(*dims)
    args = jax.device_put((params, x, y))
    jax.block_until_ready(args)

    benches = {
        "qat_q4": ("QuEST 4-bit MLP (quest with trust)", qat.step_q4, {
            "hand-written jax.jit": jax.jit(jax.value_and_grad(hand["qat_q4"])),
            "gradlang m.step_q4 (direct)": qat.step_q4,
            "gradlang jax.jit(m.step_q4)": jax.jit(qat.step_q4),
            "diagnostic: hand, Hadamard as a matmul": jax.jit(jax.value_and_grad(
                hand["qat_q4_matrix"]((d, h)))),
        }),
        "binary_reste": ("binary MLP, sign weights + activations (ReSTE)", binary.step_reste, {
            "hand-written jax.jit": jax.jit(jax.value_and_grad(hand["binary_reste"])),
            "gradlang m.step_reste (direct)": binary.step_reste,
            "gradlang jax.jit(m.step_reste)": jax.jit(binary.step_reste),
        }),
    }
    ref_name = "hand-written jax.jit"
    out = {}
    for key, (title, export, variants) in benches.items():
        # Same numbers: loss and every gradient leaf.
        ref_v, ref_g = variants[ref_name](*args)
        v, g = export(*args)
        np.testing.assert_allclose(np.asarray(v), np.asarray(ref_v), rtol=1e-5, atol=1e-6)
        diffs = []
        for a_, b_ in zip(jax.tree.leaves(g["p"]), jax.tree.leaves(ref_g)):
            np.testing.assert_allclose(np.asarray(a_), np.asarray(b_), rtol=1e-4, atol=1e-5)
            diffs.append(float(np.max(np.abs(np.asarray(a_) - np.asarray(b_)))))
        assert jax.tree.structure(g["p"]) == jax.tree.structure(ref_g)

        table = interleaved(variants, args, ref_name, rounds, calls, warmup)
        out[key] = {"title": title, "variants": table,
                    "numerics": {"loss_abs_diff": float(abs(v - ref_v)),
                                 "grad_max_abs_diff": max(diffs)}}
    return out


# ----------------------------------------------------------------------------- (b) accuracy

def table_source() -> str:
    """One module with a loss and an accuracy per (rule, bits) cell and the float32 twin."""
    lines = ["use std.nn", "use std.quant",
             "struct M { l1: QDense[I=D, O=H], l2: QDense[I=H, O=C] }",
             "fn fwd_float(p: M, x: f32[B, D]) -> f32[B, C] {"
             " return float_dense(p.l2, hardtanh(float_dense(p.l1, x))) }"]
    names = ["float"] + [f"{r}{b}" for b in BITS for r in RULES]
    for n in names[1:]:
        lines.append(f"fn fwd_{n}(p: M, x: f32[B, D]) -> f32[B, C] {{"
                     f" return {n}_dense(p.l2, hardtanh(x @ {n}_w(p.l1.w) + p.l1.b)) }}")
    for n in names:
        lines += [f"fn loss_{n}(p: M, x: f32[B, D], y: i32[B]) -> f32 {{ return cross_entropy(fwd_{n}(p, x), y) }}",
                  f"fn acc_{n}(p: M, x: f32[B, D], y: i32[B]) -> f32 {{ return accuracy(fwd_{n}(p, x), y) }}",
                  f"export step_{n} = value_and_grad(loss_{n}, wrt=[p])",
                  f"export acc_{n} = acc_{n}"]
    return "\n".join(lines) + "\n"


def measure_accuracy(steps: int, seeds: int, hidden: int, lr: float, batch: int = 128) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    import gradlang

    sys.path.insert(0, str(EXAMPLES))
    from binary_mlp import init_params, load_digits_01

    x_train, x_test, y_train, y_test = (jnp.asarray(a) for a in load_digits_01(0))
    m = gradlang.compile_source(table_source(), name="quant_table.grad", strict=True)
    opt = optax.adam(optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10), steps,
                                                        end_value=lr * 0.01))

    def trainer(step):
        @jax.jit
        def run(params, key):
            def body(carry, k):
                p, s = carry
                idx = jax.random.choice(k, len(x_train), (batch,), replace=False)
                loss, grads = step(p, x_train[idx], y_train[idx])
                updates, s = opt.update(grads["p"], s, p)
                return (optax.apply_updates(p, updates), s), loss
            (p, _), losses = jax.lax.scan(body, (params, opt.init(params)),
                                          jax.random.split(key, steps))
            return p, losses[-20:].mean()
        return run

    cells = {}
    for name in ["float"] + [f"{r}{b}" for b in BITS for r in RULES]:
        run, acc = trainer(getattr(m, f"step_{name}")), getattr(m, f"acc_{name}")
        t0 = time.perf_counter()
        accs, losses = [], []
        for seed in range(seeds):
            params = jax.tree.map(jnp.asarray, init_params(64, hidden, 10, seed))
            p, loss = run(params, jax.random.key(seed))
            accs.append(float(acc(p, x_test, y_test)))
            losses.append(float(loss))
        cells[name] = {"test_accuracy": accs, "mean": float(np.mean(accs)),
                       "std": float(np.std(accs)), "final_loss": float(np.mean(losses)),
                       "seconds": time.perf_counter() - t0}
        print(f"  {name:8s} test acc {np.mean(accs):.4f} +- {np.std(accs):.4f}  "
              f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    return {"steps": steps, "seeds": seeds, "hidden": hidden, "lr": lr, "batch": batch,
            "n_test": int(len(x_test)), "cells": cells}


# ----------------------------------------------------------------------------- report

def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=256)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--H", type=int, default=256, help="hidden units for the step timing (a power of two)")
    ap.add_argument("--C", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=200, help="interleaved rounds (default 200)")
    ap.add_argument("--calls", type=int, default=10, help="calls per timed sample (default 10)")
    ap.add_argument("--warmup", type=int, default=30, help="warm-up calls per variant")
    ap.add_argument("--steps", type=int, default=600, help="training steps per accuracy cell (default 600)")
    ap.add_argument("--seeds", type=int, default=5, help="seeds per accuracy cell (default 5)")
    ap.add_argument("--table-hidden", type=int, default=128, help="hidden units of the accuracy table's MLP")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="write the results to this file")
    args = ap.parse_args(argv)
    dims = (args.B, args.D, args.H, args.C)

    import jax

    dev = jax.devices()[0]
    print(f"gradlang quantized-training benchmark; jax {jax.__version__}, device "
          f"{dev.platform}:{dev.device_kind}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    result = {"jax": jax.__version__, "device": f"{dev.platform}:{dev.device_kind}",
              "cpu_count": os.cpu_count(), "dims": dict(zip("BDHC", dims))}

    if not args.skip_timing:
        print(f"\n(a) step time, B={args.B} D={args.D} H={args.H} C={args.C}: interleaved, "
              f"{args.rounds} rounds x {args.calls} calls per variant, {args.warmup} warm-up calls")
        timing = measure_steps(dims, args.rounds, args.calls, args.warmup)
        for bench in timing.values():
            rows = bench["variants"]
            w = max(len(n) for n in rows) + 2
            print(f"\n{bench['title']}")
            print(f"{'variant':<{w}}{'median/call':>14}{'p25-p75':>22}{'ratio vs hand':>15}{'ratio p25-p75':>16}")
            for n, r in rows.items():
                iqr = f"{r['p25_s'] * 1e6:.1f}-{r['p75_s'] * 1e6:.1f} us"
                riqr = f"{r['ratio_p25']:.3f}-{r['ratio_p75']:.3f}"
                print(f"{n:<{w}}{r['median_s'] * 1e6:>11.1f} us{iqr:>22}{r['median_ratio']:>15.3f}{riqr:>16}")
            nm = bench["numerics"]
            print(f"numerics ok: |loss diff| {nm['loss_abs_diff']:.1e}, max |grad diff| "
                  f"{nm['grad_max_abs_diff']:.1e}")
        result["timing"] = timing

    if not args.skip_accuracy:
        print(f"\n(b) test accuracy on digits (8x8, 64 -> {args.table_hidden} -> 10, weights and hidden "
              f"activations quantized, real input), {args.steps} Adam steps, mean +- std over "
              f"{args.seeds} seeds:")
        acc = measure_accuracy(args.steps, args.seeds, args.table_hidden, args.lr)
        cells = acc["cells"]
        fl = cells["float"]
        print(f"\n{'bits':>4}  " + "".join(f"{h:>17}" for h in ("STE", "ReSTE", "QuEST", "float32")))
        for b in BITS:
            row = [cells[f"{r}{b}"] for r in RULES] + [fl]
            print(f"{b:>4}  " + "".join(f"{c['mean']:>10.4f} +-{c['std']:.3f}" for c in row))
        result["accuracy"] = acc

    write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
