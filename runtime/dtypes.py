"""The JAX dtype of each IR dtype."""

import jax.numpy as jnp

from gradlang.types import DType

JNP_DTYPES = {DType.F32: jnp.float32, DType.F64: jnp.float64, DType.I32: jnp.int32,
              DType.BOOL: jnp.bool_}
