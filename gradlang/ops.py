"""Every IR op, declared once: its params dataclass, traits and a one-line description.

Traits read by passes:
- `elementwise`: broadcasts its tensor operands (NumPy rules) and works entry by entry.
- `zero_grad`: its derivative is zero almost everywhere or undefined, so no gradient flows
  through it (comparisons, logic, stop_gradient, integer-valued results).
- `unresolved`: only exists between the builder and the resolve pass.
- `random`: draws from the function's key (directly or in its region).
- `blackbox`: a host callback; reverse mode cannot go through it (black-box estimators can).
- `nonsmooth`: its derivative is zero almost everywhere; gradient flows through it only with a
  backward rule (`params.rule`, e.g. `sign(x) with ste`), else the gradient-flow pass warns.
- `power_of_two_axis`: Hadamard-transforms its operand's last axis, whose size must be a power
  of two.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

from .diagnostics import Span
from .types import Dim, DType, Type


# ---- params


@dataclass(frozen=True)
class NoParams:
    pass


@dataclass(frozen=True)
class Annotation:
    """A name with options, as written in the source or chosen by a pass: a draw's estimator
    (`with score(baseline=loo)`, `pragma estimator ...`), a non-smooth op's backward rule, an
    argmin's solver and hypergradient method, an export's `by=` (black-box estimator, `dp`,
    combination rule, composition estimator). Options are static literals (names become
    strings)."""

    name: str
    options: tuple[tuple[str | None, bool | int | float | str], ...] = ()
    """`k=v` pairs; the first may be unnamed (key None: `implicit(cg)`) until a pass names it
    from the options' schema (`gradlang.options.parse`)."""
    span: Span | None = None

    def option(self, key: str, default: object = None) -> object:
        return dict(self.options).get(key, default)

    def __str__(self) -> str:
        opts = ", ".join(("" if k is None else f"{k}=")
                         + (str(v).lower() if isinstance(v, bool) else str(v))
                         for k, v in self.options)
        return f"{self.name}({opts})" if opts else self.name


@dataclass(frozen=True)
class ConstParams:
    value: bool | int | float
    dtype: DType


@dataclass(frozen=True)
class NameParams:
    name: str


@dataclass(frozen=True)
class CallParams:
    callee: str
    kwnames: tuple[str, ...] = ()
    """Names of the trailing keyword operands, in order."""
    annotation: Annotation | None = field(default=None, metadata={"omit_default": True})
    """`f(...) with rule(...)`: the backward rule asked for (resolve moves it into the op)."""


@dataclass(frozen=True)
class CalleeParams:
    callee: str


@dataclass(frozen=True)
class HostParams:
    """The body of `extern fn name(...) -> result`: a call into Python."""

    name: str
    result: Type


@dataclass(frozen=True)
class GetParams:
    index: int
    of: int
    """The arity of the destructured tuple, as the pattern expects it."""


@dataclass(frozen=True)
class StructParams:
    name: str
    fields: tuple[str, ...]


@dataclass(frozen=True)
class ReduceParams:
    axis: tuple[int, ...] | None = None
    keepdims: bool = False


@dataclass(frozen=True)
class AxisParams:
    axis: int = -1


@dataclass(frozen=True)
class ShapeParams:
    shape: tuple[Dim, ...]


@dataclass(frozen=True)
class PermParams:
    axes: tuple[int, ...] | None = None


@dataclass(frozen=True)
class OneHotParams:
    num_classes: Dim


@dataclass(frozen=True)
class ArangeParams:
    start: Dim
    stop: Dim | None = None


@dataclass(frozen=True)
class EyeParams:
    n: Dim


@dataclass(frozen=True)
class CastParams:
    dtype: DType


@dataclass(frozen=True)
class IndexItem:
    """One subscript: `kind` is "int" (static index), "dynamic" (an i32 operand) or "slice"."""

    kind: str
    index: int = 0
    start: int | None = None
    stop: int | None = None
    step: int | None = None

    def __str__(self) -> str:
        if self.kind == "int":
            return str(self.index)
        if self.kind == "dynamic":
            return "?"
        parts = ["" if v is None else str(v) for v in (self.start, self.stop)]
        return ":".join(parts) + ("" if self.step is None else f":{self.step}")


@dataclass(frozen=True)
class IndexParams:
    items: tuple[IndexItem, ...]


@dataclass(frozen=True)
class ForParams:
    carries: tuple[str, ...]
    start: Dim = 0
    stop: Dim = 0
    truncate: int = field(default=0, metadata={"omit_default": True})
    """`with truncated(k=K)`: reverse mode goes through the last K iterations only (0: all)."""


@dataclass(frozen=True)
class DistParams:
    family: str
    given: tuple[str, ...]
    """The parameter names the operands were given as (canonical or alias, e.g. `probs`)."""


@dataclass(frozen=True)
class SampleParams:
    site: str
    """The name the draw is bound to, for messages and `explain`."""
    annotation: Annotation | None = field(default=None, metadata={"omit_default": True})
    """What the source asked for on this site (None: the default)."""
    estimator: Annotation | None = field(default=None, metadata={"omit_default": True})
    """What the estimators pass chose."""
    size: int | None = field(default=None, metadata={"omit_default": True})
    """A branched estimator's number of evaluations of the objective per sample (estimators
    pass)."""
    slot: int | None = field(default=None, metadata={"omit_default": True})
    """A branched draw's number in its expectation: its axis among the enumerated
    combinations (surrogate pass)."""
    shift: int | None = field(default=None, metadata={"omit_default": True})
    """A shifted draw's number in its expectation: which zero shift `samples`
    differentiates against is its own (surrogate pass)."""


@dataclass(frozen=True)
class ExpectParams:
    samples: int
    enum: tuple[int, ...] = field(default=(), metadata={"omit_default": True})
    """`samples` only: the support sizes of the enumerated draws (slot order); the region is
    evaluated on every combination of their values, results stacked on a second axis."""
    kind: str = field(default="expect", metadata={"omit_default": True})
    """`expect` only: `expect` (the mean over the draws) or `logmeanexp` (the log of the mean
    of their exp)."""
    shifts: int = field(default=0, metadata={"omit_default": True})
    """`samples` only: the number of draws whose value (DReG) or parameters (`shifted`
    branched estimators: RELAX) get a zero shift that the region's value is differentiated
    against; the op has as many more results, d value / d shift per evaluation (stacked like
    the others)."""


class SurrogateOperands(NamedTuple):
    """A `surrogate` op's operands by role (`SurrogateParams.split`)."""

    value: Any
    costs: tuple
    scores: tuple
    """The score terms' log-probabilities, one per entry of `baselines`."""
    enum: tuple
    """The log-probability of each enumerated combination (one operand or none)."""
    params: tuple
    """A branched draw's distribution parameters."""
    draw: tuple
    """A branched draw's values on every branch (one operand or none)."""
    aux: tuple
    """A branched draw's auxiliary noise (one operand or none)."""
    shift_grad: tuple
    """d value / d shift of a shifted branched draw (one operand or none)."""
    dregs: tuple
    """DReG draws."""
    dreg_grads: tuple
    """d value / d draw of each DReG draw."""
    state: Any
    """The moving average's state or the learned control's psi (None if none)."""


@dataclass(frozen=True)
class SurrogateParams:
    """Operands in segments (as MLIR's operand segment sizes): the value; `costs` costs; one
    score term per entry of `baselines`; then `enum`, `params`, `draw`, `aux`, `shift_grad`,
    `dregs` operands of those roles (`SurrogateOperands`), as many d value / d draw as `dregs`,
    and the state if any (`stateful`)."""

    baselines: tuple[str, ...] = field(default=(), metadata={"omit_default": True})
    """The control variate of each score term: none | loo | grpo | ma (in `expect`), none |
    vimco (in `logmeanexp`)."""
    costs: int = field(default=0, metadata={"omit_default": True})
    """The number of cost operands after the value (they sum to it); 0: the value is the only
    cost, credited to every score term."""
    credit: tuple[tuple[int, ...], ...] = field(default=(), metadata={"omit_default": True})
    """With costs: for each score term, the costs it is credited with (their indices)."""
    paired: tuple[tuple[int, ...], ...] = field(default=(), metadata={"omit_default": True})
    """For each score term (empty: none is): the credited costs it multiplies entry by entry,
    both being vectors of a batched draw's entries (the others multiply its sum)."""
    averaged: tuple[int, ...] = field(default=(), metadata={"omit_default": True})
    """Costs whose entries are averaged, not summed (the entries of a mean; their number is
    known when the op runs, not always by name where it is built)."""
    causal: tuple[tuple[int, ...], ...] = field(default=(), metadata={"omit_default": True})
    """For each score term (empty: none is): the credited costs it pairs step by step, both
    vectors over a loop's iterations: entry t of the cost multiplies the score terms of steps
    up to t (reward-to-go)."""
    enum: int = field(default=0, metadata={"omit_default": True})
    params: int = field(default=0, metadata={"omit_default": True})
    draw: int = field(default=0, metadata={"omit_default": True})
    aux: int = field(default=0, metadata={"omit_default": True})
    shift_grad: int = field(default=0, metadata={"omit_default": True})
    dregs: int = field(default=0, metadata={"omit_default": True})
    decay: float = field(default=0.0, metadata={"omit_default": True})
    """For `ma`: the moving average's decay; its state is the last operand and the op has a
    second result, the updated state."""
    branched: Annotation | None = field(default=None, metadata={"omit_default": True})
    """A branched draw's estimator (with its options)."""
    family: tuple[str, ...] = field(default=(), metadata={"omit_default": True})
    """A branched draw's distribution: (family, the names its parameters were given as)."""
    kind: str = field(default="expect", metadata={"omit_default": True})
    """`expect` or `logmeanexp` (its score terms' baselines are none or vimco)."""
    control: str = field(default="", metadata={"omit_default": True})
    """RELAX, LAX: the function r(psi, draw) of the learned control variate; psi is the
    last operand, and the op has a second result, psi after one step on the variance."""

    @property
    def stateful(self) -> bool:
        """The op takes a state as its last operand and returns its update."""
        return "ma" in self.baselines or bool(self.control)

    def segments(self) -> tuple[int, ...]:
        """The number of operands of each role, in `SurrogateOperands` order."""
        return (1, self.costs, len(self.baselines), self.enum, self.params, self.draw,
                self.aux, self.shift_grad, self.dregs, self.dregs, int(self.stateful))

    def split(self, operands: Sequence) -> SurrogateOperands:
        """The operands by role."""
        groups, at = [], 0
        for n in self.segments():
            groups.append(tuple(operands[at:at + n]))
            at += n
        value, *middle, state = groups
        return SurrogateOperands(value[0], *middle, state[0] if state else None)


@dataclass(frozen=True)
class RuleParams:
    """A non-smooth op: `rule` is its backward rule (`with ste`), None for none (zero)."""

    rule: Annotation | None = field(default=None, metadata={"omit_default": True})


@dataclass(frozen=True)
class ArgmaxParams:
    axis: int = -1
    rule: Annotation | None = field(default=None, metadata={"omit_default": True})


@dataclass(frozen=True)
class TopkParams:
    k: Dim
    axis: int = -1
    rule: Annotation | None = field(default=None, metadata={"omit_default": True})


@dataclass(frozen=True)
class SlicedParams:
    """`sliced_wasserstein(x, y, projections=L, p=2) with control_variate(kind)`."""

    projections: Dim
    p: Dim = 2
    control: Annotation | None = field(default=None, metadata={"omit_default": True})
    """`control_variate(gaussian_lower | gaussian_upper | none)`; None before the estimators
    pass chooses."""


@dataclass(frozen=True)
class QuantizeParams:
    """`quantize`: b-bit uniform quantization, symmetric (or with a zero point), per tensor or
    per channel along `axis`; `scale` says whether a scale operand was given. `quest`: QuEST's
    quantizer (Hadamard rotation, Gaussian MSE-optimal scale), per row."""

    bits: int
    axis: tuple[int, ...] | None = None
    symmetric: bool = True
    scale: bool = False
    rule: Annotation | None = field(default=None, metadata={"omit_default": True})


@dataclass(frozen=True)
class NormParams:
    """`layer_norm` / `rms_norm` over the last axis: whether a scale (and an offset) operand
    was given."""

    scale: bool = False
    offset: bool = False


@dataclass(frozen=True)
class EinsumParams:
    """`einsum`: the subscripts as written; whether a second operand was given; for
    `sampled_einsum`, the rows of x kept for the weight's backward (`with wta_crs(keep=K)`)."""

    subscripts: str
    y: bool = False
    keep: int = field(default=0, metadata={"omit_default": True})

    def terms(self) -> tuple[list[str], str]:
        """(each operand's letters, the output's): without `->`, the letters used once, in
        alphabetical order (numpy's rule)."""
        inputs, arrow, output = self.subscripts.replace(" ", "").partition("->")
        terms = inputs.split(",")
        if not arrow:
            output = "".join(sorted(c for c in set(inputs) if inputs.count(c) == 1 and c != ","))
        return terms, output

    def projects(self, i: int) -> bool:
        """Whether operand i of a two-operand einsum is a weight it projects by (a linear
        layer): the letters it shares with the other operand lead its term and leave the
        output, and its other letters go to the output ("btd,dnk->btnk", "btnk,nkd->btd")."""
        terms, output = self.terms()
        if len(terms) != 2:
            return False
        w, x = terms[i], terms[1 - i]
        contracted = [c for c in w if c in x]
        return (len(set(w)) == len(w) and w[:len(contracted)] == "".join(contracted)
                and all(c not in output for c in contracted)
                and all(c in output for c in w if c not in x))


@dataclass(frozen=True)
class ConvParams:
    """`conv` and `conv_transpose` (`window` unused; `groups` 1 for the transpose) and the
    pools (`groups` and `dilation` unused): strides, dilations and windows an int for every
    spatial axis or one each; `padding` SAME / VALID or (low, high) per spatial axis."""

    stride: int | tuple[int, ...] | None = 1
    padding: str | tuple[tuple[int, int], ...] = "SAME"
    dilation: int | tuple[int, ...] = 1
    groups: Dim = 1
    window: int | tuple[int, ...] = 1


@dataclass(frozen=True)
class AttentionParams:
    """`dot_product_attention`: whether a mask operand was given; a causal mask."""

    mask: bool = False
    causal: bool = False


@dataclass(frozen=True)
class GroupNormParams:
    """`group_norm`: the number of channel groups; whether a scale / offset was given."""

    groups: Dim
    scale: bool = False
    offset: bool = False


@dataclass(frozen=True)
class SegmentParams:
    """`segment_sum`: the number of segments (the result's first dim)."""

    segments: Dim


@dataclass(frozen=True)
class SampledParams:
    """`(x @ w) with wta_crs(keep=K)`: rows of x kept for w's backward."""

    keep: int


@dataclass(frozen=True)
class ComposeParams:
    """`compose(f, expect(g, ...), by=...)`: `by` is `scgd(beta=...)` (a moving average of the
    inner estimate, threaded as state: the op's second operand and second result) or
    `plugin` (f of this call's estimate)."""

    by: Annotation


@dataclass(frozen=True)
class ArgminParams:
    """An inner problem: its solver (`via gd(steps=, lr=)`), the hypergradient method (`with
    implicit(cg, iters=)`; None before the hypergradient pass picks one) and the sense."""

    solver: Annotation
    hyper: Annotation | None = field(default=None, metadata={"omit_default": True})
    maximize: bool = field(default=False, metadata={"omit_default": True})


@dataclass(frozen=True)
class GradParams:
    """`grad(f, wrt=[a, b])(args)` in a body: `fn` as written, the differentiated parameters
    and (after resolve) the positions of the region arguments given for them; `value`: with
    the value first (`value_and_grad`); `samples`: the draws of `expect(f, samples=N)`.
    Results after the first: the summed score terms of its draws, by baseline group
    (surrogate pass), which the enclosing expectation credits too."""

    fn: str
    wrt: tuple[str, ...]
    argnums: tuple[int, ...] = ()
    value: bool = field(default=False, metadata={"omit_default": True})
    samples: int = field(default=1, metadata={"omit_default": True})


@dataclass(frozen=True)
class STParams:
    """A non-smooth op (`op` with its `params`) whose backward is `rule`."""

    op: str
    params: object
    rule: Annotation


# ---- op definitions


@dataclass(frozen=True)
class OpDef:
    name: str
    params: type = NoParams
    traits: frozenset[str] = frozenset()
    doc: str = ""
    verify: Callable[[Any], str | None] | None = None
    """The op's own invariants (operand and result counts its params imply): what is wrong
    with an op, or None (`gradlang.verifier` calls it after every pass)."""

    def check_params(self, params: object) -> bool:
        return isinstance(params, self.params)


def _defs(names: str, params: type = NoParams, traits: str = "", doc: str = "",
          verify: Callable[[Any], str | None] | None = None) -> list[OpDef]:
    t = frozenset(traits.split())
    return [OpDef(n, params, t, doc, verify) for n in names.split()]


def _verify_samples(op) -> str | None:
    """Results: the region's, stacked, then d value / d shift for each shifted draw."""
    want = len(op.regions[0].results) + op.params.shifts if len(op.regions) == 1 else None
    if want is None:
        return f"has {len(op.regions)} regions, not 1"
    if len(op.results) != want:
        return (f"has {len(op.results)} results; its region yields "
                f"{len(op.regions[0].results)} and it has {op.params.shifts} shifts")
    return None


def _verify_grad(op) -> str | None:
    """One region with an argument per operand, yielding the objective; argnums among them."""
    if len(op.regions) != 1 or len(op.regions[0].args) != len(op.operands):
        return "needs one region with an argument per operand"
    if any(not 0 <= i < len(op.operands) for i in op.params.argnums):
        return f"differentiates argument positions {op.params.argnums} of {len(op.operands)}"
    return None


def _verify_surrogate(op) -> str | None:
    """Operands: the segments of `SurrogateParams.segments`; results: the estimate, then the
    updated state if any."""
    p = op.params
    want = sum(p.segments())
    if len(op.operands) != want:
        return (f"has {len(op.operands)} operands; its params describe {want} (segments "
                f"{p.segments()})")
    if len(op.results) != 1 + p.stateful:
        return f"has {len(op.results)} results, not {1 + p.stateful}"
    if p.costs and (len(p.credit) != len(p.baselines)
                    or any(j >= p.costs for to in p.credit for j in to)):
        return f"credits {p.credit} do not give each score term some of its {p.costs} costs"
    if p.paired and (len(p.paired) != len(p.credit)
                     or any(not set(e) <= set(to) for e, to in zip(p.paired, p.credit))):
        return f"pairs {p.paired} entry by entry with costs not credited ({p.credit})"
    if any(j >= p.costs for j in p.averaged):
        return f"averages the entries of costs {p.averaged}, but it has {p.costs}"
    if p.causal and (len(p.causal) != len(p.credit)
                     or any(not set(e) <= set(to) for e, to in zip(p.causal, p.credit))):
        return f"pairs {p.causal} step by step with costs not credited ({p.credit})"
    if any(n > 1 for n in (p.enum, p.draw, p.aux, p.shift_grad)):
        return "has more than one operand of a role that has at most one (enum, draw, aux, shift_grad)"
    if p.branched is None and p.params + p.draw + p.aux:
        return "has a branched draw's operands but no branched estimator"
    return None


UNARY_FLOAT = "exp log log1p expm1 sqrt tanh sigmoid softplus relu gelu silu sin cos"
"""Elementwise ops whose result is floating point (integer inputs are promoted to f32)."""
UNARY_SAME = "neg abs"
BINARY_ARITH = "add sub mul div pow maximum minimum"
COMPARE = "eq ne lt le gt ge"
LOGIC = "and or"
REDUCE = "sum mean max min logsumexp var"
NONSMOOTH = "sign round floor ceil step binarize"

OPS: dict[str, OpDef] = {
    d.name: d
    for d in [
        *_defs("const", ConstParams, "", "a scalar literal"),
        *_defs("ref", NameParams, "unresolved", "a free name, before resolution"),
        *_defs("call", CallParams, "unresolved", "a call, before resolution"),
        *_defs("list", NoParams, "unresolved", "a list literal, before resolution"),
        *_defs("str", NameParams, "unresolved",
               "a string literal (a builtin's static argument), before resolution"),
        *_defs("error", NoParams, "", "placeholder for an expression that has a diagnostic"),
        *_defs("dim", NameParams, "zero_grad", "the runtime size of a symbolic dim, as i32"),
        *_defs("call_fn", CalleeParams, "", "call of a user function"),
        *_defs("fn_ref", CalleeParams, "unresolved",
               "a function named as a value (an argument of map_leaves), before resolution"),
        *_defs("map_leaves", CalleeParams, "",
               "a tree with its callee applied to each leaf of the callee's parameter rank "
               "(other leaves unchanged)"),
        *_defs("sum_squares global_norm", NoParams, "",
               "the sum of squares of every entry of a tree's leaves, or its square root"),
        *_defs("inline", CalleeParams, "",
               "a call whose callee's body is its region (the operands bind its arguments), "
               "lowered like the call; results after the callee's are values of the body"),
        *_defs("host_call", HostParams, "blackbox",
               "the body of an extern function: its Python binding, through a host callback"),
        *_defs("call_jax", NameParams, "",
               "the body of a jax fn: the JAX function bound to its name, traced inline "
               "(differentiable; passes cannot see inside it)"),
        *_defs("tuple", NoParams, "", "build a tuple"),
        *_defs("get", GetParams, "", "tuple element"),
        *_defs("struct_new", StructParams, "", "build a struct"),
        *_defs("getfield", NameParams, "", "struct field"),
        *_defs(UNARY_FLOAT, NoParams, "elementwise", "elementwise math"),
        *_defs(UNARY_SAME, NoParams, "elementwise", "elementwise math"),
        *_defs("not", NoParams, "elementwise zero_grad", "logical not"),
        *_defs(BINARY_ARITH, NoParams, "elementwise", "elementwise arithmetic"),
        *_defs(COMPARE, NoParams, "elementwise zero_grad", "elementwise comparison"),
        *_defs(LOGIC, NoParams, "elementwise zero_grad", "elementwise logic"),
        *_defs("where clip", NoParams, "elementwise", "elementwise select / clamp"),
        *_defs("stop_gradient", NoParams, "zero_grad", "identity with zero derivative"),
        *_defs("cast", CastParams, "", "dtype conversion"),
        *_defs(REDUCE, ReduceParams, "", "reduction over axes"),
        *_defs("matmul dot outer solve cholesky", NoParams, "", "linear algebra"),
        *_defs("sampled_matmul", SampledParams, "random",
               "x @ w whose backward for w is estimated from `keep` sampled rows of x (WTA-CRS)"),
        *_defs("reshape broadcast_to", ShapeParams, "", "shape op"),
        *_defs("transpose", PermParams, "", "axis permutation"),
        *_defs("concat stack", AxisParams, "", "join tensors along an axis"),
        *_defs("zeros ones full", ShapeParams, "", "constant tensor"),
        *_defs("arange", ArangeParams, "zero_grad", "integer range"),
        *_defs("eye", EyeParams, "", "identity matrix"),
        *_defs("softmax log_softmax", AxisParams, "", "normalization along an axis"),
        *_defs("one_hot", OneHotParams, "zero_grad", "one-hot encoding"),
        *_defs("cross_entropy mse", NoParams, "", "losses"),
        *_defs("index", IndexParams, "", "indexing and slicing"),
        *_defs("layer_norm rms_norm", NormParams, "",
               "normalization over the last axis, times a scale (plus an offset) when given"),
        *_defs("take_along_axis", AxisParams, "", "entries at integer indices along an axis"),
        *_defs("dot_product_attention", AttentionParams, "",
               "multi-head scaled dot-product attention (jax.nn.dot_product_attention)"),
        *_defs("group_norm", GroupNormParams, "",
               "normalization over the spatial axes and each group of channels"),
        *_defs("leaky_relu", NoParams, "elementwise", "max(x, slope x)"),
        *_defs("dropout", NoParams, "random",
               "x times a Bernoulli keep-mask over 1 - rate (a draw; pathwise gradient)"),
        *_defs("einsum", EinsumParams, "", "Einstein summation of one or two tensors"),
        *_defs("sampled_einsum", EinsumParams, "random",
               "an einsum projection whose weight's backward samples rows of x (WTA-CRS)"),
        *_defs("conv", ConvParams, "", "1-D or 2-D convolution, channels last"),
        *_defs("conv_transpose", ConvParams, "", "1-D or 2-D transposed convolution"),
        *_defs("avg_pool max_pool", ConvParams, "", "1-D or 2-D pooling, channels last"),
        *_defs("segment_sum", SegmentParams, "", "sums of rows by integer segment id"),
        *_defs("if", NoParams, "", "two-way conditional with a region per branch"),
        *_defs("for", ForParams, "", "bounded loop with carried state"),
        *_defs("checkpoint", NoParams, "",
               "its region's values, recomputed in the backward pass instead of stored"),
        *_defs(NONSMOOTH, RuleParams, "elementwise nonsmooth",
               "piecewise-constant elementwise op (zero derivative almost everywhere)"),
        *_defs("argmax", ArgmaxParams, "nonsmooth", "one-hot of the largest entry along an axis"),
        *_defs("topk", TopkParams, "nonsmooth", "0/1 mask of the k largest entries along an axis"),
        *_defs("sort", AxisParams, "", "sorted along an axis"),
        *_defs("quantize", QuantizeParams, "nonsmooth", "b-bit uniform quantization"),
        *_defs("quest", QuantizeParams, "nonsmooth power_of_two_axis",
               "b-bit uniform quantization of the Hadamard-rotated last axis"),
        *_defs("hadamard", NoParams, "power_of_two_axis",
               "orthonormal fast Walsh-Hadamard transform, last axis"),
        *_defs("sliced_wasserstein", SlicedParams, "random",
               "Monte Carlo sliced Wasserstein distance SW_p^p over random directions"),
        *_defs("stochastic_round", NoParams, "random",
               "floor(x + u), u ~ U[0, 1): unbiased rounding; identity backward"),
        *_defs("compose", ComposeParams, "",
               "its region (f of its first operand, the inner estimate) evaluated with that "
               "operand replaced by the tracked estimate u, differentiated as J^T grad f(u)"),
        *_defs("argmin", ArgminParams, "",
               "the minimizer of its region's scalar objective over the region's argument, "
               "started at the operand"),
        *_defs("grad", GradParams, "",
               "the gradient (after the value, with `value`) of its region's scalar objective "
               "with respect to the region arguments at `argnums`, at the operands",
               _verify_grad),
        *_defs("straight_through", STParams, "",
               "a non-smooth op's exact value with the derivative of its rule (custom_jvp)"),
        *_defs("dist", DistParams, "", "a distribution (batch) from its parameters"),
        *_defs("sample", SampleParams, "random", "a random choice from a distribution"),
        *_defs("log_prob", NoParams, "", "log density / mass of a value"),
        *_defs("entropy", NoParams, "", "entropy of a distribution"),
        *_defs("kl", NoParams, "", "KL divergence of two distributions (closed form)"),
        *_defs("dist_mean", NoParams, "", "mean of a distribution"),
        *_defs("expect", ExpectParams, "random", "Monte Carlo mean of its region over independent draws"),
        *_defs("samples", ExpectParams, "random",
               "its region evaluated on independent draws, results stacked on a new axis 0",
               _verify_samples),
        *_defs("surrogate", SurrogateParams, "",
               "mean over samples of the score-function surrogate (magic box and baselines)",
               _verify_surrogate),
    ]
}


def params_text(params: object) -> str:
    """Params as printed in the IR: `{axis=(1,), keepdims=False}`; empty for NoParams."""
    items = []
    for f in fields(params):  # type: ignore[arg-type]
        v = getattr(params, f.name)
        if f.metadata.get("omit_default") and v == f.default:
            continue
        if isinstance(v, Annotation):
            v = str(v)
        elif f.name == "params" and not isinstance(v, tuple):
            v = params_text(v) or "{}"
        elif isinstance(v, DType):
            v = v.value
        elif isinstance(v, tuple) and v and isinstance(v[0], IndexItem):
            v = "[" + ", ".join(str(i) for i in v) + "]"
        elif isinstance(v, str) and not v.replace("_", "a").replace(".", "a").isalnum():
            v = '"' + v + '"'  # einsum's subscripts: commas and arrows (never a quote)
        items.append(f"{f.name}={v}")
    return "{" + ", ".join(items) + "}" if items else ""
