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
from gradlang.ir import PRIVATE, Module
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
        return replace(module, exports=tuple(exports))
