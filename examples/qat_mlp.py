"""Quantization-aware training with QuEST: train `examples/qat_mlp.grad` on 8x8 digits at 4 and 1 bits.

    python examples/qat_mlp.py [--steps 1500] [--out examples/out]

The data: scikit-learn's 8x8 digits, pixels / 16 in [0, 1], split 80/20 with a fixed seed (as
in binary_mlp.py). The network: 64 -> H -> 10 (H a power of two, default 128) whose weight
matrices and hidden activations are quantized by `quest(x, bits) with trust` (std.quant): the
Hadamard-rotated, Gaussian MSE-optimal grid with QuEST's trust estimator as the backward.
Variants, all from the same initial weights and on the same minibatches (Adam, cosine schedule):

- `float`: the float32 twin (same shapes, no quantizers);
- `q4`, `q1`: 4-bit / 1-bit weights and hidden activations, real-valued input pixels;
- `q4_in`, `q1_in`: the input pixels quantized too (64 features: a power of two).

After training, a check on the deployed 4-bit weights: in the Hadamard basis each output
channel's column takes at most 2^4 = 16 distinct values. Writes `qat_mlp_loss.png` and
`qat_mlp.json` to the output folder.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import gradlang
from binary_mlp import load_digits_01, plot_curves, train_variants

HERE = Path(__file__).resolve().parent
VARIANTS = ("float", "q4", "q1", "q4_in", "q1_in")
LABELS = {"float": "float32 twin", "q4": "QuEST 4-bit", "q1": "QuEST 1-bit",
          "q4_in": "QuEST 4-bit, input too", "q1_in": "QuEST 1-bit, input too"}


def hadamard_matrix(n: int) -> np.ndarray:
    """The orthonormal n x n Walsh-Hadamard matrix (n a power of two; Sylvester order)."""
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def levels_per_channel(w: np.ndarray) -> int:
    """The largest number of distinct values of a quantized weight column in the Hadamard
    basis of the contraction axis (rounded to 1e-4 of the column's RMS)."""
    rotated = hadamard_matrix(w.shape[0]) @ np.asarray(w, np.float64)
    counts = []
    for col in rotated.T:
        tol = 1e-4 * np.sqrt(np.mean(col * col))
        counts.append(len(np.unique(np.round(col / tol))))
    return max(counts)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500, help="optimisation steps per variant (default 1500)")
    ap.add_argument("--out", type=Path, default=HERE / "out", help="output folder (default examples/out)")
    ap.add_argument("--hidden", type=int, default=128, help="hidden units (a power of two)")
    ap.add_argument("--batch", type=int, default=128, help="minibatch size")
    ap.add_argument("--lr", type=float, default=1e-2, help="peak Adam learning rate")
    ap.add_argument("--eval-every", type=int, default=100, help="steps between test evaluations")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.hidden & (args.hidden - 1):
        ap.error(f"--hidden must be a power of two (QuEST rotates the hidden axis), not {args.hidden}")
    args.out.mkdir(parents=True, exist_ok=True)

    x_train, x_test, y_train, y_test = load_digits_01(args.seed)
    print(f"digits: {len(x_train)} train / {len(x_test)} test images, 64 pixels in [0, 1], 10 classes")
    data = tuple(jnp.asarray(a) for a in (x_train, x_test, y_train, y_test))

    t0 = time.perf_counter()
    m = gradlang.compile_file(HERE / "qat_mlp.grad", strict=True)
    compile_s = time.perf_counter() - t0
    print(f"compiled qat_mlp.grad in {compile_s * 1e3:.1f} ms (strict: no warnings)")

    results, curves, trained, train_s = train_variants(m, VARIANTS, data, args, "qat_mlp ")
    ref = results["float"]["test_accuracy"]
    for v in VARIANTS:
        r = results[v]
        r["gap_to_float32"] = ref - r["test_accuracy"]
        print(f"{LABELS[v]:24s} train acc {r['train_accuracy']:.4f}  test acc {r['test_accuracy']:.4f}"
              f"  (float32 - this: {r['gap_to_float32']:+.4f}; {r['train_s']:.1f} s)")

    w1, w2 = m.weights_q4(trained["q4"])
    levels = {"l1": levels_per_channel(np.asarray(w1)), "l2": levels_per_channel(np.asarray(w2))}
    print(f"deployed 4-bit weights: at most {levels['l1']} (layer 1) and {levels['l2']} (layer 2) "
          f"distinct values per output channel in the Hadamard basis (<= 16)")

    fig_path = args.out / "qat_mlp_loss.png"
    plot_curves(curves, results, LABELS, fig_path, min_accuracy=0.7)
    summary = {
        "example": "qat_mlp",
        "optimizer": "adam",
        "learning_rate": args.lr,
        "steps": args.steps,
        "batch": args.batch,
        "hidden": args.hidden,
        "n_train": len(x_train),
        "n_test": len(x_test),
        "quantizer": "quest(x, bits) with trust (weights along the contraction axis, hidden activations per example)",
        "results": results,
        "test_accuracy_float32": ref,
        "test_accuracy_q4": results["q4"]["test_accuracy"],
        "test_accuracy_q1": results["q1"]["test_accuracy"],
        "test_accuracy_q4_input_quantized": results["q4_in"]["test_accuracy"],
        "test_accuracy_q1_input_quantized": results["q1_in"]["test_accuracy"],
        "q4_weight_levels_per_channel": levels,
        "compile_s": compile_s,
        "train_s": train_s,
        "plot": str(fig_path),
    }
    (args.out / "qat_mlp.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {fig_path} and {args.out / 'qat_mlp.json'}")
    return summary


if __name__ == "__main__":
    main()
