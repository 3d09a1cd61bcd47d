"""Bring your own JAX model: train a plain-JAX MLP through the `.grad` objective classifier.grad.

    python examples/jax_model/classifier.py [--steps 600] [--out examples/out]

The network is ordinary JAX code (`mlp` below). classifier.grad declares its types (`jax fn
mlp(p: Mlp, x: f32[B, D]) -> f32[B, C]`) and uses it in a noisy cross-entropy objective;
compiling with `functions={"mlp": mlp}` traces the function inline into the exports, so JAX's
reverse mode goes through it. Trains on noisy spirals (NumPy, fixed seed) with Adam, then saves
the module as an artifact and evaluates it again from `gradlang.load` alone: the artifact holds
the traced network and needs no binding. Writes `jax_model.json` and `jax_model_loss.png` to
the output folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradlang

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the examples' shared progress bar
from progress import ProgressBar  # noqa: E402


def mlp(p: dict, x: jax.Array) -> jax.Array:
    """The model, in plain JAX: a tanh hidden layer and class scores."""
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def spirals(n_per_class: int, classes: int, noise: float, seed: int):
    """`classes` interleaved spiral arms in 2-D (one turn each) with Gaussian noise; labels are the arms."""
    rng = np.random.default_rng(seed)
    r = np.sqrt(rng.uniform(0, 1, (classes, n_per_class)))
    theta = 2 * np.pi * r + 2 * np.pi * np.arange(classes)[:, None] / classes
    x = np.stack([r * np.cos(theta), r * np.sin(theta)], -1).reshape(-1, 2)
    x = (x + noise * rng.normal(size=x.shape)).astype(np.float32)
    y = np.repeat(np.arange(classes), n_per_class).astype(np.int32)
    perm = rng.permutation(len(x))
    return x[perm], y[perm]


def init(d: int, h: int, c: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"w1": jnp.asarray(rng.normal(size=(d, h)) * np.sqrt(2 / d), jnp.float32),
            "b1": jnp.zeros(h, jnp.float32),
            "w2": jnp.asarray(rng.normal(size=(h, c)) * np.sqrt(2 / (h + c)), jnp.float32),
            "b2": jnp.zeros(c, jnp.float32)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600, help="optimisation steps (default 600)")
    ap.add_argument("--out", type=Path, default=HERE.parent / "out",
                    help="output folder (default examples/out)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-2)
    ap.add_argument("--sigma", type=float, default=0.02, help="input noise of the objective")
    ap.add_argument("--wd", type=float, default=1e-4, help="weight decay")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    x, y = spirals(400, 3, noise=0.05, seed=args.seed)
    n_train = int(0.8 * len(x))
    xtr, ytr, xte, yte = map(jnp.asarray, (x[:n_train], y[:n_train], x[n_train:], y[n_train:]))

    t0 = time.perf_counter()
    m = gradlang.compile_file(HERE / "classifier.grad", functions={"mlp": mlp})
    compile_s = time.perf_counter() - t0
    print(f"compiled classifier.grad with the JAX function mlp in {compile_s:.2f} s")

    params = init(2, args.hidden, 3, args.seed)
    opt = optax.adam(args.lr)
    state = opt.init(params)
    sigma, wd = np.float32(args.sigma), np.float32(args.wd)

    @jax.jit
    def update(params, state, idx, key):
        loss, grads = m.step(params, xtr[idx], ytr[idx], sigma, wd, key)
        updates, state = opt.update(grads["p"], state, params)
        return optax.apply_updates(params, updates), state, loss

    evaluate = jax.jit(m.evaluate)
    rng = np.random.default_rng(args.seed + 1)
    keys = jax.random.split(jax.random.key(args.seed), args.steps)
    losses = []
    bar = ProgressBar(args.steps, label="jax_model ")
    t0 = time.perf_counter()
    for i in range(args.steps):
        idx = rng.choice(n_train, args.batch, replace=False)
        params, state, loss = update(params, state, idx, keys[i])
        losses.append(loss)
        if (i + 1) % 50 == 0 or i + 1 == args.steps:
            bar.update(i + 1, f"loss {float(loss):.4f} test acc {float(evaluate(params, xte, yte)):.3f}")
    bar.close()
    train_s = time.perf_counter() - t0
    losses = np.asarray(jax.device_get(losses), np.float64)
    train_acc, test_acc = float(evaluate(params, xtr, ytr)), float(evaluate(params, xte, yte))
    print(f"after {args.steps} steps ({train_s:.1f} s): train acc {train_acc:.3f}, "
          f"test acc {test_acc:.3f}")

    artifact = m.save(args.out / "jax_model.gx")
    loaded = gradlang.load(artifact)  # no functions= here: the network is inside the artifact
    artifact_acc = float(loaded.evaluate(params, xte, yte))
    print(f"saved {artifact}; traced JAX functions in its header: "
          f"{loaded.header['jax_functions']}; test acc from the artifact alone {artifact_acc:.3f}")
    if artifact_acc != test_acc:
        raise SystemExit(f"artifact accuracy {artifact_acc} != compiled accuracy {test_acc}")

    plot = args.out / "jax_model_loss.png"
    _plot(losses, plot)
    summary = {"example": "jax_model", "steps": args.steps, "batch": args.batch,
               "hidden": args.hidden, "learning_rate": args.lr, "sigma": args.sigma,
               "weight_decay": args.wd, "final_minibatch_loss": float(losses[-1]),
               "train_accuracy": train_acc, "test_accuracy": test_acc,
               "artifact_test_accuracy": artifact_acc,
               "artifact_jax_functions": loaded.header["jax_functions"],
               "compile_s": compile_s, "train_s": train_s, "plot": str(plot)}
    (args.out / "jax_model.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {plot} and {args.out / 'jax_model.json'}")
    return summary


def _plot(losses: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(np.arange(1, len(losses) + 1), losses, lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("noisy cross-entropy + weight decay")
    ax.set_title("a plain-JAX MLP trained through classifier.grad")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
