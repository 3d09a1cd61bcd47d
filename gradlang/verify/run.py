"""`verify`: one export's gradient estimates against its reference, measured."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from . import progress
from .case import classify, smooth_wrt
from .compare import comparisons
from .inputs import generated_arguments, given_arguments
from .inputs import VerifyError
from .measure import assemble, per_leaf, sample
from .minimize import verify_minimize
from .program import Program, chunk_for, load
from .report import ExportReport, Settings
from .select import reference
from .variants import Origin


def named_arguments(program: Program, args: Mapping | Sequence | None,
                    dims: Mapping[str, int] | None, seed: int) -> dict:
    """The arguments by name: as given (by name or in order, without the key), or generated
    from the declared types (symbolic dims from `dims`)."""
    if args is None:
        return generated_arguments(program.params, dims or {}, seed, program.state)
    return given_arguments(program.params, args, program.state)


def verify_export(origin: Origin, module, name: str, args: Mapping | Sequence | None = None,
                  dims: Mapping[str, int] | None = None, settings: Settings = Settings(),
                  compare: bool = False) -> ExportReport:
    """Verify export `name` of the compiled IR `module` (compiled from `origin`)."""
    with progress.exporting(name):
        return _verify(origin, module, name, args, dims, settings, compare)


def _verify(origin: Origin, module, name: str, args: Mapping | Sequence | None,
            dims: Mapping[str, int] | None, settings: Settings, compare: bool) -> ExportReport:
    program = load(module, name, origin.externs, origin.mesh)
    named = named_arguments(program, args, dims, settings.seed)
    if program.export.transform.kind == "minimize" and program.value is None:
        if compare:
            raise VerifyError(f"--compare takes one objective of '{name}' at a time: "
                              f"verify {name}[i] --compare")
        return verify_minimize(origin, module, program, named, settings,
                               lambda part, args, s: verify_export(origin, module, part, args,
                                                                   None, s))
    case = classify(module, program.export, program.warmup)
    sampled = sample(program, named, settings)
    chunk = chunk_for(sampled.memory.peak)
    ref = reference(origin, program, case, named, settings, chunk)
    smooth = smooth_wrt(module, program.export) if case.kind == "non_smooth" else ()
    other, is_smooth = None, None
    if smooth:  # those leaves' gradient is the program's own: a reference without smoothing
        other = classify(module, program.export, program.warmup, smooth=True)
        is_smooth = [n.split(".")[0] in smooth for n in sampled.names]
        ref = per_leaf(ref, reference(origin, program, other, named, settings, chunk),
                       is_smooth, smooth)
    report = assemble(program, case, sampled, ref, settings, other, is_smooth)
    if compare:
        report = replace(report, compare=comparisons(origin, program, case, named, ref, report,
                                                     sampled.run, settings))
    return report
