"""Portable artifacts (.gx): `jax.export` serializations of each export plus a JSON header.

Layout: the magic bytes `GRADLANG-GX\\0`, a little-endian u32 header length, the UTF-8 JSON
header, then the serialized exports back to back. The header records the gradlang version,
the module name, the platforms every export was lowered for, the extern functions the module
declares, the jax functions traced into its exports (held whole: loading needs no binding for
them) and, per export, its signature (a tree parameter with the layout it was saved for:
dicts, lists, tuples, None and leaves' dtypes and shapes, `types.layout_to_json`) and its
blobs' offsets, sizes and SHA-256s: one blob,
or, for an export that calls extern functions, the pieces between its host callbacks and the
plan that replays them (`runtime.split`). Never a pickle.

Loading trusts nothing in the file: the header is checked against a schema (the type of every
field, known dtypes and platforms, export and parameter names that are identifiers, `wrt`
names that are parameters, blob ranges inside the file, a plan whose steps read only values
defined before them) and each deserialized blob against its export's signature (its name, its
arguments' tree, dtypes and shapes, its platforms), so a damaged or edited artifact is an
`ArtifactError` at load, never an error from inside JAX at the first call.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import jax
import numpy as np

from gradlang.types import DType, TreeType, substitute_dims

from .dtypes import JNP_DTYPES
from .jax_functions import JaxFunctionError
from .signature import ArgumentError, Signature, casting, without_derivatives
from .sharding import devices
from .split import SplitError, split, stitched

MAGIC = b"GRADLANG-GX\0"
FORMAT_VERSION = 3
TREE_FORMAT_VERSION = 4
"""Format 3 with tree parameters' layouts: written only when an export takes a tree, so that a
gradlang that predates trees says it cannot read the file instead of calling it corrupt."""
READABLE_VERSIONS = (1, 2, 3, 4)
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
"""The platforms `jax.export` lowers for; it needs no device of the kind to do so."""
DEFAULT_PLATFORMS = ("cpu", "cuda")
"""A laptop's artifact runs on an NVIDIA GPU as well; ROCm and TPU on request. Over the 79
exports of the examples that save, cuda adds 11% to the artifacts' size (rocm 8% more) and
about a third to the time to save (measured on a loaded 2-core machine)."""
KINDS = ("fn", "grad", "value_and_grad", "descend", "minimize")
MAX_DEPTH = 64
"""Deepest nesting of header JSON accepted (a real header nests a few levels per struct)."""


class ArtifactError(Exception):
    """The file is not a readable gradlang artifact, or the module cannot be saved as one for
    the platforms asked."""


def platform_list(platforms: Sequence[str]) -> tuple[str, ...]:
    """`platforms` checked: known names, at least one, none twice."""
    if not isinstance(platforms, Sequence) or isinstance(platforms, str) or not platforms:
        raise ArtifactError(f"platforms must be a non-empty list of names from "
                            f"{', '.join(PLATFORMS)}; got {platforms!r}")
    unknown = [p for p in platforms if p not in PLATFORMS]
    if unknown:
        raise ArtifactError(f"unknown platform {unknown[0]!r}: choose from {', '.join(PLATFORMS)}")
    if len(set(platforms)) != len(platforms):
        raise ArtifactError(f"platforms {', '.join(platforms)} name one twice")
    return tuple(platforms)


def serialize(module_name: str, version: str,
              exports: list[tuple[Signature, Callable]],
              dims: Mapping[str, int] | None = None,
              platforms: Sequence[str] = DEFAULT_PLATFORMS, externs: Sequence[str] = (),
              examples: Mapping[str, object] | None = None,
              sharding: dict | None = None) -> bytes:
    """Export each function with `jax.export` for `platforms` (symbolic dims kept unless fixed
    in `dims`). `externs` are the module's declared externs: a loaded module accepts bindings
    for them even where no export calls them, as the compiled module does. `examples` gives
    each tree parameter (by name) a value whose structure, leaf shapes and dtypes the artifact
    is exported for and records. `sharding` (`runtime.sharding.to_json`) is recorded in the
    header for `gradlang.load(path, mesh=...)`."""
    platforms = platform_list(platforms)
    exports = with_layouts(exports, examples or {})
    blobs: list[bytes] = []
    entries = []

    def place(blob: bytes) -> dict:
        offset = sum(len(b) for b in blobs)
        blobs.append(blob)
        return {"offset": offset, "size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}

    for signature, fn in exports:
        entry = _fixed(signature, dims).to_json()

        def export(f: Callable, specs: tuple) -> jax.export.Exported:
            return _exported(signature.name, f, specs, platforms)

        if signature.externs:
            try:
                plan, pieces = split(fn, signature.specs(dims), export)
            except SplitError as exc:
                raise SplitError(f"export '{signature.name}' calls extern "
                                 f"{', '.join(map(repr, signature.externs))} and cannot be saved "
                                 f"as an artifact: {exc}") from None
            entry |= {"plan": plan, "pieces": [place(b) for b in pieces]}
        else:
            try:
                entry |= place(bytes(export(jax.jit(fn), signature.specs(dims)).serialize()))
            except JaxFunctionError as exc:
                if not any(isinstance(t, TreeType) for _, t in signature.params):
                    raise
                raise ArtifactError(f"export '{signature.name}': {exc}\n  hint: the leaves of a "
                                    f"saved tree have the example's shapes; fix the dims among "
                                    f"{', '.join(signature.dims)} that they determine: "
                                    f"dims={{NAME: size}}") from None
        entries.append(entry)
    trees = any(isinstance(t, TreeType) for sig, _ in exports for _, t in sig.params)
    header = json.dumps({"format": "gradlang.gx",
                         "format_version": TREE_FORMAT_VERSION if trees else FORMAT_VERSION,
                         "gradlang_version": version, "jax_version": jax.__version__,
                         "module": module_name, "platforms": list(platforms),
                         "externs": list(externs),
                         "jax_functions": sorted({n for sig, _ in exports for n in sig.jax_functions}),
                         "exports": entries,
                         **({"sharding": sharding} if sharding is not None else {})},
                        indent=1).encode()
    return MAGIC + struct.pack("<I", len(header)) + header + b"".join(blobs)


def with_layouts(exports: list[tuple[Signature, Callable]],
                 examples: Mapping[str, object]) -> list[tuple[Signature, Callable]]:
    """The exports with each tree parameter laid out as its example; ArtifactError for an
    example of no tree parameter, a tree without one, or one an artifact cannot record."""
    trees = sorted({n for sig, _ in exports for n, t in sig.params if isinstance(t, TreeType)})
    for name in examples:
        if name not in trees:
            raise ArtifactError(f"example_args['{name}']: no export takes a tree '{name}' "
                                f"(trees: {', '.join(trees) or 'none'})")
    try:
        out = [(sig.with_layouts(examples), fn) for sig, fn in exports]
        for sig, _ in out:
            sig.specs()  # every tree has a layout
    except ArgumentError as exc:
        raise ArtifactError(str(exc)) from None
    return out


def _exported(name: str, fn: Callable, specs: tuple,
              platforms: tuple[str, ...]) -> jax.export.Exported:
    """`fn` exported for `platforms`; an ArtifactError naming the platform and the op when it
    lowers for some of them only (a failure on every platform is raised as it is)."""
    try:
        return jax.export.export(fn, platforms=platforms)(*specs)
    except Exception as exc:
        failing = {}
        for p in platforms if len(platforms) > 1 else ():
            try:
                jax.export.export(fn, platforms=(p,))(*specs)
            except Exception as one:  # noqa: BLE001 - the reason is reported below
                failing[p] = one
        if not failing or len(failing) == len(platforms):
            raise exc from None
        p, reason = next(iter(failing.items()))
        ops = sorted(set(re.findall(r"custom_call @(\w+)", str(reason))))
        first = str(reason).strip().splitlines()[0]
        rest = [q for q in platforms if q not in failing]
        raise ArtifactError(f"export '{name}' cannot be lowered for {p}"
                            + (f" (custom call {', '.join(ops)})" if ops else "") + f": {first}\n"
                            f"  hint: save it for {', '.join(rest)} only (platforms="
                            f"{rest!r}, gradlang compile --platforms {','.join(rest)})") from None


def _fixed(signature: Signature, dims: Mapping[str, int] | None) -> Signature:
    """The signature with the dims fixed at export time substituted, so that a loaded module
    checks them (a wrong size is an ArgumentError, not an error from inside JAX)."""
    if not dims:
        return signature
    env = dict(dims)
    return replace(signature, params=tuple((n, substitute_dims(t, env)) for n, t in signature.params),
                   result=substitute_dims(signature.result, env))


def read(path: str | Path) -> tuple[dict, dict[str, tuple[Signature, object]]]:
    """The header and, per export name, its signature and its deserialized `Exported` (or, for
    an export split at extern calls, its plan and pieces). Raises ArtifactError, naming the
    file, unless every check in the module doc passes and this machine's platform is one the
    artifact was lowered for."""
    try:
        header, body = _parse(Path(path).read_bytes())
        platforms = header.get("platforms")  # formats 1 and 2 do not list them: the blobs do
        out = {}
        for e in header["exports"]:
            signature = Signature.from_json(e)
            what = f"export '{e['name']}'"
            if "plan" in e:
                pieces = [_blob(body, p, f"{what} piece {i}") for i, p in enumerate(e["pieces"])]
                _check_plan(signature, e["plan"], pieces)
                out[e["name"]] = (signature, (e["plan"], pieces))
            else:
                pieces = [_blob(body, e, what)]
                _check_blob(signature, pieces[0], header.get("sharding"))
                out[e["name"]] = (signature, pieces[0])
            for piece in pieces:
                platforms = platforms or list(piece.platforms)
                if list(piece.platforms) != platforms:
                    raise ArtifactError(f"{what} was lowered for {', '.join(piece.platforms)}, "
                                        f"but the header lists {', '.join(platforms)}")
                _check_x64(what, piece)
        here = jax.export.default_export_platform()
        if platforms and here not in platforms:
            raise ArtifactError(f"the artifact was lowered for {', '.join(platforms)}, not for "
                                f"{here}, the platform JAX runs on here; save it with "
                                f"platforms including {here!r} (gradlang compile --platforms "
                                f"{','.join([*platforms, here])}), or run JAX on one of those")
    except ArtifactError as exc:
        raise ArtifactError(f"{path}: {exc}") from None
    return {**header, "platforms": platforms}, out


def _parse(data: bytes) -> tuple[dict, bytes]:
    """The checked header and the body after it."""
    if not data.startswith(MAGIC):
        raise ArtifactError("not a gradlang artifact (bad magic bytes)")
    start = len(MAGIC) + 4
    if len(data) < start:
        raise ArtifactError("corrupt artifact: truncated before the header")
    (n,) = struct.unpack_from("<I", data, len(MAGIC))
    if len(data) < start + n:
        raise ArtifactError(f"corrupt artifact: the header is {n} bytes, the file ends after "
                            f"{len(data) - start}")
    try:
        header = json.loads(data[start:start + n])
    except RecursionError:
        raise ArtifactError("corrupt header: JSON nested too deeply") from None
    except ValueError as exc:
        raise ArtifactError(f"corrupt header: {exc}") from None
    if _depth(header) > MAX_DEPTH:
        raise ArtifactError(f"corrupt header: JSON nested more than {MAX_DEPTH} levels deep")
    _check_header(header)
    return header, data[start + n:]


def _depth(j: object) -> int:
    """How deeply `j` nests lists and objects (without recursion)."""
    deepest, stack = 0, [(j, 1)]
    while stack:
        x, d = stack.pop()
        if isinstance(x, (list, dict)):
            deepest = max(deepest, d)
            stack += [(v, d + 1) for v in (x.values() if isinstance(x, dict) else x)]
    return deepest


# ---- the header's schema


def _bad(where: str, what: str) -> ArtifactError:
    return ArtifactError(f"corrupt header: {where}: {what}")


def _is_int(x: object) -> bool:
    return type(x) is int and x >= 0


def _identifier(x: object) -> bool:
    return isinstance(x, str) and x.isidentifier()


def _dotted(x: object) -> bool:
    """A declared function's name: an identifier, qualified by its module's (`nn.net`)."""
    return isinstance(x, str) and all(part.isidentifier() for part in x.split("."))


def _ids(x: object, where: str) -> list[int]:
    if not (isinstance(x, list) and all(_is_int(i) for i in x)):
        raise _bad(where, f"expected a list of value numbers, got {x!r}")
    return x


def _check_header(h: object) -> None:
    if not isinstance(h, dict):
        raise ArtifactError("corrupt header: not a JSON object")
    if h.get("format") != "gradlang.gx":
        raise _bad("format", f"expected 'gradlang.gx', got {h.get('format')!r}")
    version = h.get("format_version")
    if version not in READABLE_VERSIONS or type(version) is not int:
        raise ArtifactError(f"artifact format {version!r} is not supported (this gradlang "
                            f"reads formats {', '.join(map(str, READABLE_VERSIONS))})")
    for key in ("gradlang_version", "jax_version", "module"):
        if not isinstance(h.get(key), str):
            raise _bad(key, f"expected a string, got {h.get(key)!r}")
    if version >= 3 or "platforms" in h:
        try:
            platform_list(h.get("platforms"))
        except ArtifactError as exc:
            raise _bad("platforms", str(exc)) from None
    for key in ("externs", "jax_functions"):
        if key in h and not (isinstance(h[key], list) and all(_dotted(n) for n in h[key])):
            raise _bad(key, f"expected a list of names, got {h[key]!r}")
    if "sharding" in h:
        from .sharding import json_problem

        problem = json_problem(h["sharding"])
        if problem is not None:
            raise _bad("sharding", problem)
    exports = h.get("exports")
    if not isinstance(exports, list):
        raise _bad("exports", f"expected a list, got {type(exports).__name__}")
    names = []
    for i, e in enumerate(exports):
        _check_export(e, f"exports[{i}]")
        if e["name"] in names:
            raise _bad(f"exports[{i}]", f"a second export named '{e['name']}'")
        names.append(e["name"])


def _check_export(e: object, where: str) -> None:
    if not isinstance(e, dict):
        raise _bad(where, "expected an object")
    if not _identifier(e.get("name")):
        raise _bad(f"{where}.name", f"expected an identifier, got {e.get('name')!r}")
    where = f"export '{e['name']}'"
    if e.get("kind") not in KINDS:
        raise _bad(f"{where}.kind", f"expected one of {', '.join(KINDS)}, got {e.get('kind')!r}")
    if not isinstance(e.get("function"), str):
        raise _bad(f"{where}.function", f"expected a string, got {e.get('function')!r}")
    params = e.get("params")
    if not isinstance(params, list):
        raise _bad(f"{where}.params", "expected a list")
    names = []
    for i, p in enumerate(params):
        if not (isinstance(p, dict) and set(p) == {"name", "type"} and _identifier(p["name"])):
            raise _bad(f"{where}.params[{i}]", f"expected {{name, type}}, got {p!r}")
        if p["name"] in names:
            raise _bad(f"{where}.params[{i}]", f"a second parameter named '{p['name']}'")
        names.append(p["name"])
        _check_type(p["type"], f"{where} parameter '{p['name']}'", param=True)
    _check_type(e.get("result"), f"{where}.result", param=False)
    if "aux" in e:
        _check_type(e["aux"], f"{where}.aux", param=False)
    wrt = e.get("wrt")
    if not (isinstance(wrt, list) and all(isinstance(w, str) for w in wrt)):
        raise _bad(f"{where}.wrt", f"expected a list of parameter names, got {wrt!r}")
    unknown = [w for w in wrt if w not in names]
    if unknown:
        raise _bad(f"{where}.wrt", f"'{unknown[0]}' is not a parameter (parameters: "
                                   f"{', '.join(names)})")
    if type(e.get("stateful", False)) is not bool:
        raise _bad(f"{where}.stateful", f"expected true or false, got {e.get('stateful')!r}")
    for key in ("externs", "jax_functions"):
        if not (isinstance(e.get(key, []), list) and all(_dotted(n) for n in e.get(key, []))):
            raise _bad(f"{where}.{key}", f"expected a list of names, got {e[key]!r}")
    externs = e.get("externs", [])
    if "plan" in e:
        pieces = e.get("pieces")
        if not isinstance(pieces, list):
            raise _bad(f"{where}.pieces", "expected a list")
        for i, p in enumerate(pieces):
            _check_place(p, f"{where}.pieces[{i}]")
        _check_plan_json(e["plan"], len(pieces), externs, f"{where}.plan")
    else:
        _check_place(e, where)


def _check_place(p: object, where: str) -> None:
    if not isinstance(p, dict):
        raise _bad(where, "expected an object")
    for key in ("offset", "size"):
        if not _is_int(p.get(key)):
            raise _bad(f"{where}.{key}", f"expected a byte count, got {p.get(key)!r}")
    if not (isinstance(p.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", p["sha256"])):
        raise _bad(f"{where}.sha256", f"expected 64 hex digits, got {p.get('sha256')!r}")


def _check_type(t: object, where: str, param: bool) -> None:
    """A type's JSON form (`type_to_json`); a parameter's symbolic dims must be names, as
    they become the export's symbolic variables."""
    if t == "key":
        return
    if not isinstance(t, dict):
        raise _bad(where, f"expected a type, got {t!r}")
    if set(t) == {"dtype", "shape"}:
        if t["dtype"] not in [d.value for d in DType]:
            raise _bad(where, f"unknown dtype {t['dtype']!r} (dtypes: "
                              f"{', '.join(d.value for d in DType)})")
        dim = _identifier if param else (lambda d: isinstance(d, str) and d)
        if not (isinstance(t["shape"], list) and all(_is_int(d) or dim(d) for d in t["shape"])):
            raise _bad(where, f"bad shape {t['shape']!r}")
    elif set(t) == {"struct", "fields"} and isinstance(t["struct"], str) \
            and isinstance(t["fields"], dict):
        for n, f in t["fields"].items():
            if not _identifier(n):
                raise _bad(where, f"struct field {n!r} is not a name")
            _check_type(f, f"{where}.{n}", param)
    elif set(t) == {"tuple"} and isinstance(t["tuple"], list):
        for i, x in enumerate(t["tuple"]):
            _check_type(x, f"{where}[{i}]", param)
    elif set(t) == {"tree"}:  # a parameter's layout is what its argument is checked against
        if param and t["tree"] is None:
            raise _bad(where, "a tree parameter without the layout it was saved for")
        _check_layout(t["tree"], where)
    else:
        raise _bad(where, f"expected a type, got {t!r}")


_TREE_DTYPES = ("float16", "bfloat16", "float32", "float64")
"""The dtypes of the leaves of a saved tree."""


def _check_layout(j: object, where: str) -> None:
    """A tree's layout (`types.layout_to_json`): null, {dict}, {list}, {tuple} or a leaf."""
    if j is None:
        return
    kind = next(iter(j)) if isinstance(j, dict) and len(j) == 1 else None
    if isinstance(j, dict) and set(j) == {"dtype", "shape"}:
        if j["dtype"] not in _TREE_DTYPES:
            raise _bad(where, f"a tree leaf's dtype must be one of {', '.join(_TREE_DTYPES)}, "
                              f"got {j['dtype']!r}")
        if not (isinstance(j["shape"], list) and all(_is_int(d) for d in j["shape"])):
            raise _bad(where, f"bad tree leaf shape {j['shape']!r}")
    elif kind == "dict" and isinstance(j["dict"], dict):
        for k, v in j["dict"].items():
            _check_layout(v, f"{where}[{k!r}]")
    elif kind in ("list", "tuple") and isinstance(j[kind], list):
        for i, v in enumerate(j[kind]):
            _check_layout(v, f"{where}[{i}]")
    else:
        raise _bad(where, f"expected a tree layout, got {j!r}")


def _check_plan_json(plan: object, pieces: int, externs: list[str], where: str) -> None:
    """A plan's fields, and that every step reads values defined before it."""
    if not (isinstance(plan, dict) and {"inputs", "outputs", "out_tree", "steps"} <= set(plan)
            and isinstance(plan["steps"], list)):
        raise _bad(where, "expected {inputs, outputs, out_tree, steps}")
    defined = set(_ids(plan["inputs"], f"{where}.inputs"))
    for i, step in enumerate(plan["steps"]):
        at = f"{where}.steps[{i}]"
        if not isinstance(step, dict):
            raise _bad(at, "expected an object")
        if "run" in step:
            if not (_is_int(step["run"]) and step["run"] < pieces):
                raise _bad(at, f"runs piece {step['run']!r}, but there are {pieces}")
        elif step.get("extern") in externs:
            params = step.get("params")
            if not isinstance(params, list):
                raise _bad(at, "expected the extern's parameter types")
            for k, t in enumerate(params):
                _check_type(t, f"{at}.params[{k}]", param=False)
            _check_type(step.get("result"), f"{at}.result", param=False)
        else:
            raise _bad(at, f"calls {step.get('extern')!r}, which the export does not declare "
                           f"(externs: {', '.join(externs) or 'none'})")
        undefined = [v for v in _ids(step.get("in"), f"{at}.in") if v not in defined]
        if undefined:
            raise _bad(at, f"reads value {undefined[0]} before it is defined")
        defined |= set(_ids(step.get("out"), f"{at}.out"))
    outputs = _ids(plan["outputs"], f"{where}.outputs")
    if any(v not in defined for v in outputs):
        raise _bad(f"{where}.outputs", "returns a value no step defines")
    _check_skeleton(plan["out_tree"], len(outputs), f"{where}.out_tree")


def _check_skeleton(s: object, n: int, where: str) -> None:
    """An output skeleton (`split._skeleton`): leaves number the plan's outputs."""
    if _is_int(s):
        if s >= n:
            raise _bad(where, f"names output {s}, but there are {n}")
    elif isinstance(s, dict) and set(s) == {"dict"} and isinstance(s["dict"], dict):
        for v in s["dict"].values():
            _check_skeleton(v, n, where)
    elif isinstance(s, dict) and set(s) == {"tuple"} and isinstance(s["tuple"], list):
        for v in s["tuple"]:
            _check_skeleton(v, n, where)
    else:
        raise _bad(where, f"expected an output number, {{dict}} or {{tuple}}, got {s!r}")


# ---- the blobs against the header


def _blob(body: bytes, place: dict, what: str) -> jax.export.Exported:
    """The deserialized blob at `place`, its range and checksum checked."""
    end = place["offset"] + place["size"]
    if end > len(body):
        raise ArtifactError(f"corrupt artifact: {what} ends at byte {end} of a body of "
                            f"{len(body)} (truncated?)")
    data = body[place["offset"]:end]
    if hashlib.sha256(data).hexdigest() != place["sha256"]:
        raise ArtifactError(f"{what} is corrupt (checksum mismatch)")
    try:
        return jax.export.deserialize(bytearray(data))
    except Exception as exc:  # noqa: BLE001 - any failure means the bytes are no serialization
        raise ArtifactError(f"{what} is not a jax.export serialization ({type(exc).__name__}: "
                            f"{exc})") from None


def _aval(a) -> tuple[str, tuple[str, ...]]:
    return str(a.dtype), tuple(str(d) for d in a.shape)


def _describe_avals(avals) -> str:
    return ", ".join(f"{d}[{', '.join(s)}]" for d, s in avals)


def _check_blob(signature: Signature, exported: jax.export.Exported,
                sharding: dict | None) -> None:
    """The blob is the export the header describes: its name, its arguments' tree, dtypes and
    shapes (symbolic dims by name), one device or, for a population split over a mesh, the
    devices of the mesh the header's `sharding` records."""
    what = f"export '{signature.name}'"
    if exported.fun_name != signature.name:
        raise ArtifactError(f"{what}: its blob holds the function '{exported.fun_name}' (blobs "
                            f"swapped or the header edited?)")
    specs = signature.specs()
    want = [_aval(a) for a in jax.tree.leaves(specs)]
    got = [_aval(a) for a in exported.in_avals]
    if exported.in_tree != jax.tree.structure((specs, {})) or want != got:
        raise ArtifactError(f"{what}: its blob takes ({_describe_avals(got)}), but the header "
                            f"declares {signature.describe()}, i.e. ({_describe_avals(want)})")
    if exported.nr_devices not in (1, devices(sharding)):
        mesh = "no mesh" if sharding is None else f"a mesh of {devices(sharding)} devices"
        raise ArtifactError(f"{what}: its blob is for {exported.nr_devices} devices (a "
                            f"population split over a mesh), but the header records {mesh}; "
                            f"save it from a module compiled with shard={{'pop': axis}}, which "
                            f"records the mesh")


def _check_x64(what: str, exported: jax.export.Exported) -> None:
    """64-bit values (f64) need JAX's 64-bit mode, as when compiling."""
    wide = [a.dtype for a in (*exported.in_avals, *exported.out_avals)
            if not jax.dtypes.issubdtype(a.dtype, jax.dtypes.extended)
            and jax.dtypes.canonicalize_dtype(a.dtype) != a.dtype]
    if wide:
        raise ArtifactError(f"{what} takes or returns {wide[0]} values, which need JAX's 64-bit "
                            f"mode: set JAX_ENABLE_X64=1 or call jax.config.update("
                            f"'jax_enable_x64', True) before loading")


def _check_plan(signature: Signature, plan: dict, pieces: list[jax.export.Exported]) -> None:
    """Each step of a split export's plan gets values of the dtypes and ranks it takes: the
    export's arguments, then the results of pieces and externs."""
    what = f"export '{signature.name}'"
    inputs = [_aval(a) for a in jax.tree.leaves(signature.specs())]
    if len(plan["inputs"]) != len(inputs):
        raise ArtifactError(f"{what}: its plan takes {len(plan['inputs'])} values, but the "
                            f"header declares {signature.describe()} ({len(inputs)} arrays)")
    avals = dict(zip(plan["inputs"], inputs))
    for i, step in enumerate(plan["steps"]):
        if "run" in step:
            piece = pieces[step["run"]]
            callee = f"piece {step['run']}"
            takes, gives = [_aval(a) for a in piece.in_avals], [_aval(a) for a in piece.out_avals]
            if piece.nr_devices != 1:
                raise ArtifactError(f"{what}: {callee} is for {piece.nr_devices} devices, not one")
        got = [avals[v] for v in step["in"]]
        if "run" not in step:  # under vmap an extern gets (and returns) leading batch axes
            callee = f"extern '{step['extern']}'"
            takes = [a for t in step["params"] for a in _json_avals(t)]
            lead = got[0][1][:len(got[0][1]) - len(takes[0][1])] if got and takes else ()
            takes = [(d, lead + s) for d, s in takes]
            gives = [(d, lead + s) for d, s in _json_avals(step["result"])]
        if [(d, len(s)) for d, s in got] != [(d, len(s)) for d, s in takes]:
            raise ArtifactError(f"{what}: plan step {i} passes ({_describe_avals(got)}) to "
                                f"{callee}, which takes ({_describe_avals(takes)})")
        if len(step["out"]) != len(gives):
            raise ArtifactError(f"{what}: plan step {i} expects {len(step['out'])} results "
                                f"from {callee}, which returns {len(gives)}")
        avals.update(zip(step["out"], gives))


def _json_avals(t: dict) -> list[tuple[str, tuple[str, ...]]]:
    """The (dtype, dims) of each array in an extern's parameter or result type (JSON form:
    tensors and tuples of them)."""
    if "tuple" in t:
        return [a for e in t["tuple"] for a in _json_avals(e)]
    if "dtype" not in t:
        raise ArtifactError(f"corrupt header: an extern's type {t!r} is not an array type")
    return [(np.dtype(JNP_DTYPES[DType(t["dtype"])]).name, tuple(str(d) for d in t["shape"]))]


def loaded_function(signature: Signature, content, externs: Mapping[str, object]) -> Callable:
    """A jitted callable of a deserialized export (arguments cast to the declared dtypes)."""
    if isinstance(content, tuple):
        plan, pieces = content
        calls = [mapped_under_vmap(p.call) for p in pieces]
        return jax.jit(casting(signature, underivable(signature.name, stitched(plan, calls, externs))),
                       donate_argnums=signature.donated)
    return jax.jit(casting(signature, underivable(signature.name, mapped_under_vmap(content.call))),
                   donate_argnums=signature.donated)


def underivable(name: str, fn: Callable) -> Callable:
    """`fn` whose derivative (jax.grad's, jax.jvp's) raises an ArtifactError that says what to
    do: an artifact holds each export's computation, not its derivatives."""
    return without_derivatives(fn, ArtifactError(
        f"export '{name}' was loaded from an artifact, which holds its computation without "
        f"derivatives, so jax.grad / jax.jvp cannot go through it. Export the gradient you "
        f"need (`export g = grad(f, wrt=[...])` or value_and_grad) and save it, or "
        f"differentiate the module compiled from source (gradlang.compile_file)"))


def mapped_under_vmap(fn: Callable) -> Callable:
    """`fn` with a batching rule: under `jax.vmap` it runs once per batch element (`lax.map`).

    A deserialized `jax.export` call has no batching rule of its own; looping over the batch
    gives the same numbers as calling it on each element.
    """
    f = jax.custom_batching.custom_vmap(fn)

    @f.def_vmap
    def rule(axis_size, in_batched, *args):
        leaves, tree = jax.tree.flatten(args)
        flags = jax.tree.leaves(in_batched)

        def one(batched):
            it = iter(batched)
            return f(*jax.tree.unflatten(tree, [next(it) if b else x for x, b in zip(leaves, flags)]))

        out = jax.lax.map(one, [x for x, b in zip(leaves, flags) if b])
        return out, jax.tree.map(lambda _: True, out)

    return f
