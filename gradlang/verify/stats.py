"""The statistics of one gradient leaf: the estimates against the reference.

With d = mean - reference per compared coordinate, sigma^2 = SE(mean)^2 + SE(reference)^2 and
B = the reference's deterministic bound + a float32 floor 16 eps32 (|mean| + |ref| + rms(ref)):

- t_i = max(|d_i| - B_i, 0) / sigma_i (infinite when sigma_i = 0 and |d_i| > B_i);
- the leaf is consistent when max t_i <= z (z = 5: a false alarm rate of 6e-7 per coordinate)
  and the chi-square statistic T = sum t_i^2 over the K coordinates with sigma_i > 0, made
  normal by Wilson and Hilferty's cube root, ((T/K)^(1/3) - 1 + 2/(9K)) / sqrt(2/(9K)), is at
  most z (this catches a bias spread thinly over many coordinates);
- relative bias ||d|| / ||ref||, and a 95% confidence interval for ||E mean - ref|| / ||ref||
  by the delta method: ||d||^2 - sum sigma^2 estimates the squared bias without the noise,
  with variance 4 sum d_i^2 sigma_i^2 + 2 sum sigma_i^4 (the norm of the reference taken as
  exact);
- zero gradient: every estimate is exactly zero and the leaf is not consistent (so the
  reference is not zero: some |ref_i| > z SE_i + B_i);
- effective sample size (Kish's, the estimates as weights): ESS = N / (1 + tr Cov / ||ref||^2),
  N for an estimator without variance, about N SNR^2 when noise dominates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)
Z = 5.0
CONSISTENT = "consistent"
BY_DESIGN = "biased by design"
BIASED = "biased beyond tolerance"
ZERO = "zero gradient"
VERDICTS = (CONSISTENT, BY_DESIGN, BIASED, ZERO)
"""From best to worst; the last two fail (exit code 1)."""


@dataclass(frozen=True)
class LeafStats:
    name: str
    shape: tuple[int, ...]
    coords: np.ndarray | None
    """The flat coordinates compared with the reference (None: all)."""
    mean: np.ndarray
    reference: np.ndarray
    reference_error: np.ndarray
    reference_bound: np.ndarray
    variance: np.ndarray
    """Per coordinate (all of them), of one estimate."""
    relative_bias: float | None
    ci95: tuple[float, float] | None
    absolute_bias: float
    noise_floor: float | None
    cosine: float | None
    ess: float
    max_z: float
    chi2_z: float | None
    zero_estimate: bool
    zero_reference: bool
    verdict: str

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=int))

    @property
    def total_variance(self) -> float:
        return float(self.variance.sum())


def _ratio(x: float, norm: float) -> float | None:
    return x / norm if norm > 0 else None


def leaf_stats(name: str, shape: tuple[int, ...], samples: np.ndarray, reference: np.ndarray,
               error: np.ndarray, bound: np.ndarray, coords: np.ndarray | None,
               by_design: bool, z: float = Z) -> LeafStats:
    """The statistics of `samples` [N, size] against the reference at `coords`."""
    n = samples.shape[0]
    variance = samples.var(0, ddof=1) if n > 1 else np.zeros(samples.shape[1])
    picked = samples if coords is None else samples[:, coords]
    mean = picked.mean(0)
    se2 = (variance if coords is None else variance[coords]) / n + error ** 2
    rms = float(np.sqrt(np.mean(reference ** 2))) if reference.size else 0.0
    tolerance = bound + 16 * EPS32 * (np.abs(mean) + np.abs(reference) + rms)
    d = mean - reference
    excess = np.maximum(np.abs(d) - tolerance, 0)
    sigma = np.sqrt(se2)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(sigma > 0, excess / np.where(sigma > 0, sigma, 1), np.where(excess > 0, np.inf, 0))
    k = int((sigma > 0).sum())
    chi2_z = (float(((np.sum(t[sigma > 0] ** 2) / k) ** (1 / 3) - 1 + 2 / (9 * k))
                    / np.sqrt(2 / (9 * k))) if k else None)
    max_z = float(t.max()) if t.size else 0.0
    norm = float(np.linalg.norm(reference))
    q = float(d @ d - se2.sum())
    sd = float(np.sqrt(4 * np.sum(d ** 2 * se2) + 2 * np.sum(se2 ** 2)))
    ci = (np.sqrt(max(q - 1.96 * sd, 0)), np.sqrt(max(q + 1.96 * sd, 0)))
    zero_estimate = not samples.any()
    zero_reference = not bool(np.any(np.abs(reference) > z * error + tolerance))
    mean_norm = float(np.linalg.norm(mean))
    cosine = float(mean @ reference / (mean_norm * norm)) if mean_norm > 0 and norm > 0 else None
    trace = float(variance.sum())
    ess = n / (1 + trace / norm ** 2) if norm > 0 else (float(n) if trace == 0 else 0.0)
    if max_z <= z and (chi2_z is None or chi2_z <= z):
        verdict = CONSISTENT
    elif zero_estimate:
        verdict = ZERO
    else:
        verdict = BY_DESIGN if by_design else BIASED
    return LeafStats(name, shape, coords, mean, reference, error, bound, variance,
                     _ratio(float(np.linalg.norm(d)), norm),
                     (ci[0] / norm, ci[1] / norm) if norm > 0 else None,
                     float(np.linalg.norm(d)), _ratio(float(np.sqrt(se2.sum())), norm), cosine,
                     float(ess), max_z, chi2_z, zero_estimate, zero_reference, verdict)


def worst(verdicts: list[str]) -> str:
    return max(verdicts, key=VERDICTS.index, default=CONSISTENT)
