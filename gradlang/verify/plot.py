"""`verify --plot`: variance against time per estimate, one point per export or compared
estimator (matplotlib, imported only here)."""

from __future__ import annotations

from pathlib import Path

from .inputs import VerifyError
from .report import ExportReport

FLOOR = 1e-12
"""Where zero-variance (deterministic) estimators are drawn on the log axis."""


def points(reports: list[ExportReport]) -> list[tuple[str, float, float, bool]]:
    """(label, seconds per estimate, total variance, failed) per point."""
    out = []
    for r in reports:
        rows = [row for c in r.compare or () for row in c.rows if row.report is not None]
        if not rows:
            out.append((r.export, r.cost.seconds, sum(l.total_variance for l in r.leaves),
                        r.exit_code != 0))
        for row in rows:
            out.append((f"{r.export}: {row.annotation}", row.report.cost.seconds, row.variance,
                        row.report.exit_code != 0))
    return out


def plot(reports: list[ExportReport], path: str | Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise VerifyError("--plot needs matplotlib: pip install 'gradlang[examples]'") from None
    fig, ax = plt.subplots(figsize=(7, 5))
    for label, seconds, variance, failed in points(reports):
        y = max(variance, FLOOR)
        ax.scatter([seconds * 1e3], [y], marker="x" if failed else "o",
                   color="tab:red" if failed else "tab:blue")
        ax.annotate(label, (seconds * 1e3, y), fontsize=7, xytext=(4, 2),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("time per estimate (ms)")
    ax.set_ylabel(f"total variance of one estimate (deterministic: {FLOOR:g})")
    ax.set_title("gradlang verify: variance vs cost (x: biased beyond tolerance or zero)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
