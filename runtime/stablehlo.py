"""StableHLO text of an export, printed (and verified) through jaxlib's MLIR bindings."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
from jax.extend.mlir import ir

from .signature import Signature


def lower_to_stablehlo(signature: Signature, fn: Callable,
                       dims: Mapping[str, int] | None = None) -> ir.Module:
    """The StableHLO module of `fn` (an export, its arguments cast by `signature.casting`);
    dims not fixed in `dims` stay symbolic.

    A key parameter is lowered as its raw data, uint32[2], which `fn` wraps: a typed key
    argument would make JAX constrain its sharding, a Shardy (`sdy`) op other StableHLO
    consumers do not know. Locations keep only the name stack, whose scopes are `.grad` spans
    (the lowering opens one per op), so each StableHLO op points at its source line rather
    than at compiler internals.
    """
    specs = jax.tree.map(_key_data, signature.specs(dims))
    limit = jax.config.jax_traceback_in_locations_limit
    jax.config.update("jax_traceback_in_locations_limit", 0)
    try:
        return jax.jit(fn).lower(*specs).compiler_ir("stablehlo")
    finally:
        jax.config.update("jax_traceback_in_locations_limit", limit)


def _key_data(spec: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    """A typed key's spec as its raw data's; any other spec as it is."""
    if jax.dtypes.issubdtype(spec.dtype, jax.dtypes.prng_key):
        return jax.eval_shape(jax.random.key_data, spec)
    return spec


def module_text(module: ir.Module, debug_info: bool = False) -> str:
    """Verify the module and print it; with debug_info, locations name .grad lines."""
    if not module.operation.verify():
        raise RuntimeError("StableHLO module failed verification")
    return module.operation.get_asm(enable_debug_info=debug_info)
