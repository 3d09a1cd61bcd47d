"""One export as `verify` runs it: its gradient (every form called as `grad`), its objective's
value, and the measurements of its estimates (samples, time, compiled memory)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
import numpy as np

from gradlang.estimators.compose import estimator_of
from gradlang.ir import Export, Module
from gradlang.runtime.execute import export_function
from gradlang.runtime.lower import Lowering, bind_dims
from gradlang.runtime.signature import ArgumentError, CompiledFunction, Signature, zeros
from gradlang.types import KEY

from . import progress
from .inputs import VerifyError

CHUNK_BYTES = 1 << 28
"""Estimates are vmapped in chunks whose compiled memory stays about this size."""
FAST_COMPILE = {"xla_backend_optimization_level": 0}
"""XLA's fastest compilation, first for every batch (`batched`): on CPU it compiles 2.3x (an ES
gradient of a small MLP) to 2.7x (an ES gradient through an lbfgs argmin) faster than the
default level, and its code runs 2.5x to 7x slower (the argmin's line search, vmapped, runs
all 30 trial steps every iteration, arithmetic that level 0 leaves unoptimized)."""
OPTIMIZED = {"xla_backend_optimization_level": 1}
"""Compiles in 1.4x (the MLP) to 1.7x (the argmin) the time of level 0, and its code runs
within 10% of the default level's. Measured 2026-12-07, jax 0.10.2, 2-core CPU (CPU seconds;
`docs/reference/verify.md`)."""
RECOMPILE = 3.0
"""Level 1 saves at least 1 - 1 / 2.4 = 58% of a run at level 0 (the MLP) for an extra 1.7
compilations (the argmin), so it pays once the rest would take more than 1.7 / 0.58 = 3
level-0 compilations at level 0."""
PIECES = 16
"""A batch runs in about this many calls (fewer when it has fewer entries): the first two
decide the optimization level of the rest, progress is shown and Ctrl-C is taken between two."""


def leaf_names(tree) -> list[str]:
    """`enc.w1`-style names of a pytree's leaves, in flattening order."""
    paths, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
            for path, _ in paths]


@dataclass(frozen=True)
class Memory:
    """XLA's compiled memory analysis of one estimate, in bytes."""

    temp: int
    argument: int
    output: int
    alias: int

    @property
    def peak(self) -> int:
        return self.temp + self.argument + self.output - self.alias


@dataclass(frozen=True)
class Program:
    """An export ready to estimate: arguments are always passed to the functions jitted
    here, never closed over (XLA would embed them as constants, and its memory analysis would
    not see them)."""

    module: Module
    export: Export
    signature: Signature
    """The signature of the export as a `grad` (a `descend` loses its `lr`); key last. A
    `minimize` export keeps its own; one of its objectives (`name[i]`) is a `grad`."""
    gradient: Callable
    value: Callable | None
    """The export's objective as computed (a Monte Carlo mean for `expect`), with the same
    arguments (the key only when `value_draws`); None for a whole `minimize` export."""
    value_draws: bool
    warmup: int = 0
    """Calls at fixed arguments before each measured estimate, the state threaded (SCGD: so
    that the moving average tracks the inner expectation, as in training)."""

    @property
    def state(self) -> str | None:
        """The parameter carrying state from call to call (`baseline=ma`'s baseline,
        compose's `inner`, a learned control variate's `control`), zeros unless given; None
        when there is none (a `minimize` export's `history` is an argument like the others)."""
        return None if self.export.transform.kind == "minimize" else self.signature.state

    @property
    def draws(self) -> bool:
        return self.signature.params[-1][1] is KEY

    @property
    def params(self) -> tuple:
        """The parameters the caller gives (the key comes from the seed)."""
        return self.signature.params[:-1] if self.draws else self.signature.params

    def arguments(self, named: Mapping[str, object]) -> list:
        """The arguments in parameter order from `named` (by name), checked against the
        declared types (a VerifyError otherwise); the moving-average state defaults to zeros."""
        dims: dict[str, int] = {}  # sizes a per-entry moving average takes from the others
        for n, t in self.params:
            if n != self.state and n in named:
                bind_dims(t, named[n], dims)
        try:
            args = [named[n] if n in named or n != self.state else zeros(t, dims)
                    for n, t in self.params]
        except ArgumentError as exc:
            raise VerifyError(f"{exc} (the state): give its '{self.state}' argument") from None
        probe = [*args, jax.random.key(0)] if self.draws else list(args)
        try:
            CompiledFunction(self.signature, self.gradient).bind(tuple(probe), {})
        except ArgumentError as exc:
            raise VerifyError(str(exc).replace(f"{self.signature.name}(): ", "")) from None
        return [jax.tree.map(jnp.asarray, a) for a in args]

    def estimate(self, args: list, key=None):
        """The gradient estimate at `args` (a dict by wrt name; `minimize`: the direction)."""
        out = self.gradient(*args, key) if self.draws else self.gradient(*args)
        if self.export.transform.kind == "minimize":
            return out[1]
        return out[0] if self.signature.stateful else out

    def objective(self, args: list) -> tuple[Callable, list]:
        """(f(leaves, args, key=None) -> the objective's value at `args` with the wrt
        parameters' leaves replaced, the leaves at `args`), leaves in the order of the
        gradient's. The key may be left out when every draw is enumerated."""
        names = [n for n, _ in self.params]
        wrt = self.signature.wrt
        theta, tree = jax.tree.flatten({w: args[names.index(w)] for w in wrt})

        def f(leaves: list, args: list, key=None):
            full = list(args)
            given = tree.unflatten(leaves)
            for w in wrt:
                full[names.index(w)] = given[w]
            if self.value_draws:
                full.append(jax.random.key(0) if key is None else key)
            out = self.value(*full)
            return out[0] if self.signature.stateful else out

        return f, theta


PART = re.compile(r"(.+)\[(\d+)\]")
WARMUP = 5
"""SCGD is measured after ceil(WARMUP / beta) calls: its moving average forgets its start as
(1 - beta)^calls, e^-5 < 1% here."""


def _find(module: Module, name: str) -> tuple[Export, int | None]:
    """The export `name`, or the objective `i` of the `minimize` export `name[i]`."""
    part = PART.fullmatch(name)
    base, index = (part.group(1), int(part.group(2))) if part else (name, None)
    export = next((e for e in module.exports if e.name == base), None)
    if export is None:
        grads = [e.name for e in module.exports if e.transform.kind != "fn"]
        raise VerifyError(f"no export '{name}' (exports with a gradient: "
                          f"{', '.join(grads) or 'none'})")
    if index is not None and (export.transform.kind != "minimize"
                              or index >= len(export.transform.objectives)):
        raise VerifyError(f"no objective {index} in export '{base}'")
    return export, index


def load(module: Module, name: str, externs: Mapping[str, object], mesh=None) -> Program:
    """Export `name` of a compiled IR, with the Python bindings of its externs; `name[i]` is
    the gradient of objective i of a `minimize` export, as that export computes it."""
    export, index = _find(module, name)
    t = export.transform
    if t.kind == "fn":
        raise VerifyError(f"export '{name}' computes no gradient ({t.fn} itself); verify checks "
                          f"grad, value_and_grad, descend, minimize and compose exports")
    if t.kind == "minimize" and index is None:
        export = replace(export, transform=replace(t, descend=False, lr=None))  # its direction
        signature, step = export_function(module, export, externs, mesh)
        program = Program(module, export, signature, step, None, False)
    else:
        part = export.parts()[index] if index is not None else export
        pt = part.transform
        as_grad = replace(part, transform=replace(pt, kind="grad", lr=None))
        signature, gradient = export_function(module, as_grad, externs, mesh)
        warmup = 0
        if pt.compose is not None:
            warmup = estimator_of(pt.compose.by).warmup(WARMUP)
        program = Program(module, as_grad if index is not None else export, signature, gradient,
                          Lowering(module, externs).function(pt.fn),
                          pt.fn in module.facts.random, warmup)
    unbound = [n for n in program.signature.externs if n not in externs]
    if unbound:
        raise VerifyError(f"export '{name}' calls extern {', '.join(map(repr, unbound))}, which "
                          f"is not bound; bind it from Python: gradlang.compile_file(path, "
                          f"externs={{...}}).verify('{name}', ...)")
    return program


def compiled(fn: Callable, *args):
    """fn jitted and compiled for `args` as a user's call would be (default XLA options)."""
    return jax.jit(fn).lower(*args).compile()


def memory(executable) -> Memory:
    """XLA's memory analysis of a compiled executable (zeros where the backend has none)."""
    stats = executable.memory_analysis()
    if stats is None:
        return Memory(0, 0, 0, 0)
    return Memory(stats.temp_size_in_bytes, stats.argument_size_in_bytes,
                  stats.output_size_in_bytes, stats.alias_size_in_bytes)


def _timed(executable, args: tuple, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        out = executable(*args)
    jax.block_until_ready(out)
    return time.perf_counter() - start


def interleaved_seconds(runs: list[tuple], budget: float = 0.2, rounds: int = 20) -> list[float]:
    """Wall time of one call of each compiled executable in `runs` ((executable, args)
    pairs): the fastest of `rounds` rounds (as `timeit` reports), each round long enough
    (calls doubling, at most 1024) to take budget / rounds seconds; the rounds of the
    executables are interleaved, so a drift in the machine's speed falls on all alike."""
    calls = []
    for executable, args in runs:
        jax.block_until_ready(executable(*args))
        n = 1
        while _timed(executable, args, n) < budget / rounds and n < 1024:
            n *= 2
        calls.append(n)
    best = [float("inf")] * len(runs)
    for _ in range(rounds):
        for i, ((executable, args), n) in enumerate(zip(runs, calls)):
            best[i] = min(best[i], _timed(executable, args, n) / n)
    return best


def batched(fn: Callable, xs: tuple, n: int, chunk: int, fixed: tuple = (),
            what: str = "entries"):
    """fn(*xs, *fixed) vmapped over the leading axis of the arrays xs (n entries), not over
    `fixed`, in chunks of at most `chunk` and at most n / PIECES entries, stacked; the last
    chunk is padded so that one tracing serves all. It is compiled at XLA's backend
    optimization level 0, and again at level 1 for the chunks after the first two when those
    show that the rest would run longer than `RECOMPILE` times that compilation (so which
    level rounds the rest depends on timings). Progress is reported (as `what`) after each
    chunk, and Ctrl-C stops between two."""
    chunk = max(1, min(chunk, -(-n // PIECES)))
    starts = range(0, n, chunk)

    def part(start: int):
        """The entries from `start` on, padded to `chunk` by repeating them; their number."""
        size = min(chunk, n - start)
        rows = start + np.arange(chunk) % size
        return jax.tree.map(lambda x: x[rows], xs), size

    first, _ = part(0)
    progress.note(f"{what}: compiling")
    lowered = jax.jit(jax.vmap(lambda p, c: fn(*p, *c), in_axes=(0, None))).lower(first, fixed)
    began = time.perf_counter()
    run = lowered.compile(FAST_COMPILE)
    compile_seconds = time.perf_counter() - began
    done = progress.counter(what, n)
    outs, seconds = [], []
    for i, start in enumerate(starts):
        xs_part, size = part(start)
        began = time.perf_counter()
        outs.append(jax.tree.map(lambda y: np.asarray(y)[:size], run(xs_part, fixed)))
        seconds.append(time.perf_counter() - began)
        done(start + size)
        if i == 1 and recompile(compile_seconds, min(seconds), len(starts) - 2):
            progress.note(f"{what}: compiling at optimization level 1")
            run = lowered.compile(OPTIMIZED)
    return jax.tree.map(lambda *ys: np.concatenate(ys), *outs)


def recompile(compile_seconds: float, piece_seconds: float, rest: int) -> bool:
    """Whether the `rest` chunks still to run, each `piece_seconds` at optimization level 0
    (the faster of the first two: a first call's set-up or a stall of the machine in one does
    not decide), are better compiled again at level 1 (level 0 took `compile_seconds`)."""
    return rest * piece_seconds > RECOMPILE * compile_seconds


def chunk_for(peak: int) -> int:
    return int(max(1, min(1024, CHUNK_BYTES // max(peak, 1))))


def flat_leaves(tree, n: int) -> list[np.ndarray]:
    """The leaves of a pytree of n stacked estimates, as float64 [n, size]."""
    return [np.asarray(x, np.float64).reshape(n, -1) for x in jax.tree.leaves(tree)]


def draw_estimates(program: Program, args: list, n: int, key, chunk: int,
                   what: str = "estimates") -> list[np.ndarray]:
    """n estimates of an export that draws (keys split from `key`), per leaf as float64
    [n, size]. A moving-average baseline is carried from one estimate to the next, as in
    training (it starts at the argument given); with `warmup`, each estimate is instead the
    last of its own chain of warmup + 1 calls (independent estimates, each after warm-up)."""
    keys = jax.random.split(key, n)
    if program.state is not None:
        at = [p for p, _ in program.params].index(program.state)

        def calls(keys, args):
            def step(state, k):
                full = list(args)
                full[at] = state
                grads, state = program.gradient(*full, k)
                return state, grads

            return jax.lax.scan(step, args[at], keys)

        if program.warmup:
            def chain(k, args):
                ks = jax.random.split(k, program.warmup + 1)
                state, _ = calls(ks[:-1], args)
                full = list(args)
                full[at] = state
                return program.gradient(*full, ks[-1])[0]

            stacked = batched(chain, (keys,), n, chunk, (args,), what)
        else:
            stacked = _chained(calls, keys, args, at, what)
    else:
        stacked = batched(lambda k, a: program.estimate(a, k), (keys,), n, chunk, (args,),
                          what)
    return flat_leaves(stacked, n)


def _chained(calls: Callable, keys, args: list, at: int, what: str):
    """The results of calls(keys, args) -> (state, results), a chain of calls threading the
    state args[at] from one key to the next, run in about PIECES pieces, each from the state
    the one before left (the last piece padded with its last key: the state it leaves is not
    used). Compiled once at optimization level 0; progress and Ctrl-C between two pieces."""
    n = keys.shape[0]
    piece = -(-n // PIECES)
    progress.note(f"{what}: compiling")
    run = jax.jit(calls).lower(keys[:piece], args).compile(FAST_COMPILE)
    done = progress.counter(what, n)
    outs, full = [], list(args)
    for start in range(0, n, piece):
        size = min(piece, n - start)
        full[at], results = run(keys[np.minimum(np.arange(start, start + piece), n - 1)], full)
        outs.append(jax.tree.map(lambda y: np.asarray(y)[:size], results))
        done(start + size)
    return jax.tree.map(lambda *ys: np.concatenate(ys), *outs)
