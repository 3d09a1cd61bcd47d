"""Black-box gradients: check and complete each export's `by=` estimator.

`grad(f, wrt=[...], by=ESTIMATOR)` (and `value_and_grad`, `descend`) estimate the gradient from
forward evaluations only, by one of `estimators.black_box.BLACK_BOX` (spsa, es, eggroll: their
options and how each estimates are declared there). The runtime (`runtime.zeroth_order`) builds
the estimator; this pass records the completed choice in the export (in each objective of a
`minimize` export, `minimize([f, g with spsa(...)], ...)`). `by=dp(...)` is not a
black-box estimator (it is reverse mode, made private): the `privacy` pass checks it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from gradlang.diagnostics import Diagnostics
from gradlang.estimators.black_box import BLACK_BOX, estimator
from gradlang.ir import PRIVATE, Export, Module, Op, reachable, walk
from gradlang.ops import Annotation
from gradlang.options import OptionError, rendered, unknown


def complete(e: Annotation) -> Annotation:
    """`by=` checked and with its defaults filled in; raises OptionError."""
    if e.name not in BLACK_BOX:
        names = [*BLACK_BOX, PRIVATE]
        raise OptionError(unknown("gradient estimator", e.name, names, " for by="))
    return replace(e, options=rendered(estimator(e)))


@dataclass(frozen=True)
class ZerothOrder:
    """The black-box estimator pass (checks and completes `by=`)."""

    name: str = "zeroth_order"
    after_errors: bool = True
    requires: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()

    def run(self, module: Module, diags: Diagnostics) -> Module:
        exports = []
        for export in module.exports:
            parts = []
            for part in export.parts():  # a minimize export's objectives may each have one
                t = part.transform
                black_box = t.black_box  # by=dp is the privacy pass's
                if black_box is not None:
                    try:
                        part = replace(part, transform=replace(t, by=complete(black_box)))
                    except OptionError as exc:
                        diags.error(str(exc), black_box.span)
                parts.append(part)
            exports.append(export.joined(tuple(parts)))
        _warn_unused_methods(module, exports, diags)
        return replace(module, exports=tuple(exports))


def _warn_unused_methods(module: Module, exports: list[Export], diags: Diagnostics) -> None:
    """A hypergradient method written on an inner problem that only black-box exports reach
    is never used (they differentiate nothing): a warning at the `with`."""
    reverse: set[int] = set()
    black: dict[int, tuple[Op, str]] = {}
    for part in (p for e in exports for p in e.parts() if p.transform.kind != "fn"):
        if module.function(part.transform.fn) is None:  # reported by resolve
            continue
        for name in reachable(module, part.transform.fn):
            for op in walk(module.function(name).body):
                if op.name != "argmin":
                    continue
                if part.transform.black_box is None:
                    reverse.add(id(op))
                else:
                    black.setdefault(id(op), (op, f"{part.name} (by={part.transform.black_box.name})"))
    for key, (op, who) in black.items():
        hyper = op.params.hyper
        if key not in reverse and hyper is not None:
            diags.warning(f"'with {hyper.name}' is not used: only {who} reaches this inner "
                          f"problem, and a black-box estimate differentiates no inner problem "
                          f"(it only solves it in each forward evaluation)", hyper.span or op.span)
