"""Inner solvers for `argmin` (`via SOLVER(options)`), one frozen dataclass each, and the runner
that drives them as XLA loops on the flattened inner variable.

A solver's fields are its options (`gradlang.options`; every solver has `steps` and, but for
`sgd`, `tol`); beside them it declares its update `x, g, aux, k -> x', aux'` from the iterate x
and its gradient g, the auxiliary state the update carries (`init`), the solution it returns
(`returned`: the last iterate, or `sgd`'s average), whether it takes `subject to` constraints,
whether reverse mode can go through its loop and whether each step draws afresh. The
hypergradient pass checks and completes solvers through `SOLVERS` (`solver_of`); the lowering
of `argmin` builds the solver from the op's annotation the same way and runs it
(`estimators.hypergrads`).

One runner (`run`) drives every solver: a `fori_loop` of `steps` iterations, or, when
`tol > 0`, a `while_loop` that stops once the residual is at most `tol` (at most `steps`
iterations). With `subject to` constraints c(x) <= 0 the gradient is that of the Lagrangian
f + lam . c and the multipliers take a projected ascent step lam <- max(0, lam + rho c(x))
after each primal step (a first-order primal-dual method on the augmented Lagrangian). The
residual is the norm of the (projected) gradient, plus the constraint violation.

The problem of a solve that draws takes one key (`runtime.rules_argmin`). Every solver but
`sgd` evaluates the objective with that key at every step: the same samples throughout, a
sample-average approximation. `sgd` (`fresh_draws`) evaluates step k's gradient with
`fold_in(key, k)`: fresh samples at every step, so it solves the expected problem (stochastic
approximation, Robbins and Monro 1951), and the key itself is left to the hypergradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, make_dataclass
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from gradlang.ops import Annotation
from gradlang.options import OptionError, chosen, option
from gradlang.runtime.jax_functions import JaxFunctionError

Array = jax.Array


class Solver:
    """An inner solver; subclasses are frozen dataclasses whose fields are its options (a
    fraction, a momentum, is in [0, 1); `tol` > 0 stops at that residual)."""

    name: ClassVar[str]
    takes_constraints: ClassVar[bool] = False
    """It takes `subject to` constraints: its variant in `CONSTRAINED` is primal-dual."""
    differentiable: ClassVar[bool] = True
    """Reverse mode can go through its loop (False: it searches its step in a while loop)."""
    forward_mode: ClassVar[bool] = False
    """Its steps take forward-mode derivatives of the objective (Hessian-vector products)."""
    fresh_draws: ClassVar[bool] = False
    """A problem that draws takes fresh samples at each of its steps (step k's key is the
    solve's folded with k), not the solve's one sample set."""
    lr: ClassVar[float] = 1.0
    """Its step size (an option of the solvers that have one; 1, the first trial step, for
    those with a line search): the step of implicit differentiation's Neumann series."""
    line_search: ClassVar[bool] = False
    """It searches its step (so it has no step size `lr` that bounds the Hessian)."""
    steps: int
    tol: float
    rho: float
    """With `subject to` (the `CONSTRAINED` variants): the multipliers' step."""

    def init(self, x: Array) -> Any:
        """The auxiliary state of its update at the first iterate x."""
        return ()

    def update(self, p: Problem, x: Array, g: Array, aux: Any, k: Array) -> tuple[Array, Any]:
        """The next iterate and auxiliary state from iterate x, its gradient g and step k."""
        raise NotImplementedError(self.name)

    def returned(self, x: Array, aux: Any) -> Array:
        """The solution it returns from its last iterate x and auxiliary state aux."""
        return x

    def project(self, x: Array) -> Array:
        """x in the feasible set its steps keep to (all of space but for `projected`)."""
        return x

    def free(self, x: Array) -> Array:
        """1 where a coordinate of the solution x is free to move, 0 where a bound holds it."""
        return jnp.ones_like(x)


@dataclass(frozen=True)
class Gd(Solver):
    """Gradient descent."""

    name: ClassVar[str] = "gd"
    takes_constraints: ClassVar[bool] = True
    steps: int = option(100)
    lr: float = option(0.1)
    tol: float = option(0.0, "non-negative")

    def update(self, p, x, g, aux, k):
        return x - self.lr * g, aux


@dataclass(frozen=True)
class Momentum(Solver):
    """Gradient descent with heavy-ball momentum."""

    name: ClassVar[str] = "momentum"
    takes_constraints: ClassVar[bool] = True
    steps: int = option(100)
    lr: float = option(0.1)
    beta: float = option(0.9, "non-negative", below=1)
    tol: float = option(0.0, "non-negative")

    def init(self, x):
        return jnp.zeros_like(x)

    def update(self, p, x, g, m, k):
        m = self.beta * m + g
        return x - self.lr * m, m


@dataclass(frozen=True)
class Adam(Solver):
    """Adam."""

    name: ClassVar[str] = "adam"
    takes_constraints: ClassVar[bool] = True
    steps: int = option(200)
    lr: float = option(0.01)
    b1: float = option(0.9, "non-negative", below=1)
    b2: float = option(0.999, "non-negative", below=1)
    eps: float = option(1e-8)
    tol: float = option(0.0, "non-negative")

    def init(self, x):
        return jnp.zeros_like(x), jnp.zeros_like(x)

    def update(self, p, x, g, aux, k):
        m, v = aux
        m = self.b1 * m + (1 - self.b1) * g
        v = self.b2 * v + (1 - self.b2) * g * g
        t = (k + 1).astype(x.dtype)
        mhat, vhat = m / (1 - self.b1 ** t), v / (1 - self.b2 ** t)
        return x - self.lr * mhat / (jnp.sqrt(vhat) + self.eps), (m, v)


@dataclass(frozen=True)
class Lbfgs(Solver):
    """L-BFGS (its line search is a while loop)."""

    name: ClassVar[str] = "lbfgs"
    line_search: ClassVar[bool] = True
    differentiable: ClassVar[bool] = False
    steps: int = option(50)
    memory: int = option(10)
    tol: float = option(0.0, "non-negative")

    def init(self, x):
        hist = jnp.zeros((self.memory,) + x.shape, x.dtype)
        return hist, hist, x, jnp.zeros_like(x)

    def update(self, p, x, g, aux, k):
        """Two-loop recursion on the last `memory` pairs (s, y), newest last; masked while
        filling."""
        s_hist, y_hist, x_prev, g_prev = aux
        s, y = x - x_prev, g - g_prev
        keep = (k > 0) & (jnp.vdot(s, y) > 1e-10)
        s_hist = jnp.where(keep, jnp.roll(s_hist, -1, 0).at[-1].set(s), s_hist)
        y_hist = jnp.where(keep, jnp.roll(y_hist, -1, 0).at[-1].set(y), y_hist)
        sy = jnp.sum(s_hist * y_hist, axis=1)
        valid = sy > 0
        rho = jnp.where(valid, 1.0 / jnp.where(valid, sy, 1.0), 0.0)
        q, alphas = g, []
        for i in reversed(range(s_hist.shape[0])):
            a = rho[i] * jnp.vdot(s_hist[i], q)
            alphas.append(a)
            q = q - a * y_hist[i]
        yy = jnp.vdot(y_hist[-1], y_hist[-1])
        r = q * jnp.where(valid[-1], sy[-1] / jnp.where(valid[-1], yy, 1.0), 1.0)
        for i, a in zip(range(s_hist.shape[0]), reversed(alphas)):
            b = rho[i] * jnp.vdot(y_hist[i], r)
            r = r + s_hist[i] * (a - b)
        return backtracking(p, x, g, -r), (s_hist, y_hist, x, g)


@dataclass(frozen=True)
class NewtonCg(Solver):
    """Newton steps solved by conjugate gradients."""

    name: ClassVar[str] = "newton_cg"
    line_search: ClassVar[bool] = True
    differentiable: ClassVar[bool] = False
    forward_mode: ClassVar[bool] = True
    steps: int = option(10)
    iters: int = option(20)
    """Conjugate-gradient iterations per step."""
    tol: float = option(0.0, "non-negative")

    def update(self, p, x, g, aux, k):
        def hvp(u):
            return jax.jvp(jax.grad(p.f), (x,), (u,))[1]

        if p.opaque is not None:
            p.opaque.check(hvp, g, "the newton_cg solver's Newton steps",
                           "use a first-order solver (gd, momentum, adam, lbfgs)")
        return backtracking(p, x, g, -krylov("cg", hvp, g, self.iters, 0.0)), aux


@dataclass(frozen=True)
class Projected(Solver):
    """Projected gradient descent onto the box [lower, upper] (both required)."""

    name: ClassVar[str] = "projected"
    steps: int = option(100)
    lr: float = option(0.1)
    lower: float | None = option(None, "real")
    upper: float | None = option(None, "real")
    tol: float = option(0.0, "non-negative")

    def check(self) -> str | None:
        missing = [k for k in ("lower", "upper") if getattr(self, k) is None]
        if missing:
            return (f"solver 'projected' needs option{'s' * (len(missing) > 1)} "
                    + " and ".join(f"'{k}'" for k in missing))
        return None if self.lower < self.upper else "solver 'projected' needs lower < upper"

    def update(self, p, x, g, aux, k):
        return self.project(x - self.lr * g), aux

    def project(self, x):
        return jnp.clip(x, self.lower, self.upper)

    def free(self, x):
        """The coordinates strictly inside the box (those on a bound do not move)."""
        return ((x > self.lower) & (x < self.upper)).astype(x.dtype)


@dataclass(frozen=True)
class Sgd(Solver):
    """Stochastic gradient descent: step k's gradient from fresh draws, step size
    lr / (1 + decay k), and the solution the mean of the last `average` fraction of the
    iterates (at least the last one): Polyak-Ruppert averaging (Polyak and Juditsky 1992),
    whose error shrinks as 1 / sqrt(the averaged steps) even at a constant step. It has no
    `tol`: a residual of sampled gradients measures their noise, not convergence."""

    name: ClassVar[str] = "sgd"
    fresh_draws: ClassVar[bool] = True
    tol: ClassVar[float] = 0.0
    steps: int = option(1000)
    lr: float = option(0.01)
    decay: float = option(0.0, "non-negative")
    average: float = option(0.5, "non-negative", most=1)

    @property
    def averaged(self) -> int:
        """How many of the last iterates the solution averages."""
        return max(1, round(self.average * self.steps))

    def init(self, x):
        return jnp.zeros_like(x)  # the mean of the averaged iterates so far

    def update(self, p, x, g, mean, k):
        x = x - self.lr / (1 + self.decay * k) * g
        j = k + 1 - (self.steps - self.averaged)  # x's place among the averaged (from 1)
        return x, jnp.where(j > 0, mean + (x - mean) / jnp.maximum(j, 1), mean)

    def returned(self, x, mean):
        return mean


def _primal_dual(solver: type[Solver]) -> type[Solver]:
    """`solver`'s options for a problem with `subject to`: the multipliers' step `rho` last."""
    return make_dataclass(f"PrimalDual{solver.__name__}", [("rho", float, option(1.0))],
                          bases=(solver,), frozen=True, namespace={"__module__": __name__})


SOLVERS: dict[str, type[Solver]] = {s.name: s for s in (
    Gd, Momentum, Adam, Lbfgs, NewtonCg, Projected, Sgd)}
"""Every inner solver, by name."""
CONSTRAINED: dict[str, type[Solver]] = {
    name: _primal_dual(s) for name, s in SOLVERS.items() if s.takes_constraints}
"""The primal-dual variants of the solvers that take `subject to` (with `rho`)."""


def solver_of(a: Annotation, constrained: bool) -> Solver:
    """The solver annotation `a` names, with its options (its primal-dual variant for a
    problem with `subject to`); raises OptionError."""
    solver = chosen(SOLVERS | CONSTRAINED if constrained else SOLVERS, a.name, a.options,
                    "solver")
    if constrained and not solver.takes_constraints:
        raise OptionError(f"solver '{a.name}' cannot take 'subject to' constraints; use "
                          f"{', '.join(CONSTRAINED)} (or projected, without 'subject to', for "
                          f"a box)")
    return solver


# ---- the runner


@dataclass(frozen=True)
class Opaque:
    """The `jax fn`s an inner objective calls (`names`, not empty) and where the problem is
    written (`file:line:col`): their derivatives are JAX's, and one with only a custom VJP has
    no forward mode, which Hessian-vector products take."""

    names: tuple[str, ...]
    where: str

    def check(self, hvp: Callable[[Array], Array], u: Array, needs: str, instead: str) -> None:
        """Raise JaxFunctionError, naming the functions, `needs` (what takes the products)
        and `instead` (what to write), when the Hessian-vector product `hvp` at u takes the
        forward mode of a custom_vjp function. JAX records that in the traced computation (a
        `custom_lin` equation, the function's linearization, under jvp) and raises only when
        it is compiled, with no word of which function; a trace of the product finds it
        here."""
        if not _custom_lin(jax.make_jaxpr(hvp)(u).jaxpr):
            return
        which = (f"jax fn '{self.names[0]}'" if len(self.names) == 1 else
                 f"one of the jax fns it calls ({', '.join(repr(n) for n in self.names)})")
        raise JaxFunctionError(
            f"{which} has a custom VJP and no forward-mode derivative, but the inner problem at "
            f"{self.where} takes Hessian-vector products through it ({needs}): {instead}, or "
            f"give the function a jax.custom_jvp")


def _custom_lin(jaxpr) -> bool:
    """The jaxpr (or one nested in it: a loop's body, a branch) holds a `custom_lin`
    equation: a custom_vjp function's linearization, which has no forward-mode rule."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "custom_lin":
            return True
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns") and _custom_lin(inner):
                    return True
    return False


@dataclass(frozen=True)
class Problem:
    """An inner problem on a flat variable: objective, constraints (c <= 0, flat; None when
    unconstrained) and its solver; `opaque`: the jax fns its objective calls (None: none);
    `draw`: the objective at x with step k's fresh draws (None: f at every step)."""

    f: Callable[[Array], Array]
    c: Callable[[Array], Array] | None
    solver: Solver
    opaque: Opaque | None = None
    draw: Callable[[Array, Array], Array] | None = None

    def lagrangian_grad(self, x: Array, lam: Array, k: Array) -> Array:
        """The gradient of the Lagrangian at x for step k."""
        g = jax.grad(self.f if self.draw is None else lambda x: self.draw(x, k))(x)
        if self.c is None:
            return g
        return g + jax.vjp(self.c, x)[1](lam)[0]

    def residual(self, x: Array, g: Array) -> Array:
        r = jnp.linalg.norm(x - self.solver.project(x - g))
        if self.c is not None:
            r = r + jnp.linalg.norm(jnp.maximum(self.c(x), 0.0))
        return r


class State(NamedTuple):
    k: Array
    x: Array
    g: Array
    lam: Array
    aux: Any


def backtracking(p: Problem, x: Array, g: Array, d: Array) -> Array:
    """Armijo backtracking from a unit step: at most 30 halvings (the step is 2^-30 after 30
    failed tests), the first step that passes kept (a NaN objective passes: no step can be
    judged). A loop of fixed trip count whose finished iterations skip the test: the same
    loop written as a data-dependent `while_loop` never ended on XLA's optimized CPU code for
    one fuzzed program (tests/fuzzrun.py seed 3880: newton_cg in an argmin in a scan under
    vmap), even with an integer bound in its condition, and ended in seconds with XLA's
    optimizations off."""
    fx, slope = p.f(x), jnp.vdot(g, d)

    def test(t):
        passed = ~(p.f(x + t * d) > fx + 1e-4 * t * slope)
        return jnp.where(passed, t, t * 0.5), passed

    def halve(_, state):
        t, done = state
        return lax.cond(done, lambda t: (t, done), test, t)

    t, _ = lax.fori_loop(0, 30, halve, (jnp.ones((), x.dtype), jnp.zeros((), bool)))
    return x + t * d


def krylov(method: str, matvec: Callable[[Array], Array], b: Array, iters: int,
           tol: float) -> Array:
    """x with matvec(x) = b by `iters` steps of CG (`method` "cg") or GMRES ("gmres"), or fewer
    once the residual is at most tol |b| or at machine precision (past it, the step sizes
    divide roundoff by roundoff)."""
    atol = jnp.finfo(b.dtype).eps * jnp.linalg.norm(b)
    if method == "cg":
        return jax.scipy.sparse.linalg.cg(matvec, b, maxiter=iters, tol=tol, atol=atol)[0]
    return jax.scipy.sparse.linalg.gmres(matvec, b, tol=tol, atol=atol, restart=iters,
                                         maxiter=1, solve_method="batched")[0]


def start(p: Problem, x0: Array, lam0: Array) -> State:
    x0 = p.solver.project(x0)
    k = jnp.zeros((), jnp.int32)
    return State(k, x0, p.lagrangian_grad(x0, lam0, k), lam0, p.solver.init(x0))


def step(p: Problem, s: State, regrad: bool = True) -> State:
    """One iteration; the gradient at the new iterate is evaluated when `regrad`."""
    x, aux = p.solver.update(p, s.x, s.g, s.aux, s.k)
    lam = s.lam
    if p.c is not None:
        lam = jnp.maximum(0.0, lam + p.solver.rho * p.c(x))
    return State(s.k + 1, x, p.lagrangian_grad(x, lam, s.k + 1) if regrad else s.g, lam, aux)


def run(p: Problem, s: State, steps: int, tol: float) -> State:
    """`steps` iterations from s; with tol > 0, stop early once the residual is <= tol. A
    fixed-step run skips the gradient at its last iterate (nothing in the loop would use it),
    so its result's g is stale: `fresh` evaluates it where it is needed."""
    if tol > 0:
        stop = s.k + steps
        return lax.while_loop(lambda t: (t.k < stop) & (p.residual(t.x, t.g) > tol),
                              lambda t: step(p, t), s)
    if steps == 0:
        return s
    s = lax.fori_loop(0, steps - 1, lambda _, t: step(p, t), s)
    return step(p, s, regrad=False)


def fresh(p: Problem, s: State) -> State:
    """s with the gradient at its iterate (for its step: fresh draws with `sgd`)."""
    return s._replace(g=p.lagrangian_grad(s.x, s.lam, s.k))


def multipliers(p: Problem, x: Array) -> Array:
    """Zero multipliers shaped like the flat constraint vector (empty when unconstrained)."""
    if p.c is None:
        return jnp.zeros((0,), x.dtype)
    return jnp.zeros(jax.eval_shape(p.c, x).shape, x.dtype)
