"""Black-box gradients (`grad(f, wrt=[...], by=...)`) at run time: the export's function as
the objective of the estimator `by=` selects (`estimators.black_box`), which estimates its
gradient from forward evaluations only."""

from __future__ import annotations

from collections.abc import Callable

import jax

from gradlang.estimators.black_box import estimator
from gradlang.ops import Annotation


def black_box(f: Callable, names: list[str], wrt: tuple[str, ...], by: Annotation, draws: bool,
              value: bool, mesh=None) -> Callable:
    """The export's function of positional arguments (its key last) returning the estimated
    gradient as a dict keyed by the wrt names, after the value when `value`; called with
    `lr=`, the descended parameters theta - lr * gradient instead (the estimator's `descend`:
    spsa fuses the update into the noise regeneration, as MeZO does in place). With a `mesh`,
    the population axis of the perturbations is sharded over the mesh's first axis."""
    index = [names.index(w) for w in wrt]
    est = estimator(by)

    def gradient(*args, lr=None):
        *args, key = args
        f_key, key = jax.random.split(key) if draws else (None, key)

        def objective(theta):
            full = list(args)
            for i, t in zip(index, theta):
                full[i] = t
            return f(*full, f_key) if draws else f(*full)

        theta = [args[i] for i in index]
        if lr is not None:
            return dict(zip(wrt, est.descend(objective, theta, key, lr, mesh)))
        grads = dict(zip(wrt, est.gradient(objective, theta, key, mesh)))
        return (objective(theta), grads) if value else grads

    return gradient
