"""runtime/numerics.py: the stable softplus and its derivatives, everywhere including x = 0."""

import jax
import jax.numpy as jnp
import numpy as np

from gradlang.runtime.numerics import softplus


def test_softplus_values_and_derivatives():
    x = jnp.array([-100.0, -3.0, -1e-3, 0.0, 1e-3, 3.0, 100.0])
    np.testing.assert_allclose(softplus(x), np.logaddexp(np.asarray(x, np.float64), 0.0), rtol=1e-6,
                               atol=1e-38)  # float32 underflow at x = -100
    np.testing.assert_allclose(jax.vmap(jax.grad(softplus))(x), jax.nn.sigmoid(x), rtol=1e-6)
    assert jax.grad(softplus)(0.0) == 0.5  # not 0, as differentiating through |x| would give
    s = jax.nn.sigmoid(x)
    np.testing.assert_allclose(jax.vmap(jax.grad(jax.grad(softplus)))(x), s * (1 - s), rtol=1e-5,
                               atol=1e-30)
