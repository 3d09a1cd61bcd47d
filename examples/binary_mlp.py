"""A binarized MLP with gradlang: train `examples/binary_mlp.grad` on 8x8 digits with STE and ReSTE.

    python examples/binary_mlp.py [--steps 1500] [--out examples/out]

The data: scikit-learn's 8x8 handwritten digits (1797 images, 10 classes, 64 pixels with gray
levels 0..16, shipped with scikit-learn), pixels scaled to [0, 1], split 80/20 at random with a
fixed seed. The network: 64 -> H -> 10 with +-1 weights scaled per output channel by mean |w|
(XNOR-Net) and sign activations (std.quant's binary_dense / xnor_dense). The sign functions'
derivative is zero almost everywhere, so each variant trains through a backward rule:

- `ste`: the straight-through estimator with the hardtanh clip, `binarize(x) with ste(clip=1.0)`;
- `reste`: ReSTE, `binarize(x) with reste(power=3)`;
- `float`: the float32 twin (same shapes, real weights, hardtanh activation), for reference.

All three start from the same initial weights and see the same minibatches (Adam, cosine
schedule). After training, a deployment check evaluates the ReSTE network in plain NumPy from
its binary weights (two values per output channel) and +-1 hidden activations and compares
its test accuracy with the compiled `accuracy_reste`. Writes `binary_mlp_loss.png` and
`binary_mlp.json` to the output folder.
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
VARIANTS = ("float", "ste", "reste")
LABELS = {"float": "float32 twin", "ste": "binary, STE(clip=1)", "reste": "binary, ReSTE(power=3)"}


def load_digits_01(seed: int = 0, test_fraction: float = 0.2):
    """(x_train, x_test, y_train, y_test): float32 pixels / 16 in [0, 1], [N, 64], int32
    labels, split at random (fixed seed)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - the examples extra installs it
        raise SystemExit("this example needs scikit-learn for its data set: "
                         "pip install -e '.[examples]' (or pip install scikit-learn)") from e
    digits = load_digits()
    x = (digits.images.reshape(len(digits.images), -1) / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    perm = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    test, train = perm[:n_test], perm[n_test:]
    return x[train], x[test], y[train], y[test]


def init_params(d: int, h: int, c: int, seed: int) -> dict:
    """He-initialised hidden layer, Glorot output layer, zero biases (latent real weights)."""
    rng = np.random.default_rng(seed)
    return {
        "l1": {"w": (rng.normal(size=(d, h)) * np.sqrt(2.0 / d)).astype(np.float32),
               "b": np.zeros(h, np.float32)},
        "l2": {"w": (rng.normal(size=(h, c)) * np.sqrt(2.0 / (h + c))).astype(np.float32),
               "b": np.zeros(c, np.float32)},
    }


def train(m, variant: str, params, data, args, bar: ProgressBar, offset: int):
    """Minibatch Adam on the `step_<variant>` export; returns (params, losses, evals)."""
    x_train, x_test, y_train, y_test = data
    step = getattr(m, f"step_{variant}")
    evaluate = jax.jit(getattr(m, f"accuracy_{variant}"))
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(100, args.steps // 10),
                                                  args.steps, end_value=args.lr * 0.01)
    opt = optax.adam(schedule)
    state = opt.init(params)

    @jax.jit
    def update(params, state, idx):
        loss, grads = step(params, x_train[idx], y_train[idx])
        updates, state = opt.update(grads["p"], state, params)
        return optax.apply_updates(params, updates), state, loss

    rng = np.random.default_rng(args.seed + 1)  # the same minibatches for every variant
    per_epoch = len(x_train) // args.batch
    order = np.empty(0, np.int32)
    losses, evals = [], []
    for i in range(args.steps):
        if i % per_epoch == 0:
            order = rng.permutation(len(x_train)).astype(np.int32)
        j = i % per_epoch
        params, state, loss = update(params, state, order[j * args.batch:(j + 1) * args.batch])
        losses.append(loss)
        if (i + 1) % args.eval_every == 0 or i + 1 == args.steps:
            acc = float(evaluate(params, x_test, y_test))
            evals.append((i + 1, acc))
            bar.update(offset + i + 1, f"{variant:5s} loss {float(loss):.4f} test acc {acc:.3f}")
    return params, np.asarray(jax.device_get(losses), np.float64), evals


def train_variants(m, variants, data, args, label: str, init: dict | None = None):
    """Train every variant from the same initialization (`init`, else the MLP's of
    `init_params`); returns (results, curves, trained params, seconds), results holding each
    variant's accuracies and final loss."""
    if init is None:
        init = init_params(64, args.hidden, 10, args.seed)
    init = jax.tree.map(jnp.asarray, init)
    results, curves, trained = {}, {}, {}
    bar = ProgressBar(args.steps * len(variants), label=label)
    t0 = time.perf_counter()
    for k, variant in enumerate(variants):
        t1 = time.perf_counter()
        params, losses, evals = train(m, variant, init, data, args, bar, k * args.steps)
        acc = getattr(m, f"accuracy_{variant}")
        results[variant] = {"test_accuracy": float(acc(params, data[1], data[3])),
                            "train_accuracy": float(acc(params, data[0], data[2])),
                            "final_minibatch_loss": float(losses[-1]),
                            "train_s": time.perf_counter() - t1}
        curves[variant] = (losses, evals)
        trained[variant] = params
    bar.close()
    return results, curves, trained, time.perf_counter() - t0


def numpy_inference(m, params, x: np.ndarray) -> tuple[np.ndarray, dict]:
    """The binary network's logits in plain NumPy from its deployed form: per output channel
    two weight values +-alpha, +-1 hidden activations (sign with sign(0) = +1)."""
    w1, w2 = (np.asarray(w, np.float64) for w in m.weights(params))
    b1, b2 = (np.asarray(params[k]["b"], np.float64) for k in ("l1", "l2"))
    h = np.where(x @ w1 + b1 >= 0, 1.0, -1.0)
    logits = h @ w2 + b2
    distinct = max(len(np.unique(w[:, o])) for w in (w1, w2) for o in range(w.shape[1]))
    hidden = np.unique(np.asarray(m.hidden(params, x)))
    return logits, {"max_distinct_weights_per_channel": int(distinct),
                    "hidden_values": [float(v) for v in hidden]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500, help="optimisation steps per variant (default 1500)")
    ap.add_argument("--out", type=Path, default=HERE / "out", help="output folder (default examples/out)")
    ap.add_argument("--hidden", type=int, default=256, help="hidden units")
    ap.add_argument("--batch", type=int, default=128, help="minibatch size")
    ap.add_argument("--lr", type=float, default=1e-2, help="peak Adam learning rate")
    ap.add_argument("--eval-every", type=int, default=100, help="steps between test evaluations")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    x_train, x_test, y_train, y_test = load_digits_01(args.seed)
    print(f"digits: {len(x_train)} train / {len(x_test)} test images, 64 pixels in [0, 1], 10 classes")
    data = tuple(jnp.asarray(a) for a in (x_train, x_test, y_train, y_test))

    t0 = time.perf_counter()
    m = gradlang.compile_file(HERE / "binary_mlp.grad", strict=True)
    compile_s = time.perf_counter() - t0
    print(f"compiled binary_mlp.grad in {compile_s * 1e3:.1f} ms (strict: no warnings)")

    results, curves, trained, train_s = train_variants(m, VARIANTS, data, args, "binary_mlp ")
    for v in VARIANTS:
        r = results[v]
        print(f"{v:6s} train acc {r['train_accuracy']:.4f}  test acc {r['test_accuracy']:.4f}  "
              f"({r['train_s']:.1f} s)")

    logits, deployed = numpy_inference(m, trained["reste"], x_test)
    numpy_acc = float(np.mean(np.argmax(logits, axis=1) == y_test))
    deployed["numpy_test_accuracy"] = numpy_acc
    deployed["compiled_test_accuracy"] = results["reste"]["test_accuracy"]
    compiled_logits = np.asarray(m.logits_reste(trained["reste"], x_test), np.float64)
    deployed["max_abs_logit_diff"] = float(np.max(np.abs(logits - compiled_logits)))
    deployed["prediction_agreement"] = float(np.mean(np.argmax(logits, 1) == np.argmax(compiled_logits, 1)))
    print(f"deployment check (ReSTE net in NumPy from +-alpha weights, +-1 activations): test acc "
          f"{numpy_acc:.4f}, compiled {results['reste']['test_accuracy']:.4f}, max |logit diff| "
          f"{deployed['max_abs_logit_diff']:.1e}; weights per channel: "
          f"{deployed['max_distinct_weights_per_channel']} values, hidden values {deployed['hidden_values']}")

    fig_path = args.out / "binary_mlp_loss.png"
    plot_curves(curves, results, LABELS, fig_path, min_accuracy=0.8)
    summary = {
        "example": "binary_mlp",
        "optimizer": "adam",
        "learning_rate": args.lr,
        "steps": args.steps,
        "batch": args.batch,
        "hidden": args.hidden,
        "n_train": len(x_train),
        "n_test": len(x_test),
        "rules": {"ste": "binarize(x) with ste(clip=1.0)", "reste": "binarize(x) with reste(power=3)",
                  "float": "float32 twin (hardtanh)"},
        "results": results,
        "test_accuracy_ste": results["ste"]["test_accuracy"],
        "test_accuracy_reste": results["reste"]["test_accuracy"],
        "test_accuracy_float32": results["float"]["test_accuracy"],
        "deployment_check": deployed,
        "compile_s": compile_s,
        "train_s": train_s,
        "plot": str(fig_path),
    }
    (args.out / "binary_mlp.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {fig_path} and {args.out / 'binary_mlp.json'}")
    return summary


def plot_curves(curves, results, labels: dict, path: Path, min_accuracy: float) -> None:
    """Training loss (running mean) and test accuracy of every variant, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for v, (losses, evals) in curves.items():
        k = max(1, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax1.plot(np.arange(k, len(losses) + 1), smooth, lw=1.3, label=labels[v])
        ev = np.asarray(evals)
        ax2.plot(ev[:, 0], ev[:, 1], "o-", ms=3, lw=1,
                 label=f"{labels[v]} ({results[v]['test_accuracy']:.3f})")
    ax1.set_yscale("log")
    ax1.set_xlabel("step")
    ax1.set_ylabel("minibatch cross-entropy (running mean)")
    ax1.set_title("training loss")
    ax1.legend()
    ax2.set_ylim(min_accuracy, 1.0)
    ax2.set_xlabel("step")
    ax2.set_ylabel("test accuracy")
    ax2.set_title("test accuracy (digits test split)")
    ax2.grid(alpha=0.3)
    ax2.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
