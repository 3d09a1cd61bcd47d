"""Data reweighting under label noise: learn per-example weights for `examples/reweight.grad` by hypergradient.

    python examples/reweight.py [--steps 200] [--flip 0.4] [--out examples/out]

The data: scikit-learn's 8x8 handwritten digits (1797 images, shipped with scikit-learn) as a
binary task, digits 0-4 (label 0) against 5-9 (label 1); pixels standardized with the training
statistics. Split at random (fixed seed) into a training set whose labels are corrupted (a
fraction `--flip` of them, exactly, chosen at random, is flipped), a small clean validation
set and a test set.

The bilevel problem: the inner problem is L2-regularized logistic regression on the training
set with one weight c_i = 2 sigmoid(l_i) per example (`weighted_logistic_fit` of
`use std.bilevel`, an `argmin` solved by momentum); the outer problem minimizes the clean
validation loss of that fit over the N free parameters l with Adam, using the compiled
hypergradient (implicit differentiation, CG on Hessian-vector products). l = 0 (all weights
1) is the unweighted fit, whose penalty is tuned first by grid search on the validation loss
and then kept. Reports the test accuracy of the unweighted and the reweighted fits, how well
the learned weights separate the clean from the flipped examples (AUC, mean weights, share of
flipped labels among the lowest weights), and, for reference, the fit on the clean validation
examples alone and the oracle fit on the clean training examples only. Writes
`reweight_loss.png` (outer loss and test accuracy, weight histograms, the lowest-weighted
training images) and `reweight.json` to the output folder.
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
from digits import tile
from progress import ProgressBar

HERE = Path(__file__).resolve().parent


def load_data(n_train: int, n_val: int, flip: float, seed: int):
    """Digits 0-4 (0) vs 5-9 (1). Returns the splits (x float32 standardized with the training
    statistics, labels t float32 in {0, 1}), the flipped mask of the training set, the clean
    training labels and the training images (gray levels / 16, for plots)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - the examples extra installs it
        raise SystemExit("this example needs scikit-learn for its data set: "
                         "pip install -e '.[examples]' (or pip install scikit-learn)") from e
    digits = load_digits()
    images = digits.images.reshape(len(digits.images), -1) / 16.0
    labels = (digits.target >= 5).astype(np.float32)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(images))
    if n_train + n_val >= len(perm):
        raise SystemExit(f"--n-train + --n-val must leave test images (there are {len(perm)})")
    tr, va, te = perm[:n_train], perm[n_train:n_train + n_val], perm[n_train + n_val:]
    mu, sd = images[tr].mean(0), images[tr].std(0)
    x = ((images - mu) / (sd + 0.1)).astype(np.float32)
    flipped = np.zeros(n_train, bool)
    flipped[rng.permutation(n_train)[:int(round(flip * n_train))]] = True
    t_clean = labels[tr]
    t_noisy = np.where(flipped, 1.0 - t_clean, t_clean).astype(np.float32)
    splits = (x[tr], t_noisy), (x[va], labels[va]), (x[te], labels[te])
    return splits, flipped, t_clean, images[tr]


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for the `positive` examples (Mann-Whitney: the
    probability that a positive scores above a negative, ties counting one half)."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    s = scores[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="outer Adam steps (default 200)")
    ap.add_argument("--out", type=Path, default=HERE / "out", help="output folder (default examples/out)")
    ap.add_argument("--lr", type=float, default=0.3, help="outer Adam learning rate on the weight logits")
    ap.add_argument("--flip", type=float, default=0.4, help="fraction of training labels flipped (default 0.4)")
    ap.add_argument("--n-train", type=int, default=1000, help="training examples (noisy labels)")
    ap.add_argument("--n-val", type=int, default=100, help="clean validation examples")
    ap.add_argument("--eval-every", type=int, default=10, help="outer steps between test evaluations")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    (tr, va, te), flipped, t_clean, images = load_data(args.n_train, args.n_val, args.flip, args.seed)
    (x, t), (xv, tv), (xt, tt) = [tuple(jnp.asarray(a) for a in s) for s in (tr, va, te)]
    n = len(tr[0])
    print(f"digits 0-4 vs 5-9: {n} train ({int(flipped.sum())} labels flipped) / "
          f"{len(va[0])} clean validation / {len(te[0])} test images")

    t0 = time.perf_counter()
    m = gradlang.compile_file(HERE / "reweight.grad", strict=True)
    compile_s = time.perf_counter() - t0
    print(f"compiled reweight.grad in {compile_s * 1e3:.1f} ms; exports: {', '.join(m.exports)}")

    # The penalty: grid search of the unweighted fit's validation loss, then kept fixed.
    grid = np.arange(-6.0, 2.01, 0.5).astype(np.float32)
    grid_val = np.asarray(jax.jit(jax.vmap(m.val_loss_unweighted, in_axes=(0, None, None, None, None)))(
        jnp.asarray(grid), x, t, xv, tv), np.float64)
    log_lam = jnp.float32(grid[int(np.argmin(grid_val))])
    print(f"penalty (grid search on the validation loss of the unweighted fit): "
          f"lam = {float(jnp.exp(log_lam)):.4g}")

    def scores(p, on_val: bool = True) -> dict:
        out = {"test_accuracy": float(m.accuracy(p, xt, tt)), "test_loss": float(m.loss(p, xt, tt))}
        if on_val:
            out |= {"val_accuracy": float(m.accuracy(p, xv, tv)), "val_loss": float(m.loss(p, xv, tv))}
        return out

    l = jnp.zeros(n, jnp.float32)
    unweighted = scores(m.fit(l, log_lam, x, t))
    # References (same penalty): the clean validation examples alone; the clean training
    # examples only (an oracle that knows which labels were flipped).
    val_only = scores(m.fit(jnp.zeros(len(va[0])), log_lam, xv, tv), on_val=False)
    keep = ~flipped
    oracle = scores(m.fit(jnp.zeros(int(keep.sum())), log_lam, x[keep], t[keep]))

    opt = optax.adam(args.lr)
    state = opt.init(l)

    @jax.jit
    def update(l, state):
        loss, grads = m.hypergrad(l, log_lam, x, t, xv, tv)
        updates, state = opt.update(grads["l"], state, l)
        return optax.apply_updates(l, updates), state, loss

    test_accuracy = jax.jit(lambda l: m.accuracy(m.fit(l, log_lam, x, t), xt, tt))
    losses, evals = [], [(0, unweighted["test_accuracy"])]
    bar = ProgressBar(args.steps, label="reweight ")
    t0 = time.perf_counter()
    for i in range(args.steps):
        l, state, loss = update(l, state)
        losses.append(loss)
        if (i + 1) % args.eval_every == 0 or i + 1 == args.steps:
            evals.append((i + 1, float(test_accuracy(l))))
            bar.update(i + 1, f"val loss {float(loss):.4f} test acc {evals[-1][1]:.3f}")
    train_s = time.perf_counter() - t0
    bar.close()
    losses = np.asarray(jax.device_get(losses), np.float64)

    reweighted = scores(m.fit(l, log_lam, x, t))
    c = np.asarray(m.weights(l), np.float64)
    k = int(flipped.sum())
    lowest = np.argsort(c)[:k]
    separation = {
        "auc_clean_vs_flipped": auc(c, ~flipped),
        "mean_weight_clean": float(c[~flipped].mean()),
        "mean_weight_flipped": float(c[flipped].mean()),
        "flipped_share_of_lowest_weights": float(flipped[lowest].mean()),
        "weights_below_0.5_clean": float((c[~flipped] < 0.5).mean()),
        "weights_below_0.5_flipped": float((c[flipped] < 0.5).mean()),
    }
    print(f"after {args.steps} outer steps ({train_s:.2f} s): validation loss "
          f"{unweighted['val_loss']:.4f} -> {reweighted['val_loss']:.4f}")
    print(f"test accuracy: unweighted {unweighted['test_accuracy']:.4f}, reweighted "
          f"{reweighted['test_accuracy']:.4f} (references: clean validation set alone "
          f"{val_only['test_accuracy']:.4f}, oracle on the clean training examples "
          f"{oracle['test_accuracy']:.4f})")
    print(f"learned weights: mean {separation['mean_weight_clean']:.3f} on clean examples, "
          f"{separation['mean_weight_flipped']:.3f} on flipped ones; AUC clean vs flipped "
          f"{separation['auc_clean_vs_flipped']:.4f}; the {k} lowest weights are "
          f"{100 * separation['flipped_share_of_lowest_weights']:.1f}% flipped labels")

    fig_path = args.out / "reweight_loss.png"
    _plot(losses, evals, unweighted, val_only, oracle, c, flipped, images, tr[1], fig_path, args)
    summary = {
        "example": "reweight",
        "dataset": "sklearn load_digits 8x8, digits 0-4 (label 0) vs 5-9 (label 1)",
        "n_train": n,
        "n_val": len(va[0]),
        "n_test": len(te[0]),
        "flip_fraction": args.flip,
        "n_flipped": k,
        "log_lam": float(log_lam),
        "weights": "2 * sigmoid(l), l = 0 at the start (the unweighted fit)",
        "optimizer": "adam",
        "learning_rate": args.lr,
        "steps": args.steps,
        "inner_problem": "std.bilevel weighted_logistic_fit: momentum(steps=500) on the "
                         "preconditioned objective, hypergradient implicit(cg, iters=30)",
        "unweighted": unweighted,
        "reweighted": reweighted,
        "validation_only": val_only,
        "oracle_clean_only": oracle,
        "test_accuracy_unweighted": unweighted["test_accuracy"],
        "test_accuracy_reweighted": reweighted["test_accuracy"],
        "separation": separation,
        "compile_s": compile_s,
        "train_s": train_s,
        "plot": str(fig_path),
    }
    (args.out / "reweight.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {fig_path} and {args.out / 'reweight.json'}")
    return summary


def _plot(losses, evals, unweighted, val_only, oracle, c, flipped, images, t_noisy, path: Path,
          args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(16, 4.8))
    gs = fig.add_gridspec(1, 3, width_ratios=[1.25, 1.0, 0.8])
    ax1 = fig.add_subplot(gs[0, 0])
    steps = np.arange(1, len(losses) + 1)
    ax1.plot(steps, losses, lw=1.5, color="tab:blue", label="validation loss (outer)")
    ax1.set_xlabel("outer step")
    ax1.set_ylabel("validation logistic loss", color="tab:blue")
    ax1.set_title(f"outer loss, {100 * args.flip:.0f}% of the training labels flipped")
    ax1b = ax1.twinx()
    ev = np.asarray(evals)
    ax1b.plot(ev[:, 0], ev[:, 1], "o-", ms=2.5, lw=1, color="tab:orange", label="test accuracy")
    ax1b.axhline(unweighted["test_accuracy"], color="tab:red", ls="--", lw=1, label="unweighted fit")
    ax1b.axhline(val_only["test_accuracy"], color="tab:green", ls="-.", lw=1,
                 label="clean validation set alone")
    ax1b.axhline(oracle["test_accuracy"], color="k", ls=":", lw=1, label="oracle (clean examples only)")
    ax1b.set_ylabel("test accuracy", color="tab:orange")
    lines = ax1.get_legend_handles_labels()[0] + ax1b.get_legend_handles_labels()[0]
    ax1b.legend(lines, [h.get_label() for h in lines], fontsize=8, loc="center right")

    ax2 = fig.add_subplot(gs[0, 1])
    bins = np.linspace(0, 2, 41)
    ax2.hist(c[~flipped], bins=bins, alpha=0.6, color="tab:green", label=f"clean ({int((~flipped).sum())})")
    ax2.hist(c[flipped], bins=bins, alpha=0.6, color="tab:red", label=f"flipped ({int(flipped.sum())})")
    ax2.set_xlabel("learned weight 2 sigmoid(l)")
    ax2.set_ylabel("training examples")
    ax2.set_title("learned per-example weights")
    ax2.legend()

    # The 30 lowest-weighted training images, with their given (noisy) label in the corner;
    # a red frame: that label was flipped.
    ax3 = fig.add_subplot(gs[0, 2])
    low, cols = np.argsort(c)[:30], 6
    cmap = plt.get_cmap("gray_r").with_extremes(bad="#cfe0f0")
    ax3.imshow(tile(images[low], cols), cmap=cmap, vmin=0, vmax=1)
    for n, i in enumerate(low):
        r, col = divmod(n, cols)
        if flipped[i]:
            ax3.add_patch(plt.Rectangle((col * 9 - 0.5, r * 9 - 0.5), 8, 8, fill=False,
                                        ec="tab:red", lw=1.5))
        ax3.text(col * 9 - 0.2, r * 9 - 0.2, f"{int(t_noisy[i])}", fontsize=7, ha="left",
                 va="top", color="tab:blue", fontweight="bold")
    ax3.set_axis_off()
    ax3.set_title("30 lowest weights: given label (0: digit 0-4,\n1: digit 5-9); red frame: flipped",
                  fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
