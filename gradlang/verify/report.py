"""The verify report: per export and `wrt` leaf, as a terminal table and as JSON
(`"schema": "gradlang.verify/1"`, documented in docs/reference/verify.md, JSON)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from gradlang.explain import table

from .program import Memory
from .reference import Reference
from .stats import BIASED, VERDICTS, Z, ZERO, LeafStats, worst

SCHEMA = "gradlang.verify/1"


@dataclass(frozen=True)
class Settings:
    """How `verify` measures: N estimates, M reference samples, coordinates compared by finite
    differences per leaf, the relative Gaussian smoothing of non-smooth references, z."""

    samples: int = 1000
    seed: int = 0
    reference_samples: int = 4096
    coordinates: int = 32
    smoothing: float = 0.05
    z: float = Z


@dataclass(frozen=True)
class CostReport:
    forward: int
    backward: int
    detail: str
    seconds: float
    """Wall time of one estimate, after compilation."""
    memory: Memory


@dataclass(frozen=True)
class Row:
    """One estimator of a comparison: the annotation that selects it and its report, or why
    it does not apply (the compiler's reason)."""

    annotation: str
    current: bool
    report: ExportReport | None
    reason: str | None = None

    @property
    def variance(self) -> float | None:
        return None if self.report is None else sum(l.total_variance for l in self.report.leaves)

    @property
    def score(self) -> float | None:
        """Variance x time per estimate: the variance left after a fixed time budget."""
        return None if self.report is None else self.variance * self.report.cost.seconds

    def rank_key(self) -> tuple:
        """Unbiased estimators that pass first, then those biased by design, then failing
        ones, then those that do not apply; within a group by variance x time."""
        rep = self.report
        if rep is None:
            return (3, 0.0, 0.0)
        group = 2 if rep.exit_code else 1 if rep.biased_by_design else 0
        return (group, self.score, rep.cost.seconds)


@dataclass(frozen=True)
class Comparison:
    site: str
    kind: str  # "random" | "inner" | "black_box"
    rows: list[Row]

    def ranked(self) -> list[Row]:
        return sorted(self.rows, key=Row.rank_key)


@dataclass(frozen=True)
class CombinationCheck:
    """A `minimize` export's direction against its rule applied (in NumPy) to its objectives'
    gradients at the same keys: the largest error over `calls` calls, relative to the largest
    gradient's norm."""

    rule: str
    description: str
    calls: int
    max_relative_error: float
    tolerance: float
    verdict: str


@dataclass(frozen=True)
class ExportReport:
    """What `verify` found for one export: `print(report)` shows the table, `verdict` and
    `exit_code` sum it up, `leaf(name)` gives one `wrt` leaf's statistics."""

    export: str
    call: str
    case: str
    estimator: str
    biased_by_design: str | None
    notes: list[str]
    samples: int
    seed: int
    reference: Reference
    leaves: list[LeafStats]
    cost: CostReport
    compare: list[Comparison] | None = None
    parts: list[ExportReport] | None = None
    """`minimize`: each objective's gradient verified as its own export `name[i]`."""
    combination: CombinationCheck | None = None
    """`minimize`: the direction against the rule applied to the objectives' gradients."""

    @property
    def verdict(self) -> str:
        """The worst of the leaves' (and, for `minimize`, the objectives' and the
        combination's) verdicts."""
        return worst([l.verdict for l in self.leaves] + [p.verdict for p in self.parts or ()]
                     + ([self.combination.verdict] if self.combination else []))

    @property
    def exit_code(self) -> int:
        return int(self.verdict in (BIASED, ZERO))

    def leaf(self, name: str) -> LeafStats:
        found = [l for l in self.leaves if l.name == name]
        if not found:
            raise KeyError(f"no leaf '{name}' (leaves: {', '.join(l.name for l in self.leaves)})")
        return found[0]

    def to_json(self, file: str = "") -> dict:
        """The JSON document of this report alone."""
        return document(file, [self])

    def table(self) -> str:
        return render(self)

    def __str__(self) -> str:
        return render(self)


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _list(x: np.ndarray) -> list:
    return [_num(v) for v in np.asarray(x, np.float64).ravel()]


def leaf_json(l: LeafStats) -> dict:
    return {
        "name": l.name, "shape": list(l.shape), "size": l.size,
        "coordinates": None if l.coords is None else [int(i) for i in l.coords],
        "mean": _list(l.mean),
        "reference": {"values": _list(l.reference), "standard_error": _list(l.reference_error),
                      "bound": _list(l.reference_bound),
                      "norm": float(np.linalg.norm(l.reference))},
        "bias": {"relative": _num(l.relative_bias),
                 "ci95": None if l.ci95 is None else [_num(l.ci95[0]), _num(l.ci95[1])],
                 "absolute": _num(l.absolute_bias), "noise_floor": _num(l.noise_floor)},
        "variance": {"total": _num(l.total_variance), "per_coordinate": _list(l.variance)},
        "cosine": _num(l.cosine), "ess": _num(l.ess),
        "test": {"max_z": _num(l.max_z), "chi2_z": _num(l.chi2_z)},
        "zero": {"estimate": l.zero_estimate, "reference": l.zero_reference},
        "verdict": l.verdict,
    }


def row_json(r: Row) -> dict:
    rep = r.report
    return {"annotation": r.annotation, "current": r.current, "applicable": rep is not None,
            "reason": r.reason, "variance": _num(r.variance),
            "relative_bias": None if rep is None else _num(overall_bias(rep)),
            "seconds_per_estimate": None if rep is None else rep.cost.seconds,
            "evaluations": None if rep is None else {"forward": rep.cost.forward,
                                                     "backward": rep.cost.backward},
            "score": _num(r.score), "verdict": None if rep is None else rep.verdict}


def export_json(r: ExportReport) -> dict:
    ref, cost = r.reference, r.cost
    return {
        "export": r.export, "call": r.call, "case": r.case, "estimator": r.estimator,
        "biased_by_design": r.biased_by_design, "notes": list(r.notes),
        "samples": r.samples, "seed": r.seed,
        "reference": {"method": ref.method, "description": ref.description,
                      "samples": ref.samples, "evaluations": ref.evaluations,
                      "seconds": ref.seconds},
        "leaves": [leaf_json(l) for l in r.leaves],
        "cost": {"forward": cost.forward, "backward": cost.backward, "detail": cost.detail,
                 "seconds_per_estimate": cost.seconds,
                 "memory_bytes": {"temp": cost.memory.temp, "argument": cost.memory.argument,
                                  "output": cost.memory.output, "alias": cost.memory.alias,
                                  "peak": cost.memory.peak}},
        "compare": None if r.compare is None else [
            {"site": c.site, "kind": c.kind, "rows": [row_json(row) for row in c.ranked()]}
            for c in r.compare],
        "parts": None if r.parts is None else [export_json(p) for p in r.parts],
        "combination": None if r.combination is None else {
            "rule": r.combination.rule, "description": r.combination.description,
            "calls": r.combination.calls,
            "max_relative_error": _num(r.combination.max_relative_error),
            "tolerance": r.combination.tolerance, "verdict": r.combination.verdict},
        "verdict": r.verdict,
    }


def document(file: str, reports: list[ExportReport]) -> dict:
    """The JSON document of `gradlang verify --json`."""
    verdict = worst([r.verdict for r in reports])
    return {"schema": SCHEMA, "file": file, "exports": [export_json(r) for r in reports],
            "verdict": verdict, "exit_code": int(verdict in (BIASED, ZERO))}


def dumps(doc: dict) -> str:
    return json.dumps(doc, indent=2, allow_nan=False)


# ---- the terminal table


def _g(x: float | None, digits: int = 3) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def _time(s: float) -> str:
    return f"{s * 1e6:.0f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _bias(l: LeafStats) -> str:
    if l.relative_bias is None:
        return f"{_g(l.absolute_bias)} absolute (the reference is 0)"
    ci = "" if l.ci95 is None else f" [{_g(l.ci95[0], 2)}, {_g(l.ci95[1], 2)}]"
    return f"{_g(l.relative_bias)}{ci}"


def overall_bias(r: ExportReport) -> float | None:
    """||mean - reference|| / ||reference|| over every leaf's compared coordinates."""
    norm = math.sqrt(sum(float(l.reference @ l.reference) for l in r.leaves))
    return math.sqrt(sum(l.absolute_bias ** 2 for l in r.leaves)) / norm if norm > 0 else None


def render(r: ExportReport) -> str:
    ref, cost = r.reference, r.cost
    parts = "".join(render(p) + "\n" for p in r.parts or ())
    n = "1 estimate (deterministic)" if r.samples == 1 else f"{r.samples} estimates"
    lines = [f"export {r.export} = {r.call}",
             f"  case: {r.case}; estimator: {r.estimator}",
             f"  reference: {ref.method}: {ref.description}",
             f"  {n}, seed {r.seed}; reference: {ref.evaluations} evaluation"
             f"{'s' * (ref.evaluations != 1)}, "
             f"{_time(ref.seconds)}"]
    if r.biased_by_design:
        lines.append(f"  biased by design: {r.biased_by_design}")
    lines += [f"  note: {note}" for note in r.notes]
    rows = [["leaf", "shape", "compared", "rel. bias [95% CI]", "variance", "cosine", "ESS",
             "max z", "verdict"]]
    for l in r.leaves:
        compared = "all" if l.coords is None else f"{len(l.coords)}/{l.size}"
        rows.append([l.name, f"[{', '.join(map(str, l.shape))}]", compared, _bias(l),
                     _g(l.total_variance), _g(l.cosine, 4), _g(l.ess), _g(l.max_z, 2),
                     l.verdict])
    lines += table(rows, "  ")
    lines.append(f"  cost per estimate: {cost.forward} forward + {cost.backward} backward "
                 f"evaluations ({cost.detail}), {_time(cost.seconds)}, peak memory "
                 f"{_bytes(cost.memory.peak)} (XLA: temp {_bytes(cost.memory.temp)})")
    for c in r.compare or ():
        lines += render_comparison(c)
    if r.combination is not None:
        c = r.combination
        lines.append(f"  combination: {c.description}: largest error {_g(c.max_relative_error)} "
                     f"of the largest gradient's norm over {c.calls} call{'s' * (c.calls > 1)} "
                     f"(tolerance {_g(c.tolerance)}): {c.verdict}")
    lines.append(f"  verdict: {r.verdict}" + _why(r))
    return parts + "\n".join(lines) + "\n"


def _why(r: ExportReport) -> str:
    if r.verdict == ZERO:
        zero = [l.name for l in r.leaves if l.verdict == ZERO]
        return (f" ({', '.join(zero)}: every estimate is exactly zero, the reference is not)")
    bad = [f"{l.name}: relative bias {_bias(l)}" for l in r.leaves
           if l.verdict == r.verdict and l.verdict != VERDICTS[0]]
    bad += [f"objective {p.export}" for p in r.parts or () if p.verdict == r.verdict != VERDICTS[0]]
    if r.combination is not None and r.combination.verdict == r.verdict != VERDICTS[0]:
        bad.append("the combination")
    return f" ({', '.join(bad)})" if bad else ""


def _label(rep: ExportReport) -> str:
    """A comparison row's verdict; one biased by design whose bias is within the noise here
    is ranked with those biased by design, and says so."""
    if rep.verdict == VERDICTS[0] and rep.biased_by_design:
        return f"{rep.verdict} (biased by design)"
    return rep.verdict


def render_comparison(c: Comparison) -> list[str]:
    rows = [["rank", "annotation", "variance", "rel. bias", "time/est", "evals", "var x time",
             "verdict"]]
    rank = 0
    for row in c.ranked():
        mark = " (current)" if row.current else ""
        rep = row.report
        if rep is None:
            rows.append(["-", row.annotation + mark, "", "", "", "", "",
                         f"not applicable: {row.reason}"])
            continue
        rank += 1
        rows.append([str(rank), row.annotation + mark, _g(row.variance), _g(overall_bias(rep)),
                     _time(rep.cost.seconds), f"{rep.cost.forward}+{rep.cost.backward}",
                     _g(row.score), _label(rep)])
    what = {"random": "estimators of the random choice", "inner": "hypergradients of the",
            "black_box": "gradient estimators of"}[c.kind]
    return [f"  compare the {what} {c.site}, ranked by variance x time (unbiased first, then "
            f"biased by design, then failing):",
            *table(rows, "    ")]
