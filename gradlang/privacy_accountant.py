"""The privacy of DP-SGD (`by=dp`): Rényi differential privacy of the Poisson-subsampled
Gaussian mechanism, composed over the steps and converted to (epsilon, delta).

One step of `by=dp(clip=C, noise=sigma)` on a batch that holds each of the N training examples
independently with probability q (Poisson sampling) is the sampled Gaussian mechanism with
noise multiplier sigma (the noise's standard deviation over the sensitivity C). For an integer
order alpha >= 2 its Rényi DP under adding or removing one example is (Mironov, Talwar and
Zhang 2019, "Rényi Differential Privacy of the Sampled Gaussian Mechanism", Section 3.3)

    eps(alpha) = log A / (alpha - 1),
    A = sum_{k=0..alpha} C(alpha, k) (1 - q)^(alpha - k) q^k exp((k^2 - k) / (2 sigma^2)),

computed in log space. T steps compose to T eps(alpha), and any order gives an (epsilon,
delta) guarantee; the best over the orders is reported. Conversions:

- `improved` (the default; Balle et al. 2020, "Hypothesis Testing Interpretations and Rényi
  Differential Privacy", Theorem 21): epsilon = T eps + log((alpha - 1) / alpha)
  - (log delta + log alpha) / (alpha - 1);
- `classic` (Mironov 2017, "Rényi Differential Privacy", Proposition 3): epsilon = T eps
  + log(1 / delta) / (alpha - 1), what the TensorFlow Privacy tutorials reported.

The guarantee assumes Poisson sampling: shuffled fixed-size batches are a different mechanism
(its accounting differs), and the examples pad Poisson batches to a fixed size instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ORDERS: tuple[int, ...] = tuple(range(2, 257))
CONVERSIONS = ("improved", "classic")


@dataclass(frozen=True)
class Guarantee:
    """(epsilon, delta)-DP after `steps` steps at sampling rate q and noise multiplier
    `noise`, attained at Rényi order `order`."""

    epsilon: float
    delta: float
    order: int
    steps: int
    q: float
    noise: float

    def __str__(self) -> str:
        return (f"({self.epsilon:.3g}, {self.delta:g})-DP after {self.steps} steps at sampling "
                f"rate {self.q:.4g} and noise multiplier {self.noise:g} (Rényi order "
                f"{self.order})")


def _logsumexp(xs: list[float]) -> float:
    top = max(xs)
    return top + math.log(sum(math.exp(x - top) for x in xs))


def rdp(q: float, noise: float, order: int) -> float:
    """The Rényi DP of one step of the sampled Gaussian mechanism at an integer order."""
    if not (0 <= q <= 1) or noise < 0 or order < 2 or int(order) != order:
        raise ValueError(f"rdp needs 0 <= q <= 1, noise >= 0 and an integer order >= 2, got "
                         f"q={q}, noise={noise}, order={order}")
    if q == 0:
        return 0.0
    if noise == 0:
        return math.inf
    if q == 1:
        return order / (2 * noise**2)
    terms = [math.lgamma(order + 1) - math.lgamma(k + 1) - math.lgamma(order - k + 1)
             + k * math.log(q) + (order - k) * math.log1p(-q) + (k * k - k) / (2 * noise**2)
             for k in range(order + 1)]
    return _logsumexp(terms) / (order - 1)


def epsilon(q: float, noise: float, steps: int, delta: float,
            orders: tuple[int, ...] = ORDERS, conversion: str = "improved") -> Guarantee:
    """The smallest epsilon over `orders` such that `steps` steps of DP-SGD with sampling rate
    q and noise multiplier `noise` are (epsilon, delta)-DP."""
    if conversion not in CONVERSIONS:
        raise ValueError(f"conversion must be one of {', '.join(CONVERSIONS)}, got {conversion!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    best = None
    for a in orders:
        total = steps * rdp(q, noise, a)
        if conversion == "classic":
            eps = total + math.log(1 / delta) / (a - 1)
        else:
            eps = total + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1)
        if best is None or eps < best[0]:
            best = (max(eps, 0.0), a)
    return Guarantee(best[0], delta, best[1], steps, q, noise)
