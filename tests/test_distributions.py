"""gradlang.runtime.distributions against float64 NumPy/SciPy formulas and Monte Carlo.

Monte Carlo checks draw N = 2e5 samples with a fixed seed and allow 5 standard errors
(computed from the sample standard deviation) plus a float32 rounding floor of 1e-5
relative, which only matters where the per-sample quantity is constant.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import digamma, gammaln

from gradlang.runtime import distributions as D
from stats import assert_close, assert_unbiased

N = 200_000
EULER = np.euler_gamma


def f32(x):
    return np.asarray(x, np.float32)


def key(seed: int = 0):
    return jax.random.key(seed)


# -- float64 references -----------------------------------------------------------------------

def np_log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def np_sigmoid(x):
    return 1 / (1 + np.exp(-np.asarray(x, np.float64)))


def np_normal_lp(x, m, s):
    return -0.5 * ((x - m) / s) ** 2 - np.log(s) - 0.5 * np.log(2 * np.pi)


def np_categorical_lp(x, logits):
    lp = np_log_softmax(logits)
    shape = np.broadcast_shapes(np.shape(x), lp.shape[:-1])
    lp = np.broadcast_to(lp, shape + lp.shape[-1:])
    return np.take_along_axis(lp, np.broadcast_to(x, shape)[..., None], -1)[..., 0]


def np_poisson_entropy(rate):
    k = np.arange(40_000, dtype=np.float64)
    out = []
    for r in np.ravel(rate).astype(np.float64):
        lp = k * np.log(r) - r - gammaln(k + 1)
        p = np.exp(lp)
        out.append(-np.sum(np.where(p > 0, p * lp, 0.0)))
    return np.reshape(out, np.shape(rate))


def np_mixture_lp(x, logits, locs, scales):
    w = np.exp(np_log_softmax(logits))
    return np.log(np.sum(w * np.exp(np_normal_lp(np.asarray(x, np.float64)[..., None],
                                                 locs, scales)), -1))


def np_entropy_from_probs(p):
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0.0), -1)


REF_LOG_PROB = {
    "Normal": np_normal_lp,
    "LogNormal": lambda x, m, s: np_normal_lp(np.log(x), m, s) - np.log(x),
    "Uniform": lambda x, lo, hi: np.where((x >= lo) & (x <= hi), -np.log(hi - lo), -np.inf),
    "Exponential": lambda x, r: np.log(r) - r * x,
    "Gamma": lambda x, a, r: a * np.log(r) + (a - 1) * np.log(x) - r * x - gammaln(a),
    "Beta": lambda x, a, b: ((a - 1) * np.log(x) + (b - 1) * np.log1p(-x)
                             - gammaln(a) - gammaln(b) + gammaln(a + b)),
    "Dirichlet": lambda x, a: (np.sum((a - 1) * np.log(x), -1) + gammaln(a.sum(-1))
                               - gammaln(a).sum(-1)),
    "Gumbel": lambda x, m, s: -((x - m) / s + np.exp(-(x - m) / s)) - np.log(s),
    "Bernoulli": lambda x, l: (x * np.log(np_sigmoid(l)) + (1 - x) * np.log(np_sigmoid(-l))),
    "Categorical": np_categorical_lp,
    "OneHotCategorical": lambda x, l: np.sum(x * np_log_softmax(l), -1),
    "Poisson": lambda x, r: x * np.log(r) - r - gammaln(x + 1),
    "MixtureNormal": np_mixture_lp,
}

REF_MEAN = {
    "Normal": lambda m, s: m + 0 * s,
    "LogNormal": lambda m, s: np.exp(m + s * s / 2),
    "Uniform": lambda lo, hi: (lo + hi) / 2,
    "Exponential": lambda r: 1 / r,
    "Gamma": lambda a, r: a / r,
    "Beta": lambda a, b: a / (a + b),
    "Dirichlet": lambda a: a / a.sum(-1, keepdims=True),
    "Gumbel": lambda m, s: m + EULER * s,
    "Bernoulli": np_sigmoid,
    "Categorical": lambda l: np.sum(np.exp(np_log_softmax(l)) * np.arange(np.shape(l)[-1]), -1),
    "OneHotCategorical": lambda l: np.exp(np_log_softmax(l)),
    "Poisson": lambda r: r,
    "MixtureNormal": lambda l, m, s: np.sum(np.exp(np_log_softmax(l)) * m + 0 * s, -1),
}

REF_ENTROPY = {
    "Normal": lambda m, s: 0.5 * np.log(2 * np.pi * np.e * s * s) + 0 * m,
    "LogNormal": lambda m, s: m + 0.5 * np.log(2 * np.pi * np.e * s * s),
    "Uniform": lambda lo, hi: np.log(hi - lo),
    "Exponential": lambda r: 1 - np.log(r),
    "Gamma": lambda a, r: a - np.log(r) + gammaln(a) + (1 - a) * digamma(a),
    "Beta": lambda a, b: (gammaln(a) + gammaln(b) - gammaln(a + b) - (a - 1) * digamma(a)
                          - (b - 1) * digamma(b) + (a + b - 2) * digamma(a + b)),
    "Dirichlet": lambda a: (gammaln(a).sum(-1) - gammaln(a.sum(-1))
                            + (a.sum(-1) - a.shape[-1]) * digamma(a.sum(-1))
                            - np.sum((a - 1) * digamma(a), -1)),
    "Gumbel": lambda m, s: np.log(s) + EULER + 1 + 0 * m,
    "Bernoulli": lambda l: np_entropy_from_probs(np.stack([np_sigmoid(l), np_sigmoid(-l)], -1)),
    "Categorical": lambda l: np_entropy_from_probs(np.exp(np_log_softmax(l))),
    "OneHotCategorical": lambda l: np_entropy_from_probs(np.exp(np_log_softmax(l))),
    "Poisson": np_poisson_entropy,
}

# Batch-(2,) parameters for the Monte Carlo tests. Poisson's rates straddle the switch
# between the exact and asymptotic entropy.
LOGITS_2x3 = [[0.1, -1.0, 2.0], [0.0, 0.0, 0.5]]
MC_PARAMS = {
    "Normal": ([0.5, -1.0], [1.0, 2.0]),
    "LogNormal": ([0.2, -0.5], [0.5, 0.3]),
    "Uniform": ([-1.0, 2.0], [1.0, 5.0]),
    "Exponential": ([0.5, 2.0],),
    "Gamma": ([0.7, 3.0], [1.5, 0.5]),
    "Beta": ([0.8, 2.5], [1.5, 0.6]),
    "Dirichlet": ([[0.8, 2.0, 1.5], [3.0, 0.5, 1.0]],),
    "Gumbel": ([0.3, -1.0], [1.0, 2.0]),
    "Bernoulli": ([-1.0, 2.0],),
    "Categorical": (LOGITS_2x3,),
    "OneHotCategorical": (LOGITS_2x3,),
    "Poisson": ([0.7, 25.0],),
    "MixtureNormal": ([[0.0, 1.0], [2.0, -1.0]], [[-2.0, 2.0], [0.0, 1.0]],
                      [[0.5, 1.0], [1.0, 0.3]]),
}


def _broadcast_case(name):
    """Parameters with batch shape (3, 4), formed by broadcasting where possible."""
    rng = np.random.default_rng(0)
    col, row = rng.normal(size=(3, 1)), rng.normal(size=(4,))
    pos_col, pos_row = np.exp(0.3 * col), np.exp(0.3 * row)
    cases = {
        "Normal": (col, pos_row), "LogNormal": (col, pos_row), "Gumbel": (col, pos_row),
        "Uniform": (col - 2, row + 2), "Gamma": (pos_col, pos_row), "Beta": (pos_col, pos_row),
        "Exponential": (np.exp(rng.normal(size=(3, 4))),),
        "Dirichlet": (np.exp(0.3 * rng.normal(size=(3, 4, 5))),),
        "Poisson": (np.exp(rng.normal(size=(3, 4))),),
        "Bernoulli": (rng.normal(size=(3, 4)),),
        "Categorical": (rng.normal(size=(3, 4, 5)),),
        "OneHotCategorical": (rng.normal(size=(3, 4, 5)),),
        "MixtureNormal": (rng.normal(size=(4, 2)), rng.normal(size=(3, 1, 2)), pos_row[:2]),
    }
    return tuple(f32(p) for p in cases[name])


def event_shape(fam, params):
    return (params[0].shape[-1],) if fam.event_rank else ()


ALL = sorted(D.FAMILIES)
REPARAM = [n for n in ALL if D.FAMILIES[n].reparam]


# -- log_prob ---------------------------------------------------------------------------------

def _points(name, params):
    """Points of shape (2, 3, 4) (+ event) inside the support of every batch member."""
    rng = np.random.default_rng(1)
    shape = (2, 3, 4)
    if name in ("Normal", "Gumbel", "MixtureNormal"):
        return f32(rng.normal(size=shape))
    if name in ("LogNormal", "Exponential", "Gamma"):
        return f32(rng.exponential(size=shape))
    if name == "Uniform":
        low, high = params
        return f32(low + (high - low) * rng.uniform(0.01, 0.99, size=shape))
    if name == "Beta":
        return f32(rng.uniform(0.01, 0.99, size=shape))
    if name == "Dirichlet":
        return f32(rng.dirichlet(np.ones(params[0].shape[-1]), size=shape))
    if name in ("Bernoulli", "Poisson"):
        return f32(rng.integers(0, 6 if name == "Poisson" else 2, size=shape))
    k = params[0].shape[-1]
    idx = rng.integers(0, k, size=shape).astype(np.int32)
    return idx if name == "Categorical" else f32(np.eye(k)[idx])


@pytest.mark.parametrize("name", ALL)
def test_log_prob_matches_reference_with_broadcasting(name):
    fam = D.FAMILIES[name]
    params = _broadcast_case(name)
    x = _points(name, params)
    got = jax.jit(fam.log_prob)(x, *params)
    x64 = x.astype(np.float64) if x.dtype == np.float32 else x
    want = REF_LOG_PROB[name](x64, *(p.astype(np.float64) for p in params))
    assert got.shape == (2, 3, 4)
    # ~10 steps with up to 4 transcendentals (lgamma, log, exp: 4 roundings each) and their
    # cancellation, against float64, relative to the largest log-density: 64
    assert_close(got, want, ops=64)


def test_categorical_index_broadcasts_against_batch():
    logits = f32(np.random.default_rng(2).normal(size=(4, 5)))
    x = np.array([[0], [3], [4]], np.int32)
    got = D.FAMILIES["Categorical"].log_prob(x, logits)
    assert_close(got, np_categorical_lp(x, logits), ops=16)  # log_softmax over 5: a max, exp, sum, log


@pytest.mark.parametrize("name, probs, x", [
    ("Bernoulli", [0.1, 0.5, 0.97], [1.0, 0.0, 1.0]),
    ("Categorical", [[0.2, 0.3, 0.5], [1.0, 2.0, 1.0]], [2, 0]),
    ("OneHotCategorical", [[0.2, 0.3, 0.5], [1.0, 2.0, 1.0]], [[0.0, 0.0, 1.0], [1.0, 0, 0]]),
])
def test_probs_alias(name, probs, x):
    fam = D.FAMILIES[name]
    canonical, convert = fam.aliases["probs"]
    assert canonical == "logits"
    got = fam.log_prob(jnp.asarray(x), convert(f32(probs)))
    p = np.asarray(probs, np.float64)
    if name == "Bernoulli":
        want = np.where(np.asarray(x) == 1, np.log(p), np.log1p(-p))
    else:
        p = p / p.sum(-1, keepdims=True)
        idx = np.argmax(x, -1) if name == "OneHotCategorical" else np.asarray(x)
        want = np.log(np.take_along_axis(p, idx[:, None], -1)[:, 0])
    assert_close(got, want, ops=16)  # log(p) to logits, then a log_softmax over 3


@pytest.mark.parametrize("name, x, params", [
    ("Uniform", [-0.5, 2.5], ([0.0, 0.0], [2.0, 2.0])),
    ("LogNormal", [0.0, -1.0], ([0.0, 0.0], [1.0, 1.0])),
    ("Exponential", [-0.1], ([1.0],)),
    ("Gamma", [-0.1], ([2.0], [1.0])),
    ("Beta", [-0.1, 1.1], ([2.0, 2.0], [2.0, 2.0])),
    ("Poisson", [-1.0], ([3.0],)),
    ("Categorical", [-1, 3], ([[0.0, 1.0, 2.0]] * 2,)),
])
def test_log_prob_outside_support_is_minus_inf(name, x, params):
    got = D.FAMILIES[name].log_prob(jnp.asarray(x), *(f32(p) for p in params))
    assert np.all(np.isneginf(got))


# -- shapes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_shapes_and_dtypes(name):
    fam = D.FAMILIES[name]
    params = _broadcast_case(name)
    event = event_shape(fam, params)
    assert D.batch_shape(fam, *params) == (3, 4)
    assert len(fam.params) == len(fam.param_event_ranks) == len(params)
    dtype = {"f32": jnp.float32, "i32": jnp.int32}[fam.sample_dtype]
    x = jax.eval_shape(fam.sample, key(), *params)
    assert x.shape == (3, 4) + event and x.dtype == dtype
    x = jax.eval_shape(lambda k, *ps: fam.sample(k, *ps, shape=(5, 3, 4)), key(), *params)
    assert x.shape == (5, 3, 4) + event and x.dtype == dtype
    assert jax.eval_shape(fam.log_prob, x, *params).shape == (5, 3, 4)
    assert jax.eval_shape(fam.mean, *params).shape == (3, 4) + event
    if fam.entropy is not None:
        assert jax.eval_shape(fam.entropy, *params).shape == (3, 4)
    assert (fam.support_size is None) == (fam.enumerate_support is None)
    assert fam.entropy is not None or name == "MixtureNormal"


# -- mean and entropy -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_mean_and_entropy_closed_form_and_monte_carlo(name):
    fam = D.FAMILIES[name]
    params = tuple(f32(p) for p in MC_PARAMS[name])
    params64 = tuple(p.astype(np.float64) for p in params)
    mean = fam.mean(*params)
    assert_close(mean, REF_MEAN[name](*params64), ops=16)  # a few steps (exp, a 3-term sum)
    x = fam.sample(key(3), *params, shape=(N, 2))
    assert_unbiased(x, mean)
    if fam.entropy is not None:
        entropy = fam.entropy(*params)
        assert_close(entropy, REF_ENTROPY[name](*params64), ops=64)  # as log_prob's
        assert_unbiased(-fam.log_prob(x, *params), entropy)


def test_poisson_entropy_across_switch():
    rate = f32([1e-3, 0.5, 5.0, 19.9, 20.0, 20.1, 60.0, 1e3, 1e4])
    # below the switch a sum of 80 terms of p log p (lgamma, exp); above it the expansion,
    # whose next term ~0.1 / rate^4 is 6e-7 at 20, 1 eps32 of the entropy: 80 + 4 * 4
    assert_close(D.FAMILIES["Poisson"].entropy(rate), np_poisson_entropy(rate.astype(np.float64)), ops=96)


# -- gradients --------------------------------------------------------------------------------

REPARAM_PARAMS = {
    "Normal": (0.5, 1.5), "LogNormal": (0.2, 0.4), "Uniform": (-1.0, 2.0),
    "Exponential": (1.5,), "Gamma": (1.7, 0.8), "Beta": (1.3, 2.2), "Gumbel": (0.3, 1.2),
    "Dirichlet": ([0.8, 2.0, 1.5],),
}


@pytest.mark.parametrize("name", REPARAM)
def test_pathwise_gradient_of_mean(name):
    """Per-sample Jacobians of the draws (implicit reparameterization for Gamma, Beta and
    Dirichlet) average to the derivative of the closed-form mean, entry by entry."""
    fam = D.FAMILIES[name]
    theta = tuple(np.asarray(t, np.float64) for t in REPARAM_PARAMS[name])
    argnums = tuple(range(len(theta)))
    per_sample = jax.jacfwd(lambda *ps: fam.sample(key(4), *ps, shape=(N // 2,)),
                            argnums=argnums)(*(f32(t) for t in theta))
    h = 1e-6  # central difference of the float64 closed-form mean
    for i in argnums:
        for j in np.ndindex(theta[i].shape):
            up, down = [t.copy() for t in theta], [t.copy() for t in theta]
            up[i][j] += h
            down[i][j] -= h
            assert_unbiased(per_sample[i][(...,) + j],
                      (REF_MEAN[name](*up) - REF_MEAN[name](*down)) / (2 * h))


@pytest.mark.parametrize("name", [n for n in ALL if not D.FAMILIES[n].reparam])
def test_non_reparameterized_samples_carry_no_gradient(name):
    fam = D.FAMILIES[name]
    params = tuple(f32(p) for p in MC_PARAMS[name])
    if fam.sample_dtype == "i32":
        assert jnp.issubdtype(fam.sample(key(), *params).dtype, jnp.integer)
        return
    grads = jax.grad(lambda *ps: jnp.sum(fam.sample(key(5), *ps, shape=(100, 2)) ** 2),
                     argnums=tuple(range(len(params))))(*params)
    for g in grads:
        np.testing.assert_array_equal(g, np.zeros_like(g))


# -- KL ---------------------------------------------------------------------------------------

KL_CASES = {
    "Normal": (([0.5, -1.0], [1.0, 2.0]), ([0.0, 0.0], [1.5, 1.0])),
    "LogNormal": (([0.2, -0.5], [0.5, 0.3]), ([0.0, 0.1], [0.7, 0.4])),
    "Bernoulli": (([-1.0, 2.0],), ([0.5, 0.0],)),
    "Categorical": ((LOGITS_2x3,), ([[0.0, 0.0, 0.0], [1.0, -1.0, 0.0]],)),
    "OneHotCategorical": ((LOGITS_2x3,), ([[0.0, 0.0, 0.0], [1.0, -1.0, 0.0]],)),
    "Exponential": (([0.5, 2.0],), ([1.0, 1.5],)),
    "Gamma": (([0.7, 3.0], [1.5, 0.5]), ([1.2, 2.0], [1.0, 0.8])),
    "Beta": (([0.8, 2.5], [1.5, 0.6]), ([1.0, 2.0], [1.0, 1.2])),
    "Dirichlet": (([[0.8, 2.0, 1.5], [3.0, 0.5, 1.0]],), ([[1.0, 1.0, 1.0], [2.0, 2.0, 0.7]],)),
    "Uniform": (([0.0, -1.0], [1.0, 0.5]), ([-1.0, -1.0], [2.0, 3.0])),
    "Poisson": (([0.7, 3.0],), ([1.5, 5.0],)),
    "Gumbel": (([0.3, -1.0], [1.0, 2.0]), ([-0.5, 0.0], [1.7, 1.5])),
}


def test_kl_table_is_covered():
    assert set(D.KL) == {(n, n) for n in KL_CASES}


@pytest.mark.parametrize("name", sorted(KL_CASES))
def test_kl_against_monte_carlo(name):
    fam = D.FAMILIES[name]
    p, q = (tuple(f32(a) for a in ps) for ps in KL_CASES[name])
    kl = D.KL[(name, name)](p, q)
    x = fam.sample(key(6), *p, shape=(N, 2))
    assert_unbiased(fam.log_prob(x, *p) - fam.log_prob(x, *q), kl)
    # the closed forms' terms (logs, lgamma and digamma of the parameters) cancel: ~8 of them of
    # the parameters' size, 4 roundings each
    assert_close(D.KL[(name, name)](p, p), 0.0, ops=32, scale=max(1.0, *(np.abs(a).max() for a in p)))


def test_uniform_kl_infinite_outside_support():
    kl = D.KL[("Uniform", "Uniform")]((f32([0.0, -2.0]), f32([3.0, 1.0])), (f32(-1.0), f32(2.0)))
    assert np.all(np.isposinf(kl))


# -- finite supports --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["Bernoulli", "Categorical", "OneHotCategorical"])
def test_enumerate_support_normalizes(name):
    fam = D.FAMILIES[name]
    params = _broadcast_case(name)
    k = fam.support_size(*params)
    values = fam.enumerate_support(*params)
    assert values.shape == (k, 3, 4) + event_shape(fam, params)
    assert values.dtype == {"f32": jnp.float32, "i32": jnp.int32}[fam.sample_dtype]
    total = np.exp(np.asarray(fam.log_prob(values, *params), np.float64)).sum(0)
    assert_close(total, 1.0, ops=16)  # exp of a log_softmax, summed over at most 5 values
    assert len(np.unique(np.asarray(values).reshape(k, 12, -1)[:, 0], axis=0)) == k


# -- relaxations ------------------------------------------------------------------------------

LOGITS = f32([0.5, -1.0, 1.5, 0.0])


def test_gumbel_softmax():
    logits = jnp.broadcast_to(LOGITS, (N, 4))
    soft = D.gumbel_softmax_sample(key(7), logits, 0.5, hard=False)
    assert_close(soft.sum(-1), 1.0, ops=8)  # a softmax over 4, summed
    hard = D.gumbel_softmax_sample(key(7), logits, 0.1, hard=True)
    assert set(np.unique(hard)) <= {0.0, 1.0}
    np.testing.assert_array_equal(hard.sum(-1), 1.0)
    assert_unbiased(hard, np.exp(np_log_softmax(LOGITS)))


@pytest.mark.parametrize("fn", [D.gumbel_softmax_sample, D.relaxed_bernoulli_sample])
def test_straight_through_gradient_is_soft_gradient(fn):
    w = f32(np.random.default_rng(8).normal(size=(3, 4)))
    logits = jnp.broadcast_to(LOGITS, (3, 4))
    grad = [jax.grad(lambda l, hard=hard: jnp.sum(w * fn(key(9), l, 0.7, hard)))(logits)
            for hard in (False, True)]
    assert_close(grad[1], grad[0], ops=2)  # the same soft path, through hard - stop(soft) + soft
    assert np.any(grad[1] != 0)


def test_relaxed_bernoulli():
    logits = jnp.broadcast_to(LOGITS, (N, 4))
    soft = D.relaxed_bernoulli_sample(key(10), logits, 0.5, hard=False)
    assert np.all((soft >= 0) & (soft <= 1))
    hard = D.relaxed_bernoulli_sample(key(10), logits, 0.1, hard=True)
    assert set(np.unique(hard)) <= {0.0, 1.0}
    assert_unbiased(hard, np_sigmoid(LOGITS))
