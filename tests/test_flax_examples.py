"""The examples whose models are Flax modules bound as `jax fn`s (skipped without flax: the
`models` extra).

- examples/flax_qat: a Flax CNN trained through cnn.grad with every kernel quantized to 4 bits
  by `quest(w, 4) with trust`, shortened; it learns, stays near its float32 twin, and its
  deployed kernels lie on QuEST's grid in the Hadamard basis.
- examples/flax_vae: a discrete VAE whose encoder and decoder are Flax modules (tree params,
  the draw's estimator automatic), shortened; it learns, and from the `.grad`-only VAE's
  weights it computes the same gradients and reaches the same ELBO.
- examples/flax_mezo: MeZO fine-tuning of a Flax character-level LM (tree params), shortened
  (slow); it lowers the held-out loss. A step fits in 1.1x the forward pass's memory (its
  model at initialization, fast).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gradlang.runtime.quantizers import gaussian_clip

pytest.importorskip("flax")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EPS32 = float(np.finfo(np.float32).eps)

# Test accuracy of the 4-bit CNN after 150 steps (seed 0). Measured for seeds 0-4 (2026-12-07,
# commit d2d55c6, a 2-core CPU): 0.925-0.947, the float32 twin 0.928-0.958, the largest gap
# 0.020. Chance is 0.1.
SHORT_STEPS = 150
MIN_ACCURACY = 0.85
MAX_GAP_TO_FLOAT32 = 0.05


def off_grid_tolerance(n: int, bits: int = 4) -> float:
    """How far (in steps) a float32 QuEST row of length n may lie from an exact grid point when
    checked in float64: the codes reach 2^(bits-1) in magnitude and the step's relative error is
    at most n eps (sigma sums n squares); each of the two float32 Hadamard transforms (into the
    rotated space and back) is off by at most (log2 n + 1) eps ||row|| = (log2 n + 1) eps
    sqrt(n) sigma, i.e. that over step / sigma = 2 c / 2^bits steps."""
    step_over_sigma = 2 * gaussian_clip(bits) / 2 ** bits
    transforms = 2 * (math.log2(n) + 1) * math.sqrt(n) / step_over_sigma
    return (2 ** (bits - 1) * n + transforms) * EPS32


@pytest.mark.slow  # the default suite's time (12 min on 2 cores); run with -m slow
def test_the_4bit_flax_cnn_learns_near_its_float32_twin_on_the_quest_grid(tmp_path):
    """The 4-bit CNN learns near its float32 twin, and every deployed kernel lies on the 4-bit
    QuEST grid. One test, so that the run is not repeated on each test worker."""
    run_example(EXAMPLES / "flax_qat" / "cnn.py", tmp_path, "--steps", str(SHORT_STEPS),
                "--eval-every", "50")
    assert (tmp_path / "flax_qat_loss.png").stat().st_size > 0
    flax_qat = json.loads((tmp_path / "flax_qat.json").read_text())
    q4, f32 = flax_qat["test_accuracy_q4"], flax_qat["test_accuracy_float32"]
    assert q4 > MIN_ACCURACY
    assert q4 > f32 - MAX_GAP_TO_FLOAT32
    for arm in ("float", "q4"):
        curve = flax_qat["results"][arm]["loss_curve"]
        assert len(curve) == SHORT_STEPS and curve[-1] < curve[0]
    grid = flax_qat["grid_check"]
    assert set(grid) == {"Conv_0", "Conv_1", "Dense_0"}
    for name, g in grid.items():
        assert g["max_off_grid"] <= off_grid_tolerance(g["row_length"]), name
        assert -8 <= g["code_min"] and g["code_max"] <= 7, name
        assert g["max_levels_per_row"] <= 16, name


def run_example(script: Path, out: Path, *args: str) -> None:
    proc = subprocess.run([sys.executable, str(script), *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


# The shortened VAE: 100 steps (seed 0). Measured for seeds 0-4 (2026-12-07, commit a99011b, a
# 2-core CPU): test ELBO -24.4 to -25.0 nats/image for every arm after 100 steps (-22.00 to
# -22.63 after 300; -45.8 and -45.2 at the start for seed 0, from the shared and Flax's init),
# the Flax arm from the shared init equal to the .grad-only arm to 0.001 nats, the first
# gradients' largest relative leaf difference 1.8e-6.
VAE_STEPS = 100
MIN_VAE_TEST_ELBO = -26.0
MAX_VAE_GAP = 0.1


def first_gradient_tolerance(d: int = 64, hidden: int = 128, latents: int = 6,
                             classes: int = 8) -> float:
    """How far two float32 computations of the same gradient that sum in different orders may
    differ, relative to a leaf's largest entry: each sum of n terms is off by at most n eps of
    its terms' magnitudes, and the forward and backward passes each run the network's
    contractions (D pixels, H hidden units, L C latent classes, H, D) once."""
    return 2 * (d + hidden + latents * classes + hidden + d) * EPS32


@pytest.mark.slow  # the default suite's time (12 min on 2 cores); run with -m slow
def test_the_flax_vae_learns_and_is_the_grad_vae(tmp_path):
    """Every arm learns; from the same weights, minibatches and keys, the Flax modules bound
    as jax fns give the .grad-only VAE's gradients (the same draws), and training reaches its
    ELBO. One test, so that the run (20 s of compiling and training) is not repeated on each
    test worker."""
    run_example(EXAMPLES / "flax_vae" / "vae.py", tmp_path, "--steps", str(VAE_STEPS),
                "--eval-every", "50")
    assert (tmp_path / "flax_vae_loss.png").stat().st_size > 0
    flax_vae = json.loads((tmp_path / "flax_vae.json").read_text())
    for arm in ("flax", "flax_init", "grad"):
        curve = flax_vae["results"][arm]["test_elbo_curve"]
        assert curve[0][0] == 0 and curve[-1][0] == VAE_STEPS
        assert flax_vae["results"][arm]["final_test_elbo"] > MIN_VAE_TEST_ELBO > curve[0][1], arm
    for part, diff in flax_vae["first_gradient_relative_difference"].items():
        assert diff <= first_gradient_tolerance(), part
    assert abs(flax_vae["test_elbo_flax"] - flax_vae["test_elbo_grad"]) < MAX_VAE_GAP


# The shortened MeZO run: 1000 pretraining steps, 500 fine-tuning steps (seed 0). Measured for
# seeds 0-4 (2026-12-07, commit a99011b, a 2-core CPU): MeZO lowered the held-out stdlib loss
# from 2.66-2.72 nats/char by 0.041-0.066, backprop + Adam by 0.49-0.52.
MEZO_ARGS = ("--steps", "500", "--pretrain-steps", "1000", "--eval-every", "250")
MIN_MEZO_GAIN = 0.02
MEMORY_TARGET = 1.1  # the issue's: a MeZO step within 1.1x a forward pass


@pytest.fixture(scope="module")
def flax_mezo(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("flax_mezo")
    run_example(EXAMPLES / "flax_mezo" / "mezo.py", out, *MEZO_ARGS)
    assert (out / "flax_mezo_loss.png").stat().st_size > 0
    return json.loads((out / "flax_mezo.json").read_text())


@pytest.mark.slow
def test_mezo_fine_tuning_lowers_the_held_out_loss(flax_mezo):
    before = flax_mezo["stdlib_loss_before"]
    assert flax_mezo["stdlib_loss_after_mezo"] < before - MIN_MEZO_GAIN
    assert flax_mezo["stdlib_loss_after_backprop"] < flax_mezo["stdlib_loss_after_mezo"]


@pytest.mark.slow  # the default suite's time (12 min on 2 cores); fast twin: test_descend's no-copy step
def test_the_mezo_step_fits_in_1_1x_the_forward_pass():
    """The example's memory measurement on its model at initialization (the weights' values
    do not change the compiled memory). Under XLA's default CPU options the forward pass's MLP
    is one YNNPACK fusion whose activations are not counted: at batch 1 (the parameters
    dominate) every accounting is held to the target, at the training batch the one counting
    both sides' activations (skipped where this XLA lacks its option)."""
    import importlib.util

    import jax
    import jax.numpy as jnp

    import gradlang
    sys.path.insert(0, str(EXAMPLES))  # the example imports the examples' progress bar
    spec = importlib.util.spec_from_file_location("flax_mezo_example",
                                                  EXAMPLES / "flax_mezo" / "mezo.py")
    ex = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = ex  # a Flax module's dataclass looks its module up
    spec.loader.exec_module(ex)
    model, k = ex.CharLM(16, 128), 16
    params = model.init(jax.random.key(0), jnp.zeros((1, k), jnp.int32))["params"]
    m = gradlang.compile_file(EXAMPLES / "flax_mezo" / "mezo.grad",
                              functions={"lm": lambda p, c: model.apply({"params": p}, c)})
    by = {}
    for acc, options in ex.accountings().items():
        for batch in (1024, 1):
            context, nxt = jnp.zeros((batch, k), jnp.int32), jnp.zeros(batch, jnp.int32)
            forward = ex.memory(m.loss, (params, context, nxt), options)["total"]
            step = ex.memory(m.mezo, (params, context, nxt, jnp.float32(1e-3),
                                      jax.random.key(0)), options, donate_argnums=0)["total"]
            by.setdefault(acc, {})[batch] = step / forward
    assert all(r[1] <= MEMORY_TARGET for r in by.values()), by
    if "per_dot" not in by:
        pytest.skip("this XLA has no per-dot YNNPACK fusion option to count the forward's "
                    "activations with")
    assert max(by["per_dot"].values()) <= MEMORY_TARGET, by
