"""A 2-layer MLP classifier with gradlang: train `examples/mlp.grad` on noisy spirals with optax.

    python examples/mlp.py [--steps 4000] [--out examples/out] [--artifact build/mlp.gx]

Generates a three-arm spiral dataset (NumPy, fixed seed) with a train/test split, compiles
mlp.grad (or, with `--artifact`, loads the artifact that `gradlang compile examples/mlp.grad -o
build --emit artifact` wrote, without the compiler), trains the `step` export (value_and_grad of the loss wrt the params struct) with
minibatch Adam, evaluates test accuracy with the `evaluate` export, then saves the compiled
module as an artifact, reloads it with `gradlang.load` and evaluates the test accuracy again
from the artifact alone (not with `--artifact`: the module already is one). Writes `mlp_loss.png`, `mlp.json` and `mlp.gx` to the output folder.
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
from progress import ProgressBar

HERE = Path(__file__).resolve().parent


def make_spirals(n_per_class: int, n_classes: int, noise: float, seed: int, turns: float = 1.5):
    """`n_classes` interleaved spiral arms in 2-D, each winding `turns` times around the centre,
    with Gaussian noise; labels are the arm index."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c in range(n_classes):
        r = np.sqrt(rng.uniform(0.0, 1.0, n_per_class))  # denser near the centre than uniform
        theta = 2 * np.pi * turns * r + 2 * np.pi * c / n_classes
        pts = np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1)
        xs.append(pts + noise * rng.normal(size=pts.shape))
        ys.append(np.full(n_per_class, c))
    x = np.concatenate(xs).astype(np.float32)
    y = np.concatenate(ys).astype(np.int32)
    perm = rng.permutation(len(x))
    return x[perm], y[perm]


def init_params(d: int, h: int, c: int, seed: int) -> dict:
    """He-initialised hidden layer, Glorot output layer; zero biases (a dict per struct)."""
    rng = np.random.default_rng(seed)
    return {
        "l1": {"w": (rng.normal(size=(d, h)) * np.sqrt(2.0 / d)).astype(np.float32),
               "b": np.zeros(h, np.float32)},
        "l2": {"w": (rng.normal(size=(h, c)) * np.sqrt(2.0 / (h + c))).astype(np.float32),
               "b": np.zeros(c, np.float32)},
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4000, help="optimisation steps (default 4000)")
    ap.add_argument("--out", type=Path, default=HERE / "out", help="output folder (default examples/out)")
    ap.add_argument("--hidden", type=int, default=256, help="hidden units")
    ap.add_argument("--batch", type=int, default=128, help="minibatch size")
    ap.add_argument("--lr", type=float, default=3e-2, help="peak Adam learning rate")
    ap.add_argument("--wd", type=float, default=1e-4, help="L2 weight decay (in the loss)")
    ap.add_argument("--eval-every", type=int, default=100, help="steps between test evaluations")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--artifact", type=Path, default=None,
                    help="train from this artifact (build/mlp.gx) instead of compiling mlp.grad")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    n_classes = 3
    x, y = make_spirals(600, n_classes, noise=0.06, seed=args.seed)
    n_train = int(0.8 * len(x))
    x_train, y_train, x_test, y_test = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    print(f"spirals: {len(x_train)} train / {len(x_test)} test points, {n_classes} classes")

    t0 = time.perf_counter()
    if args.artifact is None:
        m = gradlang.compile_file(HERE / "mlp.grad")
    else:
        m = gradlang.load(args.artifact)  # no parser, no passes: the exports as compiled
    compile_s = time.perf_counter() - t0
    what = "compiled mlp.grad" if args.artifact is None else f"loaded {args.artifact}"
    print(f"{what} in {compile_s * 1e3:.1f} ms; exports: {', '.join(m.exports)}")

    params = jax.tree.map(jnp.asarray, init_params(2, args.hidden, n_classes, args.seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(100, args.steps // 10),
                                                  args.steps, end_value=args.lr * 0.01)
    opt = optax.adam(schedule)
    state = opt.init(params)
    wd = np.float32(args.wd)
    xtr, ytr = jnp.asarray(x_train), jnp.asarray(y_train)
    xte, yte = jnp.asarray(x_test), jnp.asarray(y_test)

    @jax.jit
    def update(params, state, idx):
        loss, grads = m.step(params, xtr[idx], ytr[idx], wd)
        updates, state = opt.update(grads["p"], state, params)
        return optax.apply_updates(params, updates), state, loss

    evaluate = jax.jit(m.evaluate)
    full_loss = jax.jit(lambda p: m.step(p, xtr, ytr, wd)[0])

    rng = np.random.default_rng(args.seed + 1)
    batches_per_epoch = len(x_train) // args.batch
    order = np.empty(0, np.int32)
    losses, evals = [], []
    bar = ProgressBar(args.steps, label="mlp ")
    t0 = time.perf_counter()
    for i in range(args.steps):
        if i % batches_per_epoch == 0:  # a fresh shuffle every epoch
            order = rng.permutation(len(x_train)).astype(np.int32)
        j = i % batches_per_epoch
        params, state, loss = update(params, state, order[j * args.batch:(j + 1) * args.batch])
        losses.append(loss)
        if (i + 1) % args.eval_every == 0 or i + 1 == args.steps:
            test_acc = float(evaluate(params, xte, yte))
            evals.append((i + 1, float(full_loss(params)), test_acc))
            bar.update(i + 1, f"loss {float(loss):.4f} test acc {test_acc:.3f}")
    train_s = time.perf_counter() - t0
    bar.close()
    losses = np.asarray(jax.device_get(losses), np.float64)

    final_train_loss = float(full_loss(params))
    train_acc = float(evaluate(params, xtr, ytr))
    test_acc = float(evaluate(params, xte, yte))
    print(f"after {args.steps} steps ({train_s:.2f} s): train loss {final_train_loss:.4f}, "
          f"train acc {train_acc:.4f}, test acc {test_acc:.4f}")

    # Save the compiled module as a portable artifact, reload it without the compiler front
    # end, and evaluate the test set from the artifact.
    artifact, artifact_acc, logits_gap = args.artifact, test_acc, 0.0
    if args.artifact is None:
        artifact = m.save(args.out / "mlp.gx")
        loaded = gradlang.load(artifact)
        artifact_acc = float(loaded.evaluate(params, xte, yte))
        logits_gap = float(jnp.max(jnp.abs(loaded.logits(params, xte) - m.logits(params, xte))))
        print(f"saved {artifact} ({artifact.stat().st_size} bytes); reloaded exports: "
              f"{', '.join(loaded.exports)}")
        print(f"test acc from the reloaded artifact: {artifact_acc:.4f} "
              f"(max |logits difference| vs compiled: {logits_gap:.2e})")
        if artifact_acc != test_acc:
            raise SystemExit(f"artifact accuracy {artifact_acc} != compiled accuracy {test_acc}")

    fig_path = args.out / "mlp_loss.png"
    _plot(losses, evals, m, params, x_train, y_train, x_test, y_test, fig_path, args)
    summary = {
        "example": "mlp",
        "optimizer": "adam",
        "learning_rate": args.lr,
        "weight_decay": args.wd,
        "steps": args.steps,
        "batch": args.batch,
        "hidden": args.hidden,
        "n_train": len(x_train),
        "n_test": len(x_test),
        "final_train_loss": final_train_loss,
        "final_minibatch_loss": float(losses[-1]),
        "train_accuracy": train_acc,
        "test_accuracy": test_acc,
        "artifact_test_accuracy": artifact_acc,
        "artifact_logits_max_abs_diff": logits_gap,
        "artifact": str(artifact),
        "compile_s": compile_s,
        "train_s": train_s,
        "plot": str(fig_path),
    }
    (args.out / "mlp.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {fig_path} and {args.out / 'mlp.json'}")
    return summary


def _plot(losses, evals, m, params, x_train, y_train, x_test, y_test, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.5))
    steps = np.arange(1, len(losses) + 1)
    ax1.plot(steps, losses, lw=0.6, alpha=0.35, label="minibatch loss")
    k = max(1, len(losses) // 60)
    smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
    ax1.plot(steps[k - 1:], smooth, lw=1.5, label=f"minibatch loss ({k}-step mean)")
    ev = np.asarray(evals)
    ax1.plot(ev[:, 0], ev[:, 1], "o-", ms=3, lw=1, label="full train loss")
    ax1.set_yscale("log")
    ax1.set_xlabel("step")
    ax1.set_ylabel("cross-entropy + weight decay")
    ax1.set_title("training loss")
    ax1.legend()

    ax2.plot(ev[:, 0], ev[:, 2], "o-", ms=3, color="tab:green")
    ax2.set_ylim(min(0.3, ev[:, 2].min()), 1.0)
    ax2.set_xlabel("step")
    ax2.set_ylabel("test accuracy")
    ax2.set_title(f"test accuracy (final {ev[-1, 2]:.3f})")
    ax2.grid(alpha=0.3)

    # Decision regions from the `logits` export on a grid.
    g = np.linspace(-1.3, 1.3, 200, dtype=np.float32)
    gx, gy = np.meshgrid(g, g)
    grid = np.stack([gx.ravel(), gy.ravel()], axis=1)
    pred = np.asarray(jnp.argmax(m.logits(params, grid), axis=1)).reshape(gx.shape)
    from matplotlib.colors import ListedColormap

    n_classes = int(y_train.max()) + 1
    dark = ["tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange"][:n_classes]
    light = ["#f7c6c6", "#c6daf7", "#c9efc6", "#e0cdf0", "#fde0c0"][:n_classes]
    levels = np.arange(n_classes + 1) - 0.5
    ax3.contourf(gx, gy, pred, levels=levels, cmap=ListedColormap(light))
    ax3.scatter(x_train[:, 0], x_train[:, 1], c=y_train, cmap=ListedColormap(dark), s=4,
                vmin=-0.5, vmax=n_classes - 0.5)
    ax3.scatter(x_test[:, 0], x_test[:, 1], c=y_test, cmap=ListedColormap(dark), s=18,
                marker="x", linewidths=0.8, vmin=-0.5, vmax=n_classes - 0.5)
    ax3.set_aspect("equal")
    ax3.set_title("decision regions (dots: train, x: test)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
