"""Dims that must be powers of two (the last axis of the `power_of_two_axis` ops: `hadamard`,
`quest`), across calls.

The type checker rejects a literal size at the op itself. A symbolic dim there is a requirement
of its function, carried to each call: a call that binds it to a literal size that is not a
power of two is an error at the call; one that binds it to a dim of the caller passes the
requirement on to the caller. What is left on an export's own dims is checked when it is called
(`runtime.rules_nonsmooth`, once the sizes are known).
"""

from __future__ import annotations

from pathlib import Path

from gradlang.diagnostics import Diagnostics
from gradlang.ir import Module, Op, walk
from gradlang.ops import OPS
from gradlang.shapes import is_power_of_two, unify
from gradlang.types import TensorType

from .callgraph import call_order


def _where(op: Op) -> str:
    return f"{op.name} at {Path(op.span.source.path).name}:{op.span.line}:{op.span.col}"


def check_power_of_two_dims(module: Module, diags: Diagnostics) -> None:
    """Report each call that binds a dim its callee needs to be a power of two to a literal
    size that is not one."""
    needs: dict[str, dict[str, str]] = {}
    """Per function: its dims that must be powers of two, and the op that needs it."""
    for fn in call_order(module):
        own = needs.setdefault(fn.name, {})
        for op in walk(fn.body):
            t = op.operands[0].type if op.operands else None
            if "power_of_two_axis" in OPS[op.name].traits and isinstance(t, TensorType) and t.rank \
                    and isinstance(t.shape[-1], str):
                own.setdefault(t.shape[-1], _where(op))
            elif op.name == "call_fn":
                _bind(module, op, needs[op.params.callee], own, diags)


def _bind(module: Module, call: Op, callee_needs: dict[str, str], own: dict[str, str],
          diags: Diagnostics) -> None:
    if not callee_needs:
        return
    callee = module.function(call.params.callee)
    env: dict = {}
    for p, a in zip(callee.params, call.operands):
        unify(p.value.type, a.type, env)
    for dim, why in callee_needs.items():
        size = env.get(dim)
        if isinstance(size, int) and not is_power_of_two(size):
            diags.error(f"'{callee.name}' needs its dim {dim} to be a power of two ({why} "
                        f"transforms that axis), but this call makes {dim} = {size}", call.span)
        elif isinstance(size, str):
            own.setdefault(size, why)
