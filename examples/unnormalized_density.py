"""Fitting an unnormalized 1-D density by maximum likelihood: SCGD vs plug-in vs NCE.

    python examples/unnormalized_density.py [--steps 1500] [--seeds 3] [--out examples/out]

The energy model of `unnormalized_density.grad` (12 learned bumps over a confining well) is
fitted to samples of a two-component Gaussian mixture with Adam by three gradients: the
negative log-likelihood mean(E(x)) + log Z with log Z = log E_q[exp(-E(y)) / q(y)] estimated
by `compose(..., by=scgd(beta=0.05))` (8 importance samples per step, the moving average
threaded through the calls) and by the plug-in `by=plugin` (the log of this step's mean of 8:
biased), and noise-contrastive estimation with the same noise q (one noise draw per data
point, log Z learned). Reported per method (mean +- sd over seeds): the held-out
log-likelihood with log Z computed by quadrature on a grid, the method's own estimate of log Z
against the quadrature, and the time per step. Writes `unnormalized_density_loss.png` (the
held-out log-likelihood during training and the fitted densities) and
`unnormalized_density.json`.
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
MIXTURE = ((0.3, -2.0, 0.5), (0.7, 1.5, 0.8))
"""(weight, mean, sd) of the data distribution's components."""
CENTRES = np.linspace(-5.0, 5.0, 12).astype(np.float32)
GRID = np.linspace(-15.0, 15.0, 6001).astype(np.float32)
METHODS = ("scgd", "plugin", "nce")


def sample_mixture(rng: np.random.Generator, n: int) -> np.ndarray:
    weights = np.array([w for w, _, _ in MIXTURE])
    k = rng.choice(len(MIXTURE), n, p=weights)
    means = np.array([m for _, m, _ in MIXTURE])[k]
    sds = np.array([s for _, _, s in MIXTURE])[k]
    return (means + sds * rng.normal(size=n)).astype(np.float32)


def mixture_log_density(x: np.ndarray) -> np.ndarray:
    parts = [np.log(w) - 0.5 * ((x - m) / s) ** 2 - np.log(s * np.sqrt(2 * np.pi))
             for w, m, s in MIXTURE]
    return np.logaddexp.reduce(np.stack(parts), axis=0)


class Density:
    """Held-out log-likelihood of the energy model, log Z by quadrature on GRID."""

    def __init__(self, m, test: np.ndarray):
        self.energies = jax.jit(m.energies)
        self.test = jnp.asarray(test)
        self.dx = float(GRID[1] - GRID[0])

    def log_z(self, p) -> float:
        e = np.asarray(self.energies(p, CENTRES, GRID), np.float64)
        return float(np.logaddexp.reduce(-e) + np.log(self.dx))

    def log_likelihood(self, p) -> float:
        e = np.asarray(self.energies(p, CENTRES, self.test), np.float64)
        return float(np.mean(-e) - self.log_z(p))


def train(m, method: str, x: np.ndarray, density: Density, args, seed: int) -> dict:
    """Adam on one method's gradient; the held-out log-likelihood every 50 steps."""
    p = {"w": np.zeros(len(CENTRES), np.float32)}
    params = {"p": p, "logz": np.float32(0.0)} if method == "nce" else {"p": p}
    opt = optax.adam(optax.cosine_decay_schedule(args.lr, args.steps, alpha=0.1))

    @jax.jit
    def update(params, opt_state, state, xb, key):
        if method == "scgd":
            loss, grads, state = m.scgd(params["p"], CENTRES, xb, state, key)
            estimate = jnp.log(state[0])
        elif method == "plugin":
            loss, grads = m.plugin(params["p"], CENTRES, xb, key)
            estimate = loss - jnp.mean(m.energies(params["p"], CENTRES, xb))
        else:
            loss, grads = m.nce_step(params["p"], CENTRES, params["logz"], xb, key)
            estimate = params["logz"]
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, state, loss, estimate

    rng = np.random.default_rng(seed)
    opt_state = opt.init(params)
    state = (jnp.float32(0.0), jnp.float32(0.0))
    curve, estimates, seconds = [], [], 0.0
    bar = ProgressBar(args.steps, label=f"{method:7} seed {seed} ")
    for i in range(args.steps):
        xb = x[rng.choice(len(x), args.batch, replace=False)]
        key = jax.random.fold_in(jax.random.key(seed), i)
        t0 = time.perf_counter()
        params, opt_state, state, loss, estimate = jax.block_until_ready(
            update(params, opt_state, state, xb, key))
        seconds += time.perf_counter() - t0 if i else 0.0  # the first call compiles
        estimates.append(float(estimate))
        if i % 50 == 0 or i == args.steps - 1:
            curve.append((i, density.log_likelihood(params["p"])))
            bar.update(i + 1, f"held-out log-lik {curve[-1][1]:.4f}")
    bar.close()
    return {"held_out_log_likelihood": curve[-1][1], "curve": curve,
            "log_z_estimate": float(np.mean(estimates[-50:])),
            "log_z_quadrature": density.log_z(params["p"]),
            "ms_per_step": 1e3 * seconds / max(args.steps - 1, 1),
            "w": np.asarray(params["p"]["w"]).tolist()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--out", type=Path, default=HERE / "out")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    m = gradlang.compile_file(HERE / "unnormalized_density.grad")
    test = sample_mixture(np.random.default_rng(1000), 5000)
    density = Density(m, test)
    ceiling = float(np.mean(mixture_log_density(test.astype(np.float64))))
    runs = {k: [] for k in METHODS}
    for seed in range(args.seeds):
        x = sample_mixture(np.random.default_rng(seed), args.train)
        for method in METHODS:
            runs[method].append(train(m, method, x, density, args, seed))

    def stat(method: str, key: str) -> tuple[float, float]:
        v = np.array([r[key] for r in runs[method]])
        return float(v.mean()), float(v.std())

    methods = {}
    for k in METHODS:
        gap = [r["log_z_estimate"] - r["log_z_quadrature"] for r in runs[k]]
        methods[k] = {"held_out_log_likelihood": stat(k, "held_out_log_likelihood"),
                      "log_z_error": (float(np.mean(gap)), float(np.std(gap))),
                      "ms_per_step": stat(k, "ms_per_step")}
    print(f"\nheld-out log-likelihood of the data distribution itself: {ceiling:.4f}")
    print("| method | held-out log-lik | log Z estimate - quadrature | ms / step |")
    print("|---|---:|---:|---:|")
    for k, r in methods.items():
        (ll, ll_sd), (gap, gap_sd), (ms, _) = (r["held_out_log_likelihood"], r["log_z_error"],
                                               r["ms_per_step"])
        print(f"| {k} | {ll:.4f} +- {ll_sd:.4f} | {gap:+.4f} +- {gap_sd:.4f} | {ms:.2f} |")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    xs = np.linspace(-5, 5, 400).astype(np.float32)
    b.plot(xs, np.exp(mixture_log_density(xs.astype(np.float64))), "k--", label="data")
    for k in METHODS:
        steps, ll = zip(*runs[k][0]["curve"])
        a.plot(steps, ll, label=k)
        w = {"w": np.asarray(runs[k][0]["w"], np.float32)}
        e = np.asarray(density.energies(w, CENTRES, xs), np.float64)
        b.plot(xs, np.exp(-e - density.log_z(w)), label=k)
    a.axhline(ceiling, color="k", ls="--", label="data distribution")
    a.set_xlabel("Adam step")
    a.set_ylabel("held-out log-likelihood (seed 0)")
    a.legend()
    b.set_xlabel("x")
    b.set_ylabel("density (seed 0)")
    b.legend()
    fig.tight_layout()
    fig.savefig(args.out / "unnormalized_density_loss.png", dpi=120)
    summary = {"example": "unnormalized_density", "steps": args.steps, "seeds": args.seeds,
               "inner_samples": 8, "beta": 0.05, "ceiling": ceiling, "methods": methods}
    (args.out / "unnormalized_density.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.out / 'unnormalized_density_loss.png'} and "
          f"{args.out / 'unnormalized_density.json'}")
    return summary


if __name__ == "__main__":
    main()
