"""One export's estimates measured (time, compiled memory) and set against a reference."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import jax
import numpy as np

from gradlang.passes.aux import written

from . import progress
from .case import Case
from .inputs import VerifyError
from .program import (Memory, Program, chunk_for, compiled, draw_estimates, flat_leaves,
                      interleaved_seconds, leaf_names, memory)
from .reference import Reference
from .report import CostReport, ExportReport, Settings
from .stats import leaf_stats


@dataclass(frozen=True)
class Sampled:
    """N estimates of an export at given arguments, per leaf, and the cost of one."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    samples: list[np.ndarray]
    """Per leaf, float64 [N, size]."""
    memory: Memory
    seconds: float
    run: tuple
    """(the compiled estimate, its arguments), to time it again beside others."""


def sample(program: Program, named: Mapping, settings: Settings) -> Sampled:
    """The estimates of `program` at `named` (keys from the seed), their time and memory."""
    args = program.arguments(named)
    key = jax.random.fold_in(jax.random.key(settings.seed), 1)
    call = (args, key) if program.draws else (args,)
    progress.note("compiling the gradient")
    executable = compiled(program.estimate, *call)
    mem = memory(executable)
    grads = executable(*call)
    names, shapes = leaf_names(grads), [np.shape(x) for x in jax.tree.leaves(grads)]
    if program.draws:
        samples = draw_estimates(program, args, settings.samples, key, chunk_for(mem.peak))
    else:
        samples = flat_leaves(grads, 1)
    bad = [name for name, s in zip(names, samples) if not np.isfinite(s).all()]
    if bad:
        raise VerifyError(f"export '{program.export.name}': the gradient is not finite at these "
                          f"inputs ({', '.join(bad)}); give other inputs (--at FILE.npz)")
    progress.note("timing one estimate")
    (seconds,) = interleaved_seconds([(executable, call)])
    return Sampled(names, shapes, samples, mem, seconds, (executable, call))


def per_leaf(rough: Reference, smooth: Reference, is_smooth: list[bool],
             names: tuple[str, ...]) -> Reference:
    """`rough`'s values at the leaves that reach a non-smooth op, `smooth`'s (a reference of
    the exact gradient) at the others (`is_smooth`, of the `wrt` names `names`)."""
    def pick(a: list, b: list) -> list:
        return [y if s else x for x, y, s in zip(a, b, is_smooth)]

    return Reference(f"{rough.method} | {smooth.method}",
                     f"{rough.description}; for {', '.join(names)} (no non-smooth op on their "
                     f"way to the result, so reverse mode is exact there): {smooth.description}",
                     pick(rough.values, smooth.values), pick(rough.errors, smooth.errors),
                     pick(rough.bounds, smooth.bounds), pick(rough.coords, smooth.coords),
                     rough.samples + smooth.samples, rough.evaluations + smooth.evaluations,
                     rough.seconds + smooth.seconds)


def assemble(program: Program, case: Case, sampled: Sampled, ref: Reference,
             settings: Settings, smooth: Case | None = None,
             is_smooth: list[bool] | None = None) -> ExportReport:
    """The report of `sampled` against `ref`; the leaves marked `is_smooth` reach no
    non-smooth op and are biased by design only as `smooth`, the export's case without those
    ops, is (`per_leaf`)."""
    cases = [smooth if s else case for s in is_smooth or [False] * len(sampled.names)]
    leaves = [leaf_stats(*leaf, c.biased_by_design is not None, settings.z)
              for leaf, c in zip(zip(sampled.names, sampled.shapes, sampled.samples, ref.values,
                                     ref.errors, ref.bounds, ref.coords), cases)]
    cost = case.cost()
    t = program.export.transform
    c = case.compose
    what = (f"compose({c.outer}, expect({c.inner}, samples={c.samples}), by={c.by})" if c
            else f"expect({written(case.objective)}, samples={case.samples})" if case.samples
            else written(case.objective))
    return ExportReport(program.export.name, t.call(what), case.kind, case.estimator,
                        case.biased_by_design, case.notes, sampled.samples[0].shape[0],
                        settings.seed, ref, leaves,
                        CostReport(cost.forward, cost.backward, cost.detail, sampled.seconds,
                                   sampled.memory))
