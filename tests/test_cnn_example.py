"""examples/cnn_qat: a CNN written with gradlang's conv and max_pool builtins, trained on the
8x8 digits in float32 and with 1-bit (STE) and 4-bit (QuEST) kernels, shortened (300 steps,
slow) and barely (40 steps)."""

from __future__ import annotations

import pytest

KEYS = {"test_accuracy_float32", "test_accuracy_ste1", "test_accuracy_quest4", "results",
        "quest4_kernel_levels_per_channel", "steps", "plot"}

# 300 steps (seed 0). Measured for seeds 0-4 (2026-12-07, a 2-core CPU): test accuracy float32
# 0.978-0.989, 1-bit 0.967-0.983, 4-bit 0.969-0.992; the largest gap to float32 0.014; the
# deployed 4-bit kernels at most 16 values per output channel in the Hadamard basis. Chance
# is 0.1.
MIN_ACCURACY = 0.93
MAX_GAP_TO_FLOAT32 = 0.05


# The fast twin: 40 steps (seed 0). Measured for seeds 0-2 (2026-12-07): test accuracy
# 0.75-0.90 in every variant.
FAST_MIN_ACCURACY = 0.5


@pytest.mark.slow  # the default suite's time (12 min on 2 cores); run with -m slow
def test_the_cnn_starts_learning_in_every_variant(run_example):
    s, _ = run_example("cnn_qat", ["--steps", "40", "--eval-every", "20"], KEYS)
    for variant in ("float32", "ste1", "quest4"):
        assert s[f"test_accuracy_{variant}"] >= FAST_MIN_ACCURACY
    assert max(s["quest4_kernel_levels_per_channel"].values()) <= 16


@pytest.mark.slow
def test_the_cnn_learns_in_float32_and_with_1_and_4_bit_kernels(run_example):
    s, _ = run_example("cnn_qat", ["--steps", "300", "--eval-every", "100"], KEYS)
    ref = s["test_accuracy_float32"]
    assert ref >= MIN_ACCURACY
    for variant in ("ste1", "quest4"):
        assert s[f"test_accuracy_{variant}"] >= MIN_ACCURACY
        assert ref - s[f"test_accuracy_{variant}"] <= MAX_GAP_TO_FLOAT32
    assert max(s["quest4_kernel_levels_per_channel"].values()) <= 16
