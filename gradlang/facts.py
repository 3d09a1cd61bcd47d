"""What the passes find, as typed records: `Facts` (a module's, one field per fact, each
provided by one pass) and the records its fields hold. They sit with the IR, below the passes
that make them and the runtime, `explain` and `verify` that read them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .diagnostics import Span
from .ops import Annotation

if TYPE_CHECKING:
    from .ir import Value


@dataclass(frozen=True)
class SiteChoice:
    """The estimator of one random choice, for `explain`."""

    function: str
    site: str
    family: str
    span: Span
    estimator: Annotation
    why: str
    annotated: bool
    size: int | None = None
    """A branched estimator's evaluations of the objective per sample."""
    others: tuple[str, ...] = ()
    """The other estimators `with NAME` would be accepted with here (for `explain`)."""


@dataclass(frozen=True)
class SlicedChoice:
    """The control variate of one sliced Wasserstein estimate, for `explain`."""

    function: str
    span: Span
    projections: object
    p: object
    kind: str
    why: str
    annotated: bool


@dataclass(frozen=True)
class ComposeFact:
    """What `explain` shows of a composition."""

    outer: str
    inner: str
    samples: int
    by: Annotation
    default: bool
    """`by=` was not written: the pass chose it."""


@dataclass(frozen=True)
class GradFlowFacts:
    """Where the gradient of each `wrt` parameter of one export flows (gradflow)."""

    export: str
    function: str
    wrt: tuple[str, ...]
    carries: dict[Value, frozenset[str]] = field(compare=False)
    """Values of `function` (at every nesting level) mapped to the wrt names they carry."""
    zero: tuple[str, ...] = ()
    """wrt names whose gradient is identically zero."""


@dataclass(frozen=True)
class InnerProblem:
    """One argmin, for `explain`."""

    function: str
    span: Span
    solver: Annotation
    method: Annotation
    why: str
    draws: str = ""
    """How its objective's draws are taken (one key per solve) and the bias that makes to its
    hypergradient (empty: it does not draw)."""


@dataclass(frozen=True)
class LeafNorm:
    """How the per-example gradient norm of one `wrt` leaf is computed."""

    leaf: str
    """`p` for a tensor parameter, `p.l1.w` for a field of a struct parameter."""
    ghost: bool
    """True: from the linear layer's inputs and output cotangents (no per-example gradient)."""
    why: str
    """The matmuls of a linear layer, or the first use that needs per-example gradients."""


@dataclass(frozen=True)
class PrivatePlan:
    """How one export's private gradient is computed."""

    export: str
    function: str
    """The objective as lowered."""
    clip: float
    noise: float
    axis: int
    clipping: str
    batch_dim: str
    batched: tuple[str, ...]
    """Parameters split into examples along `axis`."""
    shared: tuple[str, ...]
    """Parameters outside `wrt` that every example sees whole."""
    leaves: tuple[LeafNorm, ...]


@dataclass(frozen=True)
class Facts:
    """What the passes found, for later passes, the lowering, `explain` and `verify`: each field
    is provided by one pass (`Pass.provides`) and empty until it has run."""

    compose: Mapping[str, ComposeFact] = field(default_factory=dict)
    """compose: each composition export's parts and estimator, by export name."""
    stateful: frozenset[str] = frozenset()
    """compose, surrogate: functions that take and return state (a moving average, a
    composition's tracked inner value, RELAX's control parameters)."""
    gradflow: tuple[GradFlowFacts, ...] = ()
    """gradflow: per export, the values each `wrt` parameter's gradient flows through."""
    gradflow_notes: Mapping[Value, str] = field(default_factory=dict)
    """gradflow: "grad: w, b" notes on the values gradients flow through (for the printer)."""
    hypergrad: tuple[InnerProblem, ...] = ()
    """hypergrad: every inner problem with its solver and hypergradient method."""
    estimators: tuple[SiteChoice, ...] = ()
    """estimators: the estimator of every random choice."""
    sliced: tuple[SlicedChoice, ...] = ()
    """estimators: the control variate of every sliced Wasserstein estimate."""
    random: frozenset[str] = frozenset()
    """surrogate: the functions that draw (their exports take a key)."""
    objectives: Mapping[str, tuple[str, int, str]] = field(default_factory=dict)
    """surrogate: per export, the objective (function, samples, scope) as written, before
    its expectation was wrapped."""
    control_variates: Mapping[tuple[str, Span], set[str]] = field(default_factory=dict)
    """surrogate: the control variates each score site ends up with, per expectation."""
    credit: Mapping[tuple[str, Span], set[str]] = field(default_factory=dict)
    """surrogate: the costs each score site is credited with, per expectation."""
    privacy: Mapping[str, PrivatePlan] = field(default_factory=dict)
    """privacy: each `by=dp` export's plan (clipping, per-example axis, ghost norms)."""
