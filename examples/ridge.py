"""Ridge regression with gradlang: train `examples/ridge.grad` with optax, compare with the closed form.

    python examples/ridge.py [--steps 500] [--out examples/out] [--optimizer sgd|adam]

Generates a synthetic linear-regression problem with a known true weight vector (NumPy, fixed
seed), compiles ridge.grad, minimises the ridge objective with optax, and compares the learned
weights with the closed-form ridge solution (computed in float64 with NumPy, and also by the
`solve_ridge` export). Writes `ridge_loss.png` and `ridge.json` to the output folder.
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


def make_data(n: int, d: int, noise: float, seed: int):
    """Correlated Gaussian features, a known true w, and noisy targets y = x @ w_true + eps."""
    rng = np.random.default_rng(seed)
    # Features with a spread of scales and correlations, so the problem is not trivially
    # conditioned: x = z @ M with M random.
    m = rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d)
    x = rng.normal(size=(n, d)) @ m
    w_true = rng.normal(size=d)
    y = x @ w_true + noise * rng.normal(size=n)
    return x.astype(np.float32), y.astype(np.float32), w_true


def ridge_closed_form(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    """argmin_w 1/(2N)||x w - y||^2 + lam/2 ||w||^2, in float64."""
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    n, d = x64.shape
    return np.linalg.solve(x64.T @ x64 / n + lam * np.eye(d), x64.T @ y64 / n)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=500, help="optimisation steps (default 500)")
    ap.add_argument("--out", type=Path, default=HERE / "out", help="output folder (default examples/out)")
    ap.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd",
                    help="sgd (with momentum 0.9, default) or adam")
    ap.add_argument("--lr", type=float, default=None, help="learning rate (default 0.05 adam, 0.5 sgd)")
    ap.add_argument("--n", type=int, default=2000, help="number of samples")
    ap.add_argument("--d", type=int, default=32, help="number of features")
    ap.add_argument("--lam", type=float, default=0.01, help="ridge penalty (default 0.01)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    x, y, w_true = make_data(args.n, args.d, noise=0.5, seed=args.seed)
    lam = np.float32(args.lam)

    t0 = time.perf_counter()
    m = gradlang.compile_file(HERE / "ridge.grad")
    compile_s = time.perf_counter() - t0
    print(f"compiled ridge.grad in {compile_s * 1e3:.1f} ms; exports: {', '.join(m.exports)}")

    lr = args.lr if args.lr is not None else (0.05 if args.optimizer == "adam" else 0.5)
    # Decay the step size so that the iterates settle on the minimiser instead of hovering.
    schedule = optax.cosine_decay_schedule(lr, args.steps, alpha=0.01)
    opt = optax.adam(schedule) if args.optimizer == "adam" else optax.sgd(schedule, momentum=0.9)

    @jax.jit
    def update(w, state, x, y, lam):
        loss, grads = m.step(w, x, y, lam)
        updates, state = opt.update(grads["w"], state, w)
        return optax.apply_updates(w, updates), state, loss

    w = jnp.zeros(args.d, jnp.float32)
    state = opt.init(w)
    xs, ys = jnp.asarray(x), jnp.asarray(y)
    losses, iterates = [], []
    bar = ProgressBar(args.steps, label="ridge ")
    t0 = time.perf_counter()
    for i in range(args.steps):
        w, state, loss = update(w, state, xs, ys, lam)
        losses.append(loss)
        iterates.append(w)
        if (i + 1) % 10 == 0 or i + 1 == args.steps:
            bar.update(i + 1, f"loss {float(loss):.6f}")
    final_loss = float(m.objective(w, xs, ys, lam))  # the objective at the final iterate
    train_s = time.perf_counter() - t0
    bar.close()
    losses = np.asarray(jax.device_get(losses), np.float64)
    iterates = np.asarray(jax.device_get(iterates), np.float64)

    # Compare with the closed-form ridge solution (float64 NumPy and the gradlang export).
    w_star = ridge_closed_form(x, y, args.lam)
    w_star_grad = np.asarray(m.solve_ridge(xs, ys, lam), np.float64)
    w_learned = np.asarray(w, np.float64)
    loss_star = float(m.objective(w_star.astype(np.float32), xs, ys, lam))
    err = float(np.linalg.norm(w_learned - w_star))
    rel_err = err / float(np.linalg.norm(w_star))
    solve_rel_err = float(np.linalg.norm(w_star_grad - w_star) / np.linalg.norm(w_star))
    true_rel_err = float(np.linalg.norm(w_learned - w_true) / np.linalg.norm(w_true))

    print(f"final loss {final_loss:.6f} (closed-form optimum {loss_star:.6f}) after {args.steps} "
          f"{args.optimizer} steps in {train_s:.2f} s")
    print(f"||w - w*|| = {err:.3e}, relative error vs closed-form ridge solution: {rel_err:.3e}")
    print(f"relative error of the gradlang solve_ridge export vs NumPy float64: {solve_rel_err:.3e}")
    print(f"relative distance to the true (data-generating) w: {true_rel_err:.3e}")

    fig_path = args.out / "ridge_loss.png"
    curve = np.linalg.norm(iterates - w_star, axis=1) / np.linalg.norm(w_star)
    _plot(losses, curve, loss_star, fig_path, args)
    summary = {
        "example": "ridge",
        "optimizer": args.optimizer,
        "learning_rate": lr,
        "steps": args.steps,
        "n": args.n,
        "d": args.d,
        "lam": args.lam,
        "final_loss": final_loss,
        "closed_form_loss": loss_star,
        "closed_form_error": err,
        "closed_form_relative_error": rel_err,
        "solve_ridge_export_relative_error": solve_rel_err,
        "true_w_relative_error": true_rel_err,
        "compile_s": compile_s,
        "train_s": train_s,
        "plot": str(fig_path),
    }
    (args.out / "ridge.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {fig_path} and {args.out / 'ridge.json'}")
    return summary


def _plot(losses: np.ndarray, rel_err: np.ndarray, loss_star: float, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    steps = np.arange(1, len(losses) + 1)
    ax1.plot(steps, losses, lw=1.5)
    ax1.axhline(loss_star, color="k", ls="--", lw=1, label=f"closed-form optimum {loss_star:.4f}")
    ax1.set_yscale("log")
    ax1.set_xlabel("step")
    ax1.set_ylabel("ridge objective")
    ax1.set_title(f"ridge regression ({args.optimizer}, N={args.n}, D={args.d}, lam={args.lam})")
    ax1.legend()
    ax2.plot(steps, rel_err, lw=1.5, color="tab:orange")
    ax2.set_yscale("log")
    ax2.set_xlabel("step")
    ax2.set_ylabel("||w - w*|| / ||w*||")
    ax2.set_title("distance to the closed-form ridge solution w*")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
