"""The reference of a `compose(f, expect(g, samples=N), by=...)` export: the gradient of
f(E g), estimated by the plug-in gradient J^T grad f(g_hat) with M inner samples (a variant of
the program: `samples=M`, `by=plugin`), averaged over independent calls.

Its bias is O(1/M) (Jensen: E f(g_hat_M) = f(E g) + f'' Var g / (2M) + O(1/M^2)); the plug-in
at M/2 has about twice it, so |mean(M) - mean(M/2)| stands as its deterministic bound (as
|D(h) - D(2h)| does for finite differences)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace

import jax
import numpy as np

from gradlang.estimators.compose import Plugin
from gradlang.ops import Annotation
from gradlang.passes.overrides import Overrides

from .case import Case
from .inputs import VerifyError
from .program import Program, chunk_for, compiled, load, memory
from .reference import Reference, mean_gradient
from .report import Settings
from .variants import Origin

CALLS = 32
"""Independent plug-in gradients averaged at each of M and M/2 inner samples."""


def _plugin(origin: Origin, program: Program, samples: int) -> Program:
    """The export with `samples` inner samples and `by=plugin`."""
    export = program.export
    found = origin.compile(Overrides(by={export.transform.compose.span: Annotation(Plugin.name)},
                                     samples={export.span: samples}))
    if isinstance(found, str):
        raise VerifyError(f"the plug-in variant with {samples} inner samples does not compile: "
                          f"{found}")
    return load(found, program.export.name, origin.externs, origin.mesh)


def reference(origin: Origin, program: Program, case: Case, named: Mapping,
              settings: Settings, key) -> Reference:
    """The plug-in gradient at M = the reference samples, its bias bounded by the plug-in's
    change from M/2 (see the module docstring)."""
    if not origin.owns(program.export.transform.compose.inner_span):
        raise VerifyError(f"export '{program.export.name}': its composition is not in "
                          f"{origin.source.path}, so verify cannot change its inner samples")
    start = time.perf_counter()
    m = max(settings.reference_samples, 2 * case.samples)
    means = []
    for i, samples in enumerate((m, m // 2)):
        variant = _plugin(origin, program, samples)
        args = variant.arguments(named)
        k = jax.random.fold_in(key, i)
        chunk = chunk_for(memory(compiled(variant.estimate, args, k)).peak)
        means.append(mean_gradient(variant, args, CALLS, k, chunk, "", ""))
    full, half = means
    bounds = [np.abs(a - b) for a, b in zip(full.values, half.values)]
    description = (f"the plug-in gradient J^T grad {case.compose.outer}(g_hat) with M = {m} inner "
                   f"samples (bias O(1/M); bound: its change from M/2), the mean of {CALLS} calls")
    return replace(full, method="plug-in at large M", description=description, bounds=bounds,
                   evaluations=CALLS * (m + m // 2), seconds=time.perf_counter() - start)
