"""`gradlang verify`: is the compiled gradient the one you meant?

Each export's gradient estimates are compared with a reference chosen from the compiler's own
facts (`case.py`, `select.py`): their bias with a confidence interval, variance, effective
sample size and cost (`stats.py`, `measure.py`), as a table, JSON or a plot (`report.py`,
`plot.py`); `--compare` measures every applicable estimator (`compare.py`).
"""

from .inputs import VerifyError, read_npz
from .report import SCHEMA, ExportReport, Settings, document, dumps
from .run import verify_export
from .stats import BIASED, BY_DESIGN, CONSISTENT, ZERO
from .variants import Origin

__all__ = ["BIASED", "BY_DESIGN", "CONSISTENT", "SCHEMA", "ZERO", "ExportReport", "Origin",
           "Settings", "VerifyError", "document", "dumps", "read_npz", "verify_export"]
