"""Black-box gradients: check and complete each export's `by=` estimator.

`grad(f, wrt=[...], by=ESTIMATOR)` (and `value_and_grad`) estimate the gradient from forward
evaluations only, so f may call extern functions and non-smooth ops without backward rules:

- `spsa(eps=0.001, samples=1)`: MeZO-style two-point SPSA, (f(x + eps z) - f(x - eps z)) /
  (2 eps) z per sample, z ~ N(0, I) regenerated from the key, never stored;
- `es(sigma=0.1, pop=64, antithetic=true)`: evolution strategies over a population (the batch
  axis the runtime can shard across devices);
- `eggroll(sigma=0.1, pop=64, rank=1, antithetic=true)`: ES whose perturbation of each matrix
  parameter is low rank, A B^T / sqrt(rank).

All are unbiased for the gradient of the Gaussian-smoothed objective E f(x + s z). The runtime
(`runtime.zeroth_order`) builds the estimator; this pass records the completed choice in the
export. `by=dp(...)` is not a
black-box estimator (it is reverse mode, made private): the `privacy` pass checks it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from gradlang.diagnostics import Diagnostics
from gradlang.ir import PRIVATE, Module
from gradlang.ops import Annotation
from gradlang.options import OptionError, option, parse, rendered, unknown


@dataclass(frozen=True)
class Spsa:
    """Two-point SPSA."""

    name: ClassVar[str] = "spsa"
    eps: float = option(1e-3)
    """The difference step."""
    samples: int = option(1)


class _Population:
    """Antithetic pairs (z and -z) split the population in two halves."""

    name: ClassVar[str]
    pop: int
    antithetic: bool

    def check(self) -> str | None:
        if self.antithetic and self.pop % 2:
            return (f"'{self.name}' with antithetic pairs needs an even pop, got {self.pop}; "
                    f"write antithetic=false for an odd one")
        return None


@dataclass(frozen=True)
class Es(_Population):
    """Evolution strategies."""

    name: ClassVar[str] = "es"
    sigma: float = option(0.1)
    pop: int = option(64)
    antithetic: bool = option(True)


@dataclass(frozen=True)
class Eggroll(_Population):
    """Evolution strategies with low-rank perturbations of matrices."""

    name: ClassVar[str] = "eggroll"
    sigma: float = option(0.1)
    pop: int = option(64)
    rank: int = option(1)
    antithetic: bool = option(True)


BLACK_BOX: dict[str, type] = {c.name: c for c in (Spsa, Es, Eggroll)}
"""Each black-box estimator's options, by name."""


def complete(e: Annotation) -> Annotation:
    """`by=` checked and with its defaults filled in; raises OptionError."""
    if e.name not in BLACK_BOX:
        names = [*BLACK_BOX, PRIVATE]
        raise OptionError(unknown("gradient estimator", e.name, names, " for by="))
    options = parse(BLACK_BOX[e.name], e.options, f"estimator '{e.name}'", e.name)
    return replace(e, options=rendered(options))


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
            t = export.transform
            black_box = t.black_box  # by=dp is the privacy pass's
            if black_box is not None:
                try:
                    by = complete(black_box)
                except OptionError as exc:
                    diags.error(str(exc), black_box.span)
                else:
                    export = replace(export, transform=replace(t, by=by))
            exports.append(export)
        return replace(module, exports=tuple(exports))
