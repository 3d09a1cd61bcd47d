"""The Python API: compile .grad sources or load artifacts into modules of callables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .diagnostics import CompileError, Diagnostics, SourceFile
from .ir import Module, bound_names
from .version import __version__

if TYPE_CHECKING:
    from .dims import DimBindings


def _check_x64(module: Module, diags: Diagnostics) -> None:
    import jax

    from .types import uses_f64

    if jax.config.jax_enable_x64:
        return
    for fn in module.functions:
        if any(uses_f64(p.value.type) for p in fn.params) or uses_f64(fn.result_type):
            diags.error("f64 needs JAX's 64-bit mode: set JAX_ENABLE_X64=1 or call "
                        "jax.config.update('jax_enable_x64', True) before compiling", fn.span)
            return


class _Exports:
    """Exports by name, as attributes and items."""

    def __init__(self, functions: dict):
        self._functions = functions

    @property
    def exports(self) -> dict:
        return dict(self._functions)

    def __getattr__(self, name: str):
        functions = self.__dict__.get("_functions", {})
        if name in functions:
            return functions[name]
        raise AttributeError(f"module has no export '{name}' (exports: {', '.join(functions)})")

    def __getitem__(self, name: str):
        return self._functions[name]


def _unbound(signature, externs: Mapping[str, object]):
    """The export as a function that says which of its externs are not bound."""
    from gradlang.runtime.host import ExternError

    missing = [n for n in signature.externs if n not in externs]

    def refuse(*args, **kwargs):
        raise ExternError(f"export '{signature.name}' calls extern "
                          f"{', '.join(repr(n) for n in missing)}, which is not bound: pass "
                          f"externs={{{', '.join(repr(n) + ': fn' for n in missing)}}}")

    return refuse


def _sharding(ir: Module, mesh, shard: Mapping[str, object]):
    """The checked placement of `shard=` on `mesh` (runtime.sharding.plan); each op that
    communicates on it is a `ShardingWarning` (runtime.communication)."""
    from gradlang.runtime.communication import warn
    from gradlang.runtime.execute import signature_of
    from gradlang.runtime.sharding import plan, populations

    sharding = plan(mesh, shard, [signature_of(ir, e) for e in ir.exports], populations(ir))
    warn(ir, sharding)
    return sharding


def _on_mesh(signature, fn, sharding):
    """A loaded export placed on the mesh by `sharding` when there is one."""
    if sharding is None:
        return fn
    from gradlang.runtime.sharding import sharded

    return sharded(signature, fn, sharding)


def _compiled(signature, fn, sharding):
    """The export jit-compiled: on the mesh by `sharding` when there is one. One that calls
    externs (black boxes, Python callbacks) refuses jax.grad / jax.jvp with a gradlang error
    (the artifact writer takes the raw function, whose callbacks it cuts the export at); the
    refusal goes inside the jit, so a sharded export keeps its `lower` and `place`."""
    import jax

    if signature.externs:
        from gradlang.runtime.host import ExternError
        from gradlang.runtime.signature import without_derivatives

        names = ", ".join(f"'{n}'" for n in signature.externs)
        fn = without_derivatives(fn, ExternError(
            f"export '{signature.name}' calls extern {names}, a black box with no derivative "
            f"for jax.grad or jax.jvp to go through: export the gradient with a black-box "
            f"estimator instead, grad(f, wrt=[...], by=spsa(eps=0.001)) (or by=es / "
            f"by=eggroll), or bind a differentiable JAX function as a `jax fn`"))
    if sharding is None:
        return jax.jit(fn, donate_argnums=signature.donated)
    from gradlang.runtime.sharding import sharded

    return sharded(signature, fn, sharding)


class CompiledModule(_Exports):
    """A compiled .grad module: `m.NAME(...)` calls an export; `m.ir` is the typed IR.

    `externs` binds the module's extern functions to Python callables by name; `functions`
    binds its `jax fn` declarations to JAX functions by name (traced inline; a missing or
    mismatched binding raises CompileError); `mesh` (a `jax.sharding.Mesh`) shards black-box
    estimators' populations over its first axis, or, with `shard` (dim name -> mesh axis),
    every export's arguments by their declared dims (`runtime.sharding`); `root` is the
    folder the source's local imports resolve in and `dims` the dims it was compiled with
    (for `verify`'s variants)."""

    def __init__(self, ir: Module, externs: Mapping[str, object] | None = None, mesh=None,
                 root: str | Path | None = None, functions: Mapping[str, object] | None = None,
                 shard: Mapping[str, object] | None = None,
                 dims: Mapping[str, int] | None = None):
        from gradlang.runtime.execute import export_function
        from gradlang.runtime.host import check_bindings
        from gradlang.runtime.jax_functions import check_bindings as check_functions
        from gradlang.runtime.signature import CompiledFunction

        self.ir = ir
        externs, functions = dict(externs or {}), dict(functions or {})
        diags = check_functions(ir, functions, externs)
        if diags.has_errors:
            raise CompileError(diags)
        check_bindings(externs, self._declared_externs())
        bindings = {**externs, **functions}
        sharding = None if shard is None else _sharding(ir, mesh, shard)
        self._sharding = sharding
        population = mesh if sharding is None else sharding.population
        self._origin = (bindings, population, None if root is None else Path(root),
                        dict(dims or {}))
        self._raw = {e.name: export_function(ir, e, bindings, population) for e in ir.exports}
        super().__init__({
            name: CompiledFunction(sig, _compiled(sig, fn, sharding)
                                   if set(sig.externs) <= set(externs)
                                   else _unbound(sig, externs))
            for name, (sig, fn) in self._raw.items()})

    def _declared_externs(self) -> set[str]:
        return bound_names(self.ir, "host_call")

    def stablehlo(self, name: str, dims: Mapping[str, int] | None = None,
                  debug_info: bool = False,
                  example_args: Mapping[str, object] | None = None) -> str:
        """StableHLO text of export `name`; symbolic dims stay symbolic unless fixed in `dims`;
        a tree parameter is laid out as its value in `example_args` (by parameter name)."""
        from gradlang.runtime.artifact import with_layouts
        from gradlang.runtime.stablehlo import lower_to_stablehlo, module_text

        ((signature, fn),) = with_layouts([self._raw[name]], example_args or {})
        return module_text(lower_to_stablehlo(signature, fn, dims), debug_info)

    def verify(self, name: str, args=None, *, dims: Mapping[str, int] | None = None,
               samples: int = 1000, seed: int = 0, reference_samples: int = 4096,
               coordinates: int = 32, smoothing: float = 0.05, compare: bool = False):
        """Check export `name`'s gradient against a reference (see docs/reference/verify.md):
        `args` by parameter name (structs as dicts) or in order, without the key
        (None: generated from the declared types, symbolic dims from `dims`). Returns a
        `gradlang.verify.ExportReport` (`.verdict`, `.leaves`, `.to_json()`, `print(...)`);
        raises `gradlang.verify.VerifyError` on bad input."""
        from gradlang.verify import Origin, Settings, verify_export

        externs, mesh, root, fixed = self._origin
        source = next((e.span.source for e in self.ir.exports), SourceFile("<source>", ""))
        settings = Settings(samples, seed, reference_samples, coordinates, smoothing)
        origin = Origin(source, root, externs, mesh, fixed)
        return verify_export(origin, self.ir, name, args, dims, settings, compare)

    def artifact(self, dims: Mapping[str, int] | None = None,
                 platforms: Sequence[str] | None = None,
                 example_args: Mapping[str, object] | None = None) -> bytes:
        """The portable artifact of every export (see `gradlang.load`), lowered for each of
        `platforms` (default `gradlang.runtime.artifact.DEFAULT_PLATFORMS`: cpu and cuda).
        `example_args` gives each tree parameter (by name) a value: the artifact is exported
        for its structure, leaf shapes and dtypes, and a loaded module checks arguments
        against them (an ArtifactError without one). A module compiled with `shard=` records
        the mapping and its mesh's shape (`gradlang.load(path, mesh=...)` places it so)."""
        from gradlang.runtime.artifact import DEFAULT_PLATFORMS, serialize
        from gradlang.runtime.sharding import to_json

        return serialize(self.ir.name, __version__, list(self._raw.values()), dims,
                         DEFAULT_PLATFORMS if platforms is None else platforms,
                         sorted(self._declared_externs()), example_args,
                         None if self._sharding is None else to_json(self._sharding))

    def save(self, path: str | Path, dims: Mapping[str, int] | None = None,
             platforms: Sequence[str] | None = None,
             example_args: Mapping[str, object] | None = None) -> Path:
        """Write `artifact(dims, platforms, example_args)` to `path`."""
        path = Path(path)
        path.write_bytes(self.artifact(dims, platforms, example_args))
        return path


class LoadedModule(_Exports):
    """A module loaded from an artifact; needs neither the source nor the compiler front end.

    `externs` binds the extern functions its exports call (by name, as when compiling);
    `mesh` and `shard` place the exports on devices as when compiling (`shard` defaults to
    the mapping the artifact recorded, whose mesh shape `mesh` must have).
    `header` is the artifact's checked JSON header (`header["platforms"]`: those it runs on)."""

    def __init__(self, path: str | Path, externs: Mapping[str, object] | None = None,
                 mesh=None, shard: Mapping[str, object] | None = None):
        from gradlang.runtime.artifact import loaded_function, read
        from gradlang.runtime.host import check_bindings
        from gradlang.runtime.sharding import loaded
        from gradlang.runtime.signature import CompiledFunction

        self.header, entries = read(path)
        sharding = loaded(self.header.get("sharding"), mesh, shard,
                          [sig for sig, _ in entries.values()], str(path))
        externs = dict(externs or {})
        check_bindings(externs, {*self.header.get("externs", ()),
                                 *(n for sig, _ in entries.values() for n in sig.externs)})
        self._exported = {n: e for n, (_, e) in entries.items()}
        super().__init__({
            n: CompiledFunction(sig, _on_mesh(sig, loaded_function(sig, content, externs), sharding)
                                if set(sig.externs) <= set(externs) else _unbound(sig, externs))
            for n, (sig, content) in entries.items()})

    def exported(self, name: str) -> list:
        """The `jax.export.Exported` objects of export `name`: one, or for an export split at
        extern calls, its pieces (`.platforms`, `.in_avals`, `.mlir_module()`)."""
        content = self._exported[name]
        return list(content[1]) if isinstance(content, tuple) else [content]

    def stablehlo(self, name: str) -> str:
        """StableHLO of export `name` (of each piece, for an export split at extern calls)."""
        return "\n".join(p.mlir_module() for p in self.exported(name))


def _check_dims(module: Module, bindings: DimBindings, path: str, diags: Diagnostics) -> None:
    """An error for each name of `dims=` that an export's arguments bind (they fix it at each
    call; lowering fixes it with `stablehlo(name, dims=)`), or that nothing uses."""
    from gradlang.runtime.execute import signature_of

    bound = [(e, signature_of(module, e).dims) for e in module.exports] if bindings.sizes else []
    for name, size in bindings.sizes.items():
        export = next((e for e, dims in bound if name in dims), None)
        if export is not None:
            diags.error(f"dims={{'{name}': {size}}}: the arguments of export '{export.name}' bind "
                        f"dim {name} at each call, so it cannot be fixed when compiling (dims= is "
                        f"for dims that no argument binds); to fix it in StableHLO or an "
                        f"artifact, pass it to stablehlo(name, dims=...) or artifact(dims=...)",
                        export.span)
        elif name not in bindings.used:
            diags.error(f"dims={{'{name}': {size}}}: no function of {path} uses a dim "
                        f"'{name}' that its arguments do not bind", None)


def compile_source(text: str, name: str = "<source>", root: str | Path | None = None,
                   strict: bool = False, externs: Mapping[str, object] | None = None,
                   mesh=None, functions: Mapping[str, object] | None = None,
                   shard: Mapping[str, object] | None = None,
                   dims: Mapping[str, int] | None = None) -> CompiledModule:
    """Compile .grad source text; `root` is the folder local imports resolve in; `externs`
    binds extern functions to Python callables (wrap vectorized ones in `gradlang.batched`);
    `functions` binds `jax fn` declarations to JAX functions, traced inline; `mesh` shards the
    populations of black-box estimators (`by=es / eggroll`) over devices, or with `shard`
    (dim name -> mesh axis name, `{"B": "data"}`; `"pop"`: a black-box population) places
    every export's arguments on the mesh by their declared dims (docs/scaling.md); a `shard`
    that does not fit the module or the mesh raises `ShardingError`. `dims` fixes the dims
    that no argument binds (`{"K": 8}`: every K of a function whose parameters lack it is 8,
    as in `expect(f, samples=K)`); a dim an export's arguments bind is refused there.

    Raises CompileError (its message is the rendered diagnostics) when the program has errors,
    or, with `strict`, warnings, or a `jax fn` is not bound or does not match its binding.
    """
    from .dims import DimBindings, check_sizes
    from .driver import compile_module  # the front end (and lark) only when compiling

    bindings = DimBindings(check_sizes(dims or {}))
    diags = Diagnostics()
    source = SourceFile(name, text)
    module = compile_module(source, Path(root) if root is not None else None, diags,
                            dims=bindings)
    if module is not None:
        _check_dims(module, bindings, name, diags)
        _check_x64(module, diags)
    if diags.has_errors or (strict and diags.items):
        raise CompileError(diags)
    assert module is not None
    return CompiledModule(module, externs, mesh, root, functions, shard, bindings.sizes)


def compile_file(path: str | Path, strict: bool = False,
                 externs: Mapping[str, object] | None = None, mesh=None,
                 functions: Mapping[str, object] | None = None,
                 shard: Mapping[str, object] | None = None,
                 dims: Mapping[str, int] | None = None) -> CompiledModule:
    """Compile a .grad file (local imports resolve beside it; bindings as in `compile_source`).
    A file that cannot be read or is not UTF-8 text raises CompileError, as bad source does."""
    from .driver import read_source

    path = Path(path)
    diags = Diagnostics()
    source = read_source(path, diags, None)
    if source is None:
        raise CompileError(diags)
    return compile_source(source.text, str(path), path.parent, strict, externs, mesh, functions,
                          shard, dims)


def load(path: str | Path, externs: Mapping[str, object] | None = None, mesh=None,
         shard: Mapping[str, object] | None = None) -> LoadedModule:
    """Load an artifact written by `gradlang compile --emit artifact` or `CompiledModule.save`;
    `externs` binds the extern functions its exports call. Raises `gradlang.ArtifactError`
    when the file is damaged or edited, or was not lowered for this machine's platform.
    `mesh` places the exports on devices by `shard` (dim name -> mesh axis) or, without it,
    by the mapping the artifact was saved with, whose mesh shape `mesh` must have (else
    `ShardingError`); without `mesh`, they run on one device."""
    return LoadedModule(path, externs, mesh, shard)
