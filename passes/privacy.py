"""Differentially private gradients: check and complete each export's `by=dp(...)`.

`grad(f, wrt=[...], by=dp(clip=C, noise=SIGMA, per_example_axis=0, clipping=ghost))` (and
`value_and_grad`, `descend`) is DP-SGD's gradient: f evaluated on each example alone, each
example's gradient clipped to norm at most C, the clipped gradients summed, Gaussian noise
N(0, (SIGMA C)^2) added to every coordinate, the sum divided by the number of examples.

The examples: the *batched* arguments are f's parameters outside `wrt` whose dim at
`per_example_axis` is the batch dim, the named dim found there in the first such parameter
(`x: f32[B, D]` and `y: i32[B]`: B). Example i is every batched argument's slice i along that
axis (kept as an axis of size 1); the other arguments are shared by all examples. A parameter
holding the batch dim elsewhere, or a `wrt` parameter holding it, is an error.

This pass records a `PrivatePlan` per export in the `privacy` fact (read by the runtime and
`explain`): the completed options, the batched and shared arguments, and for each `wrt` leaf
whether its norm comes from ghost clipping (a linear layer, `passes.ghost`) or from its
per-example gradients. It runs after the surrogate pass: the objective it analyses is the one
that is lowered.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from gradlang.diagnostics import Diagnostics
from gradlang.facts import LeafNorm, PrivatePlan
from gradlang.ir import PRIVATE, Export, Function, Module, Value, reachable, walk
from gradlang.ops import Annotation
from gradlang.options import OptionError, option, parse, rendered
from gradlang.types import ERROR, UNKNOWN, TensorType, type_dims

from .elements import Alignment, Mixed
from .ghost import linear_layers

CLIPPING = ("ghost", "per_example")


@dataclass(frozen=True)
class DpOptions:
    """dp's options; clip and noise are required."""

    clip: float | None = option(None, "positive")
    """C, the bound on each example's gradient norm."""
    noise: float | None = option(None, "non-negative")
    """SIGMA, the noise multiplier."""
    per_example_axis: int = option(0, "index")
    clipping: str = option("ghost", choices=CLIPPING, plural="clipping modes")

    def check(self) -> str | None:
        missing = [k for k in ("clip", "noise") if getattr(self, k) is None]
        if missing:
            return (f"dp needs {' and '.join(missing)}: clip=C bounds each example's gradient "
                    f"norm, noise=SIGMA is the noise multiplier (the noise's standard deviation "
                    f"is SIGMA * C), e.g. by=dp(clip=1.0, noise=1.1)")
        return None


def complete(e: Annotation) -> Annotation:
    """`by=dp(...)` checked and with its defaults filled in; raises OptionError."""
    return replace(e, options=rendered(parse(DpOptions, e.options, PRIVATE, PRIVATE)))


def _examples(export: str, fn: Function, wrt: tuple[str, ...], axis: int, span,
              diags: Diagnostics) -> tuple[str, tuple[str, ...], tuple[str, ...]] | None:
    """(the batch dim, the batched parameters, the shared ones); None after an error."""
    others = [p for p in fn.params if p.name not in wrt]
    if any(p.value.type in (ERROR, UNKNOWN) for p in fn.params):
        return None
    data = [p for p in others if isinstance(p.value.type, TensorType) and p.value.type.rank]
    if not data:
        diags.error(f"by=dp splits the arguments of '{fn.name}' into examples, but it has no "
                    f"array argument besides wrt=[{', '.join(wrt)}]: pass the batch as one, "
                    f"e.g. x: f32[B, D]", span)
        return None
    ranked = [p for p in data if p.value.type.rank > axis]
    if not ranked:
        have = ", ".join(f"{p.name}: {p.value.type}" for p in data)
        diags.error(f"per_example_axis={axis} is out of range: the arguments of '{fn.name}' "
                    f"outside wrt have at most {max(p.value.type.rank for p in data)} axes "
                    f"({have})", span)
        return None
    first = ranked[0]
    dim = first.value.type.shape[axis]
    if not (isinstance(dim, str) and dim.isidentifier()):
        diags.error(f"by=dp of '{export}' splits the examples along a named dim: the dim at "
                    f"per_example_axis={axis} of '{first.name}' is {dim}; declare it with a "
                    f"name, e.g. {first.name}: f32[B, ...]", first.span)
        return None
    batched = [p for p in data if p.value.type.rank > axis and p.value.type.shape[axis] == dim]
    ok = True
    for p in others:
        if p in batched or dim not in type_dims(p.value.type):
            continue
        ok = False
        where = (f"at axis {p.value.type.shape.index(dim)}" if isinstance(p.value.type, TensorType)
                 else "inside a struct or tuple")
        diags.error(f"'{p.name}' has the batch dim {dim} {where}, not at per_example_axis="
                    f"{axis}: by=dp of '{export}' would not split it into examples; put {dim} "
                    f"at axis {axis}", p.span)
    for p in fn.params:
        if p.name in wrt and dim in type_dims(p.value.type):
            ok = False
            diags.error(f"'{p.name}' is differentiated but has the batch dim {dim}: by=dp of "
                        f"'{export}' shares the parameters between the examples, so they "
                        f"cannot have one", p.span)
    if not ok:
        return None
    return (dim, tuple(p.name for p in batched),
            tuple(p.name for p in others if p not in batched))


_COUPLING = {
    "quantize": "a per-tensor quantizer: its scale comes from that example's values alone, "
                "not from the batch's",
    "argmin": "an inner problem: it is solved once per example, on that example's data alone",
    "softmax": "it normalizes across the examples, and sees one",
    "log_softmax": "it normalizes across the examples, and sees one",
    "sort": "it orders the examples, and sees one",
    "argmax": "it compares the examples, and sees one",
    "topk": "it compares the examples, and sees one",
}
"""Ops that combine the examples of a batch (when their operand carries the example axis) and
so compute something else when by=dp runs each example alone: what they then compute."""


def _warn_coupled(module: Module, fn: Function, batched: tuple[str, ...], axis: int,
                  export: str, diags: Diagnostics) -> None:
    """A warning at each op of _COUPLING that combines the examples of fn's batched
    parameters (followed along their example axis, `passes.elements`)."""
    align = Alignment(module, Value(), 1)
    for p in fn.params:
        if p.name in batched:
            align.state[p.value] = (axis,)
    align.run(fn.body.ops)
    functions = [module.function(n) for n in reachable(module, fn.name)]
    for op in (o for f in functions for o in walk(f.body) if o.name in _COUPLING):
        if any(isinstance(e, Mixed) and e.span == op.span and e.op == op.name
               for r in op.results for e in align.of(r) or ()):
            diags.warning(f"by=dp of '{export}' computes each example alone, so this "
                          f"{op.name} does not see the batch: {_COUPLING[op.name]}; compute it "
                          f"outside the export (or pass it in) to keep the batch's", op.span)


def plan(module: Module, export: Export, diags: Diagnostics) -> PrivatePlan | None:
    """The plan of an export with a checked, completed `by=dp(...)`; None after an error."""
    t = export.transform
    fn = module.function(t.fn)
    o = dict(t.by.options)
    if fn is None:
        return None
    if fn.name in module.facts.stateful:
        diags.error("by=dp cannot thread a moving-average baseline or a learned control "
                    "variate (RELAX, LAX) through the examples; use another baseline",
                    t.by.span)
        return None
    found = _examples(export.name, fn, t.wrt, o["per_example_axis"], t.by.span, diags)
    if found is None or diags.has_errors:  # the IR may be half built: no plan is needed
        return None
    _warn_coupled(module, fn, found[1], o["per_example_axis"], export.name, diags)
    leaves = linear_layers(module, fn, t.wrt)
    if o["clipping"] == "per_example":
        leaves = tuple(LeafNorm(n.leaf, False, "clipping=per_example") for n in leaves)
    return PrivatePlan(export.name, fn.name, float(o["clip"]), float(o["noise"]),
                       o["per_example_axis"], o["clipping"], *found, leaves)


@dataclass(frozen=True)
class Privacy:
    """The differential-privacy pass (checks and completes `by=dp`, plans its clipping)."""

    name: str = "privacy"
    after_errors: bool = True
    requires: tuple[str, ...] = ("stateful",)
    provides: tuple[str, ...] = ("privacy",)

    def run(self, module: Module, diags: Diagnostics) -> Module:
        exports, plans = [], {}
        for export in module.exports:
            t = export.transform
            if t.private is not None:
                try:
                    by = complete(t.by)
                except OptionError as exc:
                    diags.error(str(exc), t.by.span)
                else:
                    if by.option("noise") == 0:
                        diags.warning("dp with noise=0 clips each example's gradient but adds no "
                                      "noise: the gradient is not differentially private",
                                      t.by.span)
                    export = replace(export, transform=replace(t, by=by))
                    found = plan(module, export, diags)
                    if found is not None:
                        plans[export.name] = found
            exports.append(export)
        return replace(module, exports=tuple(exports), facts=replace(module.facts, privacy=plans))
