"""Why an export cannot be lowered while some of its dims stay symbolic.

JAX's shape polymorphism carries a symbolic dim through most operations, but not through a
comparison that it cannot decide for every size (WTA-CRS asks `'B' <= '64'`: does it keep every
row of the batch?), nor into a host callback, whose operand shapes StableHLO must know. Such an
export lowers once those dims are fixed (`gradlang compile --dim B=32`); `SymbolicDimError`
says which dims and why, and where in the source.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import jax
from jax.extend import core

from gradlang.diagnostics import Span


class SymbolicDimError(Exception):
    """Lowering needs `dims` (names of the export's symbolic dims) fixed to sizes; `why` says
    what needs them; `spans` are the ops being lowered when it happened, innermost first."""

    def __init__(self, dims: tuple[str, ...], why: str, spans: tuple[Span, ...] = ()):
        super().__init__(f"dims {', '.join(dims)} must be fixed to lower: {why}")
        self.dims = dims
        self.why = why
        self.spans = spans

    def within(self, span: Span | None) -> SymbolicDimError:
        """The same error, raised from inside the op at `span` (an enclosing call or loop)."""
        spans = self.spans if span is None else (*self.spans, span)
        return SymbolicDimError(self.dims, self.why, spans)


_QUOTED = re.compile(r"'([^']*)'")
_NAME = re.compile(r"\b[A-Za-z_]\w*\b(?!\s*\()")  # not a function of dims: max(...), mod(...)


_COMPARISON = re.compile(r"Symbolic dimension comparison (.+) is inconclusive\.?$")


def inconclusive(exc: jax.errors.InconclusiveDimensionOperation) -> SymbolicDimError:
    """The error for JAX's "Symbolic dimension comparison 'B' <= '64' is inconclusive" (or
    "Symbolic dimension 'T' used in a context that requires a constant"): the dims are the
    names in its quoted dim expressions."""
    first = str(exc).strip().splitlines()[0]
    dims = tuple(dict.fromkeys(n for t in _QUOTED.findall(first) for n in _NAME.findall(t)))
    comparison = _COMPARISON.match(first)
    if comparison is not None:
        return SymbolicDimError(dims, f"an operation compares sizes ({comparison.group(1)}), "
                                      f"which JAX cannot decide for every value of a symbolic dim")
    return SymbolicDimError(dims, f"an operation needs a size as a constant ({first.rstrip('.')})")


def symbolic_callback(fn: Callable, specs: tuple) -> tuple[str, SymbolicDimError] | None:
    """The first host callback of `fn` (traced at `specs`) that takes or returns an array of
    symbolic shape: the extern's name and the error naming those dims."""
    found: list = []

    def visit(jaxpr) -> None:
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pure_callback":
                found.append(eqn)
            for sub in core.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(jax.make_jaxpr(fn)(*specs).jaxpr)
    for eqn in found:
        ins, outs = ([v.aval for v in vs] for vs in (eqn.invars, eqn.outvars))
        dims = tuple(dict.fromkeys(n for a in (*ins, *outs) for d in a.shape
                                   if jax.export.is_symbolic_dim(d) for n in _NAME.findall(str(d))))
        if dims:
            name = getattr(eqn.params["callback"].callback_func, "name", "?")
            shown = (f"{name}({', '.join(a.str_short() for a in ins)}) -> "
                     f"{', '.join(a.str_short() for a in outs)}")
            return name, SymbolicDimError(
                dims, f"it calls extern '{name}', a Python callback, and StableHLO passes a "
                      f"callback only arrays of static shapes (here {shown})")
    return None
