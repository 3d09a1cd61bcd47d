"""How Python binds extern functions (`extern fn name(...) -> T` in .grad source)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class batched:  # noqa: N801 - used like a decorator
    """Marks an extern's Python binding as vectorized over leading batch axes: under
    `jax.vmap` (an ES population) it is called once with every argument carrying the batch's
    leading axes and must return them too. Unmarked bindings are called once per element."""

    fn: Callable
