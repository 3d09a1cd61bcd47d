"""Credit per step of a loop (reward-to-go): a draw made at iteration t of a `for` loop whose
accumulator adds a cost each iteration (`total = total + cost`) is credited only with the costs
added at iterations >= t; earlier ones cannot depend on it (a loop's iteration sees only the
iterations before it). Costs computed after the loop from its state are credited whole.

Statistical tests average N = 10^4 fixed-seed estimates and compare them with closed forms
within 5 standard errors (`stats.assert_unbiased`); variance factors compare the total variance
of two estimators over the same number of estimates (1.4% relative standard error each), with
the bound halfway between 1 and the measured factor.
"""

from __future__ import annotations

import numpy as np
import pytest

import gradlang
from gradlang.explain import explain
from gradlang.verify import CONSISTENT
from stats import assert_unbiased, estimates, total_variance

T = 20
_rng = np.random.default_rng(0)
Q = _rng.normal(size=T).astype(np.float32)
X = _rng.normal(size=T).astype(np.float32)

SEQUENCE = """
fn f(q: f32[T], x: f32[T]) -> f32 {{
  let (s, total) = for t in range(T) carry (s = 0.0, total = 0.0) {{
    z ~ Bernoulli(logits=q[t]) with score({opts});
    (s + z, total + {cost})
  }}
  return {result}
}}
export g = grad(expect(f, samples={samples}), wrt=[q])
"""


def p_of(q):
    return 1 / (1 + np.exp(-np.asarray(q, np.float64)))


def compile_sequence(opts: str, samples: int, cost: str = "(z - x[t]) ^ 2", result: str = "total"):
    return gradlang.compile_source(SEQUENCE.format(opts=opts, samples=samples, cost=cost,
                                                   result=result))


def credit_line(m, site: str = "z") -> str:
    """The site's line in explain's credit section (after its `why` line)."""
    return [line for line in explain(m.ir).splitlines() if line.startswith(f"    {site}: ")][-1]


@pytest.mark.parametrize("opts, samples", [("baseline=none", 1), ("baseline=loo", 4)])
def test_reward_to_go_is_unbiased_with_independent_steps(opts, samples):
    """E[sum_t (z_t - x_t)^2]: d/dq_t = p_t (1 - p_t) ((1 - x_t)^2 - x_t^2)."""
    m = compile_sequence(opts, samples)
    p = p_of(Q)
    assert_unbiased(estimates(m.g, (Q, X))["q"], p * (1 - p) * ((1 - X) ** 2 - X ** 2))
    assert "per step (reward-to-go" in credit_line(m) and "(z - x[t]) ^ 2" in credit_line(m)


def test_reward_to_go_is_unbiased_when_costs_depend_on_earlier_steps():
    """cost_t = s_t x_t with s_t = z_1 + ... + z_t (the carry): E = sum_t x_t sum_{t' <= t} p_t',
    d/dq_t' = p_t' (1 - p_t') sum_{t >= t'} x_t, the reward-to-go itself. Discounted by the
    program (gamma^t in the cost), the same with x_t gamma^t."""
    m = compile_sequence("baseline=loo", 4, cost="(s + z) * x[t] * 0.9 ^ f32(t)")
    p = p_of(Q)
    w = X * 0.9 ** np.arange(T)
    assert_unbiased(estimates(m.g, (Q, X))["q"], p * (1 - p) * np.cumsum(w[::-1])[::-1])


@pytest.mark.parametrize("baseline, samples, least", [("none", 1, 2.0), ("loo", 4, 1.5)])
def test_reward_to_go_cuts_the_variance(baseline, samples, least):
    """Measured (printed): 3.1x (none), 2.0x (loo) less variance than whole credit at T = 20."""
    rtg = total_variance(estimates(compile_sequence(f"baseline={baseline}", samples).g, (Q, X))["q"])
    whole = total_variance(estimates(compile_sequence(f"baseline={baseline}, credit=whole",
                                                      samples).g, (Q, X))["q"])
    print(f"reward-to-go, baseline={baseline}: variance / {whole / rtg:.1f}")
    assert whole / rtg > least


@pytest.mark.parametrize("terminal", ["0.1 * s ^ 2", "0.1 * s * s"])
def test_a_cost_after_the_loop_is_credited_whole(terminal):
    """A terminal cost of the loop's state depends on every step's draw: whole credit for it,
    reward-to-go for the accumulated costs. E[s_T^2] = Var + mean^2 of a sum of Bernoullis.
    `s * s` splits s (an accumulator too) per step, but each entry times s depends on later
    steps: those terms stay whole."""
    m = compile_sequence("baseline=loo", 4, result=f"total + {terminal}")
    p = p_of(Q)
    mean = p.sum()
    truth = p * (1 - p) * ((1 - X) ** 2 - X ** 2 + 0.1 * (1 - 2 * p + 2 * mean))
    assert_unbiased(estimates(m.g, (Q, X))["q"], truth)
    line = credit_line(m)
    assert "per step (reward-to-go" in line and "and, whole: <source>:7: 0.1 * s" in line, line


def test_a_loop_that_is_not_an_accumulator_keeps_whole_credit():
    """total + cost - 0.1 * total reads the carry in what it adds: not split per step."""
    m = compile_sequence("baseline=loo", 4, cost="(z - x[t]) ^ 2 - 0.1 * total")
    assert "per step" not in credit_line(m)


def test_a_rollout_written_like_cartpole_gets_reward_to_go():
    """examples/cartpole.grad's shape with a stochastic policy: a batch of K walkers, the state
    and a running total carried, the stage cost a called function's mean over the batch, the
    total divided by T after the loop. s_t = s0 + sum_{t' <= t} u_t', u ~ Normal(mu, 1):
    d/dmu_k E[(1/T) sum_t mean_k s_tk^2] = (1/T) sum_t 2 t (s0_k + t mu_k) / K."""
    src = """
fn stage_cost(s: f32[K], u: f32[K]) -> f32 {
  return mean(s ^ 2)
}
fn rollout(mu: f32[K], s0: f32[K], horizon: f32[T]) -> f32 {
  let (s, total) = for t in range(T) carry (s = s0, total = 0.0) {
    u ~ Normal(mu, 1.0) with score(baseline=loo);
    let next = s + u;
    (next, total + stage_cost(next, u))
  }
  return total / f32(T)
}
export g = grad(expect(rollout, samples=8), wrt=[mu])
"""
    m = gradlang.compile_source(src)
    mu = np.array([0.3, -0.2, 0.1, 0.0], np.float32)
    s0 = np.array([1.0, -0.5, 0.0, 0.4], np.float32)
    steps = np.arange(1, 11)[:, None]
    truth = (2 * steps * (s0 + steps * mu) / 4).sum(0) / 10
    assert_unbiased(estimates(m.g, (mu, s0, np.zeros(10, np.float32)))["mu"], truth)
    assert "per step (reward-to-go" in credit_line(m, "u")


def test_verify_confirms_reward_to_go():
    m = compile_sequence("baseline=loo", 4)
    report = m.verify("g", (Q[:6], X[:6]), samples=200, reference_samples=1024)
    assert report.verdict == CONSISTENT, report.table()
