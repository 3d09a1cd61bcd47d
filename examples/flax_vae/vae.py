"""A discrete-latent VAE whose encoder and decoder are Flax modules, trained through vae.grad.

    python examples/flax_vae/vae.py [--steps 1500] [--out examples/out]

The model is examples/vae_discrete's (binarized 8x8 digits; L = 6 one-hot categorical latents
of C = 8 classes, a uniform prior, Bernoulli pixels), with its two networks written as Flax
linen modules (`Encoder`, `Decoder` below: a tanh hidden layer of 128 units each). vae.grad
declares them `jax fn encoder(p: tree, x) -> f32[L, B, C]` and `jax fn decoder(p: tree, z) ->
f32[B, D]`, their params `tree`s (the modules' `params` dicts as they are), and leaves the
draw's estimator to the compiler's automatic rule: the score function with a leave-one-out
baseline (RLOO) under `expect(loss, samples=4)`. Compiling with `functions={"encoder": ...,
"decoder": ...}` traces the modules' `apply` inline.

Three arms, the same budget: the Flax VAE through vae.grad from the `.grad` VAE's initial
weights (its Glorot initialization laid out as the Flax modules' kernels and biases: the same
model), the Flax VAE from the modules' own `init` (LeCun-normal kernels, zero biases), and the
`.grad`-only VAE of examples/vae_discrete.grad (its `step_score`: the same estimator,
`score(baseline=loo)`, 4 samples, its networks written in `.grad` with std.vi). All see the
same minibatches and keys and take the same Adam steps (warm-up + cosine schedule, as
vae_discrete.py). Each step calls the export on one image at a time (`jax.vmap`, one key
each), so that the baseline compares the samples of the same image. Before training, the two
arms' first gradients (same minibatch, same key: the same draws) are compared leaf by leaf.

Reports each arm's ELBO of the discrete model (16 hard draws per image, train and test) and
wall time. Writes `flax_vae.json` and `flax_vae_loss.png` (training and test curves,
reconstructions of test digits) to the output folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradlang

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the examples' shared data, steps and plots
from digits import PerImageMean, load_binary_digits, tile  # noqa: E402
from progress import ProgressBar  # noqa: E402
from vae_discrete import init_params, per_image  # noqa: E402

ARMS = ("flax", "flax_init", "grad")
LABELS = {"flax": "Flax modules (vae.grad), shared init",
          "flax_init": "Flax modules (vae.grad), Flax's init",
          "grad": ".grad-only VAE (vae_discrete.grad)"}


class Encoder(nn.Module):
    """Pixels [B, D] -> logits of q(z|x), laid out [L, B, C] as std.vi's categorical_logits."""
    latents: int
    classes: int
    hidden: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.tanh(nn.Dense(self.hidden)(x))
        q = nn.Dense(self.latents * self.classes)(h).reshape(x.shape[0], self.latents, self.classes)
        return q.transpose(1, 0, 2)


class Decoder(nn.Module):
    """One-hot latents [L, B, C] -> pixel logits [B, D] (std.vi's decode_onehot: the latents,
    flattened, into a tanh hidden layer)."""
    pixels: int
    hidden: int

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        h = nn.tanh(nn.Dense(self.hidden)(z.transpose(1, 0, 2).reshape(z.shape[1], -1)))
        return nn.Dense(self.pixels)(h)


def as_flax(enc: dict, dec: dict) -> tuple[dict, dict]:
    """vae_discrete's parameters (or gradients: the map is linear) in the Flax modules' layout.
    Encoder head w [L, H, C] -> kernel [H, L * C] (latent-major), b [L, 1, C] -> [L * C];
    decoder w [L, C, G] -> kernel [L * C, G]."""
    l, h, c = enc["w"].shape
    pe = {"Dense_0": {"kernel": enc["hidden"]["w"], "bias": enc["hidden"]["b"]},
          "Dense_1": {"kernel": jnp.transpose(enc["w"], (1, 0, 2)).reshape(h, l * c),
                      "bias": enc["b"].reshape(l * c)}}
    pd = {"Dense_0": {"kernel": dec["w"].reshape(l * c, -1), "bias": dec["b"]},
          "Dense_1": {"kernel": dec["logits"]["w"], "bias": dec["logits"]["b"]}}
    return pe, pd


def first_gradients(grad_fns: dict, init: dict, x, key) -> dict:
    """Both arms' gradients at the initial weights on one minibatch and key (the same draws),
    the `.grad` arm's in the Flax layout: the largest difference of a leaf, relative to the
    largest entry of that leaf, per part."""
    flax_g = grad_fns["flax"](init["flax"], x, key)[1]
    grad_g = as_flax(*grad_fns["grad"](init["grad"], x, key)[1])
    out = {}
    for part, a, b in zip(("enc", "dec"), flax_g, grad_g):
        out[part] = max(float(jnp.max(jnp.abs(u - v)) / jnp.max(jnp.abs(v)))
                        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    return out


def train(grad_fn, init, evaluate, data, args, bar, offset: int):
    """Adam on the mean -ELBO estimates of `grad_fn`, the minibatches and keys fixed by the seed
    (the same for every arm); the test ELBO at the start and every `eval_every` steps."""
    xtr, xte = data
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(100, args.steps // 10),
                                                  args.steps, end_value=args.lr * 0.05)
    opt = optax.adam(schedule)

    @jax.jit
    def apply(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params, state = init, opt.init(init)
    rng, key = np.random.default_rng(args.seed + 1), jax.random.key(args.seed + 1)
    eval_key = jax.random.key(args.seed + 2)
    per_epoch = len(xtr) // args.batch
    order = np.empty(0, np.int32)
    losses, evals = [], [(0, evaluate(params, xte, eval_key))]
    for i in range(args.steps):
        if i % per_epoch == 0:
            order = rng.permutation(len(xtr)).astype(np.int32)
        j = i % per_epoch
        key, sub = jax.random.split(key)
        loss, grads = grad_fn(params, xtr[order[j * args.batch:(j + 1) * args.batch]], sub)
        params, state = apply(params, state, grads)
        losses.append(loss)
        if (i + 1) % args.eval_every == 0 or i + 1 == args.steps:
            evals.append((i + 1, evaluate(params, xte, eval_key)))
            bar.update(offset + i + 1, f"loss {float(loss):.2f} test elbo {evals[-1][1]:.2f}")
    return params, np.asarray(jax.device_get(losses), np.float64), evals


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500,
                    help="optimisation steps per arm (default 1500)")
    ap.add_argument("--out", type=Path, default=HERE.parent / "out",
                    help="output folder (default examples/out)")
    ap.add_argument("--hidden", type=int, default=128, help="hidden units of encoder and decoder")
    ap.add_argument("--latents", type=int, default=6, help="number of categorical latents L")
    ap.add_argument("--classes", type=int, default=8, help="classes per latent C")
    ap.add_argument("--batch", type=int, default=64, help="minibatch size")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak Adam learning rate")
    ap.add_argument("--eval-every", type=int, default=250, help="steps between test evaluations")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    x_train, x_test, _, y_test = load_binary_digits(args.seed)
    d = x_train.shape[1]
    print(f"binarized digits: {len(x_train)} train / {len(x_test)} test images of {d} pixels; "
          f"{args.latents} latents x {args.classes} classes")
    encoder = Encoder(args.latents, args.classes, args.hidden)
    decoder = Decoder(d, args.hidden)
    t0 = time.perf_counter()
    m = gradlang.compile_file(HERE / "vae.grad", strict=True, functions={
        "encoder": lambda p, x: encoder.apply({"params": p}, x),
        "decoder": lambda p, z: decoder.apply({"params": p}, z)})
    compile_s = time.perf_counter() - t0
    baseline = gradlang.compile_file(HERE.parent / "vae_discrete.grad")
    (site,) = [s for s in m.ir.facts.estimators if s.function == "elbo"]
    chosen = f"{site.estimator.name}({', '.join(f'{k}={v}' for k, v in site.estimator.options)})"
    print(f"compiled vae.grad with the Flax modules bound in {compile_s:.2f} s; the draw's "
          f"estimator, chosen by the compiler: {chosen} (the baseline: leave-one-out at 4 samples)")

    grad_init = jax.tree.map(jnp.asarray, init_params(d, args.hidden, args.latents, args.classes,
                                                      args.seed))
    data = (jnp.asarray(x_train), jnp.asarray(x_test))
    ke, kd = jax.random.split(jax.random.key(args.seed))
    own_init = (encoder.init(ke, data[0][:1])["params"],
                decoder.init(kd, jnp.zeros((args.latents, 1, args.classes)))["params"])
    init = {"flax": as_flax(*grad_init), "flax_init": own_init, "grad": grad_init}
    flax_step, flax_evaluate = per_image(m.step), PerImageMean(m.evaluate)
    grad_fns = {"flax": flax_step, "flax_init": flax_step, "grad": per_image(baseline.step_score)}
    evaluate = {"flax": flax_evaluate, "flax_init": flax_evaluate,
                "grad": PerImageMean(baseline.evaluate)}
    agreement = first_gradients(grad_fns, init, data[0][:args.batch], jax.random.key(args.seed))
    print(f"first gradients, same weights, minibatch and key: largest leaf difference relative "
          f"to the leaf's largest entry {agreement['enc']:.1e} (encoder), "
          f"{agreement['dec']:.1e} (decoder)")

    results, curves, trained = {}, {}, {}
    bar = ProgressBar(args.steps * len(ARMS), label="flax_vae ")
    for k, arm in enumerate(ARMS):
        t1 = time.perf_counter()
        params, losses, evals = train(grad_fns[arm], init[arm], evaluate[arm], data, args, bar,
                                      k * args.steps)
        train_s = time.perf_counter() - t1
        k1, k2 = jax.random.split(jax.random.key(args.seed + 3))
        results[arm] = {"final_train_elbo": evaluate[arm](params, data[0], k1),
                        "final_test_elbo": evaluate[arm](params, data[1], k2),
                        "final_minibatch_loss": float(losses[-1]), "train_s": train_s,
                        "test_elbo_curve": evals}
        curves[arm], trained[arm] = (losses, evals), params
    bar.close()
    for arm in ARMS:
        r = results[arm]
        print(f"{LABELS[arm]:38s} train ELBO {r['final_train_elbo']:.3f}  test ELBO "
              f"{r['final_test_elbo']:.3f} nats/image  ({r['train_s']:.1f} s)")

    idx = np.array([np.flatnonzero(y_test == c)[0] for c in range(10)])
    recon = {arm: (baseline if arm == "grad" else m).reconstructions(*trained[arm], data[1][idx])
             for arm in ARMS}
    plot = args.out / "flax_vae_loss.png"
    _plot(curves, x_test[idx], recon, plot)
    summary = {
        "example": "flax_vae",
        "dataset": "sklearn load_digits 8x8, binarized at gray level > 7",
        "model": f"Flax linen Encoder Dense({args.hidden})-tanh-Dense(L*C), Decoder "
                 f"Dense({args.hidden})-tanh-Dense({d}); L={args.latents}, C={args.classes}",
        "estimator": "automatic: score function, leave-one-out baseline, 4 samples, per image",
        "optimizer": "adam", "learning_rate": args.lr, "steps": args.steps,
        "batch": args.batch, "n_train": len(x_train), "n_test": len(x_test),
        **{f"test_elbo_{arm}": results[arm]["final_test_elbo"] for arm in ARMS},
        "first_gradient_relative_difference": agreement,
        "results": results, "compile_s": compile_s, "plot": str(plot)}
    (args.out / "flax_vae.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {plot} and {args.out / 'flax_vae.json'}")
    return summary


def _plot(curves: dict, digits: np.ndarray, recon: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6), width_ratios=(1.3, 1))
    colors = {"flax": "tab:green", "flax_init": "tab:orange", "grad": "tab:blue"}
    width = {"grad": 3.0, "flax_init": 1.2, "flax": 1.0}  # the shared-init arms overlap
    for arm in ("grad", "flax_init", "flax"):
        losses, evals = curves[arm]
        k = max(1, len(losses) // 60)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax1.plot(np.arange(k, len(losses) + 1), smooth, lw=width[arm], color=colors[arm],
                 alpha=0.5 if arm == "grad" else 1.0,
                 label=f"{LABELS[arm]}: minibatch -ELBO ({k}-step mean)")
        ev = np.asarray(evals)
        ax1.plot(ev[:, 0], -ev[:, 1], "o--", ms=3, lw=1, color=colors[arm], label="  test -ELBO")
    ax1.set_ylim(None, np.percentile(np.concatenate([c[0] for c in curves.values()]), 97))
    ax1.set_xlabel("step")
    ax1.set_ylabel("nats / image")
    ax1.set_title("discrete VAE, score function + RLOO (automatic)")
    ax1.legend(fontsize=8)
    cmap = plt.get_cmap("gray_r").with_extremes(bad="#cfe0f0")
    rows = np.concatenate([digits] + [np.asarray(recon[a]) for a in ARMS])
    ax2.imshow(tile(rows, 10), cmap=cmap, vmin=0, vmax=1)
    ax2.set_axis_off()
    ax2.set_title("test digits; reconstructions by the Flax VAE\n"
                  "(shared init, own init) and the .grad-only VAE")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
