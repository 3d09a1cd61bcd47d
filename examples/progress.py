"""The progress bar shared by the examples: tqdm's (`tqdm.auto`: a text bar in a terminal, a
widget in a notebook), with an ETA and a smoothed rate, so the first step's compilation does
not dominate the it/s it shows.

`examples/` is not a package: each example runs as `python examples/X.py`, which puts this
folder first on `sys.path`, so the examples import it as `from progress import ProgressBar`.
"""

from __future__ import annotations

from tqdm.auto import tqdm


class ProgressBar:
    """A bar over `total` steps: `update(done, info)` moves it to `done` and shows `info`."""

    def __init__(self, total: int, label: str = ""):
        self.bar = tqdm(total=total, desc=label.strip() or None, smoothing=0.1, mininterval=0.05,
                        dynamic_ncols=True)

    def update(self, done: int, info: str = "") -> None:
        self.bar.update(done - self.bar.n)
        if info:
            self.bar.set_postfix_str(info, refresh=False)

    def close(self) -> None:
        self.bar.close()
