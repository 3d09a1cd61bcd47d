"""`verify --compare`: every estimator the compiler knows for each random choice, inner
problem and black-box export, each compiled as the annotation a user would write there (an
override, `passes.overrides`), measured on the same inputs against the same reference."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from gradlang.facts import InnerProblem, SiteChoice
from gradlang.ops import Annotation
from gradlang.estimators import REGISTRY
from gradlang.estimators.black_box import compared
from gradlang.estimators.score import BASELINES
from gradlang.estimators.hypergrads import METHODS
from gradlang.passes.overrides import Overrides
from gradlang.passes.aux import written

from .case import Case, classify, place_key
from .inputs import VerifyError
from .measure import assemble, sample
from .program import Program, interleaved_seconds, load
from .reference import Reference
from .report import Comparison, ExportReport, Row, Settings
from .variants import Origin

SCORE_BASELINES = tuple(b for b in BASELINES if b != "auto")


def site_candidates() -> list[Annotation]:
    """Every estimator of a random choice, with each baseline of the score function."""
    out = []
    for name in ["auto", *REGISTRY]:
        out += [Annotation(name, (("baseline", b),)) for b in SCORE_BASELINES] \
            if name == "score" else [Annotation(name)]
    return out


def argmin_candidates() -> list[Annotation]:
    return [a for m in METHODS.values() for a in m.variants()]


def black_box_candidates(by: Annotation) -> list[Annotation | None]:
    """Each black-box estimator at the export's smoothing scale (and population), and plain
    reverse mode (None: no `by=`)."""
    return [*compared(by), None]


def _title(place: SiteChoice | InnerProblem) -> str:
    if isinstance(place, SiteChoice):
        return f"{place.site} ({written(place.function)}, line {place.span.line}, {place.family})"
    return f"argmin ({written(place.function)}, line {place.span.line})"


PLACES = (("random", lambda c: c.sites, lambda span, e: Overrides(draws={span: e}),
           site_candidates, "estimator"),
          ("inner", lambda c: c.inner, lambda span, e: Overrides(methods={span: e}),
           argmin_candidates, "method"))
"""The places of a program that are compared: where they are in a case, the override of
their annotation, the candidates, and the attribute holding what the compiler chose."""


@dataclass(frozen=True)
class _Bench:
    """What every variant is measured with: the same inputs, reference and settings."""

    origin: Origin
    program: Program
    named: Mapping
    ref: Reference
    settings: Settings
    base: ExportReport
    """The export as compiled, measured already..."""
    base_run: tuple
    """... and its compiled estimate with its arguments, to time it beside the variants."""

    def rows(self, variants: list[tuple[str, Overrides]], chosen: Callable[[Case], str | None],
             current: str, spelled: str) -> list[Row]:
        """One row per variant (its label and overrides): the variant measured, or why it does
        not apply. `chosen` reads
        what a variant selects at the compared place, to mark the current choice (`current`,
        written `spelled` in the source). The measured rows are timed again together, their
        rounds interleaved."""
        rows, runs, found = [], [], False
        for label, overrides in variants:
            compiled = self.origin.compile(overrides)
            if isinstance(compiled, str):
                rows.append(Row(label, False, None, compiled))
                continue
            variant = load(compiled, self.program.export.name, self.origin.externs,
                           self.origin.mesh)
            case = classify(variant.module, variant.export, variant.warmup)
            if not found and chosen(case) == current:
                found = True
                rows.append(Row(label, True, self.base))
                runs.append(self.base_run)
                continue
            try:
                sampled = sample(variant, self.named, self.settings)
            except VerifyError as exc:
                rows.append(Row(label, False, None, str(exc)))
                continue
            rows.append(Row(label, False, assemble(variant, case, sampled, self.ref,
                                                   self.settings)))
            runs.append(sampled.run)
        if not found:
            rows.append(Row(spelled, True, self.base))
            runs.append(self.base_run)
        seconds = iter(interleaved_seconds(runs))
        return [r if r.report is None else
                replace(r, report=replace(r.report, cost=replace(r.report.cost,
                                                                 seconds=next(seconds))))
                for r in rows]


def comparisons(origin: Origin, program: Program, case: Case, named: Mapping, ref: Reference,
                base: ExportReport, base_run: tuple, settings: Settings) -> list[Comparison]:
    bench = _Bench(origin, program, named, ref, settings, base, base_run)
    out = []
    if case.by is not None:
        variants = [(f"by={c}" if c else "reverse mode (no by=)",
                     Overrides(by={program.export.span: c})) for c in black_box_candidates(case.by)]
        rows = bench.rows(variants, lambda c: str(c.by) if c.by else None, str(case.by),
                          f"by={case.by}")
        out.append(Comparison(f"export {program.export.name}", "black_box", rows))
    for kind, found, override, candidates, attr in PLACES:
        for place in found(case):
            if not origin.owns(place.span):
                continue
            current = getattr(place, attr)

            def chosen(c: Case, place=place, found=found, attr=attr) -> str | None:
                return next((str(getattr(x, attr)) for x in found(c) if place_key(x) == place_key(place)),
                            None)

            variants = [(f"with {c}", override(place.span, c)) for c in candidates()]
            rows = bench.rows(variants, chosen, str(current), f"with {current}")
            out.append(Comparison(_title(place), kind, rows))
    return out
