"""QAT of a Flax CNN through a `.grad` objective: 4-bit QuEST kernels against float32, on digits.

    python examples/flax_qat/cnn.py [--steps 1500] [--out examples/out]

The model is a Flax linen CNN (`CNN` below: two 3x3 convolutions with 16 and 32 channels, ReLU,
2x2 average pooling, a dense layer to 10 classes). cnn.grad declares it as `jax fn cnn(p: CNN,
x) -> f32[B, 10]`, the struct CNN having the fields of the model's `params` dict, and trains it
on a cross-entropy whose kernels are all quantized to 4 bits by `quest(w, 4) with trust`
(QuEST: Hadamard rotation, Gaussian MSE-optimal grid at each row's RMS, the trust estimator as
the backward rule); compiling with `functions={"cnn": ...}` traces `model.apply` inline. The
float32 twin is the same Flax model trained in plain JAX + optax. Both start from the same
`model.init` parameters and see the same minibatches (Adam, warm-up + cosine schedule: the
training loop of binary_mlp.py). The data: scikit-learn's digits, pixels / 16 in [0, 1],
split 80/20 with a fixed seed.

After training, a check on the deployed kernels: in the Hadamard basis each quantized row lies
on QuEST's grid, (k + 1/2) step for integers -8 <= k <= 7, step = 2 c sigma / 16 (sigma the
row's RMS before quantization, c = gaussian_clip(4)): at most 16 distinct values per row.
Writes `flax_qat.json` (accuracies, loss and accuracy curves, the grid check) and
`flax_qat_loss.png` to the output folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradlang
from gradlang.runtime.quantizers import gaussian_clip

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the examples' shared data, training loop and plot
from binary_mlp import load_digits_01, plot_curves, train  # noqa: E402
from progress import ProgressBar  # noqa: E402
from qat_mlp import hadamard_matrix  # noqa: E402

ARMS = ("float", "q4")
LABELS = {"float": "float32 (plain JAX + optax)", "q4": "QuEST 4-bit kernels (cnn.grad)"}
BITS = 4


class CNN(nn.Module):
    """conv 3x3 (16) - ReLU - avg pool 2 - conv 3x3 (32) - ReLU - avg pool 2 - dense (10), on
    [B, 8, 8, 1] images. The output channels (16, 32) and the dense fan-in (2 x 2 x 32 = 128)
    are powers of two: the axes QuEST rotates."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.avg_pool(nn.relu(nn.Conv(16, (3, 3))(x)), (2, 2), (2, 2))
        x = nn.avg_pool(nn.relu(nn.Conv(32, (3, 3))(x)), (2, 2), (2, 2))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def float_arm(model: CNN) -> SimpleNamespace:
    """The float32 twin in plain JAX + optax, with the exports' call conventions (a step
    returns the loss and {"p": gradient}) so that both arms share one training loop."""

    def loss(params, x, y):
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(params, x, y):
        value, grads = jax.value_and_grad(loss)(params, x, y)
        return value, {"p": grads}

    def accuracy(params, x, y):
        return jnp.mean(jnp.argmax(model.apply({"params": params}, x), -1) == y)

    return SimpleNamespace(step_float=step, accuracy_float=accuracy)


def rotated_rows(name: str, kernel) -> np.ndarray:
    """A kernel's rows along the axis cnn.grad quantizes (conv: output channels; dense: the
    fan-in, one row per class), in float64."""
    k = np.asarray(kernel, np.float64)
    return k.T if name.startswith("Dense") else k.reshape(-1, k.shape[-1])


def grid_check(params: dict, quantized: dict) -> dict:
    """Per kernel: each quantized row in the Hadamard basis divided by its QuEST step, minus
    1/2 (integers in [-8, 7] when it is on the grid): the largest distance to an integer, the
    codes' range and the most distinct codes in a row."""
    out = {}
    for name in params:
        w = rotated_rows(name, params[name]["kernel"])
        q = rotated_rows(name, quantized[name]["kernel"])
        sigma = np.sqrt(np.mean(w * w, -1, keepdims=True))  # the rotation keeps a row's RMS
        step = 2 * gaussian_clip(BITS) * sigma / 2 ** BITS
        codes = q @ hadamard_matrix(q.shape[-1]) / step - 0.5
        k = np.round(codes)
        out[name] = {"row_length": q.shape[-1], "rows": q.shape[0],
                     "max_off_grid": float(np.max(np.abs(codes - k))),
                     "code_min": int(k.min()), "code_max": int(k.max()),
                     "max_levels_per_row": max(len(np.unique(row)) for row in k)}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500,
                    help="optimisation steps per arm (default 1500)")
    ap.add_argument("--out", type=Path, default=HERE.parent / "out",
                    help="output folder (default examples/out)")
    ap.add_argument("--batch", type=int, default=128, help="minibatch size")
    ap.add_argument("--lr", type=float, default=1e-2, help="peak Adam learning rate")
    ap.add_argument("--eval-every", type=int, default=100, help="steps between test evaluations")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    x_train, x_test, y_train, y_test = load_digits_01(args.seed)
    print(f"digits: {len(x_train)} train / {len(x_test)} test 8x8 images, 10 classes")
    images = [jnp.asarray(a.reshape(-1, 8, 8, 1)) for a in (x_train, x_test)]
    data = (images[0], images[1], jnp.asarray(y_train), jnp.asarray(y_test))

    model = CNN()
    init = model.init(jax.random.key(args.seed), data[0][:1])["params"]
    t0 = time.perf_counter()
    m = gradlang.compile_file(HERE / "cnn.grad", strict=True,
                              functions={"cnn": lambda p, x: model.apply({"params": p}, x)})
    compile_s = time.perf_counter() - t0
    print(f"compiled cnn.grad with the Flax model bound as `cnn` in {compile_s:.2f} s")

    arms = float_arm(model)
    arms.step_q4, arms.accuracy_q4 = m.step_q4, m.accuracy_q4
    results, curves, trained = {}, {}, {}
    bar = ProgressBar(args.steps * len(ARMS), label="flax_qat ")
    for k, arm in enumerate(ARMS):
        t1 = time.perf_counter()
        params, losses, evals = train(arms, arm, init, data, args, bar, k * args.steps)
        accuracy = jax.jit(getattr(arms, f"accuracy_{arm}"))
        results[arm] = {"test_accuracy": float(accuracy(params, data[1], data[3])),
                        "train_accuracy": float(accuracy(params, data[0], data[2])),
                        "final_minibatch_loss": float(losses[-1]),
                        "train_s": time.perf_counter() - t1,
                        "loss_curve": losses.tolist(), "test_accuracy_curve": evals}
        curves[arm], trained[arm] = (losses, evals), params
    bar.close()
    for arm in ARMS:
        r = results[arm]
        print(f"{LABELS[arm]:30s} train acc {r['train_accuracy']:.4f}  test acc "
              f"{r['test_accuracy']:.4f}  ({r['train_s']:.1f} s)")

    grid = grid_check(trained["q4"], m.quantized(trained["q4"]))
    for name, g in grid.items():
        print(f"{name} kernel: {g['rows']} rows of {g['row_length']}, rotated codes in "
              f"[{g['code_min']}, {g['code_max']}], at most {g['max_levels_per_row']} distinct "
              f"per row, off the grid by at most {g['max_off_grid']:.1e} steps")

    plot = args.out / "flax_qat_loss.png"
    plot_curves(curves, results, LABELS, plot, min_accuracy=0.5)
    summary = {"example": "flax_qat", "model": "Flax linen CNN: conv3x3(16)-relu-avgpool2-"
               "conv3x3(32)-relu-avgpool2-dense(10)",
               "quantizer": f"quest(w, {BITS}) with trust on every kernel (biases float32)",
               "steps": args.steps, "batch": args.batch, "learning_rate": args.lr,
               "n_train": len(x_train), "n_test": len(x_test),
               "test_accuracy_float32": results["float"]["test_accuracy"],
               "test_accuracy_q4": results["q4"]["test_accuracy"],
               "results": results, "grid_check": grid, "compile_s": compile_s,
               "plot": str(plot)}
    (args.out / "flax_qat.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {plot} and {args.out / 'flax_qat.json'}")
    return summary


if __name__ == "__main__":
    main()
