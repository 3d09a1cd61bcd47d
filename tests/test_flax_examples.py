"""The examples whose models are Flax modules bound as `jax fn`s (skipped without flax: the
`models` extra).

- examples/flax_qat: a Flax CNN trained through cnn.grad with every kernel quantized to 4 bits
  by `quest(w, 4) with trust`, shortened; it learns, stays near its float32 twin, and its
  deployed kernels lie on QuEST's grid in the Hadamard basis.
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


@pytest.fixture(scope="module")
def flax_qat(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("flax_qat")
    script = EXAMPLES / "flax_qat" / "cnn.py"
    proc = subprocess.run([sys.executable, str(script), "--steps", str(SHORT_STEPS),
                           "--eval-every", "50", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "flax_qat_loss.png").stat().st_size > 0
    return json.loads((out / "flax_qat.json").read_text())


def test_the_4bit_flax_cnn_learns_near_its_float32_twin(flax_qat):
    q4, f32 = flax_qat["test_accuracy_q4"], flax_qat["test_accuracy_float32"]
    assert q4 > MIN_ACCURACY
    assert q4 > f32 - MAX_GAP_TO_FLOAT32
    for arm in ("float", "q4"):
        curve = flax_qat["results"][arm]["loss_curve"]
        assert len(curve) == SHORT_STEPS and curve[-1] < curve[0]


def test_every_deployed_kernel_lies_on_the_4bit_quest_grid(flax_qat):
    grid = flax_qat["grid_check"]
    assert set(grid) == {"Conv_0", "Conv_1", "Dense_0"}
    for name, g in grid.items():
        assert g["max_off_grid"] <= off_grid_tolerance(g["row_length"]), name
        assert -8 <= g["code_min"] and g["code_max"] <= 7, name
        assert g["max_levels_per_row"] <= 16, name
