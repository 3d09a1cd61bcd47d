"""Options of annotations (estimators, black-box and private gradients, solvers and
hypergradient methods, backward rules, combination rules, compositions): each annotation's
options are a frozen dataclass whose fields are declared with `option(default, kind, ...)`;
`parse` checks written options against it (unknown names with a did-you-mean, types, ranges,
finite values) and fills in the defaults, `rendered` gives them back as `k=v` pairs.

Option values are used in float32: a value must be finite there (1e300 is finite in Python but
inf in float32), and a positive value must be at least float32's smallest normal number. A
smaller one is subnormal or flushed to zero, and as a divisor (a temperature tau, a smoothing
sigma, a difference step eps) it makes inf and then NaN.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

F32_MAX = float(np.finfo(np.float32).max)
F32_TINY = float(np.finfo(np.float32).tiny)
_NOUNS = {"positive": "a positive number", "non-negative": "a non-negative number",
          "real": "a number"}
_INTEGERS = {"count": (1, "a positive integer"), "index": (0, "a non-negative integer")}


def number_problem(v: object, kind: str) -> str | None:
    """None when `v` is a valid value of `kind`, else what it must be (the end of a sentence
    "option 'k' of 'name' must be ..."). Kinds: `count` (a positive integer), `index` (a
    non-negative integer, e.g. an axis), `positive`, `non-negative` (zero or positive) and
    `real` (any finite float32)."""
    number = isinstance(v, (int, float)) and not isinstance(v, bool)
    if kind in _INTEGERS:  # the builder rejects integer literals beyond int32
        least, noun = _INTEGERS[kind]
        return None if number and isinstance(v, int) and v >= least else noun
    noun = _NOUNS[kind]
    if not number or (kind != "real" and v < 0) or (kind == "positive" and v == 0):
        return noun
    if not abs(v) <= F32_MAX:
        return f"{noun} of magnitude at most {F32_MAX:.3g} (float32's largest)"
    if kind != "real" and 0 < v < F32_TINY:
        return (f"{noun if kind == 'positive' else 'zero or a number'} of at least "
                f"{F32_TINY:.3g} (float32's smallest normal number)")
    return None


# ---- option schemas: an annotation's options as a frozen dataclass


class OptionError(ValueError):
    """An annotation's options are not valid (the message is the diagnostic's text)."""


@dataclass(frozen=True)
class Spec:
    """How one option is checked: `kind` is a `number_problem` kind, `bool`, `choice` (one of
    `choices`, written as a name) or `name` (a function's name); a number must also be below
    `below`, at least `least` and at most `most` when they are given."""

    kind: str
    choices: tuple[str, ...] = ()
    below: float | None = None
    plural: str = ""
    """The choices' noun in messages ("baselines"); the option's name plus "s" by default."""
    least: float | None = None
    most: float | None = None
    positional: bool = False
    """It may be written first without its name (`implicit(cg)`: method=cg)."""


def option(default: object, kind: str | None = None, choices: tuple[str, ...] = (),
           below: float | None = None, plural: str = "", least: float | None = None,
           most: float | None = None, positional: bool = False) -> Any:
    """A field of an options dataclass. `kind` defaults from the default's type (bool: bool,
    int: count, float: positive, str: choice when `choices` are given, else name). A default
    of None means absent unless written: it is not rendered."""
    if kind is None:
        kind = ("bool" if isinstance(default, bool) else "count" if isinstance(default, int)
                else "positive" if isinstance(default, float) else "choice" if choices else "name")
    spec = Spec(kind, choices, below, plural, least, most, positional)
    return field(default=default, metadata={"spec": spec})


@dataclass(frozen=True)
class NoOptions:
    """The options of an annotation that takes none."""


def parse(cls: type[T], given: Sequence[tuple[str, object]], owner: str, name: str) -> T:
    """`given` (an annotation's `k=v` options) as an instance of the options dataclass `cls`,
    checked and with defaults filled in; `owner` names the annotation in messages ("estimator
    'score'"), `name` is its name. Raises OptionError. A `check()` method of `cls` is called
    last for constraints between options (it returns a problem or None)."""
    specs = {f.name: f.metadata["spec"] for f in fields(cls)}
    given = _named(given, specs, name)
    for k, v in given:
        if k not in specs:
            raise OptionError(f"{owner} has no option '{k}'" + _hint(
                k, list(specs), f"options: {', '.join(specs)}" if specs else "it takes none"))
        problem = value_problem(specs[k], v)
        if problem is not None:
            raise OptionError(problem.format(k=k, name=name, v=_shown(v)))
    out = cls(**dict(given))
    problem = out.check() if hasattr(out, "check") else None
    if problem is not None:
        raise OptionError(problem)
    return out


def _named(given: Sequence[tuple[str | None, object]], specs: dict[str, Spec],
           name: str) -> Sequence[tuple[str, object]]:
    """`given` with its unnamed option (key None, written first) named by the `positional`
    field; raises OptionError where there is none or the option is also given by name."""
    if not given or given[0][0] is not None:
        return given
    first = next((k for k, s in specs.items() if s.positional), None)
    if first is None:
        raise OptionError(f"options of '{name}' are given by name, e.g. {name}(option=value)")
    if any(k == first for k, _ in given[1:]):
        raise OptionError(f"option '{first}' of '{name}' is given twice")
    return ((first, given[0][1]),) + tuple(given[1:])


def chosen(table: Mapping[str, type[T]], name: str, given: Sequence[tuple[str, object]],
           what: str, owner: str = "", listing: str = "") -> T:
    """The options of `name`, a `what` ("solver") among `table`'s, parsed as its class
    (`parse`); an unknown name is an OptionError with a did-you-mean (`unknown`). `owner`
    names it in option messages ("{what} 'name'" by default)."""
    if name not in table:
        raise OptionError(unknown(what, name, list(table), listing=listing))
    return parse(table[name], given, owner or f"{what} '{name}'", name)


def unknown(what: str, name: str, known: Sequence[str], where: str = "",
            listing: str = "") -> str:
    """The message for an unknown annotation `name` (a solver, a rule, an estimator), "unknown
    {what} 'name'{where}", with a did-you-mean among `known`, else the list of them (introduced
    by `listing`, "{what}s" by default)."""
    return f"unknown {what} '{name}'{where}" + _hint(
        name, known, f"{listing or what + 's'}: {', '.join(known)}")


def _hint(name: str, known: Sequence[str], listing: str) -> str:
    """"; did you mean 'x'?" when a name in `known` is close to `name`, else " (listing)"."""
    close = difflib.get_close_matches(name, known, n=1)
    return f"; did you mean '{close[0]}'?" if close else f" ({listing})"


def value_problem(spec: Spec, v: object) -> str | None:
    """None when `v` suits `spec`, else a message with {k}, {name} and {v} to fill in."""
    if spec.kind == "choice":
        if isinstance(v, str) and v in spec.choices:
            return None
        return ("unknown {k} '{v}' for {name} "
                f"({spec.plural or '{k}s'}: {', '.join(spec.choices)})")
    if spec.kind == "name":
        return None if isinstance(v, str) else "option '{k}' of '{name}' must be a name, got {v}"
    if spec.kind == "bool":
        return None if isinstance(v, bool) else "option '{k}' of '{name}' must be true or false, got {v}"
    number = isinstance(v, (int, float)) and not isinstance(v, bool)
    if number and spec.below is not None and not v < spec.below:
        want = f"below {spec.below:g}"
    elif number and spec.least is not None and not v >= spec.least:
        want = f"at least {spec.least:g}"
    elif number and spec.most is not None and not v <= spec.most:
        want = f"at most {spec.most:g}"
    else:
        want = number_problem(v, spec.kind)
    return None if want is None else f"option '{{k}}' of '{{name}}' must be {want}, got {{v}}"


def _shown(v: object) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def rendered(options: object) -> tuple[tuple[str, object], ...]:
    """The options as `k=v` pairs in declaration order, leaving out those that are None."""
    return tuple((f.name, getattr(options, f.name)) for f in fields(options)
                 if getattr(options, f.name) is not None)
