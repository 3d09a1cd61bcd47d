"""Artifacts of exports that call externs: the program split at its host callbacks.

`jax.export` cannot serialize a host callback, so such an export is traced to a jaxpr and cut
at each top-level `pure_callback` of an extern: the stretches between callbacks become
separately exported pieces, and a plan (JSON) lists the steps: run piece k on these values,
or call extern NAME on these values, each value a number. The loader replays the plan, calling
the Python bindings given to `gradlang.load(path, externs=...)`; the replay is traceable, so
a loaded export still composes with `jax.jit` and `jax.vmap`. A callback inside a loop, a
branch or another nested computation cannot be cut out; such an export is refused with
`SplitError`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.extend import core

from gradlang.types import type_from_json, type_to_json

from .host import HostFunction


class SplitError(Exception):
    """The export cannot be saved in pieces (a callback nested in a loop or branch)."""


def _has_callback(jaxpr) -> bool:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pure_callback":
            return True
        if any(_has_callback(sub) for sub in core.jaxprs_in_params(eqn.params)):
            return True
    return False


def _host(eqn) -> HostFunction:
    host = getattr(eqn.params.get("callback"), "callback_func", None)
    if not isinstance(host, HostFunction):
        raise SplitError("the export makes a host callback that is not an extern function")
    return host


def _skeleton(tree, counter: list[int]):
    """The output structure as JSON, each leaf replaced by its position."""
    if isinstance(tree, dict):
        return {"dict": {k: _skeleton(v, counter) for k, v in tree.items()}}
    if isinstance(tree, (tuple, list)):
        return {"tuple": [_skeleton(v, counter) for v in tree]}
    counter[0] += 1
    return counter[0] - 1


def _rebuild(skeleton, leaves: list):
    if isinstance(skeleton, int):
        return leaves[skeleton]
    if "dict" in skeleton:
        return {k: _rebuild(v, leaves) for k, v in skeleton["dict"].items()}
    return tuple(_rebuild(v, leaves) for v in skeleton["tuple"])


def _dim_vars(variables) -> set[str]:
    """The symbolic dims named in the shapes of `variables`."""
    return {name for v in variables for d in v.aval.shape if not isinstance(d, int)
            for name in d.get_vars()}


def split(fn: Callable, specs: tuple,
          export: Callable[[Callable, tuple], jax.export.Exported]) -> tuple[dict, list[bytes]]:
    """The plan and the serialized pieces of `fn` (traced at `specs`); `export(f, specs)`
    exports each piece (for the artifact's platforms)."""
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*specs)
    jaxpr = closed.jaxpr
    ids: dict = {}

    def ident(v) -> int:
        if isinstance(v, core.Literal):
            raise SplitError("a host callback takes a literal argument")
        return ids.setdefault(v, len(ids))

    for v in jaxpr.invars:
        ident(v)
    stretches: list = [[]]
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pure_callback":
            stretches.append(eqn)
            stretches.append([])
        elif any(_has_callback(sub) for sub in core.jaxprs_in_params(eqn.params)):
            raise SplitError("an extern is called inside a loop, a branch or a nested "
                             "computation, which cannot be cut out of the exported program")
        else:
            stretches[-1].append(eqn)
    needed_after: list[set] = []
    later = {v for v in jaxpr.outvars if not isinstance(v, core.Literal)}
    for part in reversed(stretches):
        needed_after.append(set(later))
        eqns = [part] if not isinstance(part, list) else part
        for eqn in eqns:
            later |= {v for v in eqn.invars if not isinstance(v, core.Literal)}
    needed_after.reverse()
    consts = dict(zip(jaxpr.constvars, closed.consts))
    steps, blobs = [], []
    for part, after in zip(stretches, needed_after):
        if not isinstance(part, list):
            host = _host(part)
            steps.append({"extern": host.name, "params": [type_to_json(t) for t in host.params],
                          "result": type_to_json(host.result),
                          "in": [ident(v) for v in part.invars],
                          "out": [ident(v) for v in part.outvars]})
            continue
        if not part:
            continue
        defined = {v for eqn in part for v in eqn.outvars}
        used = [v for eqn in part for v in eqn.invars
                if not isinstance(v, core.Literal) and v not in defined]
        inputs = [v for v in dict.fromkeys(used) if v not in consts]
        for name in _dim_vars(v for eqn in part for v in (*eqn.invars, *eqn.outvars)
                              if not isinstance(v, core.Literal)) - _dim_vars(inputs):
            # a dim only the piece's own values have (a draw of shape [D] after the extern
            # call) is bound by an argument that has it, passed in but unused
            inputs.append(next(v for v in jaxpr.invars if name in _dim_vars([v])))
        cvars = [v for v in dict.fromkeys(used) if v in consts]
        outputs = [v for v in dict.fromkeys(v for eqn in part for v in eqn.outvars) if v in after]
        info = core.DebugInfo(f"piece {len(blobs)}", "gradlang.runtime.split",
                              tuple(f"v{ident(v)}" for v in inputs),
                              tuple(f"v{ident(v)}" for v in outputs))
        piece = core.ClosedJaxpr(core.Jaxpr(cvars, inputs, outputs, part, debug_info=info),
                                 [consts[v] for v in cvars])
        exported = export(jax.jit(core.jaxpr_as_fun(piece)),
                          tuple(jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in inputs))
        steps.append({"run": len(blobs), "in": [ident(v) for v in inputs],
                      "out": [ident(v) for v in outputs]})
        blobs.append(bytes(exported.serialize()))
    plan = {"inputs": [ident(v) for v in jaxpr.invars],
            "outputs": [ident(v) if not isinstance(v, core.Literal) else None for v in jaxpr.outvars],
            "out_tree": _skeleton(out_shape, [0]), "steps": steps}
    if any(o is None for o in plan["outputs"]):
        raise SplitError("the export returns a constant")
    return plan, blobs


def stitched(plan: dict, calls: list[Callable], externs) -> Callable:
    """The export replayed from its plan: `calls` run the pieces, `externs` bind the externs."""

    def run(*args):
        env = dict(zip(plan["inputs"], jax.tree.leaves(args)))
        for step in plan["steps"]:
            inputs = [env[i] for i in step["in"]]
            if "run" in step:
                outs = calls[step["run"]](*inputs)
            else:
                host = HostFunction(step["extern"], externs.get(step["extern"]),
                                    tuple(type_from_json(t) for t in step["params"]),
                                    type_from_json(step["result"]))
                outs = jax.tree.leaves(host.call(*inputs))
            env.update(zip(step["out"], outs))
        return _rebuild(plan["out_tree"], [env[i] for i in plan["outputs"]])

    return run
