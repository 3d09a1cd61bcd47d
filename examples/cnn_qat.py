"""A CNN written in gradlang, trained on 8x8 digits in float32, with 1-bit and with 4-bit kernels.

    python examples/cnn_qat.py [--steps 1500] [--out examples/out]

`examples/cnn_qat.grad`: conv 4x4 (16 channels) - relu - max pool 2 - conv 4x4 (32) - relu -
max pool 2 - dense (10), channels last, written with gradlang's `conv` and `max_pool`
builtins (no JAX model). Variants, from the same initial weights on the same minibatches
(Adam with a warmup-cosine schedule, as `binary_mlp.py`):

- `float`: the float32 network;
- `ste1`: 1-bit kernels, binarize with STE (hardtanh clip) times each output channel's mean
  |w| (std.quant's `binary_kernel_ste`: `binary_w_ste` on the kernel flattened to
  [KH * KW * C, O]);
- `quest4`: 4-bit kernels, QuEST with its trust estimator (std.quant's `quest4_kernel`:
  `quest4_w` on the flattened kernel, a Hadamard rotation of the 16 C contraction rows, a
  Gaussian MSE-optimal grid per output channel).

The dense head stays real-valued in every variant. After training, the deployed 4-bit kernels
are checked: in the Hadamard basis each output channel takes at most 2^4 = 16 distinct values.
The data: scikit-learn's 8x8 digits, pixels / 16, split 80/20 with a fixed seed (as
binary_mlp.py). Writes `cnn_qat_loss.png` and `cnn_qat.json` to the output folder.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import gradlang
from binary_mlp import load_digits_01, plot_curves, train_variants
from qat_mlp import hadamard_matrix

HERE = Path(__file__).resolve().parent
VARIANTS = ("float", "ste1", "quest4")
LABELS = {"float": "float32", "ste1": "1-bit kernels (STE)", "quest4": "4-bit kernels (QuEST)"}


def levels_per_channel(w: np.ndarray) -> int:
    """The largest number of distinct values of a column of w [rows, O] in the Hadamard
    basis of its rows: sorted values further apart than 1e-3 of the column's RMS (the
    float32 rotations leave values of one level about 1e-6 of it apart)."""
    rotated = hadamard_matrix(w.shape[0]) @ np.asarray(w, np.float64)
    counts = []
    for col in rotated.T:
        gaps = np.diff(np.sort(col)) > 1e-3 * np.sqrt(np.mean(col * col))
        counts.append(1 + int(gaps.sum()))
    return max(counts)


def init_params(seed: int) -> dict:
    """He-initialised kernels and head, zero biases (the latent real weights)."""
    rng = np.random.default_rng(seed)

    def he(shape, fan_in):
        return (rng.normal(size=shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    return {"c1": {"w": he((4, 4, 1, 16), 16), "b": np.zeros(16, np.float32)},
            "c2": {"w": he((4, 4, 16, 32), 256), "b": np.zeros(32, np.float32)},
            "head": {"w": he((128, 10), 128), "b": np.zeros(10, np.float32)}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500, help="optimisation steps per variant "
                                                            "(default 1500)")
    ap.add_argument("--out", type=Path, default=HERE / "out",
                    help="output folder (default examples/out)")
    ap.add_argument("--batch", type=int, default=128, help="minibatch size")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak Adam learning rate")
    ap.add_argument("--eval-every", type=int, default=100, help="steps between test evaluations")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    x_train, x_test, y_train, y_test = load_digits_01(args.seed)
    print(f"digits: {len(x_train)} train / {len(x_test)} test images, 8 x 8 x 1, 10 classes")
    data = (jnp.asarray(x_train.reshape(-1, 8, 8, 1)), jnp.asarray(x_test.reshape(-1, 8, 8, 1)),
            jnp.asarray(y_train), jnp.asarray(y_test))

    t0 = time.perf_counter()
    m = gradlang.compile_file(HERE / "cnn_qat.grad", strict=True)
    compile_s = time.perf_counter() - t0
    print(f"compiled cnn_qat.grad in {compile_s * 1e3:.1f} ms (strict: no warnings)")

    init = init_params(args.seed)
    n_params = sum(int(np.size(a)) for a in jax.tree.leaves(init))
    results, curves, trained, train_s = train_variants(m, VARIANTS, data, args, "cnn_qat ",
                                                       init)

    ref = results["float"]["test_accuracy"]
    for v in VARIANTS:
        r = results[v]
        r["gap_to_float32"] = ref - r["test_accuracy"]
        print(f"{LABELS[v]:24s} train acc {r['train_accuracy']:.4f}  test acc "
              f"{r['test_accuracy']:.4f}  (float32 - this: {r['gap_to_float32']:+.4f}; "
              f"{r['train_s']:.1f} s)")
    k1, k2 = m.kernels_quest4(trained["quest4"])
    levels = {name: levels_per_channel(np.asarray(k).reshape(-1, k.shape[-1]))
              for name, k in (("c1", k1), ("c2", k2))}
    print(f"deployed 4-bit kernels: at most {levels['c1']} (conv 1) and {levels['c2']} (conv 2) "
          f"distinct values per output channel in the Hadamard basis (<= 16)")

    fig_path = args.out / "cnn_qat_loss.png"
    plot_curves(curves, results, LABELS, fig_path, min_accuracy=0.7)
    summary = {
        "example": "cnn_qat", "params": n_params, "optimizer": "adam",
        "learning_rate": args.lr, "steps": args.steps, "batch": args.batch,
        "n_train": len(x_train), "n_test": len(x_test),
        "network": "conv 4x4 (16) - relu - max_pool 2 - conv 4x4 (32) - relu - max_pool 2 - "
                   "dense (10)",
        "results": results,
        "test_accuracy_float32": ref,
        "test_accuracy_ste1": results["ste1"]["test_accuracy"],
        "test_accuracy_quest4": results["quest4"]["test_accuracy"],
        "quest4_kernel_levels_per_channel": levels,
        "compile_s": compile_s, "train_s": train_s, "plot": str(fig_path),
    }
    (args.out / "cnn_qat.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {fig_path} and {args.out / 'cnn_qat.json'}")
    return summary


if __name__ == "__main__":
    main()
