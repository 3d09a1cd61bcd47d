"""Winner-take-all column-row sampling (WTA-CRS; Liu et al. 2023, "Winner-Take-All Column Row
Sampling for Memory Efficient Adaptation of Language Model") for `(x @ w) with wta_crs(keep=k)`.

The forward pass is the exact product of x (activations, rows [..., N] x D flattened to N rows)
and w [D, O]. The backward pass computes dx = dy w^T exactly and estimates dw = x^T dy = sum_i
x_i^T dy_i from k of the N rows, so only those k rows of x are stored. With p_i proportional to
||x_i|| (the row norms, known in the forward pass), the k / 2 rows of largest p are kept as they
are (the winners), and k - k / 2 rows are drawn with replacement from the others with
probability p_i / (1 - p_winners), each scaled by (1 - p_winners) / ((k - k / 2) p_i): the
estimate is unbiased (the winners exactly, the rest by importance sampling). The draws are
systematic (one uniform u, the quantiles (j + u) / m of the rest's distribution): each row is
drawn m p_i / (1 - p_winners) times in expectation, as with independent draws, with less
variance.
"""

from __future__ import annotations

from functools import lru_cache

import jax
import jax.numpy as jnp
from jax import lax

from .reverse_only import ForwardModeError, reverse_only


def _rows(x, keep: int, key):
    """The kept rows of x (scaled) and their indices."""
    rows = x.reshape(-1, x.shape[-1])
    if keep >= rows.shape[0]:  # every row: the exact backward
        return rows, jnp.arange(rows.shape[0])
    norms = jnp.linalg.norm(rows, axis=-1)
    p = norms / jnp.maximum(jnp.sum(norms), jnp.finfo(rows.dtype).tiny)
    winners = keep // 2
    top = lax.top_k(p, winners)[1]
    rest = p.at[top].set(0.0)
    mass = jnp.sum(rest)
    drawn = keep - winners
    # systematic sampling: one uniform, the m quantiles (j + u) / m of the rest's distribution
    cdf = jnp.cumsum(rest) / jnp.maximum(mass, 1e-30)
    quantiles = (jnp.arange(drawn, dtype=rows.dtype) + jax.random.uniform(key, (), rows.dtype)) / drawn
    sampled = jnp.minimum(jnp.searchsorted(cdf, quantiles), rows.shape[0] - 1)
    scale = jnp.where(rest[sampled] > 0, mass / (drawn * jnp.maximum(rest[sampled], 1e-30)), 0.0)
    index = jnp.concatenate([top, sampled])
    coef = jnp.concatenate([jnp.ones(winners, rows.dtype), scale.astype(rows.dtype)])
    return rows[index] * coef[:, None], index


def wta_crs_matmul(x, w, key, keep: int):
    """x @ w, its gradient for w estimated from `keep` sampled rows of x (see the module). Its
    derivative exists in reverse mode only: jax.jvp through it is a ForwardModeError."""
    return _sampled(keep)((x, w), key)


@lru_cache(maxsize=None)
def _sampled(keep: int):
    def forward(xw, key):
        x, w = xw
        kept, index = _rows(x, keep, key)
        return x @ w, (kept, index, w)

    def backward(residuals, dy):
        kept, index, w = residuals
        return dy @ w.T, kept.T @ dy.reshape(-1, dy.shape[-1])[index]

    return reverse_only(forward, backward, ForwardModeError(
        f"(x @ w) with wta_crs(keep={keep}) estimates w's gradient from sampled rows in reverse "
        f"mode only: jax.jvp (jax.jacfwd, forward-over-reverse) cannot go through it; remove "
        f"the annotation to get the exact matmul, which has forward mode"))
