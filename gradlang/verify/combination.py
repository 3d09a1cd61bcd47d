"""The combination rules of `minimize` in NumPy (float64), written apart from the runtime's
(`runtime/multiobjective.py`) so that each checks the other. Each returns the coefficients c
of the direction d = sum_i c_i g_i from the Gram matrix G_ij = <g_i, g_j> (or the history)."""

from __future__ import annotations

from itertools import combinations

import numpy as np

from gradlang.estimators.combine import Dynamic, Mgda, Weights, combination_rule
from gradlang.ir import Combination


def min_norm(gram: np.ndarray) -> np.ndarray:
    """The min-norm point of the gradients' convex hull (MGDA): on each support S, the
    minimizer of c^T G c with sum(c) = 1 solves G_SS c_S = mu 1 (least squares: G may be
    singular); the feasible one (c >= 0) of least norm over every support."""
    k = gram.shape[0]
    best, best_norm = None, np.inf
    for size in range(1, k + 1):
        for support in combinations(range(k), size):
            s = list(support)
            kkt = np.block([[gram[np.ix_(s, s)], -np.ones((size, 1))],
                            [np.ones((1, size)), np.zeros((1, 1))]])
            rhs = np.r_[np.zeros(size), 1.0]
            c_s = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:size]
            if c_s.min() < -1e-12 or abs(c_s.sum() - 1) > 1e-9:
                continue
            c = np.zeros(k)
            c[s] = c_s
            norm = c @ gram @ c
            if norm < best_norm:
                best, best_norm = c, norm
    return best


def pcgrad(gram: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """PCGrad (Yu et al. 2020): each g_i loses its component along every g_j (in its order,
    j != i) with which it conflicts, <g_i', g_j> < 0; d = sum_i g_i'."""
    k = gram.shape[0]
    total = np.zeros(k)
    for i in range(k):
        c = np.eye(k)[i]
        for j in orders[i]:
            dot = c @ gram[:, j]
            if j != i and dot < 0:
                c[j] -= dot / gram[j, j]
        total += c
    return total


def dwa(history: np.ndarray, temperature: float) -> np.ndarray:
    """Dynamic Weight Average: k softmax(r / T), r_i the ratio of objective i's last two
    values (1 while the older is 0)."""
    last, before = np.asarray(history, np.float64)
    r = np.divide(last, before, out=np.ones_like(last), where=before != 0)
    e = np.exp((r - r.max()) / temperature)
    return len(r) * e / e.sum()


def coefficients(rule: Combination, grads: np.ndarray, history: np.ndarray | None,
                 orders: np.ndarray | None) -> np.ndarray:
    """c for gradients [k, size] (PCGrad: with `orders` [k, k]; dynamic: with `history`)."""
    how = combination_rule(rule)
    if isinstance(how, Weights):
        return np.asarray(rule.weights, np.float64)
    if isinstance(how, Dynamic):
        return dwa(history, float(how.temperature))
    gram = grads @ grads.T
    return min_norm(gram) if isinstance(how, Mgda) else pcgrad(gram, orders)


def random_orders(rng: np.random.Generator, k: int) -> np.ndarray:
    """A uniformly random order of the others for each gradient, as PCGrad shuffles."""
    return np.stack([rng.permutation(k) for _ in range(k)])
