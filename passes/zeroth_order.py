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
export and in the `zeroth_order` fact (export name -> estimator). `by=dp(...)` is not a
black-box estimator (it is reverse mode, made private): the `privacy` pass checks it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace

from gradlang.diagnostics import Diagnostics
from gradlang.ir import PRIVATE, Module
from gradlang.ops import Estimator

from gradlang.options import number_problem

ESTIMATORS: dict[str, dict[str, object]] = {
    "spsa": {"eps": 1e-3, "samples": 1},
    "es": {"sigma": 0.1, "pop": 64, "antithetic": True},
    "eggroll": {"sigma": 0.1, "pop": 64, "rank": 1, "antithetic": True},
}
_COUNTS = ("samples", "pop", "rank")


def _problem(e: Estimator) -> str | None:
    if e.name not in ESTIMATORS:
        names = [*ESTIMATORS, PRIVATE]
        close = difflib.get_close_matches(e.name, names, n=1)
        return (f"unknown gradient estimator '{e.name}' for by=" + (f"; did you mean '{close[0]}'?"
                if close else f" (by= takes {', '.join(names)})"))
    table = ESTIMATORS[e.name]
    for k, v in e.options:
        if k not in table:
            return f"estimator '{e.name}' has no option '{k}' (options: {', '.join(table)})"
        if isinstance(table[k], bool):
            want = None if isinstance(v, bool) else "true or false"
        else:
            want = number_problem(v, "count" if k in _COUNTS else "positive")
        if want is not None:
            return f"option '{k}' of '{e.name}' must be {want}, got {v}"
    done = dict(table) | dict(e.options)
    if done.get("antithetic") and done.get("pop", 2) % 2:
        return (f"'{e.name}' with antithetic pairs needs an even pop, got {done['pop']}; "
                f"write antithetic=false for an odd one")
    return None


@dataclass(frozen=True)
class ZerothOrder:
    """The black-box estimator pass (checks and completes `by=`)."""

    name: str = "zeroth_order"
    checks_only: bool = True

    def run(self, module: Module, diags: Diagnostics) -> Module:
        exports, chosen = [], {}
        for export in module.exports:
            t = export.transform
            black_box = t.black_box  # by=dp is the privacy pass's
            if black_box is not None:
                problem = _problem(black_box)
                if problem is not None:
                    diags.error(problem, black_box.span)
                else:
                    given = dict(black_box.options)
                    by = replace(black_box, options=tuple((k, given.get(k, v))
                                                          for k, v in ESTIMATORS[black_box.name].items()))
                    export = replace(export, transform=replace(t, by=by))
                    chosen[export.name] = by
            exports.append(export)
        return replace(module, exports=tuple(exports),
                       facts=module.facts | {"zeroth_order": chosen})
