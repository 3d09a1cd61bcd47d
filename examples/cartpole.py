"""Cart-pole balancing with gradlang: `examples/cartpole.grad` trained by ES, EGGROLL and pathwise gradients.

    python examples/cartpole.py [--steps 300] [--out examples/out]

The dynamics are written in gradlang (cartpole.grad: the classic cart-pole of Barto, Sutton and
Anderson, as in Gym, explicit Euler with dt = 0.02 s, a `for` loop over the horizon), and so is
the policy, a 4 -> H (tanh) -> 1 network whose output is a force in [-10, 10] N. The cost is
the mean over K fixed initial states (drawn near upright, fixed seed) and T = `--horizon` steps
of theta^2 + 0.1 x^2 + 0.01 theta_dot^2 + 0.01 x_dot^2 + 1e-4 u^2. Three gradients of the
same cost, each driving the same Adam optimizer (same learning rate and cosine schedule, same
number of steps, same initial policy per seed):

- `pathwise`: `value_and_grad(rollout_cost, wrt=[p])`, reverse mode through the T-step loop;
- `es`: `by=es(sigma=0.05, pop=64)`, 32 antithetic pairs of Gaussian perturbations;
- `eggroll`: `by=eggroll(sigma=0.05, pop=64, rank=1)`, each weight matrix perturbed by a rank-1
  A B^T (biases by full Gaussian noise), the perturbed matrix never formed.

The policy starts with a near-zero output layer (the pole falls). After training, each policy
is checked against Gym's CartPole termination rule (|theta| <= 12 degrees and |x| <= 2.4 m at
every step) on the training states over the training horizon and on `--n-test` fresh initial
states over a longer `--eval-horizon`. Also reported: the cosine between each black-box
estimate and the pathwise gradient at the initial policy, rollouts and simulated steps per
method, wall time. Writes `cartpole_loss.png` (cost per step; a test trajectory of each
policy) and `cartpole.json` to the output folder.
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
METHODS = ("pathwise", "es", "eggroll")
LABELS = {"pathwise": "pathwise (backprop through the dynamics)",
          "es": "ES (sigma=0.05, pop=64)",
          "eggroll": "EGGROLL (sigma=0.05, pop=64, rank 1)"}
POP = 64  # the population of `es` and `eggroll` in cartpole.grad
# Initial states uniform in +-HALF_RANGE: x (m), x_dot (m/s), theta (rad), theta_dot (rad/s).
HALF_RANGE = np.array([0.5, 0.3, 0.15, 0.3], np.float32)
THETA_LIMIT, X_LIMIT = 12 * np.pi / 180, 2.4  # Gym CartPole's termination thresholds


def init_policy(hidden: int, seed: int) -> dict:
    """The Policy struct as a dict: a random tanh layer and a near-zero output layer."""
    rng = np.random.default_rng(seed)
    return {"w1": (0.5 * rng.normal(size=(4, hidden))).astype(np.float32),
            "b1": np.zeros(hidden, np.float32),
            "w2": (0.01 * rng.normal(size=(hidden, 1))).astype(np.float32),
            "b2": np.zeros(1, np.float32)}


def initial_states(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-HALF_RANGE, HALF_RANGE, size=(n, 4)).astype(np.float32)


def make_trainer(m, method: str, s0, horizon, steps: int, lr: float):
    """A jitted scan of `n` Adam steps (the global step numbers `t` [n] drive the schedule);
    returns the parameters, the optimizer state and the cost before each step."""
    opt = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.05))

    def one(carry, inp):
        p, state = carry
        key, _ = inp
        if method == "pathwise":
            value, grads = m.pathwise(p, s0, horizon)
        else:
            value, grads = m[method](p, s0, horizon, key)
        updates, state = opt.update(grads["p"], state, p)
        return (optax.apply_updates(p, updates), state), value

    run = jax.jit(lambda p, state, keys, t: jax.lax.scan(one, (p, state), (keys, t)))
    return opt, run


def simulate(m, p, s0, steps: int):
    """States [steps + 1, K, 4] and forces [steps, K] of the closed loop from s0."""
    def f(s, _):
        s_next, u = m.closed_loop(p, s)
        return s_next, (s_next, u)

    _, (states, forces) = jax.lax.scan(f, s0, None, length=steps)
    return jnp.concatenate([s0[None], states]), forces


def stays_up(states) -> np.ndarray:
    """Per initial state: Gym's thresholds hold at every step."""
    states = np.asarray(states)
    return np.all((np.abs(states[..., 2]) <= THETA_LIMIT) & (np.abs(states[..., 0]) <= X_LIMIT), axis=0)


def cosine_to_pathwise(m, p, s0, horizon, n_keys: int = 16) -> dict:
    """The mean cosine similarity between each black-box estimate and the pathwise gradient."""
    def flat(g):
        return jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree.leaves(g["p"])])

    @jax.jit
    def cosines(p, s0, horizon, keys):
        exact = flat(m.pathwise(p, s0, horizon)[1])
        out = {}
        for method in ("es", "eggroll"):
            est = jax.lax.map(lambda k: flat(m[method](p, s0, horizon, k)[1]), keys)
            out[method] = jnp.mean(est @ exact / (jnp.linalg.norm(est, axis=1) * jnp.linalg.norm(exact)))
        return out

    out = cosines(p, s0, horizon, jax.random.split(jax.random.key(123), n_keys))
    return {k: float(v) for k, v in out.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="Adam steps per method and seed (default 300)")
    ap.add_argument("--horizon", type=int, default=100, help="training horizon T in steps of 0.02 s")
    ap.add_argument("--eval-horizon", type=int, default=500, help="horizon of the test rollouts")
    ap.add_argument("--n-init", type=int, default=16, help="fixed training initial states K")
    ap.add_argument("--n-test", type=int, default=100, help="fresh test initial states")
    ap.add_argument("--hidden", type=int, default=16, help="hidden units of the policy")
    ap.add_argument("--lr", type=float, default=0.03, help="peak Adam learning rate (cosine decay)")
    ap.add_argument("--seeds", type=int, default=3, help="policy initialisations (and noise seeds)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    ap.add_argument("--eval-every", type=int, default=25, help="steps between progress updates")
    ap.add_argument("--cosine-keys", type=int, default=16,
                    help="estimates averaged for the cosine to the pathwise gradient (0: skip it)")
    ap.add_argument("--out", type=Path, default=HERE / "out", help="output folder (default examples/out)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    methods = [s for s in args.methods.split(",") if s]
    if unknown := set(methods) - set(METHODS):
        ap.error(f"unknown methods {sorted(unknown)} (choose from {', '.join(METHODS)})")
    n_chunk = min(args.eval_every, args.steps)
    if args.steps % n_chunk:
        ap.error(f"--steps ({args.steps}) must be a multiple of --eval-every ({n_chunk})")
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    m = gradlang.compile_file(HERE / "cartpole.grad", strict=True)
    compile_s = time.perf_counter() - t0
    print(f"compiled cartpole.grad in {compile_s * 1e3:.1f} ms (strict: no warnings)")

    s0 = jnp.asarray(initial_states(args.n_init, args.seed))
    s_test = jnp.asarray(initial_states(args.n_test, args.seed + 1000))
    horizon = jnp.zeros(args.horizon, jnp.float32)  # only its length T is used
    eval_horizon = jnp.zeros(args.eval_horizon, jnp.float32)
    cost = jax.jit(m.cost)
    sim_train = jax.jit(lambda p: simulate(m, p, s0, args.horizon))
    sim_test = jax.jit(lambda p: simulate(m, p, s_test, args.eval_horizon))
    policies = [jax.tree.map(jnp.asarray, init_policy(args.hidden, args.seed + i)) for i in range(args.seeds)]
    print(f"{args.n_init} training initial states, horizon {args.horizon} steps ({0.02 * args.horizon:g} s); "
          f"initial cost {float(cost(policies[0], s0, horizon)):.3f} (seed 0)")
    cosines = {}
    if args.cosine_keys:
        cosines = cosine_to_pathwise(m, policies[0], s0, horizon, args.cosine_keys)
        print(f"cosine to the pathwise gradient at the initial policy (mean of {args.cosine_keys} "
              "estimates): " + ", ".join(f"{k} {cosines[k]:.3f}" for k in ("es", "eggroll")))
    ts = jnp.arange(args.steps, dtype=jnp.int32)

    results, curves, trajectories = {}, {}, {}
    for method in methods:
        opt, run = make_trainer(m, method, s0, horizon, args.steps, args.lr)
        per_seed, method_curves, seconds = [], [], 0.0
        t0 = time.perf_counter()
        compiled = run.lower(policies[0], opt.init(policies[0]),
                             jax.random.split(jax.random.key(0), n_chunk), ts[:n_chunk]).compile()
        jit_s = time.perf_counter() - t0
        bar = ProgressBar(args.steps * args.seeds, label=f"{method:9s}")
        for seed in range(args.seeds):
            p = policies[seed]
            state = opt.init(p)
            keys = jax.random.split(jax.random.key(args.seed + 100 + seed), args.steps)
            values = []
            for c in range(0, args.steps, n_chunk):
                t0 = time.perf_counter()
                (p, state), v = compiled(p, state, keys[c:c + n_chunk], ts[c:c + n_chunk])
                v = np.asarray(jax.block_until_ready(v))
                seconds += time.perf_counter() - t0
                values.append(v)
                bar.update(seed * args.steps + c + n_chunk, f"seed {seed} cost {v[-1]:.4f}")
            values = np.concatenate(values)
            train_states, _ = sim_train(p)
            test_states, test_forces = sim_test(p)
            per_seed.append({
                "final_cost": float(cost(p, s0, horizon)),
                "test_cost_eval_horizon": float(cost(p, s_test, eval_horizon)),
                "train_states_up": float(np.mean(stays_up(train_states))),
                "test_states_up_eval_horizon": float(np.mean(stays_up(test_states))),
            })
            method_curves.append(values.tolist())
            if seed == 0:
                trajectories[method] = (np.asarray(test_states), np.asarray(test_forces))
        bar.close()
        rollouts = 1 if method == "pathwise" else POP + 1  # value_and_grad: + the centre value
        results[method] = {
            "final_cost_mean": float(np.mean([r["final_cost"] for r in per_seed])),
            "final_cost_per_seed": [r["final_cost"] for r in per_seed],
            "train_states_up": float(np.mean([r["train_states_up"] for r in per_seed])),
            "test_states_up_eval_horizon": float(np.mean([r["test_states_up_eval_horizon"] for r in per_seed])),
            "test_cost_eval_horizon_mean": float(np.mean([r["test_cost_eval_horizon"] for r in per_seed])),
            "per_seed": per_seed,
            "rollouts_per_step": rollouts,
            "backward_passes_per_step": 1 if method == "pathwise" else 0,
            "simulated_steps_total": rollouts * args.steps * args.seeds * args.horizon * args.n_init,
            "train_s": seconds,
            "ms_per_step": 1e3 * seconds / (args.steps * args.seeds),
            "jit_s": jit_s,
        }
        if method in cosines:
            results[method]["cosine_to_pathwise_at_init"] = cosines[method]
        curves[method] = method_curves

    init_cost = float(np.mean([cost(p, s0, horizon) for p in policies]))
    print(f"\n{args.steps} Adam steps (lr {args.lr:g}, cosine decay), {args.seeds} seeds; "
          f"initial cost {init_cost:.3f} (mean over seeds)")
    print(f"| gradient | final cost (mean over seeds) | train states up, {args.horizon} steps | "
          f"test states up, {args.eval_horizon} steps | rollouts / step | ms / step |")
    print("|---|---:|---:|---:|---:|---:|")
    for method, r in results.items():
        print(f"| {LABELS[method]} | {r['final_cost_mean']:.4f} | {100 * r['train_states_up']:.0f}% | "
              f"{100 * r['test_states_up_eval_horizon']:.0f}% | {r['rollouts_per_step']} | "
              f"{r['ms_per_step']:.2f} |")

    fig_path = args.out / "cartpole_loss.png"
    _plot(curves, trajectories, fig_path)
    summary = {
        "example": "cartpole",
        "dynamics": "cart-pole (Barto, Sutton & Anderson 1983; Gym constants), explicit Euler, dt = 0.02 s",
        "policy": f"4 -> {args.hidden} (tanh) -> 1, force = 10 tanh(.) N",
        "cost": "mean of theta^2 + 0.1 x^2 + 0.01 theta_dot^2 + 0.01 x_dot^2 + 1e-4 u^2",
        "initial_state_half_range": HALF_RANGE.tolist(),
        "stays_up_rule": "|theta| <= 12 deg and |x| <= 2.4 m at every step (Gym CartPole)",
        "optimizer": "adam, cosine decay to 5%",
        "learning_rate": args.lr,
        "steps": args.steps,
        "seeds": args.seeds,
        "horizon": args.horizon,
        "eval_horizon": args.eval_horizon,
        "n_init": args.n_init,
        "n_test": args.n_test,
        "hidden": args.hidden,
        "initial_cost_mean": init_cost,
        "cosine_to_pathwise_at_init": cosines,
        "methods": results,
        "curves": curves,
        "compile_s": compile_s,
        "plot": str(fig_path),
    }
    (args.out / "cartpole.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {fig_path} and {args.out / 'cartpole.json'}")
    return summary


def _plot(curves: dict, trajectories: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = {"pathwise": "C3", "es": "C0", "eggroll": "C2"}
    for method, runs in curves.items():
        runs = np.asarray(runs)
        steps = np.arange(runs.shape[1])
        axes[0].plot(steps, np.median(runs, 0), color=colors[method], label=LABELS[method])
        axes[0].fill_between(steps, runs.min(0), runs.max(0), color=colors[method], alpha=0.2)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("Adam step")
    axes[0].set_ylabel("rollout cost (training states)")
    axes[0].set_title("cost per step (median and range over seeds)")
    axes[0].legend()
    # The test state whose pole starts farthest from upright.
    if trajectories:
        states = next(iter(trajectories.values()))[0]
        k = int(np.argmax(np.abs(states[0, :, 2])))
        for method, (states, _) in trajectories.items():
            t = 0.02 * np.arange(len(states))
            axes[1].plot(t, np.degrees(states[:, k, 2]), color=colors[method], label=method)
            axes[2].plot(t, states[:, k, 0], color=colors[method], label=method)
        for ax, limit in ((axes[1], 12.0), (axes[2], X_LIMIT)):
            ax.axhline(limit, color="gray", ls=":")
            ax.axhline(-limit, color="gray", ls=":")
            ax.set_ylim(-3 * limit, 3 * limit)  # a fallen pole leaves the plot
            ax.set_xlabel("time (s)")
            ax.legend()
        axes[1].set_ylabel("pole angle (degrees)")
        axes[1].set_title("a test trajectory (seed 0 policies; dotted: Gym's limits)")
        axes[2].set_ylabel("cart position (m)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
