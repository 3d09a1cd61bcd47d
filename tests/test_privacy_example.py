"""The DP-SGD example (examples/dp_mlp): it compiles strictly with ghost norms for its weight
matrices; padding a Poisson batch with weight-0 examples changes nothing (clipped or not);
it runs end to end with small settings, reporting the accountant's epsilon for the steps run;
with its default settings (marked slow) it reaches the results stated in docs/benchmarks.md."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

import gradlang
from gradlang.privacy_accountant import epsilon
from stats import assert_close

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "dp_mlp.grad"
KEYS = {"example", "methods", "privacy", "curves", "epsilon_curve", "sampling", "plot"}


def test_compiles_strictly_with_ghost_norms_for_the_weights():
    m = gradlang.compile_file(EXAMPLE, strict=True)
    plan = m.ir.facts.privacy["private"]
    assert {n.leaf: n.ghost for n in plan.leaves} == {"p.l1.w": True, "p.l1.b": False,
                                                      "p.l2.w": True, "p.l2.b": False}
    assert plan.batched == ("x", "y", "w") and (plan.clip, plan.noise) == (1.0, 1.5)


def test_padding_with_zero_weights_changes_nothing(load_example):
    noiseless = EXAMPLE.read_text().replace("noise=1.5", "noise=0")
    m = gradlang.compile_source(noiseless, name="dp_mlp.grad", root=EXAMPLE.parent)
    p = load_example("dp_mlp").init_params(64, 8, 10, seed=0)
    rng = np.random.default_rng(0)
    x = rng.random((5, 64), np.float32)
    y = rng.integers(0, 10, 5).astype(np.int32)
    pad = 3
    xp = np.concatenate([x, rng.random((pad, 64), np.float32)])
    yp = np.concatenate([y, rng.integers(0, 10, pad).astype(np.int32)])
    w = np.concatenate([np.ones(5, np.float32), np.zeros(pad, np.float32)])
    key = jax.random.key(0)
    small = m.private(p, x, y, np.ones(5, np.float32), key)[1]["p"]
    padded = m.private(p, xp, yp, w, key)[1]["p"]
    # the same clipped sum over n = 5 and over n = 8 with three zero-weight rows: an example's
    # gradient (64-, 32- and 10-term products, forward and backward) and its norm (~2,400
    # squares: 5 sqrt(2400), the probabilistic bound) on each side, and the 1/n
    assert_close(jax.tree.map(lambda a: 5 * np.asarray(a), small),
                 jax.tree.map(lambda b: 8 * np.asarray(b), padded), ops=2 * (2 * (64 + 32 + 10) + 5 * 49 + 4))


def test_runs_with_small_settings(run_example):
    s, written = run_example("dp_mlp", ["--steps", "100", "--eval-every", "50"], KEYS)
    for method in ("private", "plain"):
        r = s["methods"][method]
        assert r["test_accuracy_after"] > r["test_accuracy_before"] + 0.3
    q = s["sampling"]["q"]
    assert s["privacy"]["epsilon"] == epsilon(q, 1.5, 100, 1e-5).epsilon  # the same computation
    assert s["privacy"]["epsilon"] < s["privacy"]["epsilon_classic_conversion"]
    assert [c["step"] for c in written["epsilon_curve"]] == [0, 50, 100]


@pytest.mark.slow
def test_with_default_settings(run_example):
    s, _ = run_example("dp_mlp", [], KEYS)
    r = s["methods"]
    # Measured (seed 0, 1000 steps, q = 64/1438, noise 1.5, clip 1): test accuracy 0.125 ->
    # 0.953 (private), 0.986 (non-private); epsilon 5.28 at delta 1e-5 (classic conversion 5.91).
    assert r["private"]["test_accuracy_after"] >= 0.93
    assert r["plain"]["test_accuracy_after"] >= 0.97
    assert s["privacy"]["epsilon"] == pytest.approx(5.28, abs=0.005)  # as rounded above
