"""Structural IR verifier: known ops, typed params, SSA dominance, and (after typecheck) types."""

from __future__ import annotations

from .ir import Function, Module, Region, Value
from .ops import OPS
from .printer import print_function
from .types import ERROR, UNKNOWN


class VerifyError(Exception):
    """The IR is malformed: a compiler bug, never a user error."""


def verify_module(module: Module, *, resolved: bool = False, typed: bool = False) -> None:
    """Raise VerifyError (with the function's IR) on the first malformed function."""
    for fn in module.functions:
        problems = verify_function(fn, resolved=resolved, typed=typed)
        if problems:
            raise VerifyError(f"invalid IR in @{fn.name}: {problems[0]}\n{print_function(fn)}")


def verify_function(fn: Function, *, resolved: bool = False, typed: bool = False) -> list[str]:
    problems: list[str] = []
    defined: set[Value] = {p.value for p in fn.params}

    def check_type(v: Value, what: str) -> None:
        if typed and (v.type is UNKNOWN or v.type is ERROR):
            problems.append(f"{what} has type {v.type}")

    def visit(region: Region, scope: set[Value]) -> None:
        local = set(scope) | set(region.args)
        for op in region.ops:
            opdef = OPS.get(op.name)
            if opdef is None:
                problems.append(f"unknown op '{op.name}'")
                continue
            if not opdef.check_params(op.params):
                problems.append(f"op '{op.name}' has params {type(op.params).__name__}, "
                                f"expected {opdef.params.__name__}")
            elif opdef.verify is not None and opdef.verify(op) is not None:
                problems.append(f"op '{op.name}' {opdef.verify(op)}")
            if resolved and "unresolved" in opdef.traits:
                problems.append(f"unresolved op '{op.name}' after resolution")
            for v in op.operands:
                if v not in local:
                    problems.append(f"op '{op.name}' uses a value not defined before it")
            for r in op.regions:
                visit(r, local)
            for v in op.results:
                if v in local or v in defined:
                    problems.append(f"op '{op.name}' redefines a value")
                check_type(v, f"result of '{op.name}'")
                local.add(v)
                defined.add(v)
        for v in region.results:
            if v not in local:
                problems.append("region yields a value not defined in it or around it")

    for p in fn.params:
        check_type(p.value, f"parameter {p.name}")
    visit(fn.body, set(defined))
    return problems
