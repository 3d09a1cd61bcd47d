"""MAML on sinusoid regression with gradlang: meta-train `examples/maml.grad` with optax.

    python examples/maml.py [--steps 2000] [--tasks 16] [--out examples/out]

Each task is y = a sin(x - phase) (a in [0.1, 5], phase in [0, pi], x in [-5, 5]) with K
support and K query points. The meta-gradient goes through the inner gradient step (second
order); the driver checks it once against MAML written by hand in JAX, meta-trains with Adam
over batches of tasks (the export vmapped over tasks), and compares, on held-out tasks, the
query loss after one adaptation step from the meta-learned weights with that from random
weights. Writes `maml_loss.png` and `maml.json`.
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
LR_INNER = 0.01  # as in maml.grad


def tasks(key, n: int, k: int):
    """n sinusoid tasks, each with k support and k query points: (xs, ys, xq, yq), [n, k, 1]."""
    ka, kp, kx = jax.random.split(key, 3)
    amp = jax.random.uniform(ka, (n, 1, 1), minval=0.1, maxval=5.0)
    phase = jax.random.uniform(kp, (n, 1, 1), maxval=jnp.pi)
    x = jax.random.uniform(kx, (n, 2 * k, 1), minval=-5.0, maxval=5.0)
    y = amp * jnp.sin(x - phase)
    return x[:, :k], y[:, :k], x[:, k:], y[:, k:]


def init(key, h: int) -> dict:
    k1, k2, k3 = jax.random.split(key, 3)
    return {"w1": jax.random.normal(k1, (1, h)), "b1": jnp.zeros(h),
            "w2": jax.random.normal(k2, (h, h)) / jnp.sqrt(h), "b2": jnp.zeros(h),
            "w3": jax.random.normal(k3, (h, 1)) / jnp.sqrt(h), "b3": jnp.zeros(1)}


def by_hand(p, xs, ys, xq, yq):
    """MAML's meta-loss written in JAX, for the check."""
    def predict(p, x):
        h = jax.nn.relu(x @ p["w1"] + p["b1"])
        return jax.nn.relu(h @ p["w2"] + p["b2"]) @ p["w3"] + p["b3"]

    def loss(p, x, y):
        return jnp.mean((predict(p, x) - y) ** 2)

    g = jax.grad(loss)(p, xs, ys)
    return loss(jax.tree.map(lambda a, b: a - LR_INNER * b, p, g), xq, yq)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000, help="meta-training steps (default 2000)")
    ap.add_argument("--tasks", type=int, default=16, help="tasks per meta-batch (default 16)")
    ap.add_argument("--k", type=int, default=10, help="support / query points per task")
    ap.add_argument("--hidden", type=int, default=40, help="hidden units (default 40)")
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam's meta learning rate")
    ap.add_argument("--eval-tasks", type=int, default=200, help="held-out tasks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "out", help="output folder")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    m = gradlang.compile_file(HERE / "maml.grad")
    compile_s = time.perf_counter() - t0
    key = jax.random.key(args.seed)
    key, kp, kt = jax.random.split(key, 3)
    p0 = init(kp, args.hidden)

    # the meta-gradient of one task against MAML by hand (same float32 operations)
    one = [a[0] for a in tasks(kt, 1, args.k)]
    _, ours = m.meta(p0, *one)
    theirs = jax.grad(by_hand)(p0, *one)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(theirs))
    check = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                zip(jax.tree.leaves(ours["p"]), jax.tree.leaves(theirs))) / scale
    print(f"compiled maml.grad in {compile_s:.2f} s; meta-gradient vs MAML by hand: "
          f"max relative difference {check:.1e}")

    batched = jax.vmap(m.meta, in_axes=(None, 0, 0, 0, 0))
    opt = optax.adam(args.lr)

    @jax.jit
    def update(p, state, key):
        values, grads = batched(p, *tasks(key, args.tasks, args.k))
        g = jax.tree.map(lambda x: x.mean(0), grads["p"])
        updates, state = opt.update(g, state, p)
        return optax.apply_updates(p, updates), state, values.mean()

    p, state = p0, opt.init(p0)
    losses = []
    bar = ProgressBar(args.steps, label="maml ")
    t0 = time.perf_counter()
    for i in range(args.steps):
        key, sub = jax.random.split(key)
        p, state, loss = update(p, state, sub)
        losses.append(loss)
        if (i + 1) % 20 == 0 or i + 1 == args.steps:
            bar.update(i + 1, f"meta-loss {float(loss):.3f}")
    train_s = time.perf_counter() - t0
    bar.close()
    losses = np.asarray(jax.device_get(losses), np.float64)

    held = tasks(jax.random.key(args.seed + 1), args.eval_tasks, args.k)

    def after_one_step(p):
        adapted = jax.vmap(m.adapted, in_axes=(None, 0, 0))(p, held[0], held[1])
        return float(jax.vmap(m.task_loss)(adapted, held[2], held[3]).mean())

    meta_learned, from_init = after_one_step(p), after_one_step(p0)
    print(f"held-out query loss after one adaptation step: {meta_learned:.3f} from the "
          f"meta-learned weights, {from_init:.3f} from the initial ones ({args.steps} steps "
          f"in {train_s:.1f} s)")

    fig_path = args.out / "maml_loss.png"
    _plot(losses, fig_path)
    summary = {
        "example": "maml",
        "steps": args.steps,
        "tasks_per_batch": args.tasks,
        "k": args.k,
        "meta_gradient_relative_difference_vs_jax": check,
        "first_meta_loss": float(losses[0]),
        "last_meta_loss": float(losses[-20:].mean()),
        "held_out_adapted_loss": meta_learned,
        "held_out_adapted_loss_from_init": from_init,
        "compile_s": compile_s,
        "train_s": train_s,
        "plot": str(fig_path),
    }
    (args.out / "maml.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {fig_path} and {args.out / 'maml.json'}")
    return summary


def _plot(losses: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(np.arange(1, len(losses) + 1), losses, lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("meta step")
    ax.set_ylabel("query loss after one inner step")
    ax.set_title("MAML, sinusoid regression")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
