"""DP-SGD with gradlang: `examples/dp_mlp.grad` on 8x8 digits, private against non-private.

    python examples/dp_mlp.py [--steps 1000] [--batch 64] [--noise 1.5] [--out examples/out]

The data: scikit-learn's 8x8 digits (1797 images, 10 classes, shipped with scikit-learn),
pixels / 16 in [0, 1], split 80/20 with a fixed seed (as in binary_mlp.py): N = 1438 training
images. The network: 64 -> 32 (tanh) -> 10.

Batches are drawn by Poisson sampling, as the privacy accounting assumes: at each step every
training image is in the batch independently with probability q = batch / N. A batch's size
varies, so it is padded to a fixed size B (the expected size plus 6 standard deviations,
rounded up to a multiple of 8; a larger batch would stop the run, with probability about
1e-9 per step) with examples of weight 0, which contribute nothing, clipped or not. Both
methods train on the same batches with the same optimizer (SGD with momentum 0.9; momentum is
post-processing of the private gradients and costs no privacy; learning rates from a sweep
over {0.05, 0.1, 0.15, 0.25, 0.5, 1, 2, 4}, seed 0, the best final test accuracy per method;
that tuning used the test set and is not part of the privacy accounting, as usual in papers):

- `private`: `value_and_grad(loss, wrt=[p], by=dp(clip=1.0, noise=1.5))`: each example's
  gradient clipped to norm 1 (ghost norms for the two weight matrices, per-example gradients
  for the biases), N(0, 1.5^2) noise on the sum, divided by B;
- `plain`: the same objective's exact gradient (no clipping, no noise).

The noise multiplier is fixed in the .grad file (`--noise` must match it: the accountant is
given the value compiled). Reported: test accuracy before and after, training loss, time per
step, and the privacy of the run: epsilon at delta (1e-5) from the RDP accountant of the
Poisson-subsampled Gaussian mechanism (`gradlang.privacy_accountant.epsilon`, improved
conversion; the classic conversion's value too, and the tighter PLD accountant's when the
optional dp-accounting is installed), for the steps taken and q. Writes
`dp_mlp_loss.png` (test accuracy and epsilon per step) and `dp_mlp.json` to the output folder.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradlang
from gradlang.privacy_accountant import Guarantee, epsilon
from binary_mlp import load_digits_01
from mezo_mlp import init_params
from progress import ProgressBar

HERE = Path(__file__).resolve().parent
METHODS = ("private", "plain")
LABELS = {"private": "DP-SGD (by=dp, ghost clipping)", "plain": "non-private SGD"}


def padded_size(expected: float, q: float) -> int:
    """The fixed batch size Poisson batches are padded to: the mean plus 6 standard deviations,
    rounded up to a multiple of 8."""
    return int(8 * math.ceil((expected + 6 * math.sqrt(expected * (1 - q))) / 8))


def poisson_batches(n: int, q: float, size: int, steps: int, seed: int):
    """Per step, the indices of a Poisson-sampled batch (each of n examples kept with
    probability q) padded to `size`, and their weights (1 sampled, 0 padding): [steps, size]."""
    rng = np.random.default_rng(seed)
    idx = np.zeros((steps, size), np.int32)
    weight = np.zeros((steps, size), np.float32)
    for t in range(steps):
        drawn = np.flatnonzero(rng.random(n) < q)
        if len(drawn) > size:
            raise SystemExit(f"step {t}: a Poisson batch of {len(drawn)} examples exceeds the "
                             f"padded size {size}")
        idx[t, :len(drawn)] = drawn
        weight[t, :len(drawn)] = 1.0
    return idx, weight


def pld_epsilon(q: float, noise: float, steps: int, delta: float) -> Guarantee | None:
    """The PLD accountant's guarantee (dp-accounting's, tighter than RDP), or None when the
    optional dp-accounting is not installed."""
    try:
        return epsilon(q, noise, steps, delta, accountant="pld")
    except ImportError:
        return None


def make_chunk(m, method: str, opt, x, y):
    """A jitted scan of optimizer steps with `method`'s gradient over the batches (idx, weight)
    [n, B] and keys [n]; returns (params, state) and the losses."""

    def one(carry, inp):
        p, s = carry
        key, idx, w = inp
        if method == "private":
            loss, g = m.private(p, x[idx], y[idx], w, key)
        else:
            loss, g = m.plain(p, x[idx], y[idx], w)
        updates, s = opt.update(g["p"], s, p)
        return (optax.apply_updates(p, updates), s), loss

    return jax.jit(lambda carry, keys, idx, w: jax.lax.scan(one, carry, (keys, idx, w)))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000, help="optimizer steps per method (default 1000)")
    ap.add_argument("--batch", type=int, default=64, help="expected Poisson batch size (q = batch / N)")
    ap.add_argument("--hidden", type=int, default=32, help="hidden units")
    ap.add_argument("--lr-private", type=float, default=0.1, help="SGD learning rate, private")
    ap.add_argument("--lr-plain", type=float, default=1.0, help="SGD learning rate, plain")
    ap.add_argument("--noise", type=float, default=1.5, help="the noise multiplier compiled in dp_mlp.grad")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    ap.add_argument("--eval-every", type=int, default=50, help="steps between evaluations")
    ap.add_argument("--out", type=Path, default=HERE / "out", help="output folder (default examples/out)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    methods = [s for s in args.methods.split(",") if s]
    if unknown := set(methods) - set(METHODS):
        ap.error(f"unknown methods {sorted(unknown)} (choose from {', '.join(METHODS)})")
    n_chunk = min(args.eval_every, args.steps)
    if args.steps % n_chunk:
        ap.error(f"--steps ({args.steps}) must be a multiple of --eval-every ({n_chunk})")
    args.out.mkdir(parents=True, exist_ok=True)

    x_train, x_test, y_train, y_test = load_digits_01(args.seed)
    n = len(x_train)
    print(f"digits: {n} train / {len(x_test)} test images, 64 pixels in [0, 1], 10 classes")
    xtr, ytr, xte, yte = (jnp.asarray(a) for a in (x_train, y_train, x_test, y_test))

    t0 = time.perf_counter()
    m = gradlang.compile_file(HERE / "dp_mlp.grad", strict=True)
    compile_s = time.perf_counter() - t0
    dp = dict(next(e for e in m.ir.exports if e.name == "private").transform.by.options)
    if dp["noise"] != args.noise:
        ap.error(f"--noise {args.noise} differs from the noise compiled in dp_mlp.grad ({dp['noise']})")
    print(f"compiled dp_mlp.grad in {compile_s * 1e3:.1f} ms (strict: no warnings); "
          f"by=dp(clip={dp['clip']}, noise={dp['noise']})")

    q = args.batch / n
    size = padded_size(args.batch, q)
    idx, weight = poisson_batches(n, q, size, args.steps, args.seed + 1)
    print(f"Poisson sampling: q = {args.batch}/{n} = {q:.4f}, batch sizes {int(weight.sum(1).min())}"
          f"-{int(weight.sum(1).max())} (mean {weight.sum(1).mean():.1f}), padded to {size}")
    keys = jax.random.split(jax.random.key(args.seed + 2), args.steps)
    idx, weight = jnp.asarray(idx), jnp.asarray(weight)
    test_acc = jax.jit(m.evaluate)
    start = float(test_acc(jax.tree.map(jnp.asarray, init_params(64, args.hidden, 10, args.seed)),
                           xte, yte))

    lrs = {"private": args.lr_private, "plain": args.lr_plain}
    results, curves = {}, {}
    for method in methods:
        opt = optax.sgd(lrs[method], momentum=0.9)
        params = jax.tree.map(jnp.asarray, init_params(64, args.hidden, 10, args.seed))
        chunk = make_chunk(m, method, opt, xtr, ytr)
        carry = (params, opt.init(params))
        t0 = time.perf_counter()
        compiled = chunk.lower(carry, keys[:n_chunk], idx[:n_chunk], weight[:n_chunk]).compile()
        jit_s = time.perf_counter() - t0
        seconds, losses = 0.0, []
        curve = [{"step": 0, "test_accuracy": start}]
        bar = ProgressBar(args.steps, label=f"{method:8s}")
        for c in range(0, args.steps, n_chunk):
            t0 = time.perf_counter()
            carry, loss = compiled(carry, keys[c:c + n_chunk], idx[c:c + n_chunk],
                                   weight[c:c + n_chunk])
            carry = jax.block_until_ready(carry)
            seconds += time.perf_counter() - t0
            losses.append(np.asarray(loss))
            curve.append({"step": c + n_chunk, "test_accuracy": float(test_acc(carry[0], xte, yte))})
            bar.update(c + n_chunk, f"test acc {curve[-1]['test_accuracy']:.4f}")
        bar.close()
        losses = np.concatenate(losses)
        results[method] = {"learning_rate": lrs[method], "test_accuracy_before": start,
                           "test_accuracy_after": curve[-1]["test_accuracy"],
                           "train_loss_last_50": float(losses[-50:].mean() * size / args.batch),
                           "train_s": seconds, "ms_per_step": 1e3 * seconds / args.steps,
                           "jit_s": jit_s}
        curves[method] = curve

    private = epsilon(q, args.noise, args.steps, args.delta)
    classic = epsilon(q, args.noise, args.steps, args.delta, conversion="classic")
    pld = pld_epsilon(q, args.noise, args.steps, args.delta)
    privacy = {"epsilon": private.epsilon, "delta": args.delta, "rdp_order": private.order,
               "epsilon_classic_conversion": classic.epsilon,
               "epsilon_pld": pld.epsilon if pld else None,  # None: no dp-accounting
               "pld_discretization": pld.discretization if pld else None,
               "sampling_rate": q,
               "noise_multiplier": args.noise, "clip": dp["clip"], "steps": args.steps,
               "accountant": "RDP of the Poisson-subsampled Gaussian mechanism, integer orders "
                             "2-256, improved conversion (gradlang.privacy_accountant)"}
    eps_curve = [{"step": c["step"], "epsilon": epsilon(q, args.noise, c["step"], args.delta).epsilon
                  if c["step"] else 0.0} for c in curves.get("private", [])]

    print(f"\n{args.steps} steps, expected batch {args.batch} (padded to {size}), SGD with "
          f"momentum 0.9")
    print("| method | lr | test acc before -> after | train loss (last 50 steps) | ms / step |")
    print("|---|---:|---|---:|---:|")
    for method, r in results.items():
        print(f"| {LABELS[method]} | {r['learning_rate']:g} | {r['test_accuracy_before']:.4f} -> "
              f"{r['test_accuracy_after']:.4f} | {r['train_loss_last_50']:.4f} | "
              f"{r['ms_per_step']:.2f} |")
    if "private" in results:
        tighter = f"; PLD accountant: epsilon {pld.epsilon:.3g}" if pld else ""
        print(f"privacy of the private run: {private} (classic conversion: epsilon "
              f"{classic.epsilon:.3g}{tighter})")

    fig_path = args.out / "dp_mlp_loss.png"
    _plot(curves, eps_curve, fig_path)
    summary = {
        "example": "dp_mlp",
        "dataset": "sklearn load_digits 8x8, pixels / 16",
        "n_train": n,
        "n_test": len(x_test),
        "hidden": args.hidden,
        "parameters": int(sum(np.size(leaf) for leaf in jax.tree.leaves(params))),
        "sampling": {"kind": "Poisson", "q": q, "expected_batch": args.batch, "padded_to": size},
        "optimizer": "sgd, momentum 0.9",
        "steps": args.steps,
        "methods": results,
        "privacy": privacy if "private" in results else None,
        "curves": curves,
        "epsilon_curve": eps_curve,
        "compile_s": compile_s,
        "plot": str(fig_path),
    }
    (args.out / "dp_mlp.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {fig_path} and {args.out / 'dp_mlp.json'}")
    return summary


def _plot(curves: dict, eps_curve: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, eps) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method, curve in curves.items():
        acc.plot([c["step"] for c in curve], [c["test_accuracy"] for c in curve], label=LABELS[method])
    acc.set_xlabel("step")
    acc.set_ylabel("test accuracy")
    acc.set_title("DP-SGD on digits: private vs non-private")
    acc.legend(loc="lower right")
    if eps_curve:
        eps.plot([c["step"] for c in eps_curve], [c["epsilon"] for c in eps_curve], color="C0")
    eps.set_xlabel("step")
    eps.set_ylabel("epsilon (delta = 1e-5)")
    eps.set_title("privacy spent (RDP accountant)")
    for ax in (acc, eps):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
