"""Hypergradient methods (`argmin ... with METHOD(options)`): how the solution of an inner
problem is differentiated, one frozen dataclass each.

A method's fields are its options (`gradlang.options`); beside them it declares what the
hypergradient pass checks (`problem`: does it fit the solver and the constraints; `through_loop`,
`forward_mode`, `jvp`, `smooth`), the option that may be written without its name
(`option(..., positional=True)`), the annotations `verify --compare` tries (`variants`) and how it builds the
differentiable solve (`build`). The pass checks and completes methods through `METHODS`
(`method_of`); the lowering of `argmin` builds the method from the op's annotation the same way.

An inner problem is given on a flat variable as `objective(x, thetas, fixed)` and optionally
`constraints(x, thetas, fixed)` (c <= 0), where thetas are the float values the problem
captures and fixed the others (integers). `build` returns
`solve(thetas, fixed, x0) -> (x, residual, steps)`, differentiable in thetas:

- `implicit`: a `custom_jvp` whose tangent is dx = -(H + damping I)^-1 d/dthetas grad_x f .
  dthetas at the solution, H the Hessian in x, by one `jax.lax.custom_linear_solve` whose
  matvec is a Hessian-vector product (a linearization of grad_x f; H is never formed) and whose
  solve is CG, GMRES or a Neumann series. Reverse mode transposes it (JAX's linearize and
  transpose): the transposed solve (H + damping I) u = g with the same solver (H is
  symmetric), then -d/dthetas <grad_x f, u>, as a hand-written backward would. Forward mode
  (`jax.jvp`, `jax.hessian`, a Hessian-vector product of an outer problem nesting this one)
  goes through too, to any order: the rule calls the solve itself, so an outer derivative of
  the rule applies the rule again, and the solver's loop is never differentiated. For
  box-projected solvers the system is restricted to the coordinates strictly inside the box
  (the others do not move).
  With `sgd` (fresh draws at each step), the solution estimates the expected problem's, and
  the linear solve and the mixed derivative evaluate the objective with the solve's key itself,
  a sample set none of the steps used: one more fresh draw.
- `unrolled`: reverse mode through the solver's loop; `truncated(k)`: through its last k steps.
- `value_function`: Hessian-free and first order. With d = g / |g|, it re-solves the problem with
  objective f +- sigma d.x (warm started; constraints kept) and returns
  |g| (grad_thetas L(x+, lam+) - grad_thetas L(x-, lam-)) / (2 sigma), L = f + lam.c the
  Lagrangian: by the envelope theorem this is the central difference, in sigma, of the gradient
  of the perturbed problem's value function, whose sigma-derivative is the wanted
  vector-Jacobian product, including constraints that couple x and thetas. Bias O(sigma^2).
  Reverse mode only: it is a difference quotient in the cotangent's direction, which has no
  forward-mode counterpart, so `jax.jvp` through it is a `ForwardModeError`
  (`runtime.reverse_only`) saying what to write instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from gradlang.ops import Annotation
from gradlang.options import OptionError, chosen, option
from gradlang.runtime.reverse_only import ForwardModeError, reverse_only

from .solvers import SOLVERS, Opaque, Problem, Solver, State, fresh, krylov, multipliers, run, start

Array = jax.Array
Solve = Callable[[tuple, tuple, Array], tuple]


@dataclass(frozen=True)
class Inner:
    """One inner problem at run time: its solver, objective and constraints (None when
    unconstrained) on the flat variable, whether the solve reports its residual (one more
    gradient evaluation), the jax fns its objective calls (None: none), where the problem
    is written (`file:line:col`, for messages) and whether it draws (`keyed`: the fixed values
    end with the solve's key)."""

    solver: Solver
    objective: Callable
    constraints: Callable | None
    report: bool
    opaque: Opaque | None = None
    where: str = "the inner problem"
    keyed: bool = False

    def problem(self, thetas: tuple, fixed: tuple, shift: Array | None = None) -> Problem:
        """The problem at thetas, its objective plus shift . x when a shift is given; a solver
        with fresh draws evaluates step k's objective at the key folded with k."""
        def at(fixed):
            def f(x):
                value = self.objective(x, thetas, fixed)
                return value if shift is None else value + jnp.vdot(shift, x)
            return f

        c = None if self.constraints is None else (lambda x: self.constraints(x, thetas, fixed))

        def draw(x, k):  # step k's objective
            *rest, key = fixed
            return at((*rest, jax.random.fold_in(key, k)))(x)

        fresh = self.keyed and self.solver.fresh_draws
        return Problem(at(fixed), c, self.solver, self.opaque, draw if fresh else None)

    def forward(self, thetas: tuple, fixed: tuple, x0: Array, last: int = 0) -> State:
        """The solve; with last > 0, reverse mode sees only its last `last` steps."""
        p = self.problem(thetas, fixed)
        state = start(p, x0, multipliers(p, x0))
        steps, tol = self.solver.steps, self.solver.tol
        if last:
            state = jax.lax.stop_gradient(run(p, state, steps - last, tol))
            state = run(p, fresh(p, state), last, 0.0)
        else:
            state = run(p, state, steps, tol)
        return state._replace(x=self.solver.returned(state.x, state.aux))

    def result(self, thetas: tuple, fixed: tuple, state: State) -> tuple:
        """The solution, its residual (0 unless `report`) and the steps taken."""
        if not self.report:
            return state.x, jnp.zeros((), state.x.dtype), state.k
        p = self.problem(thetas, fixed)
        done = fresh(p, jax.lax.stop_gradient(state))  # a report: no derivative (the norm of
        # the constraint violation has none where it is 0)
        return state.x, jax.lax.stop_gradient(p.residual(done.x, done.g)), state.k

    def solution(self, thetas: tuple, fixed: tuple, x0: Array, last: int = 0) -> tuple:
        """`result` of the solve (reverse mode through its last `last` steps, all when 0)."""
        return self.result(thetas, fixed, self.forward(thetas, fixed, x0, last))

    def lagrangian(self, x: Array, lam: Array, thetas: tuple, fixed: tuple) -> Array:
        """f + lam . c at x, the value the value-function method differentiates in thetas."""
        value = self.objective(x, thetas, fixed)
        if self.constraints is None:
            return value
        return value + jnp.vdot(lam, self.constraints(x, thetas, fixed))


class Method:
    """A hypergradient method; subclasses are frozen dataclasses whose fields are its
    options."""

    name: ClassVar[str]
    label: ClassVar[str]
    """How messages name it."""
    through_loop: ClassVar[bool] = False
    """It differentiates through the solver's loop by reverse mode, so the solver must be
    `differentiable`."""
    forward_mode: ClassVar[bool] = False
    """Its derivative takes forward-mode derivatives of the inner objective (Hessian-vector
    products)."""
    jvp: ClassVar[bool] = True
    """Its derivative has a forward mode: `jax.jvp` goes through it, and so do the
    Hessian-vector products of an outer problem that nests it. False: reverse mode only."""
    smooth: ClassVar[bool] = False
    """It assumes a twice differentiable inner objective."""

    def completed(self, solver: Solver) -> Method:
        """Its options with the defaults that depend on the solver filled in."""
        return self

    def problem(self, solver: Solver, constrained: bool) -> str | None:
        """Why it cannot differentiate a problem solved by `solver`, with `subject to` when
        `constrained` (None when it can)."""
        if self.through_loop and not solver.differentiable:
            usable = ", ".join(n for n, s in SOLVERS.items() if s.differentiable)
            return (f"'{self.name}' differentiates through the solver's loop, but "
                    f"'{solver.name}' searches its step in a while loop; use {usable}, or "
                    f"implicit / value_function")
        return None

    @classmethod
    def variants(cls) -> list[Annotation]:
        """The annotations `verify --compare` measures for it."""
        return [Annotation(cls.name)]

    def build(self, inner: Inner) -> Solve:
        """`solve(thetas, fixed, x0) -> (x, residual, steps)`, differentiable in thetas."""
        raise NotImplementedError(self.name)


class CustomBackward(Method):
    """A method whose backward pass is its own (`backward`), around the solve, and that has no
    forward mode (`reverse_only`: a custom_vjp whose jvp is a ForwardModeError)."""

    jvp: ClassVar[bool] = False
    reverse_only_because: ClassVar[str]
    """Why its backward has no forward-mode counterpart, for the ForwardModeError."""

    def build(self, inner: Inner) -> Solve:
        def fwd(thetas, fixed, x0):
            state = inner.forward(thetas, fixed, x0)
            return inner.result(thetas, fixed, state), (state, thetas, fixed)

        def bwd(saved, cts):
            state, thetas, fixed = saved
            return self.backward(inner, state, thetas, fixed, cts[0])

        return reverse_only(fwd, bwd, self.forward_mode_error(inner))

    def backward(self, inner: Inner, state: State, thetas: tuple, fixed: tuple, g: Array) -> Any:
        """The cotangent of thetas from the cotangent g of the solution `state.x`."""
        raise NotImplementedError(self.name)

    def forward_mode_error(self, inner: Inner) -> ForwardModeError:
        """What `jax.jvp` through this problem raises: where, why, and the methods with a
        forward mode that fit its solver and constraints."""
        constrained = inner.constraints is not None
        usable = [f"'with {name}'" for name, m in METHODS.items()
                  if m.jvp and m().problem(inner.solver, constrained) is None]
        reverse = "differentiate in reverse mode (jax.grad, jax.vjp, an exported grad)"
        listed = ", ".join(usable[:-1]) + " or " * (len(usable) > 1) + "".join(usable[-1:])
        instead = (f"Write {listed} after the "
                   f"{'last constraint' if constrained else 'solver'} for a forward-mode "
                   f"derivative, or {reverse}" if usable else reverse.capitalize())
        return ForwardModeError(
            f"jax.jvp (forward mode, as in jax.jacfwd) goes through the inner problem at "
            f"{inner.where}, whose hypergradient method '{self.name}' ({self.label}) has a "
            f"reverse-mode rule only: {self.reverse_only_because}. {instead}")


LINEAR_SOLVERS = ("cg", "gmres", "neumann")
"""How implicit differentiation solves its linear system."""


@dataclass(frozen=True)
class Implicit(Method):
    """Implicit differentiation: one linear solve (`method`) at the solution, as the tangent
    of a custom_jvp (reverse mode transposes it)."""

    name: ClassVar[str] = "implicit"
    label: ClassVar[str] = "implicit differentiation"
    forward_mode: ClassVar[bool] = True
    smooth: ClassVar[bool] = True
    method: str = option("cg", choices=LINEAR_SOLVERS, plural="linear solvers", positional=True)
    iters: int = option(30)
    tol: float = option(0.0, "non-negative")
    damping: float = option(0.0, "non-negative")

    def problem(self, solver, constrained):
        if constrained:
            return ("implicit differentiation assumes an unconstrained inner problem (its "
                    "gradient is zero at the solution); with 'subject to' use value_function "
                    "or unrolled")
        if self.method == "neumann" and solver.line_search:
            return (f"implicit(neumann) sums its series with the solver's step lr, which "
                    f"converges where gradient descent with that step does (lr below 2 / the "
                    f"Hessian's largest eigenvalue); '{solver.name}' searches its step and has "
                    f"no lr; use implicit(cg) or implicit(gmres)")
        return super().problem(solver, constrained)

    @classmethod
    def variants(cls):
        return [Annotation(cls.name, (("method", s),)) for s in LINEAR_SOLVERS]

    def build(self, inner):
        @jax.custom_jvp
        def solve(thetas, fixed, x0):
            return inner.solution(thetas, fixed, x0)

        @solve.defjvp
        def jvp(primals, tangents):
            thetas, fixed, x0 = primals
            # the solve itself, not its loop: an outer derivative applies this rule to it
            x, residual, steps = out = solve(thetas, fixed, x0)
            dx = self.tangent(inner, x, thetas, fixed, tangents[0])
            no_steps = np.zeros(jnp.shape(steps), jax.dtypes.float0)  # integers: no tangent
            return out, (dx, jnp.zeros_like(residual), no_steps)

        return solve

    def tangent(self, inner: Inner, x: Array, thetas: tuple, fixed: tuple,
                dthetas: tuple) -> Array:
        """dx = -A^-1 (free * d/dthetas grad_x f . dthetas) at the solution x, A = the Hessian
        on the free coordinates (the identity on the others) + damping I. Linear in dthetas;
        its transpose, reverse mode's, solves A u = free * g with the same solver (A is
        symmetric) and returns -d/dthetas <grad_x f, u>.

        The Hessian-vector products replay one linearization of grad_x f at x (`jax.linearize`:
        its residuals, one gradient evaluation's, are kept through the solve) rather than a
        `jax.jvp` of it each: the same operations, but the objective is traced once, not once
        per trace of the solve (CG traces its matvec twice, custom_linear_solve traces solve and
        transpose_solve, vmap's batching rule retraces them): 10x faster to trace for an
        implicit problem nested in another."""
        grad_x = jax.grad(inner.objective)
        free = inner.solver.free(x)
        hvp = jax.linearize(lambda w: grad_x(w, thetas, fixed), x)[1]

        def matvec(u):
            return free * hvp(free * u) + (1 - free) * u + self.damping * u

        if inner.opaque is not None:
            inner.opaque.check(matvec, x, "implicit differentiation's linear solve",
                               "write 'with value_function' (first order) after the solver, "
                               "or 'with unrolled' for a solver without line search")
        mixed = jax.jvp(lambda th: grad_x(x, th, fixed), (thetas,), (dthetas,))[1]
        u = jax.lax.custom_linear_solve(
            matvec, -free * mixed, lambda mv, b: self.adjoint(mv, b, inner.solver.lr),
            symmetric=True)
        return free * u

    def adjoint(self, matvec: Callable[[Array], Array], g: Array, lr: float) -> Array:
        """u with matvec(u) = g by CG, GMRES or a Neumann series (step lr, the solver's)."""
        if self.method != "neumann":
            return krylov(self.method, matvec, g, self.iters, self.tol)

        def term(_, state):  # u_k = sum_{j<k} (I - lr A)^j lr g
            u, r = state
            r = r - lr * matvec(r)
            return u + r, r

        first = lr * g
        return jax.lax.fori_loop(0, self.iters, term, (first, first))[0]


@dataclass(frozen=True)
class ValueFunction(CustomBackward):
    """The value-function method: first-order, it accounts for constraints."""

    name: ClassVar[str] = "value_function"
    label: ClassVar[str] = "the value-function method"
    reverse_only_because: ClassVar[str] = (
        "its backward re-solves the problem perturbed along the cotangent, a difference "
        "quotient in the cotangent's direction that has no forward-mode counterpart")
    sigma: float = option(0.01)
    steps: int | None = option(None, "count")
    """The steps of its solves (the solver's by default)."""

    def completed(self, solver):
        return self if self.steps is not None else replace(self, steps=solver.steps)

    def problem(self, solver, constrained):
        if solver.fresh_draws:
            return (f"value_function differences two re-solves of the problem over sigma, "
                    f"which {solver.name}'s fresh draws at every step make noisy; use implicit, "
                    f"unrolled or truncated(k)")
        return super().problem(solver, constrained)

    def backward(self, inner, state, thetas, fixed, g):
        norm = jnp.linalg.norm(g)
        d = g / jnp.where(norm > 0, norm, 1.0)
        grad_theta = jax.grad(inner.lagrangian, argnums=2)

        def perturbed(sign):
            p = inner.problem(thetas, fixed, sign * self.sigma * d)
            s = run(p, fresh(p, state), self.steps, 0.0)
            return grad_theta(s.x, s.lam, thetas, fixed)

        up, down = perturbed(1.0), perturbed(-1.0)
        return jax.tree.map(lambda a, b: norm * (a - b) / (2 * self.sigma), up, down)


@dataclass(frozen=True)
class Unrolled(Method):
    """Reverse mode through every step of the solver's loop."""

    name: ClassVar[str] = "unrolled"
    label: ClassVar[str] = "unrolled differentiation"
    through_loop: ClassVar[bool] = True

    def problem(self, solver, constrained):
        problem = super().problem(solver, constrained)
        if problem is None and solver.tol:
            return ("'unrolled' differentiates through a fixed number of steps; remove the "
                    "solver's tol, or use truncated(k) or implicit")
        return problem

    def build(self, inner):
        return inner.solution


@dataclass(frozen=True)
class Truncated(Method):
    """Reverse mode through the last k steps of the solver's loop."""

    name: ClassVar[str] = "truncated"
    label: ClassVar[str] = "truncated unrolling"
    through_loop: ClassVar[bool] = True
    k: int = option(10, positional=True)

    def problem(self, solver, constrained):
        problem = super().problem(solver, constrained)
        if problem is None and self.k > solver.steps:
            return f"truncated(k={self.k}) needs k <= the solver's steps ({solver.steps})"
        return problem

    def build(self, inner):
        return partial(inner.solution, last=self.k)


METHODS: dict[str, type[Method]] = {m.name: m for m in (
    Implicit, ValueFunction, Unrolled, Truncated)}
"""Every hypergradient method, by name."""


def method_of(a: Annotation, solver: Solver, constrained: bool) -> Method:
    """The method annotation `a` names, with its options completed for `solver` and checked
    against it and the constraints (`constrained`: the problem has `subject to`); raises
    OptionError."""
    method = chosen(METHODS, a.name, a.options, "hypergradient method").completed(solver)
    problem = method.problem(solver, constrained)
    if problem is not None:
        raise OptionError(problem)
    return method

