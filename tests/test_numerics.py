"""runtime/numerics.py: the stable softplus and its derivatives, everywhere including x = 0."""

import jax
import jax.numpy as jnp
import numpy as np

from gradlang.runtime.numerics import softplus
from stats import EPS32


def test_softplus_values_and_derivatives():
    """Relative to each entry: max(x, 0) + log1p(exp(-|x|)) rounds ~9 times (exp and log1p 4
    each); its derivatives by autodiff against sigmoid's formula, both float32, ~9 roundings a
    side for the first and ~16 for the second. Below float32's smallest normal number (at
    x = -100: e^-100) only the absolute precision of subnormals is left."""
    tiny = float(np.finfo(np.float32).tiny)
    x = jnp.array([-100.0, -3.0, -1e-3, 0.0, 1e-3, 3.0, 100.0])
    np.testing.assert_allclose(softplus(x), np.logaddexp(np.asarray(x, np.float64), 0.0),
                               rtol=9 * EPS32, atol=tiny)
    np.testing.assert_allclose(jax.vmap(jax.grad(softplus))(x), jax.nn.sigmoid(x), rtol=18 * EPS32,
                               atol=tiny)
    assert jax.grad(softplus)(0.0) == 0.5  # not 0, as differentiating through |x| would give
    s = jax.nn.sigmoid(x)
    np.testing.assert_allclose(jax.vmap(jax.grad(jax.grad(softplus)))(x), s * (1 - s),
                               rtol=32 * EPS32, atol=tiny)
