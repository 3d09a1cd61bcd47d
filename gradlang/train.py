"""Training loops over a gradient export and an optax optimizer: `Trainer(export, opt)`.

The trainer threads what an export carries from call to call so that the user does not: the
optimizer's state, the export's own state (a moving-average `baseline`, a learned `control`,
compose's `inner`, dynamic weights' `history`; zeros at the start) and the key of an export that
draws (or adds DP noise), split once per step. Any object with optax's `init(params)` and
`update(grads, state, params)` serves as the optimizer; optax itself is not imported.

With an export compiled with `shard=` (docs/scaling.md), the state stays on its mesh: the
parameters placed as the export places them, every part of the optimizer state shaped as
the parameters (Adam's moments, a momentum) placed the same way, the export's state as its
parameter, the rest (a step count, the key) replicated.

    trainer = gradlang.Trainer(m.step, optax.adam(1e-3))
    state = trainer.init(params, key=jax.random.key(0))
    for x, y in batches:
        state, out = trainer.update(state, x, y)   # out.value, out.aux
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import jax
from jax.sharding import NamedSharding, PartitionSpec

from gradlang.runtime.lower import bind_dims
from gradlang.runtime.sharding import canonical, placement
from gradlang.runtime.signature import ArgumentError, Signature, zeros
from gradlang.types import KEY


class Optimizer(Protocol):
    """An optax `GradientTransformation` (or anything with its two methods)."""

    def init(self, params: Any) -> Any: ...

    def update(self, updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]: ...


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class TrainState:
    """What one training step passes to the next (a pytree: it goes through `jax.jit`)."""

    params: Any
    """The `wrt` parameters: the tree itself for one, else a dict by name."""
    opt_state: Any
    export_state: Any
    """The export's state (None when it has none)."""
    key: Any
    """The key split for each step's draws (None when the export does not draw)."""
    step: Any


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class StepOutput:
    """What a step reports: the objective's value (None for a `grad` export; `minimize`: one
    per objective), the export's auxiliary values (`has_aux=true`, else None) and the
    gradient (or `minimize`'s combined direction) the optimizer was given."""

    value: Any
    aux: Any
    grads: Any


class Trainer:
    """`init` / `update` for a `grad`, `value_and_grad` or `minimize` export and an optax
    optimizer; `update` is jit-compiled once per argument shapes."""

    def __init__(self, export: Any, optimizer: Optimizer):
        signature: Signature | None = getattr(export, "signature", None)
        if signature is None:
            raise TypeError(f"Trainer takes a gradlang export (m.NAME), got {type(export).__name__}")
        if signature.kind not in ("grad", "value_and_grad", "minimize"):
            what = ("updates its parameters itself" if signature.kind == "descend"
                    else "returns no gradient")
            raise ArgumentError(f"Trainer needs a grad, value_and_grad or minimize export; "
                                f"'{signature.name}' is a {signature.kind} export, which {what}")
        self.export, self.optimizer, self.signature = export, optimizer, signature
        names = [n for n, _ in signature.params]
        self.draws = KEY in (t for _, t in signature.params)
        skip = {*signature.wrt, signature.state, "key" if self.draws else None}
        self.data = [n for n in names if n not in skip]
        """The arguments each step takes, in the export's order."""
        self.placement = placement(export)
        """The export's parameters' shardings by name (None: not compiled with shard=)."""
        self._update = jax.jit(self._step)

    def _named(self, args: tuple, kwargs: dict, where: str) -> dict:
        if len(args) > len(self.data):
            raise ArgumentError(f"{where} takes the export's other arguments ({', '.join(self.data)}); "
                                f"{len(args)} were given")
        named = dict(zip(self.data, args))
        for k, v in kwargs.items():
            if k not in self.data or k in named:
                problem = "two values for" if k in named else "no argument"
                raise ArgumentError(f"{where}: {problem} '{k}' (arguments: {', '.join(self.data)})")
            named[k] = v
        return named

    def _wrt(self, params: Any) -> dict:
        wrt = self.signature.wrt
        if len(wrt) == 1:
            return {wrt[0]: params}
        if not (isinstance(params, dict) and set(params) == set(wrt)):
            raise ArgumentError(f"'{self.signature.name}' differentiates {', '.join(wrt)}: pass "
                                f"params as a dict with those keys")
        return params

    def init(self, params: Any, *args: Any, key: Any = None, **kwargs: Any) -> TrainState:
        """The state before the first step. `params`: the `wrt` parameters (the tree itself
        for one, a dict by name for several). `key`: needed when the export draws. Example
        arguments (`args` / `kwargs`, by the export's names) size an export state whose dims
        the parameters do not fix."""
        if self.draws and key is None:
            raise ArgumentError(f"export '{self.signature.name}' draws: pass key=jax.random.key(0)")
        params = jax.tree.map(jax.numpy.asarray, params)   # Python numbers too
        if self.placement is not None:   # structs as the dicts their shardings are laid out in
            types = dict(self.signature.params)
            params = self._tree({w: canonical(types[w], v) for w, v in self._wrt(params).items()})
        named = {**self._wrt(params), **self._named(args, kwargs, "init")}
        export_state = None
        if self.signature.state is not None:
            dims: dict[str, int] = {}
            for n, t in self.signature.params:
                if n in named:
                    bind_dims(t, named[n], dims)
            t = dict(self.signature.params)[self.signature.state]
            try:
                export_state = jax.tree.map(jax.numpy.asarray, zeros(t, dims))
            except ArgumentError as exc:
                raise ArgumentError(f"{exc}, the state '{self.signature.state}' of "
                                    f"'{self.signature.name}': pass example arguments to init, "
                                    f"e.g. trainer.init(params, {', '.join(self.data)})") from None
        state = TrainState(params, self.optimizer.init(params), export_state,
                           key if self.draws else None, jax.numpy.zeros((), jax.numpy.int32))
        return state if self.placement is None else jax.device_put(state, self._layout(state))

    def _tree(self, named: dict) -> Any:
        """The `wrt` parameters as `state.params` holds them: the tree itself for one."""
        return named[self.signature.wrt[0]] if len(self.signature.wrt) == 1 else named

    def _layout(self, state: TrainState) -> TrainState:
        """The shardings of a state on a sharded export's mesh: the parameters' (per leaf), for
        the parameters, each subtree of the optimizer state with their structure and shapes,
        and the export's state; the step count, the key and the rest replicated."""
        def leaves(name: str, value: Any) -> Any:
            return jax.tree.broadcast(self.placement[name], value)

        params = self._tree({w: leaves(w, v) for w, v in self._wrt(state.params).items()})
        layout = jax.tree.structure(state.params)
        shapes = [jax.numpy.shape(v) for v in jax.tree.leaves(state.params)]
        mesh = jax.tree.leaves(self.placement)[0].mesh
        whole = NamedSharding(mesh, PartitionSpec())

        def like_params(t: Any) -> bool:
            return jax.tree.structure(t) == layout and \
                [jax.numpy.shape(v) for v in jax.tree.leaves(t)] == shapes

        opt = jax.tree.map(lambda t: params if like_params(t) else whole, state.opt_state,
                           is_leaf=like_params)
        export = None if state.export_state is None else \
            leaves(self.signature.state, state.export_state)
        return TrainState(params, opt, export, None if state.key is None else whole, whole)

    def update(self, state: TrainState, *args: Any, **kwargs: Any) -> tuple[TrainState, StepOutput]:
        """One step: the export's gradient at `state.params` and these arguments, then the
        optimizer's update; the export's state and key carried forward."""
        return self._update(state, self._named(args, kwargs, "update"))

    def _step(self, state: TrainState, named: dict) -> tuple[TrainState, StepOutput]:
        sig = self.signature
        named = {**named, **self._wrt(state.params)}
        key = state.key
        if self.draws:
            key, named["key"] = jax.random.split(key)
        if sig.state is not None:
            named[sig.state] = state.export_state
        out = self.export(*(named[n] for n, _ in sig.params))
        out = out if isinstance(out, tuple) else (out,)
        export_state = out[-1] if sig.state is not None else None
        if sig.state is not None:
            out = out[:-1]
        value = out[0] if sig.kind != "grad" else None
        grads = out[1] if sig.kind != "grad" else out[0]
        aux = out[-1] if sig.aux is not None else None
        tree = grads[sig.wrt[0]] if len(sig.wrt) == 1 else grads
        updates, opt_state = self.optimizer.update(tree, state.opt_state, state.params)
        params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), state.params, updates)
        state = TrainState(params, opt_state, export_state, key, state.step + 1)
        if self.placement is not None:
            state = jax.lax.with_sharding_constraint(state, self._layout(state))
        return state, StepOutput(value, aux, tree)
