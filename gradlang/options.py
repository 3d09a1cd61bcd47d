"""The numeric check every option validator shares (estimators, black-box and private gradients,
solvers and hypergradient methods, backward rules, combination rules, compositions).

Option values are used in float32: a value must be finite there (1e300 is finite in Python but
inf in float32), and a positive value must be at least float32's smallest normal number. A
smaller one is subnormal or flushed to zero, and as a divisor (a temperature tau, a smoothing
sigma, a difference step eps) it makes inf and then NaN.
"""

from __future__ import annotations

import numpy as np

F32_MAX = float(np.finfo(np.float32).max)
F32_TINY = float(np.finfo(np.float32).tiny)
_NOUNS = {"positive": "a positive number", "non-negative": "a non-negative number",
          "real": "a number"}


def number_problem(v: object, kind: str) -> str | None:
    """None when `v` is a valid value of `kind`, else what it must be (the end of a sentence
    "option 'k' of 'name' must be ..."). Kinds: `count` (a positive integer), `positive`,
    `non-negative` (zero or positive) and `real` (any finite float32)."""
    number = isinstance(v, (int, float)) and not isinstance(v, bool)
    if kind == "count":  # the builder rejects integer literals beyond int32
        return None if number and isinstance(v, int) and v >= 1 else "a positive integer"
    noun = _NOUNS[kind]
    if not number or (kind != "real" and v < 0) or (kind == "positive" and v == 0):
        return noun
    if not abs(v) <= F32_MAX:
        return f"{noun} of magnitude at most {F32_MAX:.3g} (float32's largest)"
    if kind != "real" and 0 < v < F32_TINY:
        return (f"{noun if kind == 'positive' else 'zero or a number'} of at least "
                f"{F32_TINY:.3g} (float32's smallest normal number)")
    return None
