"""StableHLO text of an export, printed (and verified) through jaxlib's MLIR bindings."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
from jax.extend.mlir import ir

from .signature import Signature


def lower_to_stablehlo(signature: Signature, fn: Callable,
                       dims: Mapping[str, int] | None = None) -> ir.Module:
    """The StableHLO module of `fn`; dims not fixed in `dims` stay symbolic.

    Locations keep only the name stack, whose scopes are `.grad` spans (the lowering opens one
    per op), so each StableHLO op points at its source line rather than at compiler internals.
    """
    limit = jax.config.jax_traceback_in_locations_limit
    jax.config.update("jax_traceback_in_locations_limit", 0)
    try:
        return jax.jit(fn).lower(*signature.specs(dims)).compiler_ir("stablehlo")
    finally:
        jax.config.update("jax_traceback_in_locations_limit", limit)


def module_text(module: ir.Module, debug_info: bool = False) -> str:
    """Verify the module and print it; with debug_info, locations name .grad lines."""
    if not module.operation.verify():
        raise RuntimeError("StableHLO module failed verification")
    return module.operation.get_asm(enable_debug_info=debug_info)
