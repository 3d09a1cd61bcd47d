"""The front end's limits: the largest literals and the deepest nesting a program may have.

The compiler's stages (the builder, the passes, the lowering to JAX and JAX's own tracing) are
recursive, so a program nested deeply enough would exhaust Python's recursion limit (1000 by
default). Each kind of nesting is checked once, early, against a limit chosen so that every
later stage stays well inside that default with the stack a caller already uses (measured with
`compile --emit stablehlo` of `grad` exports, frames per level of the deepest stage):

- an expression, type or pattern level (a call in a call, a parenthesized operand, a tuple
  type in a tuple type): at most 5 frames in the builder and the passes, 2 in the lowering;
  a chain of left-associative binary operators (`a + b + c + ...`) is not nesting at all;
- a block (`if`, `for`, `checkpoint`, `argmin`/`argmax`, `expect`/`logmeanexp`): 9 (`if`) to 27
  (`argmin`) frames in JAX's tracing of the nested control flow and transformations;
- a call in a call chain: 5 frames, since the lowering inlines the callee.

So MAX_DEPTH expression levels take about 5 * 64 = 320 frames, MAX_BLOCKS blocks (through
calls) at most 27 * 16 = 432 and MAX_CALLS calls 5 * 32 = 160: with the two together, under
600 of the 1000 frames, leaving the rest to the caller (pytest, a notebook, gradlang verify).
"""

from __future__ import annotations

I32_MAX = 2**31 - 1
"""The largest i32 value: integer literals in expressions and integer options."""
I64_MAX = 2**63 - 1
"""The largest integer literal (and dimension) the parser accepts."""

MAX_DEPTH = 64
"""Nesting levels of an expression, type or pattern, and of structs and tuples in a type."""
MAX_BLOCKS = 16
"""Blocks nested in blocks, counted through the functions called inside them."""
MAX_CALLS = 32
"""Calls in a chain of functions that call each other."""
