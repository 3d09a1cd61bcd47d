"""The front end's limits: the largest literals and the deepest nesting a program may have.

The compiler's stages (the builder, the passes, the lowering to JAX and JAX's own tracing) are
recursive, so a program nested deeply enough would exhaust Python's recursion limit (1000 by
default). Each kind of nesting is checked once, early, against a limit chosen so that every
later stage stays well inside that default with the stack a caller already uses. Frames per
level of the deepest stage, measured with `compile --emit stablehlo` (and `artifact`) of
`grad` exports:

- an expression, type or pattern level (a call in a call, a parenthesized operand, a tuple
  type in a tuple type, a struct in a struct): at most 3 in the builder and the passes, 2 in
  the lowering; a chain of left-associative binary operators (`a + b + c + ...`) is not
  nesting at all;
- a block, in JAX's tracing of nested control flow and transformations: `if` 9, `checkpoint`
  12, `expect` 14, `for` 20, `argmin` 27;
- a call in a chain of calls: 5, as the lowering inlines the callee.

At the limits the deepest stacks measured are about 200 frames for expressions, types and
structs, 350 for 16 nested `for` loops and 420 for 16 nested `expect` blocks at the end of a
chain of 32 calls (16 nested `argmin`s would take about 650, but tracing them takes time
exponential in their depth: half a minute at 8, two at 10). That leaves at least a third of
the default limit to the caller (pytest, a notebook, gradlang verify).
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
