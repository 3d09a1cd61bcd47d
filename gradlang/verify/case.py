"""What computes an export's gradient, read from the compiler's facts: the case `verify`
picks its reference by, the estimator described, whether it is biased by design, its cost.

Cases, by priority: `black_box` (`by=spsa/es/eggroll`), `compose` (f(E[g]) by `plugin` or
`scgd`: both biased by design), `non_smooth` (a non-smooth op that a
`wrt` parameter reaches: with a backward rule, or without one and so a zero derivative),
`random` (random choices), `inner` (an `argmin`), `exact` (a smooth deterministic program:
reverse mode is exact). `by=dp` is reverse mode made private: its case is that of the program
without it, and its per-example clipping is biased by design.
"""

from __future__ import annotations

from dataclasses import dataclass

from gradlang.facts import ComposeFact, InnerProblem, SiteChoice
from gradlang.ir import Export, Function, Module, Op, Region, reachable, walk
from gradlang.ops import OPS, Annotation
from gradlang.estimators import REGISTRY
from gradlang.estimators.backward import rule_of
from gradlang.estimators.compose import STATE as COMPOSE_STATE, estimator_of
from gradlang.estimators.black_box import estimator
from gradlang.passes.aux import written


@dataclass(frozen=True)
class NonSmooth:
    """A non-smooth op that a `wrt` parameter reaches, and its backward rule (None: none)."""

    function: str
    op: Op
    rule: Annotation | None

    @property
    def name(self) -> str:
        return self.op.params.op if self.op.name == "straight_through" else self.op.name

    def describe(self) -> str:
        where = f"{self.name} ({written(self.function)}, line {self.op.span.line})"
        return f"{self.rule} at {where}" if self.rule else f"no backward rule at {where}"


@dataclass(frozen=True)
class Cost:
    """Evaluations of the objective per estimate, and what they are."""

    forward: int
    backward: int
    detail: str


@dataclass(frozen=True)
class Case:
    kind: str  # "black_box" | "compose" | "non_smooth" | "random" | "inner" | "exact"
    objective: str
    """The export's objective function as written (before the surrogate pass)."""
    samples: int
    sites: tuple[SiteChoice, ...]
    nonsmooth: tuple[NonSmooth, ...]
    inner: tuple[InnerProblem, ...]
    by: Annotation | None
    """The black-box estimator (`by=` other than `dp`)."""
    draws: bool
    """The export takes a key (its estimates are random)."""
    private: Annotation | None = None
    """`by=dp(...)`: per-example clipping and Gaussian noise."""
    compose: ComposeFact | None = None
    """`compose(f, expect(g, samples=N), by=...)`: f, g, N and the estimator."""
    warmup: int = 0
    """SCGD's warm-up calls before each measured estimate."""

    @property
    def estimator(self) -> str:
        """What computes the gradient, as the source would select it."""
        if self.by is not None:
            return f"by={self.by}"
        parts = [f"by={self.private}"] if self.private else []
        if self.compose is not None:
            c = self.compose
            parts.append(f"compose by={c.by} of {c.outer} at expect({c.inner}, "
                         f"samples={c.samples})")
        parts += [f"{s.estimator} at {s.site} ({written(s.function)}, line {s.span.line})" for s in self.sites]
        parts += [n.describe() for n in self.nonsmooth]
        parts += [f"{h.solver} with {h.method} ({written(h.function)}, line {h.span.line})"
                  for h in self.inner]
        return "; ".join(parts) or "reverse mode (exact)"

    @property
    def biased_by_design(self) -> str | None:
        """Why the estimator is biased by design (None: it is meant to be unbiased)."""
        why = []
        c = self.compose
        if c is not None:
            why.append(estimator_of(c.by).bias(c.outer, c.samples))
        if self.private is not None:
            why.append(f"by=dp clips each example's gradient to norm {self.private.option('clip')}"
                       f": the estimate is the mean of the clipped gradients (plus noise), not "
                       f"the objective's gradient, wherever an example's norm exceeds it")
        for s in self.sites:
            bias = REGISTRY[s.estimator.name].bias(s.estimator, s.site)
            if bias is not None:
                why.append(bias)
        for n in self.nonsmooth:
            if n.rule is not None:
                why.append(rule_of(n.rule).bias(n.name, n.op.span.line))
        return "; ".join(why) or None

    @property
    def notes(self) -> list[str]:
        out = []
        if self.warmup:
            out.append(f"each estimate is call {self.warmup + 1} of its own chain at these "
                       f"arguments, the state '{COMPOSE_STATE}' threaded from the one given "
                       f"(zeros by default), so that u tracks E g as in training")
        note = estimator(self.by).note if self.by is not None else None
        if note is not None:
            out.append(note)
        out += [f"{n.name} (line {n.op.span.line}) has no backward rule: reverse mode gives it a "
                f"zero derivative" for n in self.nonsmooth if n.rule is None]
        if self.private is not None:
            o = dict(self.private.options)
            out.append(f"by=dp's noise, N(0, ({o['noise']} x {o['clip']})^2) / (number of "
                       f"examples) per coordinate, is part of the variance")
        return out

    def cost(self) -> Cost:
        if self.by is not None:
            evals = estimator(self.by).evaluations
            return Cost(evals, 0, f"{self.by.name}: forward evaluations only")
        branches = 1
        for s in self.sites:
            branches *= s.size or 1
        n = max(self.samples, 1) * branches
        detail = [f"{max(self.samples, 1)} sample{'s' * (self.samples > 1)}"
                  + (f" x {branches} evaluations of a draw's values" if branches > 1 else "")
                  ] if self.draws and (self.sites or not self.private) else ["reverse mode"]
        detail += [f"inner {h.solver} + {h.method}" for h in self.inner]
        detail += ["by=dp: vectorized over the examples"] if self.private else []
        return Cost(n, n, "; ".join(detail))


def place_key(place: SiteChoice | InnerProblem) -> tuple:
    """Where a random choice or an inner problem is, comparable across compiled variants."""
    return place.function, place.span.line, place.span.col


def smooth_wrt(module: Module, export: Export) -> tuple[str, ...]:
    """The `wrt` names whose gradient passes through no non-smooth op (exact reverse mode
    there, whatever the others' backward rules), in order."""
    t = export.transform
    objective = module.facts.objectives.get(export.name, (t.fn,))[0]
    fn = module.function(objective)
    return tuple(w for w in t.wrt if not _reached_nonsmooth(module, fn, (w,)))


def classify(module: Module, export: Export, warmup: int = 0, smooth: bool = False) -> Case:
    """The case of `export` (`warmup`: the calls before each SCGD estimate, for its notes);
    `smooth`: as its leaves that reach no non-smooth op see it (`smooth_wrt`)."""
    t = export.transform
    objective, samples, _ = module.facts.objectives.get(export.name,
                                                                   (t.fn, t.samples, t.scope))
    compose = module.facts.compose.get(export.name) if t.compose else None
    reach = reachable(module, objective)
    sites = tuple(s for s in module.facts.estimators if s.function in reach)
    inner = tuple(h for h in module.facts.hypergrad if h.function in reach)
    nonsmooth = () if smooth else tuple(_reached_nonsmooth(module, module.function(objective),
                                                            t.wrt))
    random = t.fn in module.facts.random
    if t.black_box is not None:
        kind = "black_box"
    elif compose is not None:
        kind, samples = "compose", compose.samples
    elif nonsmooth:
        kind = "non_smooth"
    elif sites or random:
        kind = "random"
    elif inner:
        kind = "inner"
    else:
        kind = "exact"
    return Case(kind, objective, samples, sites, nonsmooth, inner, t.black_box,
                random or t.by is not None, t.private, compose, warmup if compose else 0)


def _reached_nonsmooth(module: Module, fn: Function, wrt: tuple[str, ...]) -> list[NonSmooth]:
    """Non-smooth ops whose operand depends on a `wrt` parameter (through any op, calls
    included): those whose backward rule (or lack of one) the gradient goes through."""
    found: dict[int, NonSmooth] = {}
    seen: set[tuple[str, frozenset[int]]] = set()

    def function(f: Function, seeds: frozenset[int]) -> None:
        if (f.name, seeds) in seen:
            return
        seen.add((f.name, seeds))
        region(f, f.body, {f.params[i].value for i in seeds})

    def region(f: Function, r: Region, dep: set) -> None:
        for op in r.ops:
            reached = any(v in dep for v in op.operands)
            for inner in op.regions:
                if reached:
                    dep.update(inner.args)
                for _ in range(2):  # a loop carries dependence into its next iteration
                    region(f, inner, dep)
            if reached and op.name == "call_fn":
                function(module.function(op.params.callee),
                         frozenset(i for i, v in enumerate(op.operands) if v in dep))
            if reached and op.name == "map_leaves":  # its function takes each leaf
                function(module.function(op.params.callee), frozenset({0}))
            if reached and (op.name == "straight_through" or "nonsmooth" in OPS[op.name].traits):
                rule = op.params.rule if op.name == "straight_through" else None
                found.setdefault(id(op), NonSmooth(f.name, op, rule))
            if reached or any(v in dep for inner in op.regions for v in inner.results):
                dep.update(op.results)

    function(fn, frozenset(i for i, p in enumerate(fn.params) if p.name in wrt))
    return list(found.values())


def stochastic_ops(module: Module, fn: str) -> list[Op]:
    """The draws that make `fn` random once enumerated draws are summed exactly: sample ops
    not enumerated, stochastic rounding and dropout."""
    return [op for name in reachable(module, fn) for op in walk(module.function(name).body)
            if op.name in ("stochastic_round", "dropout")
            or (op.name == "sample" and op.params.estimator.name != "enum")]
