"""The pass pipeline: one list, a registry by name, and a runner that stops on errors.

A pipeline can be written as text, `resolve,typecheck,gradflow`. Each pass is a frozen
dataclass with a `name` and `run(module, diags) -> module`. A compile given overrides
(`overrides.py`, for `gradlang verify`'s variants) runs `ApplyOverrides` before the pipeline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from gradlang.diagnostics import Diagnostics
from gradlang.ir import Module
from gradlang.verifier import verify_module

from .aux import Aux
from .compose import Compose
from .estimators import Estimators
from .gradflow import GradFlow
from .hypergrad import Hypergrad
from .multiobjective import Multiobjective
from .nested_grad import NestedGrad
from .privacy import Privacy
from .resolve import Resolve
from .straight_through import StraightThrough
from .surrogate import Surrogate
from .typecheck import Typecheck
from .zeroth_order import ZerothOrder


class Pass(Protocol):
    name: str
    after_errors: bool
    """It still runs after earlier errors: it only checks and annotates, so that one run
    reports (for instance) resolution and type errors together."""
    requires: tuple[str, ...]
    """The `Facts` fields it reads, which an earlier pass of the pipeline must provide."""
    provides: tuple[str, ...]
    """The `Facts` fields it writes."""

    def run(self, module: Module, diags: Diagnostics) -> Module: ...


PIPELINE: tuple[Pass, ...] = (Resolve(), Typecheck(), Aux(), Compose(), ZerothOrder(),
                              Multiobjective(), GradFlow(), StraightThrough(), Hypergrad(),
                              Estimators(), NestedGrad(), Surrogate(), Privacy())
PASSES: dict[str, Pass] = {p.name: p for p in PIPELINE}

_TYPED = {"resolved": True, "typed": True}
_VERIFY_AFTER = {"resolve": {"resolved": True}, "typecheck": _TYPED, "aux": _TYPED,
                 "compose": _TYPED,
                 "zeroth_order": _TYPED, "multiobjective": _TYPED, "gradflow": _TYPED,
                 "straight_through": _TYPED, "hypergrad": _TYPED, "estimators": _TYPED,
                 "nested_grad": _TYPED, "surrogate": _TYPED, "privacy": _TYPED}


def parse_pipeline(text: str) -> tuple[Pass, ...]:
    """`"resolve,typecheck"` -> the passes; unknown names, and a pass before the passes that
    provide the facts it requires, raise ValueError."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise ValueError(f"unknown pass {unknown[0]!r}; passes: {', '.join(PASSES)}")
    passes = tuple(PASSES[n] for n in names)
    check_order(passes)
    return passes


def check_order(passes: tuple[Pass, ...]) -> None:
    """Every fact a pass requires is provided by a pass before it (else ValueError)."""
    provided: set[str] = set()
    for p in passes:
        missing = [f for f in p.requires if f not in provided]
        if missing:
            by = next(q.name for q in PIPELINE if missing[0] in q.provides)
            raise ValueError(f"pass {p.name!r} requires the fact {missing[0]!r}, which the "
                             f"{by!r} pass provides: run that pass before it")
        provided.update(p.provides)


def run_pipeline(module: Module, diags: Diagnostics, passes: tuple[Pass, ...] = PIPELINE,
                 after: Callable[[str, Module], None] | None = None,
                 verify: bool = True) -> Module:
    """Run passes in order. Once an error is reported, only checking passes still run (so one
    run reports resolution and type errors together); rewriting passes do not.

    `after(name, module)` is called after each error-free pass (for --print-after). The verifier
    runs after each error-free pass when `verify` is set.
    """
    for p in passes:
        if diags.has_errors and not p.after_errors:
            continue
        module = p.run(module, diags)
        if diags.has_errors:
            continue
        if verify:
            verify_module(module, **_VERIFY_AFTER.get(p.name, {}))
        if after is not None:
            after(p.name, module)
    return module
