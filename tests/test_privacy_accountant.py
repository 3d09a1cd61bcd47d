"""The accountants of DP-SGD (`gradlang.privacy_accountant`): our RDP and dp-accounting's PLD.

- one step's Rényi DP equals a numerical integral of the Rényi divergence between the
  subsampled mixture (1 - q) N(0, s^2) + q N(1, s^2) and N(0, s^2) (the formula is its
  binomial expansion), and the Gaussian mechanism's alpha / (2 s^2) without subsampling;
- epsilon against the published TensorFlow Privacy MNIST tutorial table (Poisson rate
  256/60000, delta = 1e-5, RDP with the classic conversion, steps = epochs x 234): noise 1.12
  for 60 epochs gives 2.92, noise 1.2 for 10 epochs 1.20 (both reproduced to the 2 digits
  printed), noise 0.6 for 30 epochs 9.74 (we get 9.77: TensorFlow Privacy also used fractional
  orders, whose optimum here lies between the integers, so ours is 0.3% higher);
- the widely cited setting noise 1.1, 60 epochs: 3.01 (classic), 2.59 (the improved
  conversion, the default);
- epsilon grows with the steps, the sampling rate and 1 / noise; bad arguments are errors;
- against Google's dp-accounting (the optional extra `privacy`; these tests skip without it):
  our RDP per order equals its RdpAccountant's to float64 rounding over a grid of rates, noises
  and steps, and so does epsilon by either conversion; its PLD accountant, our `pld`, is below
  our RDP on a grid, and without subsampling within its grid of the Gaussian mechanism's exact
  epsilon (Balle and Wang 2018); without dp-accounting `pld` says what to install.
"""

from __future__ import annotations

import math
import re
import sys

import numpy as np
import pytest

from gradlang.privacy_accountant import ORDERS, PLD_MISSING, epsilon, rdp

Q = 256 / 60000
STEPS_PER_EPOCH = 60000 // 256


@pytest.mark.parametrize("q, noise, order", [(0.01, 1.1, 2), (0.01, 1.1, 8), (0.1, 0.8, 5),
                                             (0.3, 2.0, 12), (0.05, 0.7, 3)])
def test_rdp_equals_the_renyi_divergence_by_quadrature(q, noise, order):
    x = np.linspace(-40, 40, 400_001)
    base = np.exp(-x**2 / (2 * noise**2)) / (noise * math.sqrt(2 * math.pi))
    ratio = (1 - q) + q * np.exp((2 * x - 1) / (2 * noise**2))  # mixture density / base
    integral = np.trapezoid(base * ratio**order, x)
    # the trapezoid rule is exact to rounding for a smooth integrand decaying this fast (its
    # error falls like exp(-2 pi^2 noise^2 / h^2)); its 4e5-term sum rounds by ~4e5 eps64
    # relative, which the log of an integral near 1 amplifies by integral / log(integral)
    rel = len(x) * np.finfo(np.float64).eps * integral / abs(math.log(integral))
    assert rdp(q, noise, order) == pytest.approx(math.log(integral) / (order - 1), rel=rel)


def test_without_subsampling_it_is_the_gaussian_mechanism():
    assert rdp(1.0, 2.0, 7) == pytest.approx(7 / 8, rel=1e-12)  # float64: ~10 roundings
    assert rdp(0.0, 2.0, 7) == 0.0


@pytest.mark.parametrize("noise, epochs, published, tolerance", [(1.12, 60, 2.92, 0.005),
                                                                 (1.2, 10, 1.20, 0.005),
                                                                 (0.6, 30, 9.74, 0.04)])
def test_tensorflow_privacy_mnist_table(noise, epochs, published, tolerance):
    """The published values are rounded to 0.01 (+-0.005). At noise 0.6 the best order of our
    integer grid is 3 (epsilon 9.767), while TF Privacy's grid also has fractional orders
    between 2 and 4, which can only lower it: that difference of grids is what 0.04 allows."""
    got = epsilon(Q, noise, epochs * STEPS_PER_EPOCH, 1e-5, conversion="classic")
    assert got.epsilon == pytest.approx(published, abs=tolerance)


def test_the_cited_setting():
    classic = epsilon(Q, 1.1, 60 * STEPS_PER_EPOCH, 1e-5, conversion="classic")
    improved = epsilon(Q, 1.1, 60 * STEPS_PER_EPOCH, 1e-5)
    assert round(classic.epsilon, 2) == 3.01 and classic.order == 9
    assert round(improved.epsilon, 2) == 2.59 and improved.order == 8
    assert "(2.59, 1e-05)-DP after 14040 steps" in str(improved)


def test_monotone():
    base = epsilon(0.01, 1.0, 1000, 1e-5).epsilon
    assert epsilon(0.01, 1.0, 2000, 1e-5).epsilon > base
    assert epsilon(0.02, 1.0, 1000, 1e-5).epsilon > base
    assert epsilon(0.01, 1.5, 1000, 1e-5).epsilon < base
    assert epsilon(0.01, 1.0, 1000, 1e-6).epsilon > base


def test_bad_arguments():
    with pytest.raises(ValueError, match="delta"):
        epsilon(0.01, 1.0, 10, 0.0)
    with pytest.raises(ValueError, match="conversion"):
        epsilon(0.01, 1.0, 10, 1e-5, conversion="tight")
    with pytest.raises(ValueError, match="integer order"):
        rdp(0.01, 1.0, 2.5)
    assert epsilon(0.01, 0.0, 10, 1e-5).epsilon == math.inf


# Cross-checks against Google's dp-accounting (the optional extra `privacy`), and its PLD
# accountant as ours.

EPS64 = float(np.finfo(np.float64).eps)
DELTA = 1e-5
# dp_mlp's default settings: q = 64 / 1438, noise 1.5, 1000 steps
DP_MLP = (64 / 1438, 1.5, 1000)
# the RDP grid: orders spread over 2..256 (the accountant's cost grows with the order, so not
# all of them), rates from 1e-3 to 0.9, noise from 0.5 to 4, one step and many
GRID_ORDERS = (2, 3, 4, 5, 6, 8, 11, 16, 23, 32, 45, 64, 90, 128, 181, 256)
RDP_GRID = [(q, noise, steps) for q in (1e-3, 0.0445, 0.3, 0.9) for noise in (0.5, 1.0, 4.0)
            for steps in (1, 1000)]


@pytest.fixture(scope="module")
def dpa():
    return pytest.importorskip("dp_accounting")


def _rdp_accountant(dpa, q, noise, steps, orders):
    """dp-accounting's RDP accountant (adding or removing one example) after `steps` steps."""
    accountant = dpa.rdp.RdpAccountant(orders, dpa.NeighboringRelation.ADD_OR_REMOVE_ONE)
    step = dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(noise))
    accountant.compose(dpa.SelfComposedDpEvent(step, steps))
    return accountant


def rdp_tolerance(q: float, noise: float, order: int) -> float:
    """How far two float64 evaluations of one step's RDP at `order` may differ. Each of the
    order + 1 log-space terms, lgamma(a + 1) - lgamma(k + 1) - lgamma(a - k + 1) + k log q +
    (a - k) log(1 - q) + (k^2 - k) / (2 noise^2), adds pieces each rounded to about an ulp of
    its size, so a term is off by a few ulps of `scale`, the pieces' magnitudes summed at the
    largest k; log-sum-exp adds about an ulp per term (a + 1) and one of the largest term,
    whose size cancellation can keep in the result however small it is (hence an absolute
    tolerance); dividing by a - 1 divides the error too. Our math.lgamma against scipy's
    gammaln and different orders of addition make the two sides round differently: a factor
    of 8 over this scale (the largest seen on RDP_GRID is 0.33 of it)."""
    a = order
    scale = (2 * math.lgamma(a + 1) + a * (abs(math.log(q)) + abs(math.log1p(-q)))
             + a * a / (2 * noise**2) + a + 1)
    return 8 * EPS64 * scale / (a - 1)


@pytest.mark.parametrize("q, noise, steps", RDP_GRID)
def test_rdp_per_order_equals_dp_accounting(dpa, q, noise, steps):
    theirs = _rdp_accountant(dpa, q, noise, steps, GRID_ORDERS).rdp
    for a, r in zip(GRID_ORDERS, theirs):
        # T steps compose to T times one step's RDP: T times the error
        tolerance = steps * rdp_tolerance(q, noise, a)
        assert steps * rdp(q, noise, a) == pytest.approx(r, rel=0, abs=tolerance)


def _epsilon_tolerance(q, noise, steps, orders, eps):
    """The composed RDP's error at the worst order, plus a few ulps of the conversion's terms
    (epsilon itself and log(1 / delta))."""
    return (steps * max(rdp_tolerance(q, noise, a) for a in orders)
            + 8 * EPS64 * (eps + math.log(1 / DELTA)))


@pytest.mark.parametrize("q, noise, steps, orders", [(*s, GRID_ORDERS) for s in RDP_GRID]
                         + [(*DP_MLP, ORDERS)])
def test_epsilon_equals_dp_accounting(dpa, q, noise, steps, orders):
    """dp-accounting 0.6's RdpAccountant.get_epsilon converts by the improved bound (its
    `compute_epsilon`: Canonne, Kamath and Steinke 2020, Proposition 12, the same formula as
    Balle et al. 2020, Theorem 21, with a KL shortcut to epsilon 0 that none of these settings
    reaches), so ours with `improved` matches it; the classic conversion (Mironov 2017,
    Proposition 3), which its comment cites but does not compute, is taken over its RDP."""
    theirs = _rdp_accountant(dpa, q, noise, steps, orders)
    eps, order = theirs.get_epsilon_and_optimal_order(DELTA)
    ours = epsilon(q, noise, steps, DELTA, orders=orders)
    assert (ours.epsilon, ours.order) == (pytest.approx(eps, rel=0, abs=_epsilon_tolerance(
        q, noise, steps, orders, eps)), order)
    classic = min(r + math.log(1 / DELTA) / (a - 1) for a, r in zip(orders, theirs.rdp))
    ours = epsilon(q, noise, steps, DELTA, orders=orders, conversion="classic")
    assert ours.epsilon == pytest.approx(classic, rel=0, abs=_epsilon_tolerance(
        q, noise, steps, orders, classic))


@pytest.mark.parametrize("q, noise, steps", [(q, noise, steps) for q in (1e-3, 0.0445, 0.3)
                                             for noise in (1.0, 4.0) for steps in (1, 300)])
def test_pld_is_at_most_rdp(dpa, q, noise, steps):
    """PLD composes the privacy loss exactly up to its grid, RDP bounds it by moments and
    converts: PLD's epsilon is lower, here by 8% to 99% (a grid of 1e-3 nats, for speed, is
    fine enough: its excess over a grid of 1e-4 at these settings is under 0.01)."""
    pld = epsilon(q, noise, steps, DELTA, accountant="pld", discretization=1e-3)
    assert pld.epsilon <= epsilon(q, noise, steps, DELTA).epsilon
    assert (pld.accountant, pld.order, pld.discretization) == ("pld", None, 1e-3)


def gaussian_epsilon(noise: float, delta: float) -> float:
    """The exact epsilon of the Gaussian mechanism of sensitivity 1 and standard deviation
    `noise` at delta (Balle and Wang 2018, "Improving the Gaussian Mechanism for Differential
    Privacy", Theorem 8): delta(eps) = Phi(1 / (2 s) - eps s) - e^eps Phi(-1 / (2 s) - eps s)
    falls with eps; solved by bisection to float64's resolution."""
    def phi(x):
        return 0.5 * math.erfc(-x / math.sqrt(2))

    def delta_at(eps):
        half = 1 / (2 * noise)
        return phi(half - eps * noise) - math.exp(eps) * phi(-half - eps * noise)

    lo, hi = 0.0, 200.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_at(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize("noise, steps", [(0.7, 1), (1.0, 1), (4.0, 1), (1.0, 16), (4.0, 16)])
def test_pld_without_subsampling_is_the_exact_gaussian_epsilon(dpa, noise, steps):
    """With q = 1, T steps of noise s are one Gaussian mechanism of noise s / sqrt(T), whose
    epsilon is known exactly. PLD's pessimistic grid overstates each step's privacy loss by at
    most one interval h: it is never below the exact value and at most T h above (measured: 7e-6
    above at most, with h = 1e-3)."""
    h = 1e-3
    exact = gaussian_epsilon(noise / math.sqrt(steps), DELTA)
    pld = epsilon(1.0, noise, steps, DELTA, accountant="pld", discretization=h)
    assert exact <= pld.epsilon <= exact + steps * h


def test_pld_guarantee_and_edge_cases(dpa):
    got = epsilon(0.01, 4.0, 10, DELTA, accountant="pld")  # the default grid: 1e-4 nats
    assert (got.accountant, got.order, got.discretization) == ("pld", None, 1e-4)
    assert str(got).endswith("(PLD accountant, discretization 0.0001)")
    assert epsilon(0.01, 0.0, 100, DELTA, accountant="pld").epsilon == math.inf
    assert epsilon(0.0, 1.0, 100, DELTA, accountant="pld").epsilon == 0.0
    assert epsilon(0.01, 1.0, 0, DELTA, accountant="pld").epsilon == 0.0


def test_pld_without_dp_accounting(monkeypatch):
    monkeypatch.setitem(sys.modules, "dp_accounting", None)  # `import dp_accounting` fails
    with pytest.raises(ImportError, match=re.escape(PLD_MISSING)):
        epsilon(0.01, 1.0, 100, DELTA, accountant="pld")
    assert PLD_MISSING == "the PLD accountant needs dp-accounting: pip install 'gradlang[privacy]'"
    assert epsilon(0.01, 1.0, 100, DELTA).order is not None  # the RDP accountant needs nothing


def test_bad_accountant_options():
    with pytest.raises(ValueError, match="accountant must be one of rdp, pld"):
        epsilon(0.01, 1.0, 10, DELTA, accountant="moments")
    with pytest.raises(ValueError, match="options of the rdp accountant"):
        epsilon(0.01, 1.0, 10, DELTA, accountant="pld", conversion="classic")
    with pytest.raises(ValueError, match="option of the pld accountant"):
        epsilon(0.01, 1.0, 10, DELTA, discretization=1e-3)
    with pytest.raises(ValueError, match="discretization must be positive"):
        epsilon(0.01, 1.0, 10, DELTA, accountant="pld", discretization=0.0)
    with pytest.raises(ValueError, match="steps >= 0"):
        epsilon(0.01, 1.0, -1, DELTA)
