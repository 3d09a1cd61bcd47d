"""Shared IR rewriting helpers: value substitution, def-use maps, dead-code elimination."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from gradlang.ir import Function, Op, Region, Value, walk


def defining_ops(region: Region) -> dict[Value, Op]:
    """Map each value defined by an op in `region` (nested regions included) to that op."""
    return {r: op for op in walk(region) for r in op.results}


def map_ops(region: Region, f: Callable[[Op], Op]) -> Region:
    """The region with every op (nested ones first) replaced by f(op)."""
    ops = []
    for op in region.ops:
        if op.regions:
            op = replace(op, regions=tuple(map_ops(r, f) for r in op.regions))
        ops.append(f(op))
    return replace(region, ops=tuple(ops))


def region_uses(region: Region) -> set[Value]:
    """Every value used by an op or yield in `region`, nested regions included."""
    used = set(region.results)
    for op in walk(region):
        used.update(op.operands)
        for r in op.regions:
            used.update(r.results)
    return used


def eliminate_dead_code(region: Region) -> Region:
    """Drop ops none of whose results is used (all ops are pure)."""
    live = set(region.results)
    kept: list[Op] = []
    for op in reversed(region.ops):
        if not any(r in live for r in op.results):
            continue
        regions = tuple(eliminate_dead_code(r) for r in op.regions)
        op = replace(op, regions=regions) if regions else op
        live.update(op.operands)
        for r in regions:
            live.update(region_uses(r))
        kept.append(op)
    return replace(region, ops=tuple(reversed(kept)))


def dce_function(fn: Function) -> Function:
    return replace(fn, body=eliminate_dead_code(fn.body))


def clone_region(region: Region) -> Region:
    """A copy of `region` with fresh values for its arguments and every op result (nested
    regions included); values it captures from outside stay as they are."""
    env: dict[Value, Value] = {}

    def fresh(v: Value) -> Value:
        env[v] = Value(v.type, v.hint)
        return env[v]

    def copy(r: Region) -> Region:
        args = tuple(fresh(a) for a in r.args)
        ops = []
        for op in r.ops:
            operands = tuple(env.get(v, v) for v in op.operands)
            regions = tuple(copy(x) for x in op.regions)
            ops.append(replace(op, operands=operands, regions=regions,
                               results=tuple(fresh(v) for v in op.results)))
        return Region(args, tuple(ops), tuple(env.get(v, v) for v in r.results))

    return copy(region)


def inline_body(fn: Function) -> Region:
    """The body of `fn` as a fresh region whose arguments are its parameters (the region of an
    `inline` op calling it)."""
    return clone_region(Region(tuple(p.value for p in fn.params), fn.body.ops, fn.body.results))
