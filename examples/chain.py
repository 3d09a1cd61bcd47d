"""Policy gradient on a chain walk: reward-to-go found by the compiler against whole-return credit.

    python examples/chain.py [--steps 300] [--out examples/out]

A walker on a chain of S = 8 states starts at the left end and takes T = 30 steps, each left or
right (clamped at the ends), drawn from a tabular softmax policy; after each move it receives
the new state's reward (-0.05, and +1 at the right end) plus Normal(0, 2^2) noise. The program,
examples/chain.grad, writes the walk as a loop that adds each reward to a running total; the
compiler finds that accumulator and credits each step's action with the rewards from that step
on (`gradlang explain`: "per step (reward-to-go ...)"). `walk_whole` is the same walk with
`score(credit=whole)`: each action multiplies the whole return. Both use a leave-one-out
baseline over 8 walks per step.

Trains the same zero-initialized policy both ways with Adam on the same keys and reports the
expected return (256 walks, fixed key) along training, the step at which each first reaches 90%
of the optimum (dynamic programming on the known chain), and the gradient variance at the
initial policy over many keys. Writes `chain_loss.png` and `chain.json` to the output folder.

Measured (300 steps, 2-core CPU, jax 0.10.2): reward-to-go first reaches 90% of the optimum
(23.7) at step 110, whole-return credit at step 215; at the uniform policy the gradient
variance is 1.8x lower with reward-to-go.
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
S, T = 8, 30
CREDITS = {"reward_to_go": "step_rtg", "whole_return": "step_whole"}


def chain(states: int = S):
    """The transition matrices [2, S, S] (left, right; clamped) and the rewards per state."""
    move = np.zeros((2, states, states), np.float32)
    for s in range(states):
        move[0, s, max(s - 1, 0)] = 1.0
        move[1, s, min(s + 1, states - 1)] = 1.0
    rewards = np.full(states, -0.05, np.float32)
    rewards[-1] = 1.0
    return move, rewards


def optimum(move, rewards, steps: int = T) -> float:
    """The best expected return from the left end (the noise has mean zero): value iteration."""
    value = np.zeros(len(rewards))
    for _ in range(steps):
        value = np.max([move[a] @ (rewards + value) for a in range(2)], axis=0)
    return float(value[0])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    ap.add_argument("--lr", type=float, default=0.03, help="Adam learning rate")
    ap.add_argument("--noise", type=float, default=2.0, help="reward noise (standard deviation)")
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--var-keys", type=int, default=500, help="keys for the gradient variance")
    ap.add_argument("--out", type=Path, default=HERE / "out", help="output folder (default examples/out)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    m = gradlang.compile_file(HERE / "chain.grad")
    move, rewards = chain()
    start = np.eye(S, dtype=np.float32)[0]
    env = (jnp.asarray(move), jnp.asarray(rewards), jnp.asarray(start), jnp.zeros(T, jnp.float32),
           jnp.float32(args.noise))
    best = optimum(move, rewards)
    theta0 = jnp.zeros((S, 2), jnp.float32)
    opt = optax.adam(args.lr)
    evaluate = jax.jit(lambda theta: m.expected_return(theta, *env, jax.random.key(args.seed + 1)))
    print(f"chain of {S} states, {T} steps, reward noise {args.noise}: optimum {best:.3f}, "
          f"uniform policy {float(evaluate(theta0)):.3f}")

    steps = {name: jax.jit(lambda theta, key, f=getattr(m, export): f(theta, *env, key))
             for name, export in CREDITS.items()}

    @jax.jit
    def apply(theta, state, grads):
        updates, state = opt.update(grads, state, theta)
        return optax.apply_updates(theta, updates), state

    curves, results = {}, {}
    t0 = time.perf_counter()
    for name, step in steps.items():
        theta, state = theta0, opt.init(theta0)
        key = jax.random.key(args.seed + 2)  # the same keys for both
        curve = [(0, float(evaluate(theta)))]
        bar = ProgressBar(args.steps, label=f"{name:13s} ")
        for i in range(args.steps):
            key, sub = jax.random.split(key)
            _, grads = step(theta, sub)
            theta, state = apply(theta, state, grads["theta"])
            if (i + 1) % args.eval_every == 0 or i + 1 == args.steps:
                curve.append((i + 1, float(evaluate(theta))))
                bar.update(i + 1, f"expected return {curve[-1][1]:.2f}")
        bar.close()
        reached = next((s for s, r in curve if r >= 0.9 * best), None)
        results[name] = {"final_return": curve[-1][1], "steps_to_90pct": reached,
                         "mean_return_over_training": float(np.mean([r for _, r in curve[1:]]))}
        curves[name] = curve
        print(f"{name}: final expected return {curve[-1][1]:.3f} ({curve[-1][1] / best:.0%} of the "
              f"optimum), 90% first reached at step {reached}")
    train_s = time.perf_counter() - t0

    keys = jax.random.split(jax.random.key(args.seed + 3), args.var_keys)
    variance = {}
    for name, step in steps.items():
        grads = jax.vmap(lambda k, step=step: step(theta0, k)[1]["theta"])(keys)
        variance[name] = float(np.asarray(grads, np.float64).var(0).sum())
    ratio = variance["whole_return"] / variance["reward_to_go"]
    print(f"gradient variance at the uniform policy ({args.var_keys} keys): reward-to-go "
          f"{variance['reward_to_go']:.4g}, whole return {variance['whole_return']:.4g} ({ratio:.1f}x)")

    plot = _plot(curves, best, args.out / "chain_loss.png")
    summary = {"example": "chain", "states": S, "steps_per_walk": T, "noise": args.noise,
               "optimum": best, "training_steps": args.steps, "learning_rate": args.lr,
               "results": results, "curves": curves, "gradient_variance_at_init": variance,
               "variance_ratio_whole_over_rtg": ratio, "train_s": train_s, "plot": plot}
    (args.out / "chain.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out / 'chain.json'}" + (f" and {plot}" if plot else ""))
    return summary


def _plot(curves: dict, best: float, path: Path) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        s, r = zip(*curve)
        ax.plot(s, r, label=name.replace("_", " "))
    ax.axhline(best, color="gray", ls="--", lw=1, label="optimum")
    ax.set_xlabel("training step")
    ax.set_ylabel("expected return")
    ax.set_title("policy gradient on a chain walk (leave-one-out, 8 walks per step)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


if __name__ == "__main__":
    main()
