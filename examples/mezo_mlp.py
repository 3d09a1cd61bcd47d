"""MeZO-style fine-tuning with gradlang: `examples/mezo_mlp.grad` on 8x8 digits from forward passes only.

    python examples/mezo_mlp.py [--steps 10000] [--out examples/out]

The data: scikit-learn's 8x8 digits (1797 images, 10 classes, shipped with scikit-learn),
pixels / 16 in [0, 1], split 80/20 with a fixed seed (as in binary_mlp.py). The network:
64 -> 32 (tanh) -> 10. It is first *pretrained* briefly by backprop (Adam on the cross-entropy
of only `--pretrain-n` training images), which leaves it at ~88% test accuracy, and then
*fine-tuned* on the whole training set by plain SGD (learning rate decayed to 0 by a cosine),
every method from the same pretrained weights, on the same minibatches and (for SPSA) the same
random directions:

- `mezo_error`: MeZO's two-point SPSA step, `descend(error, wrt=[p], by=spsa(eps=0.001))`
  (the update p - lr g written by regenerating the noise, no gradient stored), on the
  error rate computed by a NumPy `extern fn error_rate(...)` (non-differentiable: argmax on the
  host). MeZO's eps = 1e-3 was chosen for language models with hundreds of millions of
  parameters, where a perturbation that small still moves the logits; on this 2,410-parameter
  network it rarely flips any prediction, so the two values are equal and the estimate is
  exactly zero on most steps (the example reports how often it is not);
- `mezo_error_wide`: the same with eps = 0.03, a smoothing scale at which the Gaussian-smoothed
  error rate has a useful slope;
- `mezo_loss`: the same estimator (eps = 0.001) on the smooth cross-entropy;
- `backprop`: reverse-mode gradients of the cross-entropy (reference).

Each SPSA step costs two forward passes of the minibatch and no backward pass; a backprop step
costs one forward and one backward pass. The default learning rates come from a sweep over
{0.001, 0.003, 0.01, 0.03, 0.1, 0.3} (seed 0; the best final training error per method);
above its best rate each SPSA variant degrades or diverges. Reports test accuracy before and
after, forward passes, wall time, and the fraction of SPSA steps whose two values differed.
Writes `mezo_mlp_loss.png` (test accuracy, training error rate and training loss per step) and
`mezo_mlp.json` to the output folder.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradlang
from binary_mlp import load_digits_01
from progress import ProgressBar

HERE = Path(__file__).resolve().parent
METHODS = ("mezo_error", "mezo_error_wide", "mezo_loss", "backprop")
LABELS = {"mezo_error": "SPSA on error rate (eps=1e-3)",
          "mezo_error_wide": "SPSA on error rate (eps=3e-2)",
          "mezo_loss": "SPSA on cross-entropy (eps=1e-3)",
          "backprop": "backprop on cross-entropy"}
ESTIMATE = {"mezo_error": "spsa(eps=0.001) on the extern error rate",
            "mezo_error_wide": "spsa(eps=0.03) on the extern error rate",
            "mezo_loss": "spsa(eps=0.001) on the cross-entropy",
            "backprop": "reverse mode on the cross-entropy"}


def error_rate(logits: np.ndarray, labels: np.ndarray) -> np.float32:
    """The extern: the fraction of rows whose largest logit is not the label (NumPy, on the
    host; called with the declared shapes [B, C] and [B])."""
    return np.float32(np.mean(np.argmax(logits, axis=-1) != labels))


def init_params(d: int, h: int, c: int, seed: int) -> dict:
    """Glorot-initialised layers (tanh hidden), zero biases; the MLP struct as a dict."""
    rng = np.random.default_rng(seed)

    def dense(i: int, o: int) -> dict:
        return {"w": (rng.normal(size=(i, o)) * np.sqrt(2.0 / (i + o))).astype(np.float32),
                "b": np.zeros(o, np.float32)}

    return {"l1": dense(d, h), "l2": dense(h, c)}


def pretrain(m, params, x, y, steps: int, lr: float):
    """Full-batch Adam on the cross-entropy of a small subset (backprop)."""
    opt = optax.adam(lr)

    def body(carry, _):
        p, s = carry
        loss, grads = m.backprop(p, x, y)
        updates, s = opt.update(grads["p"], s, p)
        return (optax.apply_updates(p, updates), s), loss

    (params, _), losses = jax.jit(lambda p: jax.lax.scan(body, (p, opt.init(p)), None,
                                                         length=steps))(params)
    return params, np.asarray(losses)


def make_chunk(m, method: str, lr: float, total: int, x, y):
    """A jitted scan of SGD steps with `method`'s gradient on the minibatches `idx` [n, batch]
    (keys [n], global step numbers `t` [n]), the learning rate decayed from `lr` to 0 by a
    cosine over `total` steps; returns the parameters and, per step, whether the estimate was
    nonzero."""
    schedule = optax.cosine_decay_schedule(lr, total)

    def one(p, inp):
        key, idx, t = inp
        xb, yb = x[idx], y[idx]
        rate = schedule(t)
        if method == "backprop":
            _, g = m.backprop(p, xb, yb)
            new = jax.tree.map(lambda a, b: a - rate * b, p, g["p"])
        else:
            new = m[method](p, xb, yb, rate, key)["p"]
        # an SPSA step moves along (scalar) * z: not at all exactly when the two values were equal
        moved = jnp.any(jnp.stack([jnp.any(a != b) for a, b in zip(jax.tree.leaves(new),
                                                                     jax.tree.leaves(p))]))
        return new, moved

    return jax.jit(lambda p, keys, idx, t: jax.lax.scan(one, p, (keys, idx, t)))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10000, help="fine-tuning steps per method (default 10000)")
    ap.add_argument("--batch", type=int, default=256, help="minibatch size")
    ap.add_argument("--hidden", type=int, default=32, help="hidden units")
    ap.add_argument("--pretrain-n", type=int, default=100, help="training images seen in pretraining")
    ap.add_argument("--pretrain-steps", type=int, default=40, help="full-batch Adam steps of pretraining")
    ap.add_argument("--pretrain-lr", type=float, default=1e-2)
    ap.add_argument("--lr-mezo-error", type=float, default=0.001, help="SGD learning rate, mezo_error")
    ap.add_argument("--lr-mezo-error-wide", type=float, default=0.03, help="SGD learning rate, mezo_error_wide")
    ap.add_argument("--lr-mezo-loss", type=float, default=0.03, help="SGD learning rate, mezo_loss")
    ap.add_argument("--lr-backprop", type=float, default=0.3, help="SGD learning rate, backprop")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    ap.add_argument("--eval-every", type=int, default=200, help="steps between evaluations")
    ap.add_argument("--out", type=Path, default=HERE / "out", help="output folder (default examples/out)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    methods = [s for s in args.methods.split(",") if s]
    if unknown := set(methods) - set(METHODS):
        ap.error(f"unknown methods {sorted(unknown)} (choose from {', '.join(METHODS)})")
    args.out.mkdir(parents=True, exist_ok=True)

    x_train, x_test, y_train, y_test = load_digits_01(args.seed)
    print(f"digits: {len(x_train)} train / {len(x_test)} test images, 64 pixels in [0, 1], 10 classes")
    xtr, ytr, xte, yte = (jnp.asarray(a) for a in (x_train, y_train, x_test, y_test))

    t0 = time.perf_counter()
    m = gradlang.compile_file(HERE / "mezo_mlp.grad", strict=True, externs={"error_rate": error_rate})
    compile_s = time.perf_counter() - t0
    print(f"compiled mezo_mlp.grad in {compile_s * 1e3:.1f} ms (strict: no warnings)")

    test_acc = jax.jit(m.evaluate)
    train_loss = jax.jit(m.loss)
    train_error = jax.jit(m.error)  # the extern, on the host

    def evaluate(p) -> dict:
        return {"test_accuracy": float(test_acc(p, xte, yte)),
                "train_error": float(train_error(p, xtr, ytr)),
                "train_loss": float(train_loss(p, xtr, ytr))}

    params = jax.tree.map(jnp.asarray, init_params(x_train.shape[1], args.hidden, 10, args.seed))
    params, pre_losses = pretrain(m, params, xtr[:args.pretrain_n], ytr[:args.pretrain_n],
                                  args.pretrain_steps, args.pretrain_lr)
    start = evaluate(params)
    print(f"pretrained by backprop ({args.pretrain_steps} Adam steps on {args.pretrain_n} images): "
          f"test accuracy {start['test_accuracy']:.4f}, train error {start['train_error']:.4f}, "
          f"train loss {start['train_loss']:.4f}")

    # The same minibatches and the same SPSA directions for every method.
    rng = np.random.default_rng(args.seed + 1)
    idx = jnp.asarray(rng.integers(0, len(x_train), size=(args.steps, args.batch)), jnp.int32)
    keys = jax.random.split(jax.random.key(args.seed + 2), args.steps)
    ts = jnp.arange(args.steps, dtype=jnp.int32)
    lrs = {"mezo_error": args.lr_mezo_error, "mezo_error_wide": args.lr_mezo_error_wide,
           "mezo_loss": args.lr_mezo_loss, "backprop": args.lr_backprop}
    n_chunk = min(args.eval_every, args.steps)
    if args.steps % n_chunk:
        ap.error(f"--steps ({args.steps}) must be a multiple of --eval-every ({n_chunk})")

    results, curves = {}, {}
    for method in methods:
        chunk = make_chunk(m, method, lrs[method], args.steps, xtr, ytr)
        t0 = time.perf_counter()
        compiled = chunk.lower(params, keys[:n_chunk], idx[:n_chunk], ts[:n_chunk]).compile()
        jit_s = time.perf_counter() - t0
        p, seconds, moved = params, 0.0, []
        curve = [{"step": 0, **start}]
        bar = ProgressBar(args.steps, label=f"{method:16s}")
        for c in range(0, args.steps, n_chunk):
            t0 = time.perf_counter()
            p, mv = compiled(p, keys[c:c + n_chunk], idx[c:c + n_chunk], ts[c:c + n_chunk])
            p = jax.block_until_ready(p)
            seconds += time.perf_counter() - t0
            moved.append(np.asarray(mv))
            curve.append({"step": c + n_chunk, **evaluate(p)})
            bar.update(c + n_chunk, f"test acc {curve[-1]['test_accuracy']:.4f}")
        bar.close()
        moved = np.concatenate(moved)
        end = curve[-1]
        spsa = method != "backprop"
        results[method] = {
            "estimator": ESTIMATE[method],
            "learning_rate": lrs[method],
            "test_accuracy_before": start["test_accuracy"],
            "test_accuracy_after": end["test_accuracy"],
            "train_error_before": start["train_error"],
            "train_error_after": end["train_error"],
            "train_loss_before": start["train_loss"],
            "train_loss_after": end["train_loss"],
            "forward_passes": (2 if spsa else 1) * args.steps,
            "backward_passes": 0 if spsa else args.steps,
            "examples_forwarded": (2 if spsa else 1) * args.steps * args.batch,
            "nonzero_estimate_fraction": float(moved.mean()),
            "train_s": seconds,
            "ms_per_step": 1e3 * seconds / args.steps,
            "jit_s": jit_s,
        }
        curves[method] = curve

    print(f"\nfine-tuning: {args.steps} SGD steps of {args.batch} images from the pretrained network")
    print("| method | lr | test acc before -> after | train error after | forward passes | "
          "backward passes | nonzero estimates | train s |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for method, r in results.items():
        print(f"| {LABELS[method]} | {r['learning_rate']:g} | {r['test_accuracy_before']:.4f} -> "
              f"{r['test_accuracy_after']:.4f} | {r['train_error_after']:.4f} | {r['forward_passes']} | "
              f"{r['backward_passes']} | {100 * r['nonzero_estimate_fraction']:.1f}% | {r['train_s']:.2f} |")

    fig_path = args.out / "mezo_mlp_loss.png"
    _plot(curves, fig_path)
    summary = {
        "example": "mezo_mlp",
        "dataset": "sklearn load_digits 8x8, pixels / 16",
        "n_train": len(x_train),
        "n_test": len(x_test),
        "hidden": args.hidden,
        "parameters": int(sum(np.size(leaf) for leaf in jax.tree.leaves(params))),
        "pretraining": {"images": args.pretrain_n, "adam_steps": args.pretrain_steps,
                        "lr": args.pretrain_lr, "final_loss": float(pre_losses[-1]), **start},
        "optimizer": "sgd, cosine decay of the learning rate to 0",
        "steps": args.steps,
        "batch": args.batch,
        "methods": results,
        "curves": curves,
        "compile_s": compile_s,
        "plot": str(fig_path),
    }
    (args.out / "mezo_mlp.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {fig_path} and {args.out / 'mezo_mlp.json'}")
    return summary


def _plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for method, curve in curves.items():
        steps = [c["step"] for c in curve]
        for ax, key in zip(axes, ("test_accuracy", "train_error", "train_loss")):
            ax.plot(steps, [c[key] for c in curve], label=LABELS[method])
    axes[0].set_ylabel("test accuracy")
    axes[1].set_ylabel("training error rate (the extern)")
    axes[2].set_ylabel("training cross-entropy")
    axes[2].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("fine-tuning step")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right")
    axes[0].set_title("MeZO-style fine-tuning of an MLP on digits")
    axes[1].set_title("per step: SPSA 2 forward passes, backprop forward + backward")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
