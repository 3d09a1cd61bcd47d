"""A discrete-latent VAE with gradlang: score function + RLOO vs Gumbel-softmax on binarized digits.

    python examples/vae_discrete.py [--steps 1500] [--out examples/out]

Loads scikit-learn's 8x8 digits (binarized, as in vae_gaussian.py) and compiles
vae_discrete.grad: L one-hot categorical latents of C classes each, a uniform prior, Bernoulli
pixels (the encoder, decoder and ELBO terms from `use std.vi`). Trains the same initial model
twice with Adam on the same minibatches and keys:

- `step_score`: score-function gradient with a leave-one-out baseline (`with
  score(baseline=loo)`, 4 samples per image): unbiased for the discrete ELBO;
- `step_gumbel`: Gumbel-softmax relaxation (`with gumbel(tau=0.5)`, 4 samples per image):
  pathwise, lower variance, biased (it differentiates a relaxed model).

The exports take a minibatch. The compiler proves that each image's latents reach only that
image's term of the ELBO and credits each image's log-probability with its own term
(`gradlang explain examples/vae_discrete.grad`: "per element of B"), so the leave-one-out
baseline compares the 4 samples of the same image, RLOO as in Kool et al. (2019), without
calling the export image by image.

Reports both models' final ELBO of the discrete model (hard draws, train and test) and the
measured variance of the gradient estimators at the same parameters (the initial ones and the
score-trained ones): the per-coordinate variance over many keys for a fixed minibatch, summed
over all parameters; for the score function also with `credit=whole` (each image's
log-probability times the minibatch's ELBO) and called image by image (`jax.vmap`, the
workaround before the compiler credited per element). Writes `vae_discrete_loss.png` and
`vae_discrete.json` to the output folder.
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
ESTIMATORS = {"score_loo": "step_score", "gumbel": "step_gumbel"}


def init_params(d: int, h: int, n_latents: int, n_classes: int, seed: int) -> tuple[dict, dict]:
    """Glorot-initialised weights, zero biases (CategoricalEncoder and CategoricalDecoder of
    stdlib/vi.grad as dicts)."""
    rng = np.random.default_rng(seed)

    def glorot(*shape: int, fan_in: int, fan_out: int) -> np.ndarray:
        return (rng.normal(size=shape) * np.sqrt(2.0 / (fan_in + fan_out))).astype(np.float32)

    l, c = n_latents, n_classes
    enc = {"hidden": {"w": glorot(d, h, fan_in=d, fan_out=h), "b": np.zeros(h, np.float32)},
           "w": glorot(l, h, c, fan_in=h, fan_out=l * c), "b": np.zeros((l, 1, c), np.float32)}
    dec = {"w": glorot(l, c, h, fan_in=l * c, fan_out=h), "b": np.zeros(h, np.float32),
           "logits": {"w": glorot(h, d, fan_in=h, fan_out=d), "b": np.zeros(d, np.float32)}}
    return enc, dec


def per_image(step):
    """A step export called on each image of a batch separately (one key each), averaged, under
    `jax.jit`: (mean value, mean gradients as an (enc, dec) tuple)."""
    def run(params, x, key):
        keys = jax.random.split(key, x.shape[0])
        values, grads = jax.vmap(lambda xi, k: step(*params, xi[None], k))(x, keys)
        return values.mean(), jax.tree.map(lambda g: g.mean(0), (grads["enc"], grads["dec"]))
    return jax.jit(run)


def batched(step):
    """A step export called once on the whole minibatch, under `jax.jit`."""
    def run(params, x, key):
        value, grads = step(*params, x, key)
        return value, (grads["enc"], grads["dec"])
    return jax.jit(run)


def gradient_variance(run, params, x, key, n_keys: int) -> tuple[dict, np.ndarray]:
    """Per-coordinate variance of a gradient estimator over n_keys keys at fixed parameters and
    data, summed over the encoder's, the decoder's and all parameters; and the mean gradient."""
    draws = {"enc": [], "dec": []}
    for k in jax.random.split(key, n_keys):
        for part, tree in zip(("enc", "dec"), run(params, x, k)[1]):
            draws[part].append(np.concatenate([np.asarray(g, np.float64).ravel()
                                               for g in jax.tree.leaves(tree)]))
    flat = {part: np.stack(d) for part, d in draws.items()}
    var = {part: float(f.var(0, ddof=1).sum()) for part, f in flat.items()}
    mean = np.concatenate([flat["enc"].mean(0), flat["dec"].mean(0)])
    return {"total": var["enc"] + var["dec"], "encoder": var["enc"], "decoder": var["dec"]}, mean


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500, help="optimisation steps per estimator (default 1500)")
    ap.add_argument("--out", type=Path, default=HERE / "out", help="output folder (default examples/out)")
    ap.add_argument("--hidden", type=int, default=128, help="hidden units of encoder and decoder")
    ap.add_argument("--latents", type=int, default=6, help="number of categorical latents L")
    ap.add_argument("--classes", type=int, default=8, help="classes per latent C")
    ap.add_argument("--batch", type=int, default=64, help="minibatch size")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak Adam learning rate")
    ap.add_argument("--var-keys", type=int, default=200, help="keys for the gradient variance")
    ap.add_argument("--eval-every", type=int, default=250, help="steps between test evaluations")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    x_train, x_test, _, y_test = load_binary_digits(args.seed)
    d = x_train.shape[1]
    print(f"binarized digits: {len(x_train)} train / {len(x_test)} test images of {d} pixels; "
          f"{args.latents} latents x {args.classes} classes")

    t0 = time.perf_counter()
    m = gradlang.compile_file(HERE / "vae_discrete.grad")
    compile_s = time.perf_counter() - t0
    print(f"compiled vae_discrete.grad in {compile_s * 1e3:.1f} ms; exports: {', '.join(m.exports)}")

    init = jax.tree.map(jnp.asarray, init_params(d, args.hidden, args.latents, args.classes, args.seed))
    xtr, xte = jnp.asarray(x_train), jnp.asarray(x_test)
    evaluate = PerImageMean(m.evaluate)  # the discrete model's ELBO, 16 hard draws per image
    # One compiled gradient function per estimator, shared by training and the variance
    # measurement (same shapes: a minibatch of args.batch images).
    grad_fns = {name: batched(getattr(m, export)) for name, export in ESTIMATORS.items()}
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(100, args.steps // 10),
                                                  args.steps, end_value=args.lr * 0.05)
    opt = optax.adam(schedule)

    results, curves, trained = {}, {}, {}
    train_s = 0.0

    @jax.jit
    def apply(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for name, grad_fn in grad_fns.items():
        params, state = init, opt.init(init)
        rng = np.random.default_rng(args.seed + 1)  # the same minibatches and keys for both
        key = jax.random.key(args.seed + 1)
        eval_key = jax.random.key(args.seed + 2)
        batches_per_epoch = len(x_train) // args.batch
        order = np.empty(0, np.int32)
        losses, evals = [], []
        bar = ProgressBar(args.steps, label=f"{name:9s} ")
        t0 = time.perf_counter()
        for i in range(args.steps):
            if i % batches_per_epoch == 0:
                order = rng.permutation(len(x_train)).astype(np.int32)
            j = i % batches_per_epoch
            key, sub = jax.random.split(key)
            loss, grads = grad_fn(params, xtr[order[j * args.batch:(j + 1) * args.batch]], sub)
            params, state = apply(params, state, grads)
            losses.append(loss)
            if (i + 1) % args.eval_every == 0 or i + 1 == args.steps:
                test_elbo = float(evaluate(params, xte, eval_key))
                evals.append((i + 1, test_elbo))
                bar.update(i + 1, f"loss {float(loss):.2f} test elbo {test_elbo:.2f}")
        train_s += time.perf_counter() - t0
        bar.close()
        k1, k2 = jax.random.split(jax.random.key(args.seed + 3))
        results[name] = {
            "final_train_elbo": float(evaluate(params, xtr, k1)),
            "final_test_elbo": float(evaluate(params, xte, k2)),
            "final_minibatch_loss": float(losses[-1]),
        }
        curves[name] = (np.asarray(jax.device_get(losses), np.float64), evals)
        trained[name] = params
        print(f"{name}: train ELBO {results[name]['final_train_elbo']:.3f}, "
              f"test ELBO {results[name]['final_test_elbo']:.3f} nats/image "
              f"(discrete model, hard draws)")

    # Gradient variance of both estimators at the same parameters and minibatch, over many keys.
    t0 = time.perf_counter()
    x_var = xtr[:args.batch]
    # For comparison: the score estimator credited with the whole minibatch, and called image
    # by image.
    compared = {"score_loo_credit_whole": batched(m.step_score_whole),
                "score_loo_per_image": per_image(m.step_score)}
    variance = {}
    for at, params in (("init", init), ("score_trained", trained["score_loo"])):
        var_key = jax.random.key(args.seed + 4)
        out, means = {}, {}
        for name, grad_fn in {**grad_fns, **compared}.items():
            out[name], means[name] = gradient_variance(grad_fn, params, x_var, var_key, args.var_keys)
        out["ratio_score_loo_over_gumbel"] = out["score_loo"]["total"] / out["gumbel"]["total"]
        out["gumbel_mean_gradient_cosine_to_score"] = cosine(means["gumbel"], means["score_loo"])
        variance[at] = out
        print(f"gradient variance at the {at} parameters ({args.var_keys} keys, batch {args.batch}): "
              f"score+RLOO {out['score_loo']['total']:.4g}, gumbel {out['gumbel']['total']:.4g} "
              f"(ratio {out['ratio_score_loo_over_gumbel']:.1f}); score+RLOO credited whole "
              f"{out['score_loo_credit_whole']['total']:.4g}, image by image "
              f"{out['score_loo_per_image']['total']:.4g}; cosine(mean gumbel, mean score) "
              f"{out['gumbel_mean_gradient_cosine_to_score']:.3f}")
    variance_s = time.perf_counter() - t0

    fig_path = args.out / "vae_discrete_loss.png"
    _plot(curves, variance, m, trained, x_test, y_test, fig_path)
    summary = {
        "example": "vae_discrete",
        "dataset": "sklearn load_digits 8x8, binarized at gray level > 7",
        "optimizer": "adam",
        "learning_rate": args.lr,
        "steps": args.steps,
        "batch": args.batch,
        "hidden": args.hidden,
        "latents": args.latents,
        "classes": args.classes,
        "samples_per_image": 4,
        "n_train": len(x_train),
        "n_test": len(x_test),
        "estimators": {"score_loo": "score function, leave-one-out baseline, credit per image",
                       "gumbel": "Gumbel-softmax relaxation, tau=0.5"},
        **{f"{name}_final_test_elbo": r["final_test_elbo"] for name, r in results.items()},
        "results": results,
        "gradient_variance_keys": args.var_keys,
        "gradient_variance": variance,
        "compile_s": compile_s,
        "train_s": train_s,
        "variance_s": variance_s,
        "plot": str(fig_path),
    }
    (args.out / "vae_discrete.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {fig_path} and {args.out / 'vae_discrete.json'}")
    return summary


def _plot(curves, variance, m, trained, x_test, y_test, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(15, 4.8))
    ax1 = fig.add_subplot(1, 3, 1)
    colors = {"score_loo": "tab:blue", "gumbel": "tab:orange"}
    labels = {"score_loo": "score + RLOO", "gumbel": "Gumbel-softmax"}
    lo, hi = np.inf, -np.inf
    for name, (losses, evals) in curves.items():
        steps = np.arange(1, len(losses) + 1)
        k = max(1, len(losses) // 60)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        what = "relaxed -ELBO" if name == "gumbel" else "-ELBO"
        ax1.plot(steps[k - 1:], smooth, lw=1.2, color=colors[name],
                 label=f"{labels[name]}: minibatch {what} ({k}-step mean)")
        ev = np.asarray(evals)
        ax1.plot(ev[:, 0], -ev[:, 1], "o--", ms=3, lw=1, color=colors[name],
                 label=f"{labels[name]}: test -ELBO (hard draws)")
        lo, hi = min(lo, smooth.min(), (-ev[:, 1]).min()), max(hi, np.percentile(losses, 95))
    ax1.set_ylim(lo - 2, hi)
    ax1.set_xlabel("step")
    ax1.set_ylabel("nats / image")
    ax1.set_title("training loss and test negative ELBO")
    ax1.legend(fontsize=8)

    ax2 = fig.add_subplot(1, 3, 2)
    names = ["score_loo", "gumbel", "score_loo_credit_whole"]
    xs = np.arange(len(names))
    for i, at in enumerate(variance):
        ax2.bar(xs + (i - 0.5) * 0.38, [variance[at][n]["total"] for n in names], 0.38, label=f"at {at} params")
    ax2.set_xticks(xs, ["score + RLOO\n(credit per image)", "Gumbel-softmax",
                        "score + RLOO\n(credit=whole)"])
    ax2.set_yscale("log")
    ax2.set_ylabel("total gradient variance (sum over parameters)")
    ax2.set_title("gradient variance over keys, same parameters")
    ax2.legend()

    idx = np.array([np.flatnonzero(y_test == c)[0] for c in range(10)])
    rows = [x_test[idx]] + [np.asarray(m.reconstructions(*trained[n], x_test[idx])) for n in curves]
    cmap = plt.get_cmap("gray_r").with_extremes(bad="#cfe0f0")
    ax3 = fig.add_subplot(1, 3, 3)
    ax3.imshow(tile(np.concatenate(rows), 10), cmap=cmap, vmin=0, vmax=1)
    ax3.set_axis_off()
    ax3.set_title("test digits; reconstructions: score + RLOO, Gumbel")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
