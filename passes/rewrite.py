"""Shared IR rewriting helpers: value substitution, def-use maps, dead-code elimination."""

from __future__ import annotations

from dataclasses import replace

from gradlang.ir import Function, Op, Region, Value, walk


def defining_ops(region: Region) -> dict[Value, Op]:
    """Map each value defined by an op in `region` (nested regions included) to that op."""
    return {r: op for op in walk(region) for r in op.results}


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
