"""Shape arithmetic over integer and symbolic dims: broadcasting, unification, sizes.

Functions raise `ShapeError` with a user-facing message; the typecheck pass reports it.
"""

from __future__ import annotations

from collections import Counter

from .types import Dim, StructType, TensorType, TreeType, TupleType, Type


class ShapeError(Exception):
    """A type error; `arg`, when given, names the builtin argument at fault (the
    diagnostic points at it)."""

    def __init__(self, message: str, arg: str | None = None):
        super().__init__(message)
        self.arg = arg


def show(shape: tuple[Dim, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def broadcast(*shapes: tuple[Dim, ...]) -> tuple[Dim, ...]:
    """NumPy broadcasting; a symbolic dim matches itself or 1, never a different size."""
    rank = max(len(s) for s in shapes)
    out: list[Dim] = []
    for i in range(rank):
        dims = [s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0]
        chosen: Dim = 1
        for d in dims:
            if d == 1 or d == chosen:
                continue
            if chosen != 1:
                raise ShapeError(f"cannot broadcast shapes {' and '.join(show(s) for s in shapes)}: "
                                 f"dimension {chosen} does not match {d}")
            chosen = d
        out.append(chosen)
    return tuple(out)


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def normalize_axis(axis: int, rank: int) -> int:
    if not -rank <= axis < rank:
        raise ShapeError(f"axis {axis} is out of range for a tensor of rank {rank}")
    return axis % rank


def add_dims(a: Dim, b: Dim) -> Dim:
    if isinstance(a, int) and isinstance(b, int):
        return a + b
    return f"{a}+{b}"


def sub_dims(a: Dim, b: Dim) -> Dim:
    if isinstance(a, int) and isinstance(b, int):
        return a - b
    return a if b == 0 else f"{a}-{b}"


def _factors(d: str) -> list[str]:
    """The factors of a derived dim `2*A*(B+C)` at parenthesis depth 0: ["2", "A", "B+C"]."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(d):
        depth += (ch == "(") - (ch == ")")
        if ch == "*" and depth == 0:
            out.append(d[start:i])
            start = i + 1
    out.append(d[start:])
    return [f[1:-1] if f.startswith("(") and f.endswith(")") else f for f in out]


def _size(shape: tuple[Dim, ...]) -> tuple[int, Counter]:
    """The size of `shape` as a constant times a multiset of symbolic factors (a derived dim
    such as `2*A*B`, the size `reshape` inferred, counts as its factors)."""
    const, syms = 1, Counter()
    for d in shape:
        for f in ([d] if isinstance(d, int) else _factors(d)):
            if isinstance(f, int) or f.isdigit():
                const *= int(f)
            else:
                syms[f] += 1
    return const, syms


def reshape(shape: tuple[Dim, ...], target: tuple[Dim, ...]) -> tuple[Dim, ...]:
    """The target shape with a `-1` entry inferred; sizes must provably agree."""
    if list(target).count(-1) > 1:
        raise ShapeError("reshape allows at most one -1 entry")
    c_in, s_in = _size(shape)
    known = tuple(d for d in target if d != -1)
    c_t, s_t = _size(known)
    if -1 not in target:
        if (c_in, s_in) != (c_t, s_t):
            raise ShapeError(f"cannot reshape {show(shape)} into {show(target)}: sizes differ")
        return target
    if s_t - s_in or c_t == 0 or c_in % c_t:
        raise ShapeError(f"cannot reshape {show(shape)} into {show(target)}: the size of "
                         f"{show(shape)} is not a multiple of the size of {show(known)}")
    c, syms = c_in // c_t, s_in - s_t
    names = sorted(syms.elements())
    if not names:
        inferred: Dim = c
    elif c == 1 and len(names) == 1:
        inferred = names[0]
    else:
        # Derived names such as `B+C` are parenthesized: 2 * (B+C) is not `2*B+C`.
        inferred = "*".join(([str(c)] if c != 1 else [])
                            + [n if n.isidentifier() else f"({n})" for n in names])
    return tuple(inferred if d == -1 else d for d in target)


def unify(expected: Type, actual: Type, env: dict[str, Dim]) -> str | None:
    """Bind the symbolic dims of `expected` to those of `actual`; a mismatch message or None."""
    if isinstance(expected, TensorType):
        if not isinstance(actual, TensorType):
            return f"expected a tensor {expected}, got {actual}"
        if expected.dtype != actual.dtype:
            return f"expected dtype {expected.dtype.value}, got {actual.dtype.value}"
        if len(expected.shape) != len(actual.shape):
            return f"expected rank {len(expected.shape)} ({expected}), got {actual}"
        for e, a in zip(expected.shape, actual.shape):
            if isinstance(e, str):
                if e in env and env[e] != a:
                    return (f"expected {expected} with {e} = {env[e]} (from an earlier argument "
                            f"or field), got {actual}")
                env[e] = a
            elif e != a:
                return f"expected {expected}, got {actual}"
        return None
    if isinstance(expected, StructType):
        if not isinstance(actual, StructType) or actual.name != expected.name:
            return f"expected struct {expected.name}, got {actual}"
        for (name, e), (_, a) in zip(expected.fields, actual.fields):
            problem = unify(e, a, env)
            if problem:
                return f"field '{name}': {problem}"
        return None
    if isinstance(expected, TupleType):
        if not isinstance(actual, TupleType) or len(actual.elems) != len(expected.elems):
            return f"expected {expected}, got {actual}"
        for e, a in zip(expected.elems, actual.elems):
            problem = unify(e, a, env)
            if problem:
                return problem
        return None
    if isinstance(expected, TreeType):  # opaque: it has no dims to bind
        return None if isinstance(actual, TreeType) else f"expected a tree, got {actual}"
    return f"expected {expected}, got {actual}"
