"""Gradients of gradients: what a `grad(f, wrt=[...])(args)` in a body may differentiate.

Under a differentiated export, the gradient such an op computes is differentiated again (MAML's
adapted parameters, a gradient penalty, a Hessian-vector product), so everything it reaches must
have derivatives of every order: smooth ops, pathwise and relaxed draws, backward rules (their
own derivatives), inner problems whose hypergradient is itself differentiable. This pass
reports, at the op that breaks it, each that is not (an estimator's `nested` says why).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gradlang.diagnostics import Diagnostics, Span
from gradlang.estimators import REGISTRY
from gradlang.estimators.hypergrads import method_of
from gradlang.estimators.solvers import solver_of
from gradlang.ir import Module, Op, Region, reachable, walk

_CALLS = ("call_fn", "inline", "map_leaves")


def _at(span: Span) -> str:
    return f"{Path(span.source.path).name}:{span.line}:{span.col}"


def _reached(module: Module, region: Region) -> list[Op]:
    """The ops a region runs, in it and in the functions it calls."""
    ops = list(walk(region))
    callees = [o.params.callee for o in ops if o.name in _CALLS]
    for name in dict.fromkeys(n for c in callees for n in reachable(module, c)):
        ops += walk(module.function(name).body)
    return ops


def _problem(module: Module, op: Op) -> str | None:
    """Why `op`'s derivative cannot be differentiated again (None when it can)."""
    if op.name == "sample":
        est = op.params.estimator
        why = REGISTRY[est.name].nested
        if why:
            return (f"the draw '{op.params.site}' takes {est.name}: {why}; draw it with reparam "
                    f"from a reparameterizable family, or pass its value in as an argument")
    elif op.name == "argmin":
        solver = solver_of(op.params.solver, len(op.regions) > 1)
        method = method_of(op.params.hyper, solver, len(op.regions) > 1)
        if not method.jvp:
            return (f"its hypergradient method {method.name} is not differentiable again "
                    f"({method.reverse_only_because}); use implicit or unrolled")
    elif op.name == "expect" and any(
            o.name == "sample" and REGISTRY[o.params.estimator.name].role != "pathwise"
            for o in _reached(module, op.regions[0])):
        return (f"an {op.params.kind}(...) of its own, whose draws are not pathwise, holds their "
                f"credit for the first derivative only; write grad(expect(f, samples=N), "
                f"...) for f's draws, or move the scope out")
    elif op.name in ("sampled_matmul", "sampled_einsum"):
        return "wta_crs samples rows for the first derivative only; drop the annotation here"
    elif op.name == "host_call":
        return (f"extern '{op.params.name}' is a black box, which reverse mode cannot "
                f"differentiate; bind a jax fn instead")
    return None


@dataclass(frozen=True)
class NestedGrad:
    """Checks the ops that each `grad` in a differentiated function differentiates again."""

    name: str = "nested_grad"
    after_errors: bool = False
    requires: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()

    def run(self, module: Module, diags: Diagnostics) -> Module:
        differentiated = {name for e in module.exports for part in e.parts()
                          if part.transform.kind != "fn" and part.transform.black_box is None
                          for name in reachable(module, part.transform.fn)}
        reported: set[tuple[int, int]] = set()
        for fn in module.functions:
            if fn.name not in differentiated:
                continue
            for op in walk(fn.body):
                if op.name != "grad":
                    continue
                for inner in _reached(module, op.regions[0]):
                    why = _problem(module, inner)
                    if why is not None and (id(inner), id(op)) not in reported:
                        reported.add((id(inner), id(op)))
                        diags.error(f"grad(...) at {_at(op.span)} is differentiated again by "
                                    f"the export, but {why}", inner.span)
        return module
