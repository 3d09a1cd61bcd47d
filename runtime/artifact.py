"""Portable artifacts (.gx): `jax.export` serializations of each export plus a JSON header.

Layout: the magic bytes `GRADLANG-GX\\0`, a little-endian u32 header length, the UTF-8 JSON
header, then the serialized exports back to back. The header records the gradlang version,
the module name and, per export, its signature and its blobs' offsets, sizes and SHA-256s:
one blob, or, for an export that calls extern functions, the pieces between its host
callbacks and the plan that replays them (`runtime.split`). Never a pickle.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import jax

from gradlang.types import substitute_dims

from .signature import Signature, casting
from .split import SplitError, split, stitched

MAGIC = b"GRADLANG-GX\0"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


class ArtifactError(Exception):
    """The file is not a readable gradlang artifact."""


def serialize(module_name: str, version: str,
              exports: list[tuple[Signature, Callable]],
              dims: Mapping[str, int] | None = None) -> bytes:
    """Export each function with `jax.export` (symbolic dims kept unless fixed in `dims`)."""
    blobs: list[bytes] = []
    entries = []

    def place(blob: bytes) -> dict:
        offset = sum(len(b) for b in blobs)
        blobs.append(blob)
        return {"offset": offset, "size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}

    for signature, fn in exports:
        entry = _fixed(signature, dims).to_json()
        if signature.externs:
            try:
                plan, pieces = split(fn, signature.specs(dims))
            except SplitError as exc:
                raise SplitError(f"export '{signature.name}' calls extern "
                                 f"{', '.join(map(repr, signature.externs))} and cannot be saved "
                                 f"as an artifact: {exc}") from None
            entry |= {"plan": plan, "pieces": [place(b) for b in pieces]}
        else:
            entry |= place(bytes(jax.export.export(jax.jit(fn))(*signature.specs(dims)).serialize()))
        entries.append(entry)
    header = json.dumps({"format": "gradlang.gx", "format_version": FORMAT_VERSION,
                         "gradlang_version": version, "jax_version": jax.__version__,
                         "module": module_name, "exports": entries}, indent=1).encode()
    return MAGIC + struct.pack("<I", len(header)) + header + b"".join(blobs)


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
    an export split at extern calls, its plan and pieces)."""
    data = Path(path).read_bytes()
    if not data.startswith(MAGIC):
        raise ArtifactError(f"{path}: not a gradlang artifact (bad magic bytes)")
    start = len(MAGIC) + 4
    if len(data) < start:
        raise ArtifactError(f"{path}: corrupt artifact: truncated before the header")
    (n,) = struct.unpack_from("<I", data, len(MAGIC))
    try:
        header = json.loads(data[start:start + n])
    except ValueError as exc:
        raise ArtifactError(f"{path}: corrupt header: {exc}") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{path}: corrupt header: not a JSON object")
    if header.get("format_version") not in READABLE_VERSIONS:
        raise ArtifactError(f"{path}: artifact format {header.get('format_version')} is not "
                            f"supported (this gradlang reads format {FORMAT_VERSION})")
    body = data[start + n:]
    out = {}
    try:
        for e in header["exports"]:
            def blob(place: dict) -> jax.export.Exported:
                data = body[place["offset"]:place["offset"] + place["size"]]
                if hashlib.sha256(data).hexdigest() != place["sha256"]:
                    raise ArtifactError(f"{path}: export '{e['name']}' is corrupt (checksum "
                                        f"mismatch)")
                return jax.export.deserialize(bytearray(data))

            content = (e["plan"], [blob(p) for p in e["pieces"]]) if "plan" in e else blob(e)
            out[e["name"]] = (Signature.from_json(e), content)
    except (KeyError, TypeError, AssertionError) as exc:
        raise ArtifactError(f"{path}: corrupt header: bad export entry ({exc!r})") from None
    return header, out


def loaded_function(signature: Signature, content, externs: Mapping[str, object]) -> Callable:
    """A jitted callable of a deserialized export (arguments cast to the declared dtypes)."""
    if isinstance(content, tuple):
        plan, pieces = content
        calls = [mapped_under_vmap(p.call) for p in pieces]
        return jax.jit(casting(signature, stitched(plan, calls, externs)),
                       donate_argnums=signature.donated)
    return jax.jit(casting(signature, mapped_under_vmap(content.call)),
                   donate_argnums=signature.donated)


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
