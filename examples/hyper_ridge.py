"""Per-feature ridge penalties by hypergradient: train `examples/hyper_ridge.grad`'s penalties on the validation loss.

    python examples/hyper_ridge.py [--steps 300] [--out examples/out]

The data: a synthetic linear regression (NumPy, fixed seed) with D features of which only a
few are informative (the rest have true weight 0), correlated Gaussian features, noisy targets,
split into a small training set, a validation set and a large test set (features standardized
and targets centered with the training statistics; the ridge fit has no intercept).

The bilevel problem: the inner problem fits ridge regression with one penalty exp(log_lam[j])
per feature (`ridge_fit` of `use std.bilevel`, an `argmin` solved by momentum); the outer
problem minimizes the validation MSE of that fit over the D log-penalties with Adam, using the
compiled hypergradient (implicit differentiation, CG on Hessian-vector products). The baseline:
one shared penalty picked by grid search on the same validation loss. Both are then scored on
the test set, next to an oracle (least squares on the informative features only). A check
compares the compiled hypergradient with the closed form (jax.grad through the ridge solution
of the normal equations). Writes `hyper_ridge_loss.png` (penalties learned per feature, the
outer loss curve) and `hyper_ridge.json` to the output folder.
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


def make_data(n_train: int, n_val: int, n_test: int, d: int, informative: int, noise: float,
              rho: float, seed: int):
    """Correlated Gaussian features (corr rho^|i-j|), `informative` nonzero true weights at
    random positions, y = x @ w_true + noise * eps. Returns the three splits (standardized and
    centered with the training statistics), w_true and the informative mask."""
    rng = np.random.default_rng(seed)
    n = n_train + n_val + n_test
    cov = rho ** np.abs(np.subtract.outer(np.arange(d), np.arange(d)))
    x = rng.normal(size=(n, d)) @ np.linalg.cholesky(cov).T
    mask = np.zeros(d, bool)
    mask[rng.choice(d, informative, replace=False)] = True
    w_true = np.where(mask, rng.choice([-1.0, 1.0], d) * rng.uniform(0.5, 2.0, d), 0.0)
    y = x @ w_true + noise * rng.normal(size=n)
    mu, sd, ym = x[:n_train].mean(0), x[:n_train].std(0), y[:n_train].mean()
    x, y = ((x - mu) / sd).astype(np.float32), (y - ym).astype(np.float32)
    cut = np.cumsum([n_train, n_val])
    splits = [(x[a:b], y[a:b]) for a, b in zip([0, *cut], [*cut, n])]
    return splits, w_true, mask


def closed_form_val_loss(log_lam, x, y, xv, yv):
    """The validation MSE at the exact ridge solution, in plain JAX (for the hypergradient
    check: jax.grad differentiates through jnp.linalg.solve)."""
    n, d = x.shape
    w = jnp.linalg.solve(x.T @ x / n + jnp.diag(jnp.exp(log_lam)), x.T @ y / n)
    return jnp.mean((xv @ w - yv) ** 2)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="outer Adam steps (default 300)")
    ap.add_argument("--out", type=Path, default=HERE / "out", help="output folder (default examples/out)")
    ap.add_argument("--lr", type=float, default=0.1, help="outer Adam learning rate on the log-penalties")
    ap.add_argument("--d", type=int, default=50, help="number of features")
    ap.add_argument("--informative", type=int, default=8, help="features with a nonzero true weight")
    ap.add_argument("--n-train", type=int, default=80, help="training examples")
    ap.add_argument("--n-val", type=int, default=80, help="validation examples")
    ap.add_argument("--n-test", type=int, default=5000, help="test examples")
    ap.add_argument("--noise", type=float, default=1.0, help="noise standard deviation")
    ap.add_argument("--rho", type=float, default=0.5, help="feature correlation rho^|i-j|")
    ap.add_argument("--init", type=float, default=0.0, help="initial log-penalty of every feature")
    ap.add_argument("--grid", type=int, default=41, help="points of the shared-penalty grid on log_lam in [-6, 4]")
    ap.add_argument("--eval-every", type=int, default=10, help="outer steps between test evaluations")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    (tr, va, te), w_true, mask = make_data(args.n_train, args.n_val, args.n_test, args.d,
                                           args.informative, args.noise, args.rho, args.seed)
    (x, y), (xv, yv), (xt, yt) = [tuple(jnp.asarray(a) for a in s) for s in (tr, va, te)]
    print(f"synthetic regression: {args.d} features ({args.informative} informative), "
          f"{args.n_train} train / {args.n_val} validation / {args.n_test} test, noise {args.noise}")

    t0 = time.perf_counter()
    m = gradlang.compile_file(HERE / "hyper_ridge.grad", strict=True)
    compile_s = time.perf_counter() - t0
    print(f"compiled hyper_ridge.grad in {compile_s * 1e3:.1f} ms; exports: {', '.join(m.exports)}")

    # Baseline: one shared penalty, grid search on the validation loss (all grid points at once).
    grid = np.linspace(-6.0, 4.0, args.grid).astype(np.float32)
    grid_val = np.asarray(jax.jit(jax.vmap(m.val_loss_shared, in_axes=(0, None, None, None, None)))(
        jnp.asarray(grid), x, y, xv, yv), np.float64)
    best = int(np.argmin(grid_val))
    shared_ll = float(grid[best])
    w_shared = m.fit(jnp.full(args.d, shared_ll, jnp.float32), x, y)
    shared = {"log_lam": shared_ll, "lam": float(np.exp(shared_ll)),
              "val_mse": float(grid_val[best]), "test_mse": float(m.mse(w_shared, xt, yt))}
    print(f"shared penalty (grid of {args.grid}): lam = {shared['lam']:.4g}, "
          f"val MSE {shared['val_mse']:.4f}, test MSE {shared['test_mse']:.4f}")

    # Check the compiled hypergradient against the closed form at the starting point.
    log_lam = jnp.full(args.d, args.init, jnp.float32)
    _, g = m.hypergrad(log_lam, x, y, xv, yv)
    g_ref = jax.grad(closed_form_val_loss)(log_lam, x, y, xv, yv)
    check = float(jnp.linalg.norm(g["log_lam"] - g_ref) / jnp.linalg.norm(g_ref))
    print(f"hypergradient vs closed form (jax.grad through linalg.solve): relative error {check:.2e}")

    opt = optax.adam(args.lr)
    state = opt.init(log_lam)

    @jax.jit
    def update(log_lam, state):
        loss, grads = m.hypergrad(log_lam, x, y, xv, yv)
        updates, state = opt.update(grads["log_lam"], state, log_lam)
        return optax.apply_updates(log_lam, updates), state, loss

    test_mse = jax.jit(lambda ll: m.mse(m.fit(ll, x, y), xt, yt))
    init = {"val_mse": float(m.val_loss(log_lam, x, y, xv, yv)), "test_mse": float(test_mse(log_lam))}
    losses, evals = [], [(0, init["test_mse"])]
    bar = ProgressBar(args.steps, label="hyper_ridge ")
    t0 = time.perf_counter()
    for i in range(args.steps):
        log_lam, state, loss = update(log_lam, state)
        losses.append(loss)
        if (i + 1) % args.eval_every == 0 or i + 1 == args.steps:
            evals.append((i + 1, float(test_mse(log_lam))))
            bar.update(i + 1, f"val MSE {float(loss):.4f} test MSE {evals[-1][1]:.4f}")
    train_s = time.perf_counter() - t0
    bar.close()
    losses = np.asarray(jax.device_get(losses), np.float64)

    w = m.fit(log_lam, x, y)
    w_exact = m.fit_exact(log_lam, x, y)
    learned = {"val_mse": float(m.val_loss(log_lam, x, y, xv, yv)), "test_mse": float(m.mse(w, xt, yt)),
               "test_mse_closed_form_fit": float(m.mse(w_exact, xt, yt)),
               "solver_relative_error": float(jnp.linalg.norm(w - w_exact) / jnp.linalg.norm(w_exact))}
    ll = np.asarray(log_lam, np.float64)
    # Oracle: least squares on the informative features only (knows the support).
    xs, xts = np.asarray(x)[:, mask], np.asarray(xt)[:, mask]
    w_or = np.linalg.lstsq(xs, np.asarray(y), rcond=None)[0]
    oracle_mse = float(np.mean((xts @ w_or - np.asarray(yt)) ** 2))

    print(f"per-feature penalties after {args.steps} steps ({train_s:.2f} s): "
          f"val MSE {init['val_mse']:.4f} -> {learned['val_mse']:.4f}, "
          f"test MSE {init['test_mse']:.4f} -> {learned['test_mse']:.4f}")
    print(f"test MSE: shared penalty {shared['test_mse']:.4f}, per-feature {learned['test_mse']:.4f}, "
          f"oracle (least squares on the {args.informative} informative features) {oracle_mse:.4f}, "
          f"noise floor {args.noise ** 2:.4f}")
    print(f"median learned log-penalty: informative features {np.median(ll[mask]):.2f}, "
          f"noise features {np.median(ll[~mask]):.2f} (shared: {shared_ll:.2f}); inner solver "
          f"vs closed form at the learned penalties: relative error "
          f"{learned['solver_relative_error']:.1e}")

    fig_path = args.out / "hyper_ridge_loss.png"
    _plot(ll, mask, shared_ll, losses, evals, shared, oracle_mse, fig_path, args)
    summary = {
        "example": "hyper_ridge",
        "data": "synthetic linear regression, correlated Gaussian features",
        "d": args.d,
        "informative": args.informative,
        "n_train": args.n_train,
        "n_val": args.n_val,
        "n_test": args.n_test,
        "noise": args.noise,
        "optimizer": "adam",
        "learning_rate": args.lr,
        "steps": args.steps,
        "inner_problem": "std.bilevel ridge_fit: momentum(steps=500) on the curvature-normalized "
                         "objective, hypergradient implicit(cg, iters=30)",
        "hypergradient_relative_error_vs_closed_form": check,
        "shared_penalty": shared,
        "initial": init,
        "per_feature": learned,
        "oracle_test_mse": oracle_mse,
        "learned_log_lam": ll.tolist(),
        "informative_mask": mask.tolist(),
        "median_log_lam_informative": float(np.median(ll[mask])),
        "median_log_lam_noise": float(np.median(ll[~mask])),
        "test_mse_improvement_over_shared": shared["test_mse"] - learned["test_mse"],
        "compile_s": compile_s,
        "train_s": train_s,
        "plot": str(fig_path),
    }
    (args.out / "hyper_ridge.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {fig_path} and {args.out / 'hyper_ridge.json'}")
    return summary


def _plot(ll, mask, shared_ll, losses, evals, shared, oracle_mse, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    idx = np.arange(len(ll))
    ax1.bar(idx[mask], ll[mask], color="tab:green", label="informative feature")
    ax1.bar(idx[~mask], ll[~mask], color="tab:gray", label="noise feature")
    ax1.axhline(shared_ll, color="tab:red", ls="--", lw=1.2, label=f"best shared (grid) {shared_ll:.2f}")
    ax1.axhline(args.init, color="k", ls=":", lw=1, label=f"initial {args.init:.1f}")
    ax1.set_xlabel("feature")
    ax1.set_ylabel("learned log penalty  log lam_j")
    ax1.set_title("per-feature ridge penalties learned by hypergradient")
    ax1.legend(fontsize=8)

    steps = np.arange(1, len(losses) + 1)
    ax2.plot(steps, losses, lw=1.5, label="validation MSE (outer loss)")
    ev = np.asarray(evals)
    ax2.plot(ev[:, 0], ev[:, 1], "o-", ms=2.5, lw=1, label="test MSE")
    ax2.axhline(shared["val_mse"], color="tab:blue", ls="--", lw=1, label="shared penalty: validation")
    ax2.axhline(shared["test_mse"], color="tab:orange", ls="--", lw=1, label="shared penalty: test")
    ax2.axhline(oracle_mse, color="k", ls=":", lw=1, label="oracle (true support, least squares)")
    ax2.set_xlabel("outer step")
    ax2.set_ylabel("mean squared error")
    ax2.set_title(f"outer loss (Adam, lr {args.lr}, D={args.d}, N={args.n_train})")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
