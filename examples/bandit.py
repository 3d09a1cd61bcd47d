"""Policy gradient with gradlang: a 10-armed Gaussian bandit trained with RLOO from `std.rl`.

    python examples/bandit.py [--steps 200] [--out examples/out] [--advantage rloo|grpo]

The environment (rewards ~ Normal(means[a], 1), arm means drawn once from N(0, 1) with a fixed
seed), the rollouts and the policy-gradient losses are written in examples/bandit.grad. Each
step draws B groups of G arms from the softmax policy with the `sample` export, records their
log-probabilities under this (old) policy, then takes a few Adam steps on the PPO-clipped
surrogate of `std.rl` with leave-one-out (RLOO) advantages within each group (or GRPO's
group-normalized ones with --advantage grpo). Before training, checks the estimator: the mean
of many on-policy RLOO gradients from the surrogate matches the exact gradient of the expected
reward (and the compiler's own `with score(baseline=loo)` estimator on the same problem).
Reports the final expected reward against the optimum (the best arm's mean). Writes
`bandit_loss.png` and `bandit.json` to the output folder.
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


def gradient_check(m, theta, means, group: int, n: int, key) -> dict:
    """Mean and variance over n keys of the on-policy surrogate gradient (one group of `group`
    pulls, RLOO advantages) and of the compiler's built-in score + leave-one-out estimator,
    against the exact gradient of the expected reward."""
    exact = np.asarray(m.exact_grad(theta, means)["theta"], np.float64)
    zeros = jnp.zeros((group, 1), jnp.float32)

    def surrogate_grad(k):
        rollout = m.sample(theta, means, zeros, k)
        actions = rollout[0].astype(jnp.int32)
        logp_old = m.log_probs(theta, actions)
        # ascent direction: minus the loss gradient; eps is irrelevant on-policy (ratio 1)
        return -m.step_rloo(theta, actions, rollout[1], logp_old, 0.2)[1]["theta"]

    keys = jax.random.split(key, n)
    out = {"exact_gradient_norm": float(np.linalg.norm(exact))}
    for name, fn in (("std_rl_rloo", surrogate_grad),
                     ("builtin_score_loo", lambda k: m.builtin_grad(theta, means, k)["theta"])):
        g = np.asarray(jax.jit(jax.vmap(fn))(keys), np.float64)
        mean = g.mean(0)
        se = g.std(0, ddof=1) / np.sqrt(n)
        out[name] = {
            "relative_error_of_mean": float(np.linalg.norm(mean - exact) / np.linalg.norm(exact)),
            "cosine_to_exact": float(mean @ exact / (np.linalg.norm(mean) * np.linalg.norm(exact))),
            "max_z_score": float(np.max(np.abs(mean - exact) / np.maximum(se, 1e-12))),
            "total_variance": float(g.var(0, ddof=1).sum()),
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="rollout rounds (default 200)")
    ap.add_argument("--out", type=Path, default=HERE / "out", help="output folder (default examples/out)")
    ap.add_argument("--arms", type=int, default=10, help="number of arms")
    ap.add_argument("--group", type=int, default=8, help="pulls per group G (the RLOO group)")
    ap.add_argument("--groups", type=int, default=16, help="groups per round B")
    ap.add_argument("--epochs", type=int, default=4, help="surrogate updates per round (PPO epochs)")
    ap.add_argument("--clip", type=float, default=0.2, help="PPO ratio clipping epsilon")
    ap.add_argument("--lr", type=float, default=0.05, help="Adam learning rate")
    ap.add_argument("--advantage", choices=["rloo", "grpo"], default="rloo")
    ap.add_argument("--check-keys", type=int, default=4000, help="keys for the gradient check")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(args.seed)
    means = rng.normal(size=args.arms).astype(np.float32)
    best = int(np.argmax(means))
    optimum = float(means[best])
    print(f"{args.arms}-armed Gaussian bandit: best arm {best} with mean reward {optimum:.3f}; "
          f"uniform policy {means.mean():.3f}")

    t0 = time.perf_counter()
    m = gradlang.compile_file(HERE / "bandit.grad")
    compile_s = time.perf_counter() - t0
    print(f"compiled bandit.grad in {compile_s * 1e3:.1f} ms; exports: {', '.join(m.exports)}")

    theta = jnp.zeros(args.arms, jnp.float32)
    means = jnp.asarray(means)
    key = jax.random.key(args.seed)

    key, sub = jax.random.split(key)
    check = gradient_check(m, theta, means, args.group, args.check_keys, sub)
    for name in ("std_rl_rloo", "builtin_score_loo"):
        c = check[name]
        print(f"gradient check ({name}, {args.check_keys} keys at the uniform policy): relative "
              f"error of the mean {c['relative_error_of_mean']:.3f}, cosine to exact "
              f"{c['cosine_to_exact']:.4f}, max |z| {c['max_z_score']:.2f}, variance "
              f"{c['total_variance']:.4f}")

    step = m.step_rloo if args.advantage == "rloo" else m.step_grpo
    opt = optax.adam(args.lr)
    state = opt.init(theta)
    zeros = jnp.zeros((args.group, args.groups), jnp.float32)
    eps = np.float32(args.clip)

    @jax.jit
    def round_(theta, state, key):
        rollout = m.sample(theta, means, zeros, key)
        actions, rewards = rollout[0].astype(jnp.int32), rollout[1]
        logp_old = m.log_probs(theta, actions)

        def epoch(carry, _):
            theta, state = carry
            loss, grads = step(theta, actions, rewards, logp_old, eps)
            updates, state = opt.update(grads["theta"], state, theta)
            return (optax.apply_updates(theta, updates), state), loss

        (theta, state), losses = jax.lax.scan(epoch, (theta, state), None, length=args.epochs)
        return theta, state, jnp.mean(rewards), losses[0]

    value = jax.jit(m.value)
    history = []  # (round, mean sampled reward, expected reward, p(best arm))
    bar = ProgressBar(args.steps, label="bandit ")
    t0 = time.perf_counter()
    for i in range(args.steps):
        key, sub = jax.random.split(key)
        theta, state, sampled, _ = round_(theta, state, sub)
        expected = float(value(theta, means))
        history.append((i + 1, float(sampled), expected, float(jax.nn.softmax(theta)[best])))
        bar.update(i + 1, f"expected reward {expected:.3f} / optimum {optimum:.3f}")
    train_s = time.perf_counter() - t0
    bar.close()

    final = float(value(theta, means))
    probs = np.asarray(jax.nn.softmax(theta), np.float64)
    print(f"after {args.steps} rounds ({train_s:.2f} s, {args.steps * args.group * args.groups} "
          f"pulls): expected reward {final:.4f} vs optimum {optimum:.4f} (regret "
          f"{optimum - final:.4f}); p(best arm) {probs[best]:.3f}")

    fig_path = args.out / "bandit_loss.png"
    _plot(history, probs, np.asarray(means), optimum, fig_path, args)
    summary = {
        "example": "bandit",
        "arms": args.arms,
        "arm_means": [float(v) for v in np.asarray(means)],
        "best_arm": best,
        "advantage": args.advantage,
        "optimizer": "adam",
        "learning_rate": args.lr,
        "steps": args.steps,
        "group": args.group,
        "groups": args.groups,
        "epochs": args.epochs,
        "clip": args.clip,
        "pulls": args.steps * args.group * args.groups,
        "optimum": optimum,
        "uniform_policy_reward": float(np.mean(np.asarray(means))),
        "final_expected_reward": final,
        "final_regret": optimum - final,
        "final_reward_fraction_of_optimum": final / optimum,
        "final_p_best_arm": float(probs[best]),
        "gradient_check_keys": args.check_keys,
        "gradient_check": check,
        "compile_s": compile_s,
        "train_s": train_s,
        "plot": str(fig_path),
    }
    (args.out / "bandit.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {fig_path} and {args.out / 'bandit.json'}")
    return summary


def _plot(history, probs, means, optimum, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = np.asarray(history)
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.5))
    ax1.plot(h[:, 0], h[:, 1], lw=0.6, alpha=0.4, label="mean sampled reward per round")
    ax1.plot(h[:, 0], h[:, 2], lw=1.5, label="expected reward of the policy")
    ax1.axhline(optimum, color="k", ls="--", lw=1, label=f"optimum {optimum:.3f}")
    ax1.axhline(means.mean(), color="gray", ls=":", lw=1, label="uniform policy")
    ax1.set_xlabel("round")
    ax1.set_ylabel("reward")
    ax1.set_title(f"{args.advantage.upper()} policy gradient, {args.group} x {args.groups} pulls per round")
    ax1.legend()

    ax2.plot(h[:, 0], h[:, 3], color="tab:green")
    ax2.set_ylim(0, 1.02)
    ax2.set_xlabel("round")
    ax2.set_ylabel("pi(best arm)")
    ax2.set_title("probability of the best arm")
    ax2.grid(alpha=0.3)

    order = np.argsort(means)
    xs = np.arange(len(means))
    ax3.bar(xs, probs[order], color="tab:blue")
    ax3.set_xticks(xs, [f"{means[i]:.2f}" for i in order], rotation=45)
    ax3.set_xlabel("arm (by mean reward)")
    ax3.set_ylabel("probability")
    ax3.set_title("final policy pi(a)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
