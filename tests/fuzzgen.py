"""A type-directed random generator of .grad programs, for fuzzing the compiler end to end.

`generate(seed)` writes a program that is well typed by construction: every expression is
generated for a target type (dtype and shape, dims literal or symbolic), so most programs pass
the front end and reach every pass: scalars and tensors, structs, tuples, user and stdlib
calls, `if` and `for` with carries, builtins, non-smooth ops with backward rules, random choices
of every family with every estimator annotation, `expect` / `logmeanexp`, `argmin` / `argmax`
with every solver, constraint and hypergradient method, solver reports, `checkpoint`, truncated
loops, `wta_crs`, `sliced_wasserstein`, externs bound to NumPy callables, and every export form
(`grad`, `value_and_grad`, `expect`, `logmeanexp`, `by=spsa / es / eggroll / dp`, `descend`,
`minimize`, `compose`). Some programs (`odd`) break rules on purpose (an estimator on the wrong
family, an option out of range, a literal at the edge of float32) so that diagnostics are
exercised too, and a `deep` share nests one expression, block or call chain up to and past the
front end's limits. tests/fuzzrun.py compiles and calls the programs.
"""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

DIM_NAMES = ("B", "N", "D", "H", "K")
FLOAT_LITERALS = ("1.0", "0.5", "2.0", "0.1", "0.25", "3.0", "1e-3", "1.5")
ODD_FLOAT_LITERALS = ("0.0", "1e30", "1e39", "1e-45", "3.4e38", "100000.0")
"""Literals at the edges of float32 (rarely drawn)."""
INT_LITERALS = ("0", "1", "2", "3")
ODD_INT_LITERALS = ("3000000000", "2147483647", "99999999999999999999")
ODD_OPTIONS = ("0", "1", "-1", "0.0", "-0.5", "1e999", "1e39", "1e-50", "100000", "2.5", "3000000000")
"""Values an option of an odd program may get instead of its usual one."""
UNARY = ("exp", "log", "log1p", "expm1", "sqrt", "tanh", "sigmoid", "softplus", "relu", "abs",
         "sin", "cos", "stop_gradient", "gelu", "silu")
REDUCTIONS = ("sum", "mean", "max", "min", "logsumexp", "var")
NONSMOOTH = ("sign", "round", "floor", "ceil", "step", "binarize")
RULES = {"sign": ("ste", "ste(clip=1.0)", "reste", "reste(power=3, clip=1, max_grad=10)",
                  "approx_sign", "swish_sign(beta=5)"),
         "binarize": ("ste", "reste(power=2)", "approx_sign", "swish_sign"),
         "argmax": ("ste", "st_gumbel", "st_gumbel(tau=0.5)"),
         "quantize": ("ste", "trust", "trust(bound=2)", "ste(clip=2.0)"),
         "quest": ("trust", "ste")}
PATHWISE = ("Normal", "LogNormal", "Uniform", "Exponential", "Gamma", "Beta", "Dirichlet", "Gumbel")
FAMILIES = PATHWISE + ("Bernoulli", "Categorical", "OneHotCategorical", "Poisson", "MixtureNormal")
SOLVERS = ("gd", "momentum", "adam", "lbfgs", "newton_cg", "projected")
CONSTRAINED = ("gd", "momentum", "adam")
STD_MODULES = ("nn", "quant", "ot", "rl", "bilevel", "vi")
SPECIAL_NAMES = ("key", "baseline", "control", "inner", "history", "lr")
"""Names the exports give their own extra parameters: a user parameter may be named so too."""


# ---- types


@dataclass(frozen=True)
class Tensor:
    dtype: str
    shape: tuple = ()

    def __str__(self) -> str:
        return self.dtype if not self.shape else f"{self.dtype}[{', '.join(map(str, self.shape))}]"

    @property
    def is_float(self) -> bool:
        return self.dtype in ("f32", "f64")


@dataclass(frozen=True)
class Struct:
    name: str
    """As written in a type: `P`, `P[D=N]`, `Dense[I=D, O=H]`."""
    fields: tuple
    """((name, type), ...) with the use site's dims."""

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Tup:
    elems: tuple

    def __str__(self) -> str:
        return "(" + ", ".join(map(str, self.elems)) + ")"


Type = Tensor | Struct | Tup
F32 = Tensor("f32")
I32 = Tensor("i32")
BOOL = Tensor("bool")


def dims_of(t: Type) -> set:
    if isinstance(t, Tensor):
        return {d for d in t.shape if isinstance(d, str)}
    elems = [f for _, f in t.fields] if isinstance(t, Struct) else list(t.elems)
    return set().union(*(dims_of(e) for e in elems)) if elems else set()


def all_float(t: Type) -> bool:
    """A valid `wrt` target: a float tensor or a struct of them."""
    if isinstance(t, Tensor):
        return t.is_float
    return isinstance(t, Struct) and all(all_float(f) for _, f in t.fields)


def shape_list(shape: tuple) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


# ---- programs


@dataclass
class Program:
    seed: int
    source: str
    sizes: dict
    """Concrete sizes of the symbolic dims at call time."""
    externs: dict
    """Extern name -> the Python callable bound to it."""
    features: Counter
    depth: int
    """The deepest nesting of expressions and blocks the generator reached."""
    deep: bool = False


@dataclass
class FnInfo:
    name: str
    params: list
    ret: Type
    draws: bool
    externs: bool


@dataclass
class FnState:
    """What one function body has done so far."""

    draws: list = field(default_factory=list)
    branched: str | None = None
    dreg: list = field(default_factory=list)
    """(distribution text, draw name) of `with dreg` draws: the body must use log_prob of each."""
    calls_externs: bool = False
    draws_any: bool = False


@dataclass
class Scope:
    vars: dict
    dims: frozenset
    fn: FnState
    draw: bool = False
    top: bool = False
    """The top-level body of an export's objective: branched estimators apply here."""
    samples: int = 1
    lme: bool = False
    own: bool = False
    """The export's own expectation (a moving-average baseline applies)."""
    extern: bool = False
    indent: int = 1
    level: int = 0
    """Nesting level of the current expression (for the depth statistic)."""
    pre: list | None = None
    """Statements to emit before the one being generated (None: nothing can be hoisted)."""
    nested: bool | None = None
    """Inside an argmin body: True when inner problems must be unrolled or truncated."""

    def child(self, **changes) -> Scope:
        values = dict(self.__dict__, vars=dict(self.vars))
        values.update(changes)
        return Scope(**values)


class Gen:
    """One program's generator (deterministic in its seed)."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.seed = seed
        rng = self.rng
        self.sizes = {d: rng.choice((1, 2, 2, 3, 3, 4, 4)) for d in DIM_NAMES}
        if rng.random() < 0.5:  # a power of two for every dim: Hadamard transforms apply
            self.sizes = {d: rng.choice((1, 2, 4)) for d in DIM_NAMES}
        self.features: Counter = Counter()
        self.depth = 0
        self.counter = itertools.count()
        self.uses: list[str] = []
        self.structs: list[Struct] = []
        self.struct_decls: list[str] = []
        self.functions: dict[str, FnInfo] = {}
        self.fn_decls: list[str] = []
        self.extern_decls: list[str] = []
        self.externs: dict[str, Callable] = {}
        self.exports: list[str] = []
        self.pragmas: list[str] = []
        self.odd = rng.random() < 0.08
        """This program may use odd literals and rule-breaking choices."""

    # ---- small helpers

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def pick(self, seq):
        return self.rng.choice(list(seq))

    def fresh(self, prefix: str = "v") -> str:
        name = f"{prefix}{next(self.counter)}"
        return name if name not in ("i32", "f32", "f64") else self.fresh(prefix)

    def note(self, *tags: str) -> None:
        for t in tags:
            self.features[t] += 1

    def dim(self, dims: frozenset, literal_p: float = 0.4):
        if dims and not self.chance(literal_p):
            return self.pick(sorted(dims))
        return self.pick((1, 2, 3, 4))

    def tensor(self, dims: frozenset, dtype: str = "f32", rank: int | None = None) -> Tensor:
        if rank is None:
            rank = self.rng.choices((0, 1, 2, 3), (35, 35, 24, 6))[0]
        return Tensor(dtype, tuple(self.dim(dims) for _ in range(rank)))

    def value_type(self, dims: frozenset, floats_only: bool = False) -> Type:
        """A parameter or result type: mostly float tensors, some ints, bools, structs, tuples."""
        r = self.rng.random()
        structs = [x for x in self.structs if dims_of(x) <= dims]
        if r < 0.12 and not floats_only and structs:
            return self.pick(structs)
        if r < 0.17 and not floats_only:
            return Tup(tuple(self.tensor(dims, self.pick(("f32", "i32"))) for _ in range(2)))
        if r < 0.27 and not floats_only:
            return self.tensor(dims, self.pick(("i32", "bool")))
        return self.tensor(dims)

    def float_lit(self) -> str:
        if self.odd and self.chance(0.15):
            self.note("literal:odd-float")
            return self.pick(ODD_FLOAT_LITERALS)
        return self.pick(FLOAT_LITERALS)

    def int_lit(self) -> str:
        if self.odd and self.chance(0.1):
            self.note("literal:odd-int")
            return self.pick(ODD_INT_LITERALS)
        return self.pick(INT_LITERALS)

    def block(self, s: Scope, stmts: list[str], last: str) -> str:
        """`{ stmts; last }` with the body indented one level deeper than `s`."""
        pad = "  " * (s.indent + 1)
        lines = [pad + x for x in stmts] + [pad + last]
        for i in range(len(lines) - 1):  # a line starting with ( - [ would continue the one above
            if lines[i + 1].lstrip()[:1] in "(-[":
                lines[i] += ";"
        return "{\n" + "\n".join(lines) + "\n" + "  " * s.indent + "}"

    def enter(self, s: Scope, **changes) -> Scope:
        c = s.child(level=s.level + 1, **changes)
        self.depth = max(self.depth, c.level)
        return c

    # ---- expressions of a target type

    def expr(self, t: Type, s: Scope, d: int) -> str:
        if isinstance(t, Struct):
            return self.struct_expr(t, s, d)
        if isinstance(t, Tup):
            names = [n for n, v in s.vars.items() if v == t]
            if names and self.chance(0.5):
                return self.pick(names)
            return "(" + ", ".join(self.expr(e, s, d - 1) for e in t.elems) + ")"
        if t.dtype in ("f32", "f64"):
            return self.fexpr(t, s, d)
        if t.dtype == "i32":
            return self.iexpr(t, s, d)
        return self.bexpr(t, s, d)

    def struct_expr(self, t: Struct, s: Scope, d: int) -> str:
        names = [n for n, v in s.vars.items() if v == t]
        if names and self.chance(0.7):
            return self.pick(names)
        if d > 0 and self.chance(0.15):
            self.note("op:if-struct")
            return f"(if {self.bexpr(BOOL, s, d - 1)} then {self.struct_expr(t, s, d - 1)} else {self.struct_expr(t, s, d - 1)})"
        ctor = t.name.split("[")[0]
        self.note("struct:constructor")
        return f"{ctor}(" + ", ".join(f"{n}={self.expr(f, s, d - 1)}" for n, f in t.fields) + ")"

    def var_of(self, t: Type, s: Scope) -> str | None:
        names = [n for n, v in s.vars.items() if v == t]
        fields = [f"{n}.{fn}" for n, v in s.vars.items() if isinstance(v, Struct)
                  for fn, ft in v.fields if ft == t]
        fields += [f"{n}.{fn}.{gn}" for n, v in s.vars.items() if isinstance(v, Struct)
                   for fn, ft in v.fields if isinstance(ft, Struct) for gn, gt in ft.fields if gt == t]
        if fields and (not names or self.chance(0.3)):
            self.note("struct:field")
            return self.pick(fields)
        return self.pick(names) if names else None

    def const(self, t: Tensor, s: Scope) -> str:
        if not t.shape:
            if t.dtype == "i32":
                return self.int_lit()
            if t.dtype == "bool":
                return self.pick(("true", "false"))
            if s.dims and self.chance(0.15):
                self.note("dim-as-value")
                return f"f32({self.pick(sorted(s.dims))})"
            return self.float_lit()
        shape = shape_list(t.shape)
        if t.dtype == "i32":
            return f"full({shape}, {self.int_lit()})"
        if t.dtype == "bool":
            return f"full({shape}, {self.pick(('true', 'false'))})"
        return self.pick((f"zeros({shape})", f"ones({shape})", f"full({shape}, {self.float_lit()})"))

    def leaf(self, t: Tensor, s: Scope) -> str:
        v = self.var_of(t, s)
        if v is not None and self.chance(0.8):
            return v
        if t.is_float and self.chance(0.7):  # a reduction of a float variable, broadcast
            floats = [n for n, x in s.vars.items() if isinstance(x, Tensor) and x.is_float]
            if floats:
                name = self.pick(floats)
                x = name if not s.vars[name].shape else f"{self.pick(('mean', 'sum', 'max'))}({name})"
                return f"({x} * ones({shape_list(t.shape)}))" if t.shape else x
        return self.const(t, s)

    def bshape(self, shape: tuple) -> tuple:
        """A shape that broadcasts to `shape` without changing it."""
        r = self.rng.random()
        if r < 0.7 or not shape:
            return shape
        if r < 0.82:
            return ()
        if r < 0.92:
            return shape[self.rng.randrange(1, len(shape) + 1):]
        i = self.rng.randrange(len(shape))
        return shape[:i] + (1,) + shape[i + 1:]

    def choose(self, options: list, t: Tensor, s: Scope, d: int) -> str:
        """Try weighted productions until one applies (returns a string)."""
        weights = [w for w, _ in options]
        for _ in range(8):
            _, make = self.rng.choices(options, weights)[0]
            out = make(t, s, d)
            if out is not None:
                return out
        return self.leaf(t, s)

    def fexpr(self, t: Tensor, s: Scope, d: int) -> str:
        if d <= 0:
            return self.leaf(t, s)
        s = self.enter(s)
        return self.choose(self.float_productions, t, s, d)

    @property
    def float_productions(self) -> list:
        return [(10, lambda t, s, d: self.leaf(t, s)), (8, self.f_unary), (12, self.f_binary),
                (3, self.f_pow), (5, self.f_reduce), (5, self.f_matmul), (2, self.f_transpose),
                (2, self.f_reshape), (2, self.f_concat), (2, self.f_stack), (1, self.f_broadcast),
                (2, self.f_softmax), (1, self.f_one_hot), (4, self.f_index), (3, self.f_cast),
                (4, self.f_if), (2, self.f_where), (2, self.f_clip), (4, self.f_call),
                (4, self.f_nonsmooth), (2, self.f_quant), (3, self.f_dist_builtin),
                (2, self.f_sliced_wasserstein), (3, self.f_expect), (3, self.f_for),
                (2, self.f_checkpoint), (3, self.f_argmin), (2, self.f_extern), (2, self.f_losses),
                (1, self.f_linalg), (2, self.f_stdlib), (1, self.f_stochastic),
                (4, self.f_layers)]

    def f_unary(self, t, s, d):
        op = self.pick(UNARY)
        self.note(f"builtin:{op}")
        if op in ("log", "sqrt"):  # keep the argument positive, mostly
            return f"{op}({self.fexpr(t, s, d - 1)} * {self.fexpr(t, s, d - 1)} + 0.5)"
        if self.chance(0.15):
            return f"(-{self.fexpr(t, s, d - 1)})"
        return f"{op}({self.fexpr(t, s, d - 1)})"

    def f_binary(self, t, s, d):
        op = self.pick(("+", "-", "*", "/", "+", "*", "maximum", "minimum"))
        a = self.fexpr(t, s, d - 1)
        b = self.fexpr(Tensor(t.dtype, self.bshape(t.shape)), s, d - 1)
        if self.chance(0.5):
            a, b = b, a
        if op == "/":
            return f"({a} / (1.0 + {b} * {b}))"
        if op in ("maximum", "minimum"):
            self.note(f"builtin:{op}")
            return f"{op}({a}, {b})"
        return f"({a} {op} {b})"

    def f_pow(self, t, s, d):
        self.note("op:pow")
        return f"({self.fexpr(t, s, d - 1)} ^ {self.pick(('2', '2.0', '3', '0.5 * 2.0'))})"

    def f_reduce(self, t, s, d):
        op = self.pick(REDUCTIONS)
        self.note(f"builtin:{op}")
        if not t.shape and self.chance(0.4):
            return f"{op}({self.fexpr(self.tensor(s.dims, t.dtype), s, d - 1)})"
        k = self.rng.randrange(len(t.shape) + 1)
        if 1 in t.shape and self.chance(0.3):  # keepdims over a unit axis
            k = t.shape.index(1)
            inner = Tensor(t.dtype, t.shape[:k] + (self.dim(s.dims),) + t.shape[k + 1:])
            return f"{op}({self.fexpr(inner, s, d - 1)}, axis={k}, keepdims=true)"
        inner = Tensor(t.dtype, t.shape[:k] + (self.dim(s.dims),) + t.shape[k:])
        axis = k if self.chance(0.6) else k - len(inner.shape)
        if self.chance(0.15) and len(inner.shape) >= 2:
            return f"{op}({self.fexpr(inner, s, d - 1)}, axis=[{axis}])"
        return f"{op}({self.fexpr(inner, s, d - 1)}, axis={axis})"

    def f_matmul(self, t, s, d):
        k = self.dim(s.dims)
        f = t.dtype
        self.note("op:matmul")
        if not t.shape:
            a, b = self.fexpr(Tensor(f, (k,)), s, d - 1), self.fexpr(Tensor(f, (k,)), s, d - 1)
            return self.pick((f"({a} @ {b})", f"dot({a}, {b})"))
        if len(t.shape) == 1:
            if self.chance(0.5):
                return f"({self.fexpr(Tensor(f, (t.shape[0], k)), s, d - 1)} @ {self.fexpr(Tensor(f, (k,)), s, d - 1)})"
            return f"({self.fexpr(Tensor(f, (k,)), s, d - 1)} @ {self.fexpr(Tensor(f, (k, t.shape[0])), s, d - 1)})"
        *lead, m, n = t.shape
        if len(t.shape) == 2 and self.chance(0.15):
            self.note("builtin:outer")
            return f"outer({self.fexpr(Tensor(f, (m,)), s, d - 1)}, {self.fexpr(Tensor(f, (n,)), s, d - 1)})"
        a = self.fexpr(Tensor(f, (*lead, m, k)), s, d - 1)
        b = self.fexpr(Tensor(f, (k, n)), s, d - 1)
        if s.draw and self.chance(0.2):
            s.fn.draws_any = True
            keep = self.pick((1, 2, 3, 64))
            self.note("memory:wta_crs")
            return f"(({a} @ {b}) with wta_crs(keep={keep}))"
        return f"({a} @ {b})"

    def f_transpose(self, t, s, d):
        if len(t.shape) < 2:
            return None
        self.note("builtin:transpose")
        if len(t.shape) == 2 and self.chance(0.6):
            return f"transpose({self.fexpr(Tensor(t.dtype, t.shape[::-1]), s, d - 1)})"
        perm = list(range(len(t.shape)))
        self.rng.shuffle(perm)
        # transpose(x, axes=perm)[i] = x.shape[perm[i]]: x's axis perm[i] has t's dim i
        src = [None] * len(perm)
        for i, p in enumerate(perm):
            src[p] = t.shape[i]
        return f"transpose({self.fexpr(Tensor(t.dtype, tuple(src)), s, d - 1)}, axes={shape_list(perm)})"

    def f_reshape(self, t, s, d):
        self.note("builtin:reshape")
        if t.shape and all(isinstance(x, int) for x in t.shape) and self.chance(0.5):
            n = int(np.prod(t.shape))
            inner = Tensor(t.dtype, (n,))
            target = list(t.shape)
            if self.chance(0.4):
                target[self.rng.randrange(len(target))] = -1
            return f"reshape({self.fexpr(inner, s, d - 1)}, {shape_list(tuple(target))})"
        i = self.rng.randrange(len(t.shape) + 1)
        inner = Tensor(t.dtype, t.shape[:i] + (1,) + t.shape[i:])
        return f"reshape({self.fexpr(inner, s, d - 1)}, {shape_list(t.shape)})"

    def f_concat(self, t, s, d):
        axes = [i for i, x in enumerate(t.shape) if isinstance(x, int) and x >= 2]
        if not axes:
            return None
        k = self.pick(axes)
        n1 = self.rng.randrange(1, t.shape[k])
        parts = [Tensor(t.dtype, t.shape[:k] + (n,) + t.shape[k + 1:]) for n in (n1, t.shape[k] - n1)]
        self.note("builtin:concat")
        axis = k if self.chance(0.7) else k - len(t.shape)
        return f"concat([{', '.join(self.fexpr(p, s, d - 1) for p in parts)}], axis={axis})"

    def f_stack(self, t, s, d):
        axes = [i for i, x in enumerate(t.shape) if isinstance(x, int) and 1 <= x <= 3]
        if not axes:
            return None
        k = self.pick(axes)
        part = Tensor(t.dtype, t.shape[:k] + t.shape[k + 1:])
        self.note("builtin:stack")
        return f"stack([{', '.join(self.fexpr(part, s, d - 1) for _ in range(t.shape[k]))}], axis={k})"

    def f_broadcast(self, t, s, d):
        if not t.shape:
            return None
        self.note("builtin:broadcast_to")
        return f"broadcast_to({self.fexpr(Tensor(t.dtype, self.bshape(t.shape)), s, d - 1)}, {shape_list(t.shape)})"

    def f_softmax(self, t, s, d):
        if not t.shape:
            return None
        op = self.pick(("softmax", "log_softmax"))
        self.note(f"builtin:{op}")
        axis = self.pick((-1, len(t.shape) - 1, 0))
        return f"{op}({self.fexpr(t, s, d - 1)}, axis={axis})"

    def f_one_hot(self, t, s, d):
        if not t.shape or t.dtype != "f32":
            return None
        self.note("builtin:one_hot")
        return f"one_hot({self.iexpr(Tensor('i32', t.shape[:-1]), s, d - 1)}, {t.shape[-1]})"

    def f_index(self, t, s, d):
        self.note("op:index")
        r = self.rng.random()
        if r < 0.4:  # x[i] of a tensor with one more leading axis
            n = self.dim(s.dims)
            inner = self.fexpr(Tensor(t.dtype, (n,) + t.shape), s, d - 1)
            if isinstance(n, int):
                i = str(self.rng.randrange(-n, n))
            else:
                i = self.pick(("0", "-1", self.iexpr(I32, s, d - 1)))
            return f"{inner}[{i}]"
        if r < 0.7 and t.shape and isinstance(t.shape[0], int):  # a slice of a longer axis
            m = t.shape[0]
            n = m + self.rng.randrange(0, 3)
            a = self.rng.randrange(0, n - m + 1)
            inner = self.fexpr(Tensor(t.dtype, (n,) + t.shape[1:]), s, d - 1)
            if self.chance(0.2) and m >= 1:  # every second entry of 2m - 1 or 2m
                inner = self.fexpr(Tensor(t.dtype, (2 * m - self.rng.randrange(2),) + t.shape[1:]), s, d - 1)
                return f"{inner}[::2]"
            sl = self.pick((f"{a}:{a + m}", f"{a}:{a + m}:1", f"{a - n}:{a + m - n}" if a + m < n else f"{a}:"))
            return f"{inner}[{sl}]"
        if t.shape:  # x[:, i] picks a column
            n = self.pick((1, 2, 3))
            inner = self.fexpr(Tensor(t.dtype, t.shape[:1] + (n,) + t.shape[1:]), s, d - 1)
            return f"{inner}[:, {self.rng.randrange(-n, n)}]"
        return None

    def f_cast(self, t, s, d):
        self.note("op:cast")
        if self.chance(0.5):
            return f"{t.dtype}({self.iexpr(Tensor('i32', t.shape), s, d - 1)})"
        if self.odd and self.chance(0.2):
            self.note("op:cast-f64")
            return f"f32(f64({self.fexpr(t, s, d - 1)}))"
        return f"{t.dtype}({self.bexpr(Tensor('bool', t.shape), s, d - 1)})"

    def f_if(self, t, s, d):
        self.note("op:if")
        if t.shape and self.chance(0.3):
            c = self.bexpr(Tensor("bool", t.shape), s, d - 1)
        else:
            c = self.bexpr(BOOL, s, d - 1)
        return f"(if {c} then {self.fexpr(t, s, d - 1)} else {self.fexpr(t, s, d - 1)})"

    def f_where(self, t, s, d):
        self.note("builtin:where")
        c = self.bexpr(Tensor("bool", self.bshape(t.shape)), s, d - 1)
        return f"where({c}, {self.fexpr(t, s, d - 1)}, {self.fexpr(Tensor(t.dtype, self.bshape(t.shape)), s, d - 1)})"

    def f_clip(self, t, s, d):
        self.note("builtin:clip")
        return f"clip({self.fexpr(t, s, d - 1)}, -{self.float_lit()}, {self.float_lit()})"

    def f_call(self, t, s, d):
        return self.call(t, s, d)

    def callable_in(self, s: Scope) -> list[FnInfo]:
        """User functions a body with scope `s` may call."""
        return [f for f in self.functions.values() if dims_of_params(f) <= s.dims
                and (s.draw or not f.draws) and (s.extern or not f.externs)]

    def call(self, t: Type, s: Scope, d: int) -> str | None:
        """A call of a user function returning `t`, or of one returning a tuple or struct
        holding `t`, whose parameter dims are all in scope."""
        direct, via = [], []
        for f in self.callable_in(s):
            if f.ret == t:
                direct.append(f)
            elif isinstance(f.ret, Tup) and t in f.ret.elems:
                via.append(f)
        if not direct and not via:
            return None
        f = self.pick(direct) if direct and (not via or self.chance(0.7)) else self.pick(via)
        self.note("call:user")
        if f.draws:
            s.fn.draws_any = True
        if f.externs:
            s.fn.calls_externs = True
        args = ", ".join(self.expr(pt, s, d - 1) for _, pt in f.params)
        text = f"{f.name}({args})"
        if f.ret != t:  # destructure through a checkpoint block
            names = [self.fresh("u") for _ in f.ret.elems]
            want = names[f.ret.elems.index(t)]
            self.note("tuple:destructure")
            pattern = ", ".join(names)
            return f"checkpoint {self.block(s, [f'let ({pattern}) = {text}'], want)}"
        return text

    def f_nonsmooth(self, t, s, d):
        r = self.rng.random()
        x = self.fexpr(t, s, d - 1)
        if r < 0.55:
            op = self.pick(NONSMOOTH)
            text = f"{op}({x})"
        elif r < 0.75 and t.shape:
            op = "argmax"
            text = f"argmax({x}, axis=-1)"
        elif r < 0.85 and t.shape:
            op = "topk"
            last = t.shape[-1]
            k = self.rng.randrange(1, last + 1) if isinstance(last, int) else self.pick((1, 1, 2, 3))
            text = f"topk({x}, {k}, axis=-1)"
        elif t.shape:
            op = "sort"
            text = f"sort({x}, axis=-1)"
        else:
            return None
        self.note(f"nonsmooth:{op}")
        rules = RULES.get(op, ("ste", "ste(clip=1.0)"))
        if op != "sort" and self.chance(0.6):
            rule = self.pick(rules) if not (self.odd and self.chance(0.3)) else self.pick(("reste", "trust", "st_gumbel"))
            self.note(f"rule:{rule.split('(')[0]}")
            return f"({text} with {rule})"
        return text

    def f_quant(self, t, s, d):
        r = self.rng.random()
        pow2 = bool(t.shape) and (t.shape[-1] in (1, 2, 4, 8) or (isinstance(t.shape[-1], str) and self.chance(0.5)))
        if r < 0.5 or not pow2:
            bits = self.pick((1, 2, 4, 8))
            opts = ""
            if t.shape and self.chance(0.3):
                opts += f", axis={len(t.shape) - 1}"
            if self.chance(0.2):
                opts += ", symmetric=false"
            if self.chance(0.2):
                opts += f", scale={self.fexpr(Tensor(t.dtype, self.bshape(t.shape)), s, d - 1)}"
            text = f"quantize({self.fexpr(t, s, d - 1)}, {bits}{opts})"
            op = "quantize"
        elif r < 0.8:
            text = f"quest({self.fexpr(t, s, d - 1)}, {self.pick((1, 2, 4))})"
            op = "quest"
        else:
            self.note("builtin:hadamard")
            return f"hadamard({self.fexpr(t, s, d - 1)})"
        self.note(f"nonsmooth:{op}")
        if self.chance(0.7):
            rule = self.pick(RULES[op])
            self.note(f"rule:{rule.split('(')[0]}")
            return f"({text} with {rule})"
        return text

    def f_stochastic(self, t, s, d):
        if not s.draw:
            return None
        s.fn.draws_any = True
        self.note("builtin:stochastic_round")
        return f"stochastic_round({self.fexpr(t, s, d - 1)})"

    def f_sliced_wasserstein(self, t, s, d):
        if t.shape or not s.draw:
            return None
        s.fn.draws_any = True
        n, dd = self.dim(s.dims), self.dim(s.dims)
        x = self.fexpr(Tensor("f32", (n, dd)), s, d - 1)
        y = self.fexpr(Tensor("f32", (n, dd)), s, d - 1)
        proj = self.pick((1, 3, 4, 8))
        p = self.pick(("", ", p=2", ", p=1"))
        self.note("builtin:sliced_wasserstein")
        if p != ", p=1" and self.chance(0.6):
            cv = self.pick(("none", "gaussian_lower", "gaussian_upper"))
            if cv == "gaussian_upper":
                proj = max(proj, 3)
            self.note(f"control_variate:{cv}")
            return f"(sliced_wasserstein({x}, {y}, projections={proj}{p}) with control_variate({cv}))"
        return f"sliced_wasserstein({x}, {y}, projections={proj}{p})"

    def f_losses(self, t, s, d):
        if t.shape:
            return None
        r = self.rng.random()
        if r < 0.4:
            self.note("builtin:mse")
            u = self.tensor(s.dims)
            return f"mse({self.fexpr(u, s, d - 1)}, {self.fexpr(Tensor('f32', self.bshape(u.shape)), s, d - 1)})"
        b, c = self.dim(s.dims), self.dim(s.dims)
        self.note("builtin:cross_entropy")
        logits = self.fexpr(Tensor("f32", (b, c)), s, d - 1)
        if self.chance(0.5):
            return f"cross_entropy({logits}, softmax({self.fexpr(Tensor('f32', (b, c)), s, d - 1)}))"
        return f"cross_entropy({logits}, {self.iexpr(Tensor('i32', (b,)), s, d - 1)})"

    def f_layers(self, t, s, d):
        """The layer builtins, each producing t: normalizations, einsum, convolutions and
        pools that keep the length (stride 1), lookups and gathers, attention, segments."""
        if t.dtype != "f32" or not t.shape:
            return None
        options = ["norm", "einsum", "leaky_relu", "take_along_axis", "lookup", "segment_sum"]
        if len(t.shape) == 3:
            options += ["conv", "conv_transpose", "pool"]
        if len(t.shape) == 4:
            options.append("attention")
        if isinstance(t.shape[-1], int) and len(t.shape) >= 2:
            options.append("group_norm")
        op = self.pick(options)
        self.note(f"builtin:{op}")
        x = lambda: self.fexpr(t, s, d - 1)  # noqa: E731
        last = t.shape[-1]
        if op == "norm":
            name = self.pick(("layer_norm", "rms_norm"))
            scale = f", {self.fexpr(Tensor('f32', (last,)), s, d - 1)}" if self.chance(0.5) else ""
            return f"{name}({x()}{scale})"
        if op == "group_norm":
            groups = self.pick([g for g in (1, 2, 4) if last % g == 0])
            return f"group_norm({x()}, {groups})"
        if op == "leaky_relu":
            return f"leaky_relu({x()}, {self.pick(('0.01', '0.2'))})"
        if op == "einsum":  # t's letters, then a contracted one
            letters = "abcdefgh"[:len(t.shape)]
            k = self.dim(s.dims)
            a = self.fexpr(Tensor("f32", t.shape + (k,)), s, d - 1)
            b = self.fexpr(Tensor("f32", (k,)), s, d - 1)
            return f'einsum("{letters}z,z->{letters}", {a}, {b})'
        if op == "take_along_axis":
            k = self.dim(s.dims)
            src = self.fexpr(Tensor("f32", t.shape[:-1] + (k,)), s, d - 1)
            return f"take_along_axis({src}, {self.iexpr(Tensor('i32', t.shape), s, d - 1)}, axis=-1)"
        if op == "lookup":  # table[ids] with ids of t's leading shape
            n = self.dim(s.dims)
            table = self.fexpr(Tensor("f32", (n, last)), s, d - 1)
            return f"{table}[{self.iexpr(Tensor('i32', t.shape[:-1]), s, d - 1)}]"
        if op == "segment_sum":
            m = self.dim(s.dims)
            data = self.fexpr(Tensor("f32", (m,) + t.shape[1:]), s, d - 1)
            return f"segment_sum({data}, {self.iexpr(Tensor('i32', (m,)), s, d - 1)}, {t.shape[0]})"
        if op == "attention":
            causal = ", causal=true" if self.chance(0.5) else ""
            return f"dot_product_attention({x()}, {x()}, {x()}{causal})"
        c = self.dim(s.dims)
        src = self.fexpr(Tensor("f32", t.shape[:2] + (c,)), s, d - 1)
        if op == "pool":  # a window of 2 with one zero of padding keeps the length
            name = self.pick(("max_pool", "avg_pool"))
            return f"{name}({self.fexpr(t, s, d - 1)}, 2, stride=1, padding=[(0, 1)])"
        kernel = self.fexpr(Tensor("f32", (3, c, last)), s, d - 1)
        padding = self.pick(('', ', padding=[(1, 1)]', ', padding="SAME"'))
        return f"{op}({src}, {kernel}{padding})"

    def f_linalg(self, t, s, d):
        if len(t.shape) == 2 and t.shape[0] == t.shape[1]:
            n = t.shape[0]
            self.note("builtin:cholesky")
            v = self.fexpr(Tensor("f32", (n,)), s, d - 1)
            return f"cholesky(2.0 * eye({n}) + outer({v}, {v}))"
        if len(t.shape) in (1, 2):
            n = t.shape[0]
            self.note("builtin:solve")
            v = self.fexpr(Tensor("f32", (n,)), s, d - 1)
            return f"solve(2.0 * eye({n}) + outer({v}, {v}), {self.fexpr(t, s, d - 1)})"
        return None

    def f_stdlib(self, t, s, d):
        return self.stdlib_call(t, s, d)

    def f_extern(self, t, s, d):
        if not s.extern:
            return None
        s.fn.calls_externs = True
        return self.extern_call(t, s, d)

    # ---- i32 and bool

    def iexpr(self, t: Tensor, s: Scope, d: int) -> str:
        if d <= 0:
            return self.leaf(t, s)
        s = self.enter(s)
        r = self.rng.random()
        if r < 0.3:
            return self.leaf(t, s)
        if r < 0.45:
            op = self.pick(("+", "-", "*"))
            return f"({self.iexpr(t, s, d - 1)} {op} {self.iexpr(Tensor('i32', self.bshape(t.shape)), s, d - 1)})"
        if r < 0.6:
            self.note("op:cast")
            return f"i32({self.fexpr(Tensor('f32', t.shape), s, d - 1)} * 2.0)"
        if r < 0.67 and len(t.shape) == 1:
            self.note("builtin:arange")
            n = t.shape[0]
            if isinstance(n, int) and self.chance(0.5):
                return f"arange(1, {n + 1})"
            return f"arange({n})"
        if r < 0.75:
            self.note("builtin:sum")
            k = self.rng.randrange(len(t.shape) + 1)
            inner = Tensor("i32", t.shape[:k] + (self.dim(s.dims),) + t.shape[k:])
            return f"sum({self.iexpr(inner, s, d - 1)}, axis={k})"
        if r < 0.85:
            self.note("builtin:where")
            c = self.bexpr(Tensor("bool", t.shape), s, d - 1)
            return f"where({c}, {self.iexpr(t, s, d - 1)}, {self.iexpr(t, s, d - 1)})"
        if r < 0.92:
            return f"(if {self.bexpr(BOOL, s, d - 1)} then {self.iexpr(t, s, d - 1)} else {self.iexpr(t, s, d - 1)})"
        return f"i32({self.bexpr(Tensor('bool', t.shape), s, d - 1)})"

    def bexpr(self, t: Tensor, s: Scope, d: int) -> str:
        if d <= 0:
            v = self.var_of(t, s)
            return v if v is not None and self.chance(0.5) else f"({self.leaf(Tensor('f32', t.shape), s)} > {self.float_lit()})"
        s = self.enter(s)
        r = self.rng.random()
        if r < 0.15:
            return self.leaf(t, s)
        if r < 0.6:
            op = self.pick(("<", "<=", ">", ">=", "==", "!="))
            self.note("op:compare")
            u = Tensor(self.pick(("f32", "f32", "i32")), t.shape)
            return f"({self.expr(u, s, d - 1)} {op} {self.expr(Tensor(u.dtype, self.bshape(t.shape)), s, d - 1)})"
        if r < 0.85:
            op = self.pick(("and", "or"))
            self.note("op:logic")
            return f"({self.bexpr(t, s, d - 1)} {op} {self.bexpr(Tensor('bool', self.bshape(t.shape)), s, d - 1)})"
        self.note("op:logic")
        return f"(not {self.bexpr(t, s, d - 1)})"

    # ---- distributions and random choices

    def positive(self, t: Tensor, s: Scope, d: int) -> str:
        if not t.shape and self.chance(0.3):
            return self.pick(("1.0", "0.5", "2.0"))
        x = self.fexpr(t, s, d)
        return self.pick((f"(softplus({x}) + 0.1)", f"exp(0.5 * tanh({x}))", f"({x} * {x} + 0.5)"))

    def categories(self, s: Scope, static: bool = False):
        return self.pick((2, 3, 4)) if static or self.chance(0.6) else self.dim(s.dims, 0.0)

    def dist(self, family: str, batch: tuple, s: Scope, d: int, static: bool = False) -> tuple[str, Tensor]:
        """A distribution of `family` with batch shape `batch` and the type of its draws."""
        f = Tensor("f32", batch)

        def sub() -> Tensor:
            return Tensor("f32", self.bshape(batch))

        s = s.child(draw=False, pre=None)
        kw = self.chance(0.3)
        if family in ("Normal", "LogNormal", "Gumbel"):
            loc, scale = self.fexpr(f, s, d), self.positive(sub(), s, d)
            return (f"{family}(loc={loc}, scale={scale})" if kw else f"{family}({loc}, {scale})"), f
        if family == "Uniform":
            return f"Uniform(-{self.positive(f, s, d)}, {self.positive(sub(), s, d)})", f
        if family in ("Exponential", "Poisson"):
            return f"{family}({self.positive(f, s, d)})", f
        if family in ("Gamma", "Beta"):
            return f"{family}({self.positive(f, s, d)}, {self.positive(sub(), s, d)})", f
        if family == "Bernoulli":
            logits = self.fexpr(f, s, d)
            return (f"Bernoulli(probs=sigmoid({logits}))" if kw else f"Bernoulli(logits={logits})"), f
        c = self.categories(s, static)
        e = Tensor("f32", batch + (c,))
        if family == "Dirichlet":
            return f"Dirichlet({self.positive(e, s, d)})", e
        if family == "MixtureNormal":
            return (f"MixtureNormal({self.fexpr(e, s, d)}, {self.fexpr(e, s, d)}, "
                    f"{self.positive(e, s, d)})"), f
        logits = self.fexpr(e, s, d)
        text = f"{family}(probs=softmax({logits}))" if kw else f"{family}(logits={logits})"
        return text, (Tensor("i32", batch) if family == "Categorical" else e)

    def draw_value(self, family: str, t: Tensor, s: Scope, d: int) -> str:
        """A value in (or near) the support of `family`, of the draws' type `t`."""
        if t.dtype == "i32":
            return self.iexpr(t, s, d)
        x = self.fexpr(t, s, d)
        return {"Bernoulli": f"step({x})", "Poisson": f"floor(abs({x}))", "Beta": f"sigmoid({x})",
                "Dirichlet": f"softmax({x})", "OneHotCategorical": f"argmax({x})",
                "Exponential": f"exp({x})", "Gamma": f"exp({x})", "LogNormal": f"exp({x})",
                }.get(family, x)

    def f_dist_builtin(self, t, s, d):
        r = self.rng.random()
        families = [f for f in FAMILIES if f not in ("Dirichlet", "OneHotCategorical")]
        if r < 0.45:
            family = self.pick(families)
            text, dt = self.dist(family, t.shape, s, d - 1)
            self.note("builtin:log_prob")
            return f"log_prob({text}, {self.draw_value(family, dt, s, d - 1)})"
        family = self.pick([f for f in families if f != "MixtureNormal"])
        if r < 0.65:
            self.note("builtin:entropy")
            return f"entropy({self.dist(family, t.shape, s, d - 1)[0]})"
        if r < 0.85:
            self.note("builtin:kl")
            return f"kl({self.dist(family, t.shape, s, d - 1)[0]}, {self.dist(family, t.shape, s, d - 1)[0]})"
        family = self.pick([f for f in families if f != "Categorical"])
        self.note("builtin:mean-of-distribution")
        return f"mean({self.dist(family, t.shape, s, d - 1)[0]})"

    def estimator(self, family: str, batch: tuple, static: bool, s: Scope) -> str | None:
        """An annotation for a draw of `family` (None: the compiler chooses)."""
        if self.odd and self.chance(0.2):
            return self.pick(("reparam", "enum", "mvd", "arm", "swor(k=2)", "unordered(k=9)",
                              "score(baseline=loo)", "score(baseline=ma)", "gumbel(tau=0.0)",
                              "dreg", "score(baseline=vimco)", "rebar(tau=-1.0)", "frobnicate"))
        if self.chance(0.35):
            return None
        options = ["auto", "auto(enum_max=4)"]
        if family in PATHWISE:
            options += ["reparam"] * 3
            if s.lme and s.top and family in ("Normal", "LogNormal", "Gumbel", "Exponential"):
                options += ["dreg"] * 3
        if family != "Uniform":
            baselines = ["auto", "none"]
            if s.samples >= 2 and not s.lme:
                baselines += ["loo", "loo", "grpo"]
            if s.own and not s.lme and s.fn.branched not in ("relax",):
                baselines += ["ma"]
            if s.lme and s.samples >= 2:
                baselines += ["vimco", "vimco"]
            b = self.pick(baselines)
            extra = ", decay=0.8" if b == "ma" and self.chance(0.5) else ""
            extra += self.pick(("", "", ", credit=downstream", ", credit=whole"))
            options += [f"score(baseline={b}{extra})"] * 3 + ["score"]
        if family in ("Bernoulli", "OneHotCategorical"):
            options += ["gumbel", "gumbel(tau=0.5)", "st_gumbel", "st_gumbel(tau=2.0)"]
        if s.top and s.samples <= 4 and not s.lme:
            unbatched = not batch
            if family in ("Bernoulli", "Categorical", "OneHotCategorical") and unbatched and static \
                    and s.fn.branched in (None, "enum"):
                options += ["enum"] * 3
            if s.fn.branched is None:
                if family in ("Normal", "Bernoulli") and unbatched:
                    options += ["mvd"] * 3
                if family == "Bernoulli":
                    options += ["arm", "disarm", "rebar", "rebar(eta=0.5, tau=1.0)", "relax"] * 2
                if family in ("Categorical", "OneHotCategorical") and unbatched and static:
                    options += ["swor(k=2)", "swor(k=2, baseline=normalized)", "unordered(k=2)",
                                "rao_blackwell(k=1)"] * 2
        choice = self.pick(options)
        name = choice.split("(")[0]
        if name in ("enum", "mvd", "arm", "disarm", "rebar", "relax", "swor", "unordered",
                    "rao_blackwell"):
            s.fn.branched = name
        if name == "relax":
            choice = f"relax(control={self.control_variate(batch, s)}{self.pick(('', ', lr=0.05', ', eta=0.5, tau=1.0'))})"
        return choice

    def control_variate(self, batch: tuple, s: Scope) -> str:
        """A RELAX control variate `fn r(psi: T, s: draws) -> f32` (generated now)."""
        name = self.fresh("ctl")
        psi_t = self.pick([self.tensor(s.dims & set(batch) if batch else frozenset())]
                          + [x for x in self.structs if all_float(x) and not dims_of(x)])
        params = [("psi", psi_t), ("s", Tensor("f32", batch))]
        self.function(name, params, F32, depth=2)
        return name

    def draw_stmt(self, s: Scope, d: int) -> str:
        family = self.pick(FAMILIES)
        batch = () if self.chance(0.6) else self.tensor(s.dims, rank=self.pick((1, 1, 2))).shape
        static = self.chance(0.7)
        est = self.estimator(family, batch, static, s)
        if est == "dreg" and family in PATHWISE and s.pre is not None:
            # the parameters as variables, so that the objective's log_prob(d, z) is of this d
            params = [self.fresh("d") for _ in range(2)]
            inner = s.child(draw=False, pre=None)
            self.hoist(s, f"let {params[0]} = {self.fexpr(Tensor('f32', batch), inner, d)}")
            self.hoist(s, f"let {params[1]} = {self.positive(Tensor('f32', batch), inner, d)}")
            text = f"{family}({params[1]})" if family == "Exponential" else f"{family}({', '.join(params)})"
            dt = Tensor("f32", batch)
        else:
            text, dt = self.dist(family, batch, s, d, static)
        name = self.fresh("z")
        s.vars[name] = dt
        s.fn.draws.append(name)
        s.fn.draws_any = True
        self.note(f"family:{family}", f"estimator:{(est or 'default').split('(')[0]}")
        if est == "dreg":
            s.fn.dreg.append((text, name))
        head = self.pick((f"{name} ~", f"let {name} ~"))
        return f"{head} {text}" + (f" with {est}" if est else "")

    # ---- expressions with regions

    def hoist(self, s: Scope, stmt: str) -> bool:
        """Emit `stmt` before the statement being generated (False where that is not possible)."""
        if s.pre is None:
            return False
        s.pre.append(stmt)
        return True

    def f_expect(self, t, s, d):
        if not s.draw:
            return None
        n = self.pick((1, 2, 3))
        s.fn.draws_any = True  # an expectation makes its function random (it takes a key)
        lme = not t.shape and self.chance(0.3)
        inner = self.enter(s, samples=n, lme=lme, own=False, top=False, pre=None)
        body = self.fexpr(t, inner, d - 1)
        self.note("op:logmeanexp-in-body" if lme else "op:expect-in-body")
        return f"{'logmeanexp' if lme else 'expect'}({body}, samples={n})"

    def stmts(self, s: Scope, n: int, d: int) -> list[str]:
        """n statements in the block of scope `s` (hoisted ones included)."""
        out: list[str] = []
        for _ in range(n):
            s.pre = []
            r = self.rng.random()
            if r < 0.3 and s.draw:
                stmt = self.draw_stmt(s, d)
            elif r < 0.4:
                t = self.value_type(s.dims)
                if isinstance(t, Tup):
                    names = [self.fresh() for _ in t.elems]
                    stmt = f"let ({', '.join(names)}) = {self.expr(t, s, d)}"
                    s.vars.update(zip(names, t.elems))
                    self.note("tuple:destructure")
                else:
                    name = self.fresh()
                    stmt = f"let {name} = {self.expr(t, s, d)}"
                    s.vars[name] = t
            elif r < 0.45:
                stmt = self.report_stmt(s, d)
            elif r < 0.55 and self.callable_in(s):  # bind the result of a user function
                f = self.pick(self.callable_in(s))
                name = self.fresh()
                stmt = f"let {name} = {f.name}({', '.join(self.expr(t, s, d - 1) for _, t in f.params)})"
                s.vars[name] = f.ret
                s.fn.draws_any |= f.draws
                s.fn.calls_externs |= f.externs
                self.note("call:user")
            elif r < 0.5 and s.vars:  # rebind a name with a value of its type
                name, t = self.pick(list(s.vars.items()))
                if name in s.fn.draws or "." in name:
                    continue
                stmt = f"let {name} = {self.expr(t, s, d)}"
                self.note("let:rebind")
            else:
                t = self.tensor(s.dims)
                name = self.fresh()
                stmt = f"let {name} = {self.expr(t, s, d)}"
                s.vars[name] = t
            out += s.pre + [stmt]
        s.pre = []
        return out

    def f_for(self, t, s, d):
        n = self.pick((1, 2, 3)) if self.chance(0.7) or not s.dims else self.pick(sorted(s.dims))
        i = self.fresh("i")
        carries = [(self.fresh("c"), t)]
        if self.chance(0.3):
            carries.append((self.fresh("c"), self.value_type(s.dims)))
        inits = [f"{c} = {self.expr(ct, s, d - 1)}" for c, ct in carries]
        body = self.enter(s, pre=[], top=False)
        body.vars[i] = I32
        body.vars.update(carries)
        body.indent = s.indent + 1
        stmts = self.stmts(body, self.rng.randrange(0, 3), d - 1)
        body.pre = []
        nexts = [self.expr(ct, body, d - 1) for _, ct in carries]
        stmts += body.pre
        last = nexts[0] if len(nexts) == 1 else f"({', '.join(nexts)})"
        rng_text = f"range({n})" if self.chance(0.8) else f"range(0, {n})"
        loop = f"for {i} in {rng_text} carry ({', '.join(inits)}) {self.block(body, stmts, last)}"
        self.note("op:for")
        if self.chance(0.2):
            k = self.pick((1, 2, 5))
            loop += f" with truncated(k={k})"
            self.note("memory:truncated")
        if len(carries) == 1:
            return f"({loop})" if self.chance(0.5) else loop
        names = [self.fresh() for _ in carries]
        if not self.hoist(s, f"let ({', '.join(names)}) = {loop}"):
            return None
        s.vars.update((nm, ct) for nm, (_, ct) in zip(names, carries))
        return names[0]

    def f_checkpoint(self, t, s, d):
        body = self.enter(s, pre=[], indent=s.indent + 1, top=False)
        stmts = self.stmts(body, self.rng.randrange(0, 3), d - 1)
        body.pre = []
        last = self.fexpr(t, body, d - 1)
        self.note("memory:checkpoint")
        return f"checkpoint {self.block(body, stmts + body.pre, last)}"

    def solver(self, method_kind: str) -> tuple[str, str]:
        """(solver text, its name)."""
        name = self.pick(SOLVERS)
        if method_kind in ("unrolled", "truncated") and not self.odd:
            name = self.pick(("gd", "momentum", "adam", "projected"))
        steps = self.pick((2, 3, 5, 10, 20))
        opts = [f"steps={steps}"] if self.chance(0.8) else []
        if name in ("gd", "momentum", "projected") and self.chance(0.6):
            opts.append(f"lr={self.pick(('0.1', '0.05', '0.3'))}")
        if name == "momentum" and self.chance(0.5):
            opts.append("beta=0.5")
        if name == "adam" and self.chance(0.5):
            opts += ["lr=0.05", "b1=0.9"]
        if name == "lbfgs" and self.chance(0.5):
            opts.append(f"memory={self.pick((1, 3, 10))}")
        if name == "newton_cg" and self.chance(0.5):
            opts.append(f"iters={self.pick((1, 3, 5))}")
        if name == "projected":
            opts += ["lower=-1.0", "upper=1.0"] if not (self.odd and self.chance(0.5)) else ["lower=1.0"]
        if method_kind != "unrolled" and self.chance(0.2):
            opts.append(f"tol={self.pick(('1e-4', '0.01'))}")
        self.note(f"solver:{name}")
        return f"{name}({', '.join(opts)})" if opts or self.chance(0.5) else name, name

    def method(self, constrained: bool, nested: bool) -> str:
        """A hypergradient method kind: implicit, value_function, unrolled, truncated or none."""
        kinds = ["none", "unrolled", "truncated", "value_function"]
        if not constrained:
            kinds += ["implicit"] * 3
        if nested and not self.odd:
            kinds = ["unrolled", "truncated"]
        return self.pick(kinds)

    def method_text(self, kind: str) -> str:
        if kind == "implicit":
            lin = self.pick(("cg", "gmres", "neumann"))
            opts = [lin] + [o for o in (f"iters={self.pick((2, 5, 30))}", "tol=1e-5", "damping=0.1")
                            if self.chance(0.3)]
            if lin == "cg" and len(opts) == 1 and self.chance(0.5):
                self.note("hypergrad:implicit-cg")
                return "implicit"
            self.note(f"hypergrad:implicit-{lin}")
            return f"implicit({', '.join(opts)})"
        self.note(f"hypergrad:{kind}")
        if kind == "value_function":
            return self.pick(("value_function", "value_function(sigma=0.05)", "value_function(sigma=0.1, steps=3)"))
        if kind == "truncated":
            return f"truncated(k={self.pick((1, 2))})"
        return "unrolled"

    def argmin_text(self, var: str, vt: Type, init: str, s: Scope, d: int, nested_only: bool) -> str:
        """`argmin v: T = init { ... } via ... [subject to ...] [with ...]`, objective over v."""
        constrained = isinstance(vt, Tensor) and self.chance(0.25)
        kind = self.method(constrained, nested_only)
        solver, sname = self.solver(kind)
        if constrained and sname not in CONSTRAINED and not self.odd:
            solver, sname = "gd(steps=5)", "gd"
        effective = kind if kind != "none" else ("value_function" if constrained else "implicit")
        body = self.enter(s, draw=False, extern=False, pre=[], indent=s.indent + 1, top=False,
                          nested=effective == "implicit" or sname == "newton_cg")
        body.vars[var] = vt
        stmts = self.stmts(body, self.rng.randrange(0, 2), min(d - 1, 2))
        body.pre = []
        leaves = tensor_leaves(var, vt)
        terms = [f"0.5 * sum(({x} - {self.fexpr(ft, body, min(d - 1, 1))}) ^ 2)" for x, ft in leaves]
        extra = self.fexpr(Tensor("f32", self.tensor(body.dims).shape), body, min(d - 1, 2))
        terms.append(f"0.1 * sum(tanh({extra}))")
        objective = " + ".join(terms)
        stmts += body.pre
        maximize = self.chance(0.2)
        head = "argmax" if maximize else "argmin"
        if maximize:
            objective = f"-({objective})"
        text = f"{head} {var}: {vt} = {init} {self.block(body, stmts, objective)} via {solver}"
        if constrained:
            cs = []
            for _ in range(self.pick((1, 1, 2))):
                side = self.fexpr(Tensor("f32", self.bshape(vt.shape)), s.child(pre=None), 1)
                cs.append(self.pick((f"{var} <= {side} + 1.0", f"{var} >= -1.0", f"sum({var}) <= 2.0")))
            if self.chance(0.3):
                solver_with_rho = solver.replace("(", "(rho=0.5, ", 1) if "(" in solver else f"{solver}(rho=0.5)"
                text = text.replace(f"via {solver}", f"via {solver_with_rho}")
            text += " subject to " + ", ".join(cs)
            self.note("argmin:subject-to")
        if kind != "none":
            text += f" with {self.method_text(kind)}"
        self.note(f"argmin:{head}")
        return text

    def f_argmin(self, t, s, d):
        if t.dtype != "f32":
            return None
        nested_only = bool(s.nested)
        var = self.fresh("q")
        structs = [x for x in self.structs if all_float(x) and dims_of(x) <= s.dims
                   and any(f == t for _, f in x.fields)]
        if structs and s.pre is not None and self.chance(0.3):
            st = self.pick(structs)
            field_name = next(n for n, f in st.fields if f == t)
            init = self.struct_expr(st, s.child(pre=None), 1)
            w = self.fresh("w")
            self.hoist(s, f"let {w} = {self.argmin_text(var, st, init, s, d, nested_only)}")
            s.vars[w] = st
            self.note("argmin:struct")
            return f"{w}.{field_name}"
        if self.odd and not t.shape and self.chance(0.3):
            init = "0"
            self.note("argmin:int-init")
        else:
            init = self.fexpr(t, s.child(pre=None), 1) if self.chance(0.5) else self.const(t, s)
        return f"({self.argmin_text(var, t, init, s, d, nested_only)})"

    def report_stmt(self, s: Scope, d: int) -> str:
        """`argmin ... as (w, report)`, binding the solution and the solver's report."""
        t = self.tensor(s.dims)
        var, w, rep = self.fresh("q"), self.fresh("w"), self.fresh("rep")
        init = self.const(t, s)
        text = self.argmin_text(var, t, init, s, d, bool(s.nested))
        s.vars[w] = t
        s.vars[f"{rep}.residual"] = F32
        s.vars[f"{rep}.steps"] = I32
        self.note("argmin:report")
        return f"{text} as ({w}, {rep})"

    # ---- externs and the standard library

    def extern_call(self, t: Tensor, s: Scope, d: int) -> str | None:
        """A call of a new `extern fn` returning `t` (or a tuple holding it), bound to NumPy."""
        name = self.fresh("ext")
        params = [Tensor(t.dtype if t.dtype != "bool" else "f32", t.shape)]
        for _ in range(self.rng.randrange(0, 2)):
            params.append(self.tensor(s.dims, self.pick(("f32", "i32"))))
        result: Type = t
        if self.chance(0.25) and s.pre is not None:
            result = Tup((t, F32))
        batched = self.chance(0.3)
        self.extern_decls.append(f"extern fn {name}({', '.join(f'a{i}: {p}' for i, p in enumerate(params))}) -> {result}")
        self.externs[name] = extern_binding(params, result, batched)
        self.note("extern:batched" if batched else "extern:plain")
        call = f"{name}({', '.join(self.expr(p, s, d - 1) for p in params)})"
        if result == t:
            return call
        a, b = self.fresh(), self.fresh()
        self.hoist(s, f"let ({a}, {b}) = {call}")
        s.vars[a], s.vars[b] = t, F32
        return a

    def layer(self, s: Scope, out) -> str | None:
        """A std.nn Dense layer with output size `out`: a variable or a constructor."""
        names = [n for n, v in s.vars.items() if isinstance(v, Struct) and v.name.startswith("Dense[")
                 and v.fields[1][1].shape == (out,)]
        if names:
            return self.pick(names)
        return None

    def stdlib_call(self, t: Tensor, s: Scope, d: int) -> str | None:
        if t.dtype != "f32":
            return None
        u, options = self.uses, []
        e = lambda shape: self.fexpr(Tensor("f32", shape), s, d - 1)  # noqa: E731
        a, b = self.dim(s.dims), self.dim(s.dims)
        if t == F32:
            if "nn" in u:
                options += [lambda: f"l2({e((a, b))})",
                            lambda: f"accuracy({e((a, b))}, {self.iexpr(Tensor('i32', (a,)), s, d - 1)})"]
            if "ot" in u:
                options += [lambda: f"wasserstein_1d({e((a,))}, {e((a,))})",
                            lambda: f"ot.gaussian_lower_mean({e((a, b))}, {e((a, b))})"]
            if "rl" in u:
                options += [lambda: f"kl_k3({e((a, b))}, {e((a, b))})",
                            lambda: f"rloo_surrogate({e((a, b))}, {e((a, b))})"]
        if len(t.shape) == 1:
            if "rl" in u:
                options += [lambda: f"{self.pick(('rloo_advantages', 'grpo_advantages'))}({e(t.shape)})"]
            if "bilevel" in u:
                options += [lambda: f"ridge_fit_shared({e(())}, {e((a, t.shape[0]))}, {e((a,))})"]
            if "vi" in u:
                options += [lambda: f"kl_std_normal({e((t.shape[0], b))}, exp({e((t.shape[0], b))}))"]
        if len(t.shape) == 2:
            layer = self.layer(s, t.shape[1])
            if "nn" in u and layer is not None:
                var = next(v for n, v in s.vars.items() if n == layer)
                fn = self.pick(("dense", "dense_tanh", "dense_relu", "nn.dense"))
                options += [lambda: f"{fn}({layer}, {e((t.shape[0], var.fields[0][1].shape[0]))})"]
            if "quant" in u:
                options += [lambda: f"{self.pick(('ste4_w', 'reste1_w', 'q2_w', 'ste1_w', 'hardtanh'))}({e(t.shape)})"]
        if not options:
            return None
        self.note("call:stdlib")
        return self.pick(options)()

    # ---- functions

    def function(self, name: str, params: list, ret: Type, depth: int, callable_: bool = False,
                 deep: tuple | None = None, **flags) -> FnInfo:
        """Generate `fn name(params) -> ret { ... }` and add it to the program."""
        dims = frozenset().union(*(dims_of(t) for _, t in params)) if params else frozenset()
        fn = FnState()
        flags["top"] = flags.get("top", False) and ret == F32  # branched estimators need a scalar
        s = Scope(vars=dict(params), dims=dims, fn=fn, indent=0, pre=[], **flags)
        stmts = []
        for pname, pt in params:
            if isinstance(pt, Tup) and self.chance(0.7):
                names = [self.fresh() for _ in pt.elems]
                stmts.append(f"let ({', '.join(names)}) = {pname}")
                s.vars.update(zip(names, pt.elems))
                self.note("tuple:param")
        if s.draw and s.top and self.chance(0.8):
            s.pre = []
            stmt = self.draw_stmt(s, depth)
            stmts += s.pre + [stmt]
        stmts += self.stmts(s, self.rng.randrange(0, 4), depth)
        s.pre = []
        result = self.expr(ret, s, depth)
        if ret == F32:
            if deep is not None:
                result = self.deep(result, s, *deep)
            for z in fn.draws:
                if self.chance(0.5) and isinstance(s.vars.get(z), Tensor):
                    result = f"{result} + mean(f32({z}))"
            for text, z in fn.dreg:
                result = f"{result} - sum(log_prob({text}, {z}))"
        stmts += s.pre
        signature = ", ".join(f"{n}: {t}" for n, t in params)
        self.fn_decls.append(f"fn {name}({signature}) -> {ret} {self.block(s, stmts, 'return ' + result)}")
        info = FnInfo(name, list(params), ret, fn.draws_any, fn.calls_externs)
        if callable_:
            self.functions[name] = info
        return info

    def deep(self, x: str, s: Scope, kind: str, n: int) -> str:
        """`x` nested `n` levels deep by one construct (a parse, build and pass stress test)."""
        self.note(f"deep:{kind}")
        self.depth = max(self.depth, n)
        leaf = self.leaf(F32, s)
        if kind == "parens":
            return "(" * n + x + ")" * n
        if kind == "unary":
            return "tanh(" * n + x + ")" * n
        if kind == "neg":
            return "-" * n + f"({x})"
        if kind == "calls":
            prev = None
            for _ in range(n):
                name = self.fresh("deep")
                body = "tanh(v)" if prev is None else f"{prev}(v) + 0.5"
                self.fn_decls.append(f"fn {name}(v: f32) -> f32 {{ return {body} }}")
                prev = name
            return f"{x} + {prev}({leaf})"
        e = x
        for k in range(n):
            if kind == "binary":
                e = f"({leaf} + {e})"
            elif kind == "if":
                e = f"(if {leaf} > 0.0 then {e} else {leaf})"
            elif kind == "for":
                c = self.fresh("c")
                e = f"for {self.fresh('i')} in range(1) carry ({c} = {leaf}) {{ {c} + {e} }}"
            elif kind == "checkpoint":
                e = f"checkpoint {{ {e} }}"
            elif kind == "expect":
                e = f"expect({e}, samples=1)"
            elif kind == "argmin":
                q = self.fresh("q")
                e = f"(argmin {q}: f32 = 0.0 {{ 0.5 * ({q} - {e}) ^ 2 }} via gd(steps=2) with unrolled)"
        return e

    def names(self, n: int, special: bool) -> list[str]:
        pool = ["x", "y", "w", "t", "a", "b", "m", "u", "theta", "lam", "p", "r", "g", "h"]
        names = self.rng.sample(pool, n)
        if special and self.chance(0.05):
            names[self.rng.randrange(n)] = self.pick(SPECIAL_NAMES)
            self.note("param:special-name")
        return names

    def params(self, n: int, dims: frozenset, special: bool = True, exclude=()) -> list:
        """n parameters of random types over `dims`, at least one a wrt candidate."""
        names = [x for x in self.names(n + len(exclude), special) if x not in exclude][:n]
        types = [self.value_type(dims) for _ in names]
        if types and not any(all_float(t) for t in types):
            types[0] = self.tensor(dims)
        return list(zip(names, types))

    def wrt(self, params: list) -> str:
        candidates = [n for n, t in params if all_float(t)]
        chosen = self.rng.sample(candidates, self.rng.randrange(1, len(candidates) + 1))
        if self.odd and self.chance(0.1):
            chosen.append(self.pick([n for n, _ in params]))
        return f"wrt=[{', '.join(chosen)}]"

    def struct_decl(self, dims: frozenset) -> None:
        name = f"S{len(self.struct_decls)}"
        fields = []
        for i in range(self.rng.randrange(1, 4)):
            nested = [x for x in self.structs if "[" not in x.name or x.name.startswith("Dense[")]
            if nested and self.chance(0.2):
                fields.append((f"f{i}", self.pick(nested)))
            else:
                fields.append((f"f{i}", self.tensor(dims, "f32" if self.chance(0.85) else "i32")))
        text = ", ".join(f"{n}: {t}" for n, t in fields)
        self.struct_decls.append(f"struct {name} {{ {text} }}")
        st = Struct(name, tuple(fields))
        self.structs.append(st)
        free = sorted(dims_of(st))
        if free and self.chance(0.4):  # a use that binds the struct's dims
            old = self.pick(free)
            new = self.dim(dims, 0.3)
            self.structs.append(Struct(f"{name}[{old}={new}]", substitute(st.fields, {old: new})))
            self.note("struct:dim-binding")

    def body_depth(self) -> int:
        return self.rng.choices((1, 2, 3, 4), (20, 40, 30, 10))[0]

    # ---- exports

    def program(self) -> Program:
        rng = self.rng
        dims = frozenset(rng.sample(DIM_NAMES, rng.randrange(1, 4)))
        self.uses = [m for m in STD_MODULES if self.chance(0.07)]
        for m in self.uses:
            self.note(f"use:std.{m}")
        if "nn" in self.uses:
            for _ in range(2):
                i, o = self.dim(dims), self.dim(dims)
                self.structs.append(Struct(f"Dense[I={i}, O={o}]",
                                           (("w", Tensor("f32", (i, o))), ("b", Tensor("f32", (o,))))))
        if self.chance(0.1):
            self.pragmas.append("pragma estimator " + self.pick(
                ("auto(enum_max=4)", "score(baseline=none)", "reparam", "score(baseline=loo)", "auto")))
            self.note("pragma:estimator")
        if self.chance(0.08):
            self.pragmas.append("pragma backward " + self.pick(("ste", "ste(clip=1.0)", "reste", "trust")))
            self.note("pragma:backward")
        for _ in range(rng.choices((0, 1, 2), (50, 35, 15))[0]):
            self.struct_decl(dims)
        kind = rng.choices(PLANS, [w for _, w in PLAN_WEIGHTS])[0]
        self.kind = kind
        deep = None
        if self.chance(0.06):
            dkind = self.pick(("parens", "unary", "neg", "binary", "if", "for", "checkpoint",
                               "expect", "argmin", "calls"))
            cap = {"argmin": 5, "for": 48, "checkpoint": 64, "expect": 48, "calls": 128}.get(dkind, 512)
            n = self.pick((8, 15, 16, 17, 24, 31, 32, 33, 48, 63, 64, 65, 128, 512))
            deep = (dkind, min(n, cap))
        self.deep_spec = deep
        allow_draw = kind not in ("compose_f",)
        allow_extern = kind in ("fn", "blackbox")
        for i in range(rng.choices((0, 1, 2, 3), (30, 35, 25, 10))[0]):
            hp = self.params(rng.randrange(1, 4), dims, special=False)
            hdims = frozenset().union(*(dims_of(t) for _, t in hp))
            self.function(f"h{i}", hp, self.value_type(hdims), self.body_depth(), callable_=True,
                          draw=allow_draw and self.chance(0.4),
                          extern=allow_extern and self.chance(0.3))
        getattr(self, f"plan_{kind}")(dims)
        self.note(f"plan:{kind}")
        source = "\n".join(
            [f"use std.{m}" for m in self.uses] + self.pragmas + self.struct_decls
            + self.extern_decls + self.fn_decls + self.exports) + "\n"
        if self.odd and self.chance(0.6):
            source = self.odd_options(source)
        return Program(self.seed, source, dict(self.sizes), dict(self.externs), self.features,
                       self.depth, getattr(self, "_deep_used", False))

    def odd_options(self, source: str) -> str:
        """One or two `name=number` options (of builtins, estimators, solvers, exports) set to
        an odd value: zero, negative, huge, tiny, out of range."""
        found = list(re.finditer(r"\b([a-z_]+)=(-?\d[\d.e+-]*)", source))
        for m in sorted(self.rng.sample(found, min(len(found), self.pick((1, 2)))),
                        key=lambda m: -m.start()):
            source = source[:m.start(2)] + self.pick(ODD_OPTIONS) + source[m.end(2):]
            self.note(f"odd-option:{m.group(1)}")
        return source

    def export(self, text: str, tag: str) -> None:
        self.exports.append(f"export e{len(self.exports)} = {text}")
        self.note(f"export:{tag}")

    def objective(self, dims, ret: Type = F32, special: bool = True, params=None, **flags):
        params = params or self.params(self.rng.randrange(1, 4), dims, special)
        deep = self.deep_spec if ret == F32 and not getattr(self, "_deep_used", False) else None
        self._deep_used = deep is not None or getattr(self, "_deep_used", False)
        return self.function(self.fresh("f"), params, ret, self.body_depth(), deep=deep, **flags)

    def maybe_plain(self, f: FnInfo) -> None:
        """Sometimes export the objective itself, or its gradient by a black-box estimator, too."""
        if self.chance(0.25):
            self.export(f.name, "fn")
        if self.chance(0.1) and any(all_float(t) for _, t in f.params):
            self.export(self.transform("grad", f.name, self.wrt(f.params), self.black_box()), "grad(by=black-box)")

    def plan_fn(self, dims):
        params = self.params(self.rng.randrange(1, 4), dims)
        pdims = frozenset().union(*(dims_of(t) for _, t in params))
        f = self.objective(dims, ret=self.value_type(pdims), params=params,
                           draw=self.chance(0.5), top=True, extern=True)
        self.export(f.name, "fn")

    def plan_grad(self, dims):
        f = self.objective(dims, draw=self.chance(0.3), top=True, own=True)
        kind = self.pick(("grad", "value_and_grad"))
        self.export(f"{kind}({f.name}, {self.wrt(f.params)})", kind)
        self.maybe_plain(f)

    def plan_expect(self, dims):
        params = self.params(self.rng.randrange(1, 4), dims)
        pdims = frozenset().union(*(dims_of(t) for _, t in params))
        n = self.pick((1, 2, 3, 4))
        f = self.objective(dims, ret=self.tensor(pdims), params=params, draw=True, top=True,
                           samples=n, own=True)
        self.export(f"expect({f.name}, samples={n})", "expect")

    def plan_grad_expect(self, dims):
        n = self.pick((1, 2, 3, 4))
        f = self.objective(dims, draw=True, top=True, samples=n, own=True)
        kind = self.pick(("grad", "value_and_grad"))
        self.export(f"{kind}(expect({f.name}, samples={n}), {self.wrt(f.params)})", f"{kind}(expect)")
        self.maybe_plain(f)

    def plan_lme(self, dims):
        n = self.pick((1, 2, 3))
        f = self.objective(dims, draw=True, top=True, samples=n, lme=True)
        inner = f"logmeanexp({f.name}, samples={n})"
        kind = self.pick(("bare", "grad", "value_and_grad"))
        if kind == "bare":
            self.export(inner, "logmeanexp")
        else:
            self.export(f"{kind}({inner}, {self.wrt(f.params)})", f"{kind}(logmeanexp)")

    def black_box(self) -> str:
        name = self.pick(("spsa", "es", "eggroll"))
        self.note(f"by:{name}")
        if name == "spsa":
            return self.pick(("spsa", "spsa(eps=0.001)", "spsa(eps=0.01, samples=2)"))
        pop = self.pick((2, 4, 8))
        opts = [f"sigma={self.pick(('0.1', '0.05'))}", f"pop={pop}"]
        if name == "eggroll" and self.chance(0.5):
            opts.append(f"rank={self.pick((1, 2))}")
        if self.chance(0.3):
            opts.append("antithetic=false")
        return f"{name}({', '.join(opts)})"

    def step_kind(self) -> str:
        return self.pick(("grad", "value_and_grad", "descend"))

    def transform(self, kind: str, inner: str, wrt: str, by: str | None) -> str:
        by_text = f", by={by}" if by else ""
        if kind == "descend":
            lr = self.pick((", lr=0.1", ", lr=0.01", ""))
            return f"descend({inner}, {wrt}{lr}{by_text})"
        return f"{kind}({inner}, {wrt}{by_text})"

    def plan_blackbox(self, dims):
        f = self.objective(dims, draw=self.chance(0.3), top=True, own=True, extern=True)
        kind = self.step_kind()
        self.export(self.transform(kind, f.name, self.wrt(f.params), self.black_box()), f"{kind}(by=black-box)")
        self.maybe_plain(f)

    def plan_dp(self, dims):
        batch = self.pick(sorted(dims))
        axis = self.pick((0, 0, 1))
        rest = frozenset(dims - {batch})
        params = []
        names = self.names(5, special=False)
        k, m = self.dim(rest), self.dim(rest)
        params.append((names[0], Tensor("f32", (k, m))))
        if self.chance(0.5):
            params.append((names[1], self.tensor(rest)))
        lead = () if axis == 0 else (self.dim(rest),)
        params.append((names[2], Tensor("f32", lead + (batch, k))))
        if self.chance(0.5):
            params.append((names[3], Tensor(self.pick(("f32", "i32")), lead + (batch,))))
        if self.chance(0.3):
            params.append((names[4], F32))
        params = params[2:] + params[:2]  # the examples come first: they set the batch dim
        x, w = names[2], names[0]
        f = self.objective(dims, params=params, draw=self.chance(0.2), top=True)
        if self.chance(0.7):  # a linear layer: ghost clipping applies
            decl = self.fn_decls[-1]
            self.fn_decls[-1] = decl.replace("  return ", f"  return mean(tanh({x} @ {w})) + ", 1)
            self.note("dp:linear-layer")
        opts = [f"clip={self.pick(('1.0', '0.5'))}", f"noise={self.pick(('1.1', '0.0', '0.5'))}"]
        if axis or self.chance(0.3):
            opts.append(f"per_example_axis={axis}")
        if self.chance(0.3):
            opts.append(f"clipping={self.pick(('ghost', 'per_example'))}")
        wrt = [n for n, t in params if all_float(t) and batch not in dims_of(t)]
        wrt = self.rng.sample(wrt, self.rng.randrange(1, len(wrt) + 1))
        kind = self.step_kind()
        self.export(self.transform(kind, f.name, f"wrt=[{', '.join(wrt)}]", f"dp({', '.join(opts)})"),
                    f"{kind}(by=dp)")

    def plan_descend(self, dims):
        n = self.pick((0, 2, 3))
        f = self.objective(dims, draw=n > 0 or self.chance(0.2), top=True, samples=max(n, 1), own=True)
        inner = f"expect({f.name}, samples={n})" if n else f.name
        self.export(self.transform("descend", inner, self.wrt(f.params), None), "descend")

    def plan_minimize(self, dims):
        params = self.params(self.rng.randrange(1, 4), dims)
        items = []
        k = self.pick((2, 2, 3))
        for _ in range(k):
            scope = self.pick(("fn", "expect", "logmeanexp"))
            n = self.pick((1, 2, 3))
            f = self.objective(dims, params=params, draw=scope != "fn" or self.chance(0.2), top=True,
                               samples=n, lme=scope == "logmeanexp")
            items.append(f.name if scope == "fn" else f"{scope}({f.name}, samples={n})")
        rule = self.pick(("mgda", "mgda(solver=exact)", "mgda(solver=frank_wolfe, iters=10)",
                          "pcgrad", "pcgrad(shuffle=false)", "dynamic", "dynamic(temperature=2)",
                          "weights(" + ", ".join(self.pick(("0.5", "1.0", "0.0", "2")) for _ in items) + ")"))
        self.note(f"minimize:{rule.split('(')[0]}")
        self.export(f"minimize([{', '.join(items)}], {self.wrt(params)}, by={rule})", "minimize")

    def plan_compose(self, dims):
        n = self.pick((1, 2, 4))
        g_params = self.params(self.rng.randrange(1, 3), dims, exclude=("u",))
        gdims = frozenset().union(*(dims_of(t) for _, t in g_params))
        g = self.objective(dims, ret=self.tensor(gdims), params=g_params, draw=True, top=True, samples=n)
        others = []
        if self.chance(0.4):
            others.append(self.pick(g_params))
        used = {name for name, _ in g_params}
        for name, t in self.params(self.rng.randrange(0, 2), dims, exclude=tuple(used) + ("u",)):
            others.append((name, t))
        f_params = [("u", g.ret)] + others
        f = self.objective(dims, params=f_params, draw=False)
        by = self.pick(("scgd(beta=0.1)", "scgd", "plugin", None))
        self.note(f"compose:{(by or 'default').split('(')[0]}")
        inner = f"compose({f.name}, expect({g.name}, samples={n})" + (f", by={by})" if by else ")")
        kind = self.pick(("bare", "grad", "value_and_grad", "descend"))
        if kind == "bare":
            self.export(inner, "compose")
            return
        candidates = [nm for nm, t in g_params + others if all_float(t)]
        wrt = self.rng.sample(candidates, self.rng.randrange(1, len(candidates) + 1))
        self.export(self.transform(kind, inner, f"wrt=[{', '.join(dict.fromkeys(wrt))}]", None),
                    f"{kind}(compose)")


PLAN_WEIGHTS = (("fn", 10), ("grad", 12), ("expect", 8), ("grad_expect", 16), ("lme", 6),
                ("blackbox", 10), ("dp", 8), ("descend", 6), ("minimize", 8), ("compose", 8))
PLANS = [k for k, _ in PLAN_WEIGHTS]


def substitute(fields: tuple, mapping: dict) -> tuple:
    def sub(t: Type) -> Type:
        if isinstance(t, Tensor):
            return Tensor(t.dtype, tuple(mapping.get(d, d) for d in t.shape))
        if isinstance(t, Struct):
            return Struct(t.name, substitute(t.fields, mapping))
        return Tup(tuple(sub(e) for e in t.elems))

    return tuple((n, sub(t)) for n, t in fields)


def tensor_leaves(path: str, t: Type) -> list:
    """(field path, tensor type) of every tensor in a tensor or struct value."""
    if isinstance(t, Tensor):
        return [(path, t)]
    return [leaf for n, f in t.fields for leaf in tensor_leaves(f"{path}.{n}", f)]


def dims_of_params(f: FnInfo) -> set:
    return set().union(*(dims_of(t) for _, t in f.params)) if f.params else set()


def extern_binding(params: list, result: Type, batched: bool) -> Callable:
    """A NumPy function of the extern's declared types: the result's dims come from the
    arguments' shapes (leading batch axes too, for a `gradlang.batched` binding)."""

    def fn(*args):
        args = [np.asarray(a) for a in args]
        lead = args[0].shape[:args[0].ndim - len(params[0].shape)] if batched else ()
        env = {}
        for p, a in zip(params, args):
            for dim, n in zip(p.shape, a.shape[len(lead):]):
                if isinstance(dim, str):
                    env[dim] = n
        level = np.tanh(sum(float(np.sum(a, dtype=np.float64)) for a in args))

        def out(t: Tensor):
            shape = lead + tuple(env[x] if isinstance(x, str) else x for x in t.shape)
            dtype = {"f32": np.float32, "i32": np.int32, "bool": np.bool_}[t.dtype]
            return np.full(shape, level, dtype) if t.dtype == "f32" else np.zeros(shape, dtype)

        return tuple(out(e) for e in result.elems) if isinstance(result, Tup) else out(result)

    if batched:
        import gradlang
        return gradlang.batched(fn)
    return fn


def generate(seed: int) -> Program:
    return Gen(seed).program()
