"""The call graph of a module: callees before callers, and the functions that draw."""

from __future__ import annotations

from gradlang.ir import Function, Module, walk
from gradlang.ops import OPS


def call_order(module: Module) -> list[Function]:
    """Callees before callers (resolve rejects recursion, so the call graph has no cycles)."""
    done: dict[str, None] = {}  # insertion-ordered

    def visit(name: str) -> None:
        if name in done:
            return
        for op in walk(module.function(name).body):
            if op.name == "call_fn":
                visit(op.params.callee)
        done[name] = None

    for fn in module.functions:
        visit(fn.name)
    return [module.function(n) for n in done]


def random_functions(module: Module) -> set[str]:
    """Functions that draw, directly or through the functions they call."""
    out: dict[str, bool] = {}
    for fn in call_order(module):
        out[fn.name] = any("random" in OPS[op.name].traits
                           or (op.name == "call_fn" and out[op.params.callee])
                           for op in walk(fn.body))
    return {name for name, draws in out.items() if draws}
