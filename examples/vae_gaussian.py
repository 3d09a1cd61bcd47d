"""A Gaussian-latent VAE with gradlang: train `examples/vae_gaussian.grad` on binarized 8x8 digits.

    python examples/vae_gaussian.py [--steps 3000] [--out examples/out]

Loads scikit-learn's 8x8 digits (shipped with the package, no download), binarizes the pixels
(gray level > 7) and splits them into train and test images. Compiles vae_gaussian.grad, whose
encoder, decoder and bounds come from `use std.vi`, and maximizes the ELBO with minibatch Adam:
the `step` export is value_and_grad of the negative ELBO, its Gaussian draw pathwise
(reparameterized), the KL in closed form; each call takes a fresh `jax.random.key`. Reports the
train and test ELBO and the tighter importance-weighted bound (IWAE) for several K. Writes
`vae_gaussian_loss.png` (training curve, reconstructions, samples from the prior) and
`vae_gaussian.json` to the output folder.
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
from digits import PerImageMean, load_binary_digits, tile
from progress import ProgressBar

HERE = Path(__file__).resolve().parent


def init_params(d: int, h: int, z: int, seed: int) -> tuple[dict, dict]:
    """Glorot-initialised dense layers, zero biases; the log-scale head starts near scale 1/e
    (structs are dicts: GaussianEncoder and BernoulliDecoder of stdlib/vi.grad)."""
    rng = np.random.default_rng(seed)

    def dense(i: int, o: int, bias: float = 0.0) -> dict:
        return {"w": (rng.normal(size=(i, o)) * np.sqrt(2.0 / (i + o))).astype(np.float32),
                "b": np.full(o, bias, np.float32)}

    enc = {"hidden": dense(d, h), "loc": dense(h, z), "log_scale": dense(h, z, -1.0)}
    dec = {"hidden": dense(z, h), "logits": dense(h, d)}
    return enc, dec


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000, help="optimisation steps (default 3000)")
    ap.add_argument("--out", type=Path, default=HERE / "out", help="output folder (default examples/out)")
    ap.add_argument("--hidden", type=int, default=128, help="hidden units of encoder and decoder")
    ap.add_argument("--latent", type=int, default=8, help="latent dimensions")
    ap.add_argument("--batch", type=int, default=128, help="minibatch size")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak Adam learning rate")
    ap.add_argument("--iwae-k", default="1,10,100", help="sample counts K of the IWAE bounds")
    ap.add_argument("--eval-every", type=int, default=250, help="steps between test evaluations")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    x_train, x_test, _, y_test = load_binary_digits(args.seed)
    d = x_train.shape[1]
    print(f"binarized digits: {len(x_train)} train / {len(x_test)} test images of {d} pixels")

    t0 = time.perf_counter()
    m = gradlang.compile_file(HERE / "vae_gaussian.grad")
    compile_s = time.perf_counter() - t0
    print(f"compiled vae_gaussian.grad in {compile_s * 1e3:.1f} ms; exports: {', '.join(m.exports)}")

    params = jax.tree.map(jnp.asarray, init_params(d, args.hidden, args.latent, args.seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(100, args.steps // 10),
                                                  args.steps, end_value=args.lr * 0.05)
    opt = optax.adam(schedule)
    state = opt.init(params)
    xtr, xte = jnp.asarray(x_train), jnp.asarray(x_test)

    @jax.jit
    def update(params, state, idx, key):
        loss, grads = m.step(*params, xtr[idx], key)
        updates, state = opt.update((grads["enc"], grads["dec"]), state, params)
        return optax.apply_updates(params, updates), state, loss

    # Bounds are means over images, evaluated one image (and key) at a time in fixed-size
    # chunks: one compilation for the training and the test set.
    evaluate = PerImageMean(m.evaluate)
    evaluate_iwae = PerImageMean(m.evaluate_iwae)

    rng = np.random.default_rng(args.seed + 1)
    key = jax.random.key(args.seed)
    batches_per_epoch = len(x_train) // args.batch
    order = np.empty(0, np.int32)
    losses, evals = [], []
    bar = ProgressBar(args.steps, label="vae_gaussian ")
    t0 = time.perf_counter()
    for i in range(args.steps):
        if i % batches_per_epoch == 0:  # a fresh shuffle every epoch
            order = rng.permutation(len(x_train)).astype(np.int32)
        j = i % batches_per_epoch
        key, sub = jax.random.split(key)
        params, state, loss = update(params, state, order[j * args.batch:(j + 1) * args.batch], sub)
        losses.append(loss)
        if (i + 1) % args.eval_every == 0 or i + 1 == args.steps:
            key, sub = jax.random.split(key)
            test_elbo = evaluate(params, xte, sub)
            evals.append((i + 1, test_elbo))
            bar.update(i + 1, f"-elbo {float(loss):.2f} test elbo {test_elbo:.2f}")
    train_s = time.perf_counter() - t0
    bar.close()
    losses = np.asarray(jax.device_get(losses), np.float64)

    key, k1, k2 = jax.random.split(key, 3)
    train_elbo = evaluate(params, xtr, k1)
    test_elbo = evaluate(params, xte, k2)
    iwae = {}
    for k in sorted(int(v) for v in args.iwae_k.split(",")):
        key, sub = jax.random.split(key)
        iwae[k] = evaluate_iwae(params, xte, sub, jnp.zeros(k, jnp.float32))
    print(f"after {args.steps} steps ({train_s:.2f} s): train ELBO {train_elbo:.3f}, "
          f"test ELBO {test_elbo:.3f} nats/image")
    print("test IWAE bound: " + ", ".join(f"K={k}: {v:.3f}" for k, v in iwae.items()))
    ks = sorted(iwae)
    if not iwae[ks[-1]] >= iwae[ks[0]] - 0.05:
        raise SystemExit(f"the IWAE bound did not tighten with K: {iwae}")

    fig_path = args.out / "vae_gaussian_loss.png"
    key, sub = jax.random.split(key)
    _plot(losses, evals, m, params, x_test, y_test, sub, fig_path, args)
    summary = {
        "example": "vae_gaussian",
        "dataset": "sklearn load_digits 8x8, binarized at gray level > 7",
        "optimizer": "adam",
        "learning_rate": args.lr,
        "steps": args.steps,
        "batch": args.batch,
        "hidden": args.hidden,
        "latent": args.latent,
        "n_train": len(x_train),
        "n_test": len(x_test),
        "estimator": "pathwise (reparam), KL in closed form",
        "final_train_elbo": train_elbo,
        "final_test_elbo": test_elbo,
        "test_iwae": {str(k): v for k, v in iwae.items()},
        "final_minibatch_loss": float(losses[-1]),
        "compile_s": compile_s,
        "train_s": train_s,
        "plot": str(fig_path),
    }
    (args.out / "vae_gaussian.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {fig_path} and {args.out / 'vae_gaussian.json'}")
    return summary


def _plot(losses, evals, m, params, x_test, y_test, key, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(15, 4.8))
    ax1 = fig.add_subplot(1, 3, 1)
    steps = np.arange(1, len(losses) + 1)
    ax1.plot(steps, losses, lw=0.6, alpha=0.35, label="minibatch -ELBO")
    k = max(1, len(losses) // 60)
    smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
    ax1.plot(steps[k - 1:], smooth, lw=1.5, label=f"minibatch -ELBO ({k}-step mean)")
    ev = np.asarray(evals)
    ax1.plot(ev[:, 0], -ev[:, 1], "o-", ms=3, lw=1, label="test -ELBO")
    ax1.set_ylim(min(smooth.min(), (-ev[:, 1]).min()) - 2, np.percentile(losses, 99))
    ax1.set_xlabel("step")
    ax1.set_ylabel("negative ELBO (nats / image)")
    ax1.set_title("training loss")
    ax1.legend()

    # Test digits (one per class) and their reconstructions from the mean of q(z|x).
    idx = np.array([np.flatnonzero(y_test == c)[0] for c in range(10)])
    recon = np.asarray(m.reconstructions(*params, x_test[idx]))
    cmap = plt.get_cmap("gray_r").with_extremes(bad="#cfe0f0")
    ax2 = fig.add_subplot(1, 3, 2)
    ax2.imshow(tile(np.concatenate([x_test[idx], recon]), 10), cmap=cmap, vmin=0, vmax=1)
    ax2.set_axis_off()
    ax2.set_title("test digits (top) and reconstructions (bottom)")

    # New digits: pixel probabilities of p(x|z) at z ~ N(0, I).
    z = np.asarray(jax.random.normal(key, (40, args.latent)), np.float32)
    ax3 = fig.add_subplot(1, 3, 3)
    ax3.imshow(tile(np.asarray(m.generate(params[1], z)), 10), cmap=cmap, vmin=0, vmax=1)
    ax3.set_axis_off()
    ax3.set_title("samples from the prior (pixel probabilities)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
