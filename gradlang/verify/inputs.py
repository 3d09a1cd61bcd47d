"""The arguments `verify` calls an export with: given by parameter name (a mapping, or an .npz
file whose struct fields are `name.field` keys), or generated from the declared types."""

from __future__ import annotations

import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import numpy as np

from gradlang.types import DType, StructType, TensorType, TreeType, TupleType, Type, type_dims


class VerifyError(Exception):
    """A usage error of `verify`: unknown export, unreadable or ill-shaped inputs, missing dims.
    Its message is one line for the user (the CLI prints it as `gradlang: error: ...`)."""


NP_DTYPES = {DType.F32: np.float32, DType.F64: np.float64, DType.I32: np.int32, DType.BOOL: np.bool_}


def read_npz(path: str | Path) -> dict[str, object]:
    """An .npz file as nested dicts: the key `enc.w1` becomes `{"enc": {"w1": array}}`."""
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("it holds one array, not named arrays (write it with np.savez)")
        with data:
            flat = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise VerifyError(f"cannot read {path} as an .npz file: {exc}") from None
    tree: dict[str, object] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise VerifyError(f"{path}: key '{key}' nests under '{p}', which is an array")
            node = child
        if leaf in node:
            raise VerifyError(f"{path}: key '{key}' is given twice")
        node[leaf] = value
    return tree


def _convert(t: Type, x: object, where: str) -> object:
    """x (arrays, nested dicts for structs, dicts keyed "0", "1"... or sequences for tuples)
    as NumPy values of type t's structure; shapes are checked by the export's signature."""
    if isinstance(t, TensorType):
        if isinstance(x, Mapping):
            raise VerifyError(f"argument '{where}': expected a {t} array, got fields "
                              f"{', '.join(map(str, x))}")
        try:
            return np.asarray(x, NP_DTYPES[t.dtype])
        except (TypeError, ValueError) as exc:
            raise VerifyError(f"argument '{where}': expected a {t} array: {exc}") from None
    if isinstance(t, TreeType):
        paths, _ = jax.tree_util.tree_flatten_with_path(x)
        for path, leaf in paths:
            if not np.issubdtype(np.asarray(leaf).dtype, np.floating):
                raise VerifyError(f"argument '{where}': a tree's leaves must be float arrays; "
                                  f"{where}{jax.tree_util.keystr(path)} is "
                                  f"{np.asarray(leaf).dtype}")
        return jax.tree.map(np.asarray, x)
    if isinstance(t, StructType):
        if not isinstance(x, Mapping):
            raise VerifyError(f"argument '{where}': struct {t.name} needs its fields "
                              f"{', '.join(f'{where}.{n}' for n, _ in t.fields)}")
        names = [n for n, _ in t.fields]
        missing = [f"{where}.{n}" for n in names if n not in x]
        extra = [f"{where}.{k}" for k in x if k not in names]
        if missing or extra:
            raise VerifyError(f"argument '{where}' (struct {t.name}): "
                              + (f"missing {', '.join(missing)}" if missing
                                 else f"unknown {', '.join(extra)}"))
        return {n: _convert(f, x[n], f"{where}.{n}") for n, f in t.fields}
    assert isinstance(t, TupleType)
    if isinstance(x, Mapping):
        x = [x.get(str(i)) for i in range(len(t.elems))]
    if not isinstance(x, Sequence) or len(x) != len(t.elems) or any(v is None for v in x):
        raise VerifyError(f"argument '{where}': expected a tuple of {len(t.elems)} values "
                          f"({', '.join(f'{where}.{i}' for i in range(len(t.elems)))})")
    return tuple(_convert(e, v, f"{where}.{i}") for i, (e, v) in enumerate(zip(t.elems, x)))


def given_arguments(params: Sequence[tuple[str, Type]], given: Mapping | Sequence,
                    state: str | None) -> dict:
    """The arguments by name from a mapping by name (or a sequence in parameter order); the
    moving-average parameter `state` may be left out (it starts at zeros)."""
    names = [n for n, _ in params]
    given = dict(given) if isinstance(given, Mapping) else dict(zip(names, given))
    missing = [n for n in names if n not in given and n != state]
    extra = [k for k in given if k not in names]
    if missing:
        raise VerifyError(f"missing argument{'s' * (len(missing) > 1)} "
                          f"{', '.join(repr(n) for n in missing)} (parameters: {', '.join(names)})")
    if extra:
        raise VerifyError(f"unknown argument{'s' * (len(extra) > 1)} "
                          f"{', '.join(repr(n) for n in extra)} (parameters: {', '.join(names)})")
    return {n: _convert(t, given[n], n) for n, t in params if n in given}


def generated_arguments(params: Sequence[tuple[str, Type]], dims: Mapping[str, int],
                        seed: int, state: str | None) -> dict:
    """Deterministic arguments by name from the declared types: floats uniform in [-1, 1],
    integers in {0, 1}, bools fair coins (from `seed`); the moving-average parameter `state`
    is left out (it starts at zeros)."""
    tree = next((n for n, t in params if isinstance(t, TreeType) and n != state), None)
    if tree is not None:
        raise VerifyError(f"parameter '{tree}' is a tree, whose structure only a value gives: "
                          f"give the arguments (args=... in Python, --at FILE.npz with keys "
                          f"'{tree}.a.b' for nested dicts)")
    needed = [d for n, t in params if n != state for d in type_dims(t)]
    missing = list(dict.fromkeys(d for d in needed if d not in dims))
    if missing:
        flags = " ".join(f"--dim {d}=SIZE" for d in missing)
        raise VerifyError(f"the parameters have symbolic dims {', '.join(missing)}: give their "
                          f"sizes ({flags}, or dims={{...}} in Python) or the arguments (--at FILE.npz)")
    rng = np.random.default_rng(seed)

    def make(t: Type) -> object:
        if isinstance(t, TensorType):
            shape = tuple(dims[d] if isinstance(d, str) else d for d in t.shape)
            if t.dtype.is_float:
                return rng.uniform(-1.0, 1.0, shape).astype(NP_DTYPES[t.dtype])
            if t.dtype is DType.I32:
                return rng.integers(0, 2, shape).astype(np.int32)
            return rng.integers(0, 2, shape).astype(np.bool_)
        if isinstance(t, StructType):
            return {n: make(f) for n, f in t.fields}
        assert isinstance(t, TupleType)
        return tuple(make(e) for e in t.elems)

    return {n: make(t) for n, t in params if n != state}
