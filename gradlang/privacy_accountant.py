"""The privacy of DP-SGD (`by=dp`): the Poisson-subsampled Gaussian mechanism composed over the
steps and converted to (epsilon, delta), by one of two accountants.

One step of `by=dp(clip=C, noise=sigma)` on a batch that holds each of the N training examples
independently with probability q (Poisson sampling) is the sampled Gaussian mechanism with
noise multiplier sigma (the noise's standard deviation over the sensitivity C), under adding or
removing one example.

`rdp` (the default; no dependency). For an integer order alpha >= 2 the mechanism's Rényi DP
is (Mironov, Talwar and Zhang 2019, "Rényi Differential Privacy of the Sampled Gaussian
Mechanism", Section 3.3)

    eps(alpha) = log A / (alpha - 1),
    A = sum_{k=0..alpha} C(alpha, k) (1 - q)^(alpha - k) q^k exp((k^2 - k) / (2 sigma^2)),

computed in log space. T steps compose to T eps(alpha), and any order gives an (epsilon,
delta) guarantee; the best over the orders is reported. Conversions:

- `improved` (the default; Balle et al. 2020, "Hypothesis Testing Interpretations and Rényi
  Differential Privacy", Theorem 21, also Canonne, Kamath and Steinke 2020, Proposition 12):
  epsilon = T eps + log((alpha - 1) / alpha) - (log delta + log alpha) / (alpha - 1), what
  Google's dp-accounting reports;
- `classic` (Mironov 2017, "Rényi Differential Privacy", Proposition 3): epsilon = T eps
  + log(1 / delta) / (alpha - 1), what the TensorFlow Privacy tutorials reported.

The orders are the integers 2..256: A is then a finite sum, exact to rounding. Fractional
orders need an infinite series of erfc terms (ibid.); on the examples' settings the best
fractional order (measured by quadrature) lowers epsilon by 0.2% (dp_mlp) and 3.4% (tiny_lm),
while `pld` below lowers it by 8% and 13% (docs/privacy-accounting.md has the measurements).

`pld` (needs the optional dp-accounting, `pip install 'gradlang[privacy]'`): Google's
privacy-loss-distribution accountant (Koskela et al. 2020; Doroshenko et al. 2022, "Connect
the Dots"), which composes the distribution of the privacy loss itself and reads off the
smallest epsilon at delta, with no conversion loss: near-exact, so lower than `rdp`. The
distribution lives on a grid of `discretization` nats (default 1e-4, dp-accounting's own),
rounded pessimistically: the value is an upper bound on the mechanism's true epsilon, never
below it, above it by a discretization error. On the examples' settings that error is under
1e-5 at 1e-4, under 4e-4 at 1e-3 and 0.008-0.04 at 1e-2 (it falls about like the interval
squared); relative to epsilon it is largest for a small epsilon over many steps (q = 0.001,
noise 4, 1000 steps: epsilon 0.0216, +1.3% at 1e-4, +85% at 1e-3). Time grows like 1 / interval:
0.3-0.7 s for the examples at 1e-4.

The guarantee assumes Poisson sampling: shuffled fixed-size batches are a different mechanism
(its accounting differs), and the examples pad Poisson batches to a fixed size instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

Accountant = Literal["rdp", "pld"]
Conversion = Literal["improved", "classic"]
ACCOUNTANTS: tuple[Accountant, ...] = get_args(Accountant)
CONVERSIONS: tuple[Conversion, ...] = get_args(Conversion)
ORDERS: tuple[int, ...] = tuple(range(2, 257))
PLD_DISCRETIZATION = 1e-4
PLD_MISSING = "the PLD accountant needs dp-accounting: pip install 'gradlang[privacy]'"


@dataclass(frozen=True)
class Guarantee:
    """(epsilon, delta)-DP after `steps` steps at sampling rate q and noise multiplier
    `noise`, from `accountant`: `rdp` attained it at Rényi order `order`; `pld` has no order
    (None) and computed it on a grid of `discretization` nats."""

    epsilon: float
    delta: float
    order: int | None
    steps: int
    q: float
    noise: float
    accountant: Accountant = "rdp"
    discretization: float | None = None

    def __str__(self) -> str:
        how = (f"Rényi order {self.order}" if self.accountant == "rdp" else
               f"PLD accountant, discretization {self.discretization:g}")
        return (f"({self.epsilon:.3g}, {self.delta:g})-DP after {self.steps} steps at sampling "
                f"rate {self.q:.4g} and noise multiplier {self.noise:g} ({how})")


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


def _converted(total: float, order: int, delta: float, conversion: Conversion) -> float:
    """epsilon at delta from the composed Rényi DP `total` at `order`."""
    if conversion == "classic":
        return total + math.log(1 / delta) / (order - 1)
    return total + math.log1p(-1 / order) - (math.log(delta) + math.log(order)) / (order - 1)


def _rdp_epsilon(q: float, noise: float, steps: int, delta: float, orders: tuple[int, ...],
                 conversion: Conversion) -> Guarantee:
    best, order = min((_converted(steps * rdp(q, noise, a) if steps else 0.0, a, delta,
                                  conversion), a) for a in orders)
    return Guarantee(max(best, 0.0), delta, order, steps, q, noise)


def _dp_accounting():
    """Google's dp-accounting, imported on first use (an optional dependency)."""
    try:
        import dp_accounting
    except ImportError as err:
        raise ImportError(PLD_MISSING, name="dp_accounting") from err
    return dp_accounting


def _pld_epsilon(q: float, noise: float, steps: int, delta: float,
                 discretization: float) -> Guarantee:
    """dp-accounting's PLD accountant after `steps` Poisson-sampled Gaussian steps (adding or
    removing one example), read at delta."""
    dpa = _dp_accounting()
    step = dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(noise))
    accountant = dpa.pld.PLDAccountant(dpa.NeighboringRelation.ADD_OR_REMOVE_ONE,
                                       value_discretization_interval=discretization)
    if steps:  # dp-accounting refuses a count of 0; no step leaves the identity: epsilon 0
        accountant.compose(dpa.SelfComposedDpEvent(step, steps))
    return Guarantee(float(accountant.get_epsilon(delta)), delta, None, steps, q, noise, "pld",
                     discretization)


def epsilon(q: float, noise: float, steps: int, delta: float,
            orders: tuple[int, ...] | None = None, conversion: Conversion | None = None,
            accountant: Accountant = "rdp", discretization: float | None = None) -> Guarantee:
    """The smallest epsilon such that `steps` steps of DP-SGD with sampling rate q and noise
    multiplier `noise` are (epsilon, delta)-DP, by `accountant`: `rdp` over `orders` (default
    2..256) with `conversion` (default `improved`), or `pld` (dp-accounting's) on a grid of
    `discretization` nats (default 1e-4)."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")
    if conversion is not None and conversion not in CONVERSIONS:
        raise ValueError(f"conversion must be one of {', '.join(CONVERSIONS)}, got {conversion!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not (0 <= q <= 1) or noise < 0 or steps < 0:
        raise ValueError(f"epsilon needs 0 <= q <= 1, noise >= 0 and steps >= 0, got q={q}, "
                         f"noise={noise}, steps={steps}")
    if accountant == "rdp":
        if discretization is not None:
            raise ValueError("discretization is an option of the pld accountant, not of rdp")
        return _rdp_epsilon(q, noise, steps, delta, ORDERS if orders is None else orders,
                            "improved" if conversion is None else conversion)
    if orders is not None or conversion is not None:
        raise ValueError("orders and conversion are options of the rdp accountant, not of pld")
    discretization = PLD_DISCRETIZATION if discretization is None else discretization
    if not discretization > 0:
        raise ValueError(f"discretization must be positive, got {discretization}")
    return _pld_epsilon(q, noise, steps, delta, discretization)
