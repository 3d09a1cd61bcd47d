"""Type and shape checking: give every value its type, or report why it has none.

One rule per op in `RULES`. Literals are weakly typed (as in JAX): `x * 2` keeps the dtype of
`x`. Symbolic dims broadcast only against themselves or 1. Calls unify the callee's declared
signature with the argument types. A value whose computation failed gets the ERROR type, which
silences the errors that would follow from it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import reduce
from typing import Callable

from gradlang import ops as O
from gradlang.diagnostics import Diagnostics
from gradlang.ir import Function, Module, Op, Region, Value, reachable, walk
from gradlang.shapes import (ShapeError, add_dims, broadcast, is_power_of_two, normalize_axis,
                             reshape, show, sub_dims, unify)
from gradlang.options import F32_MAX
from gradlang.types import (ERROR, SOLVER_REPORT, DistType, DType, StructType, TensorType, TreeType,
                            TupleType, Type, promote, is_float_tree, scalar, substitute_dims,
                            type_dims, uses_f64)

from . import typecheck_nn as N
from . import typecheck_random as R
from .aux import result_problem
from .typecheck_dims import check_power_of_two_dims


class _Ctx:
    def __init__(self, module: Module):
        self.module = module
        self.weak: set[Value] = set()
        self.structs = {s.name: StructType(s.name, s.fields) for s in module.structs}


Rule = Callable[[_Ctx, Op, list[Value]], "Type | tuple[Type, ...]"]


def _tensor(v: Value, what: str = "operand") -> TensorType:
    if not isinstance(v.type, TensorType):
        raise ShapeError(f"{what} must be a tensor, got {v.type}")
    return v.type


def _numeric(v: Value, what: str = "operand") -> TensorType:
    t = _tensor(v, what)
    if t.dtype is DType.BOOL:
        raise ShapeError(f"{what} must be numeric, got {t}")
    return t


def _float_dtype(d: DType) -> DType:
    return d if d.is_float else DType.F32


def _promote_values(ctx: _Ctx, values: list[Value]) -> DType:
    """Result dtype of combining tensors: strong dtypes promote; weak literals adapt."""
    strong = [v.type.dtype for v in values if v not in ctx.weak]
    weak = [v.type.dtype for v in values if v in ctx.weak]
    if not strong:
        return reduce(promote, weak)
    dtype = reduce(promote, strong)
    if not dtype.is_float and any(d.is_float for d in weak):
        return DType.F32
    return dtype


# ---- rules


def _const(ctx, op, args):
    return scalar(op.params.dtype)


def _unary_float(ctx, op, args):
    t = _numeric(args[0])
    return t.with_dtype(_float_dtype(t.dtype))


def _unary_same(ctx, op, args):
    return _numeric(args[0])


def _not(ctx, op, args):
    t = _tensor(args[0])
    if t.dtype is not DType.BOOL:
        raise ShapeError(f"'not' needs a bool operand, got {t}")
    return t


def _arith(ctx, op, args):
    ts = [_numeric(a) for a in args]
    dtype = _promote_values(ctx, args)
    if op.name == "div":
        dtype = _float_dtype(dtype)
    return TensorType(dtype, broadcast(*(t.shape for t in ts)))


def _compare(ctx, op, args):
    ts = [_tensor(a) for a in args]
    if op.name not in ("eq", "ne"):
        for a in args:
            _numeric(a)
    return TensorType(DType.BOOL, broadcast(*(t.shape for t in ts)))


def _logic(ctx, op, args):
    ts = [_tensor(a) for a in args]
    for t in ts:
        if t.dtype is not DType.BOOL:
            raise ShapeError(f"'{op.name}' needs bool operands, got {t}")
    return TensorType(DType.BOOL, broadcast(*(t.shape for t in ts)))


def _where(ctx, op, args):
    c, x, y = (_tensor(a) for a in args)
    if c.dtype is not DType.BOOL:
        raise ShapeError(f"the condition of where must be bool, got {c}")
    return TensorType(_promote_values(ctx, args[1:]), broadcast(c.shape, x.shape, y.shape))


def _clip(ctx, op, args):
    ts = [_numeric(a) for a in args]
    return TensorType(_promote_values(ctx, args), broadcast(*(t.shape for t in ts)))


def _same(ctx, op, args):
    return _tensor(args[0])


def _cast(ctx, op, args):
    return _tensor(args[0]).with_dtype(op.params.dtype)


def _reduce(ctx, op, args):
    t = _numeric(args[0])
    p: O.ReduceParams = op.params
    axes = range(t.rank) if p.axis is None else [normalize_axis(a, t.rank) for a in p.axis]
    if len(set(axes)) != len(list(axes)):
        raise ShapeError(f"repeated axis in {list(p.axis or ())}")
    shape = tuple((1 if i in axes else d) for i, d in enumerate(t.shape) if p.keepdims or i not in axes)
    dtype = _float_dtype(t.dtype) if op.name in ("mean", "var", "logsumexp") else t.dtype
    return TensorType(dtype, shape)


def _contract(a: TensorType, b: TensorType, da, db) -> None:
    if da != db:
        raise ShapeError(f"contracted dimensions differ: {a} and {b} ({da} vs {db})")


def _sliced_wasserstein(ctx, op, args):
    """Two point clouds of the same shape [N, D]; a scalar."""
    x, y = (a.type for a in args)
    if not (isinstance(x, TensorType) and isinstance(y, TensorType) and x.rank == 2
            and x.dtype.is_float and y.dtype.is_float):
        raise ShapeError(f"sliced_wasserstein compares two point clouds x [N, D] and y [N, D], "
                         f"got {x} and {y}")
    if x.shape != y.shape:
        raise ShapeError(f"sliced_wasserstein needs point clouds of the same shape (as many "
                         f"points, of the same dimension), got {x} and {y}")
    return TensorType(x.dtype, ())


def _sampled_matmul(ctx, op, args):
    """x @ w with x's rows sampled for w's backward: x [..., N, D] (at least 2-D), w [D, O]."""
    x, w = args
    if not (isinstance(x.type, TensorType) and x.type.rank >= 2 and isinstance(w.type, TensorType)
            and w.type.rank == 2 and x.type.dtype.is_float and w.type.dtype.is_float):
        raise ShapeError(f"wta_crs samples rows of the left operand for the gradient of the right "
                         f"one: it needs float x [..., N, D] @ w [D, O], got {x.type} @ {w.type}")
    return _matmul(ctx, op, args)


def _matmul(ctx, op, args):
    a, b = _numeric(args[0], "left operand of @"), _numeric(args[1], "right operand of @")
    if a.rank == 0 or b.rank == 0:
        raise ShapeError(f"@ needs tensors of rank >= 1, got {a} and {b}")
    dtype = _promote_values(ctx, args)
    _contract(a, b, a.shape[-1], b.shape[0] if b.rank == 1 else b.shape[-2])
    if a.rank == 1 and b.rank == 1:
        return TensorType(dtype, ())
    if b.rank == 1:
        return TensorType(dtype, a.shape[:-1])
    if a.rank == 1:
        return TensorType(dtype, b.shape[:-2] + b.shape[-1:])
    batch = broadcast(a.shape[:-2], b.shape[:-2])
    return TensorType(dtype, batch + (a.shape[-2], b.shape[-1]))


def _dot(ctx, op, args):
    a, b = _numeric(args[0]), _numeric(args[1])
    if a.rank != 1 or b.rank != 1:
        raise ShapeError(f"dot needs two vectors, got {a} and {b}; use @ for matrices")
    _contract(a, b, a.shape[0], b.shape[0])
    return TensorType(_promote_values(ctx, args), ())


def _outer(ctx, op, args):
    a, b = _numeric(args[0]), _numeric(args[1])
    if a.rank != 1 or b.rank != 1:
        raise ShapeError(f"outer needs two vectors, got {a} and {b}")
    return TensorType(_promote_values(ctx, args), (a.shape[0], b.shape[0]))


def _square(t: TensorType, what: str) -> None:
    if t.rank != 2 or t.shape[0] != t.shape[1] or not t.dtype.is_float:
        raise ShapeError(f"{what} needs a square float matrix, got {t}")


def _solve(ctx, op, args):
    a, b = _tensor(args[0]), _tensor(args[1])
    _square(a, "solve")
    if b.rank not in (1, 2) or b.shape[0] != a.shape[0]:
        raise ShapeError(f"solve: right-hand side {b} does not match matrix {a}")
    return TensorType(_promote_values(ctx, args), b.shape)


def _cholesky(ctx, op, args):
    a = _tensor(args[0])
    _square(a, "cholesky")
    return a


def _reshape(ctx, op, args):
    t = _tensor(args[0])
    return t.with_shape(reshape(t.shape, op.params.shape))


def _broadcast_to(ctx, op, args):
    t = _tensor(args[0])
    target = op.params.shape
    if broadcast(t.shape, target) != tuple(target):
        raise ShapeError(f"cannot broadcast {t} to {show(target)}")
    return t.with_shape(target)


def _transpose(ctx, op, args):
    t = _tensor(args[0])
    axes = op.params.axes
    perm = tuple(reversed(range(t.rank))) if axes is None else tuple(
        normalize_axis(a, t.rank) for a in axes)
    if sorted(perm) != list(range(t.rank)):
        raise ShapeError(f"transpose axes {list(axes)} are not a permutation of the {t.rank} axes of {t}")
    return t.with_shape(tuple(t.shape[i] for i in perm))


def _join(ctx, op, args):
    ts = [_tensor(a) for a in args]
    dtype = _promote_values(ctx, args)
    first = ts[0]
    if op.name == "stack":
        if any(t.shape != first.shape for t in ts):
            raise ShapeError("stack needs tensors of one shape, got " + ", ".join(map(str, ts)))
        axis = normalize_axis(op.params.axis, first.rank + 1)
        return TensorType(dtype, first.shape[:axis] + (len(ts),) + first.shape[axis:])
    if first.rank == 0:
        raise ShapeError("concat needs tensors of rank >= 1")
    axis = normalize_axis(op.params.axis, first.rank)
    size = first.shape[axis]
    for t in ts[1:]:
        if t.rank != first.rank or any(d != e for i, (d, e) in enumerate(zip(t.shape, first.shape))
                                       if i != axis):
            raise ShapeError(f"concat along axis {axis}: {t} does not match {first}")
        size = add_dims(size, t.shape[axis])
    return TensorType(dtype, first.shape[:axis] + (size,) + first.shape[axis + 1:])


def _filled(ctx, op, args):
    if op.name == "full":
        v = _tensor(args[0], "value of full")
        if v.rank != 0:
            raise ShapeError(f"the value of full must be a scalar, got {v}")
        return TensorType(v.dtype, op.params.shape)
    return TensorType(DType.F32, op.params.shape)


def _arange(ctx, op, args):
    p: O.ArangeParams = op.params
    n = p.start if p.stop is None else sub_dims(p.stop, p.start)
    if isinstance(n, int) and n < 0:
        raise ShapeError(f"arange({p.start}, {p.stop}) is empty: stop is below start")
    return TensorType(DType.I32, (n,))


def _eye(ctx, op, args):
    return TensorType(DType.F32, (op.params.n, op.params.n))


def _softmax(ctx, op, args):
    t = _numeric(args[0])
    if t.rank == 0:
        raise ShapeError(f"{op.name} needs a tensor of rank >= 1")
    normalize_axis(op.params.axis, t.rank)
    return t.with_dtype(_float_dtype(t.dtype))


def _along_axis(ctx, op, args):
    """argmax / topk (an f32 mask shaped like x) and sort (x's type) along an axis."""
    t = _numeric(args[0])
    if t.rank == 0:
        raise ShapeError(f"{op.name} needs a tensor of rank >= 1")
    axis = normalize_axis(op.params.axis, t.rank)
    if op.name == "topk":
        k, d = op.params.k, t.shape[axis]
        if isinstance(k, int) and isinstance(d, int) and not 1 <= k <= d:
            raise ShapeError(f"topk needs 1 <= k <= {d} (the size of axis {op.params.axis}), got {k}")
    return t if op.name == "sort" else t.with_dtype(DType.F32)


def _last_axis_power_of_two(t: TensorType, what: str) -> None:
    n = t.shape[-1] if t.rank else 1
    if t.rank == 0 or (isinstance(n, int) and not is_power_of_two(n)):
        raise ShapeError(f"{what} transforms the last axis, whose size must be a power of two, "
                         f"got {t}")


def _quantize(ctx, op, args):
    t = _numeric(args[0])
    p = op.params
    if not isinstance(p.bits, int) or not 1 <= p.bits <= 16:
        raise ShapeError(f"bits must be an integer from 1 to 16, got {p.bits}")
    if op.name == "quest":
        if p.bits > 8:
            raise ShapeError(f"quest supports 1 to 8 bits, got {p.bits}")
        _last_axis_power_of_two(t, "quest")
    for a in p.axis or ():
        normalize_axis(a, t.rank)
    if p.scale:
        s = _numeric(args[1], "scale")
        broadcast(t.shape, s.shape)
    return t.with_dtype(_float_dtype(t.dtype))


def _hadamard(ctx, op, args):
    t = _numeric(args[0])
    _last_axis_power_of_two(t, "hadamard")
    return t.with_dtype(_float_dtype(t.dtype))


def _one_hot(ctx, op, args):
    t = _tensor(args[0])
    if not t.dtype.is_int:
        raise ShapeError(f"one_hot needs integer labels, got {t}")
    return TensorType(DType.F32, t.shape + (op.params.num_classes,))


def _cross_entropy(ctx, op, args):
    logits, labels = _numeric(args[0], "logits"), _tensor(args[1], "labels")
    if logits.rank == 0 or not logits.dtype.is_float:
        raise ShapeError(f"cross_entropy needs float logits of rank >= 1, got {logits}")
    if labels.dtype.is_int:
        if labels.shape != logits.shape[:-1]:
            raise ShapeError(f"integer labels must have shape {show(logits.shape[:-1])} for "
                             f"logits {logits}, got {labels}")
    elif labels.dtype.is_float:
        if labels.shape != logits.shape:
            raise ShapeError(f"probability labels must have the shape of logits {logits}, got {labels}")
    else:
        raise ShapeError(f"labels must be integer classes or probabilities, got {labels}")
    return TensorType(logits.dtype, ())


def _mse(ctx, op, args):
    ts = [_numeric(a) for a in args]
    broadcast(*(t.shape for t in ts))
    return TensorType(_float_dtype(_promote_values(ctx, args)), ())


def _index(ctx, op, args):
    t = _tensor(args[0], "indexed value")
    items: tuple[O.IndexItem, ...] = op.params.items
    if len(items) > t.rank:
        raise ShapeError(f"too many indices ({len(items)}) for {t}")
    indices = [_tensor(v, "index") for v in args[1:]]
    for k, i in enumerate(indices):
        if not i.dtype.is_int:
            raise ShapeError(f"an index must be i32, got {i}", f"index{k}")
    if any(i.rank for i in indices) and (len(indices) > 1 or any(it.kind == "int" for it in items)):
        raise ShapeError(f"an integer tensor index (a lookup, table[ids]) takes the other "
                         f"subscripts as slices (:), got [{', '.join(map(str, items))}]")
    dynamic = iter(indices)
    shape: list = []
    for item, d in zip(items, t.shape):
        if item.kind == "dynamic":  # a scalar drops the axis; a lookup's ids replace it
            shape.extend(next(dynamic).shape)
        elif item.kind == "int":
            if isinstance(d, int) and not -d <= item.index < d:
                raise ShapeError(f"index {item.index} is out of bounds for a dimension of size {d}")
        elif item.kind == "slice":
            if isinstance(d, int):
                shape.append(len(range(*slice(item.start, item.stop, item.step).indices(d))))
            elif (item.start, item.stop, item.step) == (None, None, None):
                shape.append(d)
            elif (item.step is None and (item.start is None or item.start >= 0)
                  and (item.stop is None or item.stop < 0)):
                # x[k:], x[:-k], x[j:-k]: the size is d minus what is cut off at both ends,
                # so that x[1:] and x[:-1] have the same type (e.g. in x[1:] - x[:-1]).
                shape.append(sub_dims(d, (item.start or 0) - (item.stop or 0)))
            else:
                shape.append(f"{d}[{item}]")
    return t.with_shape(tuple(shape) + t.shape[len(items):])


def _tuple(ctx, op, args):
    return TupleType(tuple(a.type for a in args))


def _get(ctx, op, args):
    t = args[0].type
    p: O.GetParams = op.params
    if not isinstance(t, TupleType):
        raise ShapeError(f"cannot destructure a value of type {t}: it is not a tuple")
    if len(t.elems) != p.of:
        raise ShapeError(f"cannot destructure a tuple of {len(t.elems)} elements into {p.of} names")
    return t.elems[p.index]


def _getfield(ctx, op, args):
    t = args[0].type
    name = op.params.name
    if not isinstance(t, StructType):
        raise ShapeError(f"value of type {t} has no fields (looking for '.{name}')")
    field = t.field(name)
    if field is None:
        raise ShapeError(f"struct {t.name} has no field '{name}' (fields: "
                         f"{', '.join(n for n, _ in t.fields)})")
    return field


def _struct_new(ctx, op, args):
    st = ctx.structs[op.params.name]
    env: dict = {}
    for (name, ftype), a in zip(st.fields, args):
        problem = unify(ftype, _weak_as(ctx, a, ftype), env)
        if problem:
            raise ShapeError(f"field '{name}' of {st.name}: {problem}")
    return substitute_dims(st, env)


def _call_fn(ctx, op, args):
    fn = ctx.module.function(op.params.callee)
    env: dict = {}
    for p, a in zip(fn.params, args):
        problem = unify(p.value.type, _weak_as(ctx, a, p.value.type), env)
        if problem:
            raise ShapeError(f"argument '{p.name}' of '{fn.name}': {problem}")
    return substitute_dims(fn.result_type, env)


def _call_jax(ctx, op, args):
    """A jax fn's body: its declared result, whose dims its parameters must fix (the result's
    shape is known only once the function is traced), or a tree parameter (at run time: a
    tree has no dims the type checker sees)."""
    fn = ctx.module.function(op.params.name)
    known = {d for p in fn.params for d in type_dims(p.value.type)}
    free = [d for d in type_dims(fn.result_type) if d not in known]
    if free and not any(isinstance(p.value.type, TreeType) for p in fn.params):
        dims = ", ".join(f"'{d}'" for d in free)
        raise ShapeError(f"jax fn '{fn.name}' returns {fn.result_type}, but no parameter has "
                         f"dim{'s' * (len(free) > 1)} {dims}: its size would be unknown to the "
                         f"type checker; write a number or a dim of a parameter")
    return fn.result_type


def _tree_reduction(ctx, op, args):
    """sum_squares / global_norm: a float scalar, of the widest float dtype of the leaves
    (f32 for a tree, whose leaves are known only at run time)."""
    t = args[0].type
    if not is_float_tree(t):
        raise ShapeError(f"{op.name} needs a tree, or a tensor or struct of float tensors, "
                         f"got {t}")
    return scalar(DType.F64 if uses_f64(t) else DType.F32)


def _map_leaves(ctx, op, args):
    """map_leaves(t, f): t's type; f takes one float tensor whose dims are distinct names (a
    leaf of any shape of its rank binds them), returns that type, and neither draws nor calls
    a JAX or extern function (it runs once per leaf, outside the analyses of draws)."""
    t = args[0].type
    fn = ctx.module.function(op.params.callee)
    if not isinstance(t, (TreeType, StructType)):
        raise ShapeError(f"map_leaves applies a function to the leaves of a tree or a struct, "
                         f"got {t}")
    leaf = fn.params[0].value.type if len(fn.params) == 1 else None
    if not (isinstance(leaf, TensorType) and leaf.dtype.is_float):
        params = ", ".join(f"{p.name}: {p.value.type}" for p in fn.params)
        raise ShapeError(f"map_leaves needs a function of one float tensor, got "
                         f"'{fn.name}({params})'")
    if not all(isinstance(d, str) for d in leaf.shape) or len(set(leaf.shape)) != leaf.rank:
        raise ShapeError(f"map_leaves applies '{fn.name}' to leaves of any shape of rank "
                         f"{leaf.rank}: its parameter's dims must be distinct names, e.g. "
                         f"f32[{', '.join(f'D{i}' for i in range(leaf.rank))}], got {leaf}")
    if fn.result_type != leaf:
        raise ShapeError(f"map_leaves needs '{fn.name}' to return its parameter's type "
                         f"{leaf}, but it returns {fn.result_type}")
    bad = _leaf_function_problem(ctx.module, fn.name)
    if bad:
        raise ShapeError(f"map_leaves needs a function that {bad}")
    return t


def _leaf_function_problem(module: Module, name: str) -> str | None:
    """What keeps function `name` from running on each leaf: a draw, or a call of a JAX or
    extern function (directly or through its callees)."""
    for caller in reachable(module, name):
        for op in walk(module.function(caller).body):
            if "random" in O.OPS[op.name].traits:
                return f"does not draw; '{caller}' draws"
            bound = module.function(op.params.callee) if op.name == "call_fn" else None
            if bound is not None and any(o.name in ("call_jax", "host_call")
                                         for o in bound.body.ops):
                return f"calls no jax fn or extern; '{caller}' calls '{bound.name}'"
    return None


def _dim(ctx, op, args):
    return scalar(DType.I32)


def _weak_as(ctx: _Ctx, v: Value, expected: Type) -> Type:
    """A weak scalar literal takes the dtype that is expected of it."""
    if v in ctx.weak and isinstance(expected, TensorType) and isinstance(v.type, TensorType):
        if expected.dtype.is_float or v.type.dtype is expected.dtype:
            return v.type.with_dtype(expected.dtype)
    return v.type


RULES: dict[str, Rule] = {
    "const": _const, "dim": _dim, "tuple": _tuple, "get": _get, "getfield": _getfield,
    "struct_new": _struct_new, "call_fn": _call_fn, "host_call": lambda ctx, op, args: op.params.result,
    "call_jax": _call_jax, "map_leaves": _map_leaves, "sum_squares": _tree_reduction,
    "global_norm": _tree_reduction,
    **{n: _unary_float for n in O.UNARY_FLOAT.split()},
    **{n: _unary_same for n in O.UNARY_SAME.split()},
    "not": _not,
    **{n: _arith for n in O.BINARY_ARITH.split()},
    **{n: _compare for n in O.COMPARE.split()},
    **{n: _logic for n in O.LOGIC.split()},
    "where": _where, "clip": _clip, "stop_gradient": _same, "cast": _cast,
    **{n: _reduce for n in O.REDUCE.split()},
    "matmul": _matmul, "sampled_matmul": _sampled_matmul, "sliced_wasserstein": _sliced_wasserstein, "dot": _dot, "outer": _outer, "solve": _solve, "cholesky": _cholesky,
    "reshape": _reshape, "broadcast_to": _broadcast_to, "transpose": _transpose,
    "concat": _join, "stack": _join, "zeros": _filled, "ones": _filled, "full": _filled,
    "arange": _arange, "eye": _eye, "softmax": _softmax, "log_softmax": _softmax,
    "one_hot": _one_hot, "cross_entropy": _cross_entropy, "mse": _mse, "index": _index,
    **R.RULES, **N.RULES,
    "sign": _unary_same, "round": _unary_same, "floor": _unary_same, "ceil": _unary_same,
    "step": _unary_float, "binarize": _unary_float,
    "argmax": _along_axis, "topk": _along_axis, "sort": _along_axis,
    "quantize": _quantize, "quest": _quantize, "hadamard": _hadamard,
    "stochastic_round": _unary_float,
}


@dataclass(frozen=True)
class Typecheck:
    """The type and shape checking pass."""

    name: str = "typecheck"
    after_errors: bool = True
    requires: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()

    def run(self, module: Module, diags: Diagnostics) -> Module:
        ctx = _Ctx(module)
        functions = tuple(_FunctionChecker(ctx, fn, diags).run() for fn in module.functions)
        module = replace(module, functions=functions)
        _check_exports(module, diags)
        check_power_of_two_dims(module, diags)
        return module


def _check_exports(module: Module, diags: Diagnostics) -> None:
    for export in (part for e in module.exports for part in e.parts()):
        t = export.transform
        fn = module.function(t.fn)
        if fn is None or t.kind == "fn":
            continue
        if t.compose is not None:
            if t.has_aux:
                diags.error("has_aux=true is not supported with compose(...): return the "
                            "metrics from another export", export.fn_span)
            continue
        problem = result_problem(t.kind, t.has_aux, fn.name, fn.result_type)
        if problem is not None:
            diags.error(problem, export.fn_span)
        for name, span in zip(t.wrt, t.wrt_spans):
            p = fn.param(name)
            if p is not None and not is_float_tree(p.value.type):
                diags.error(f"cannot differentiate with respect to '{name}' of type "
                            f"{p.value.type}: only float tensors (or structs of them) have "
                            f"gradients", span)


class _FunctionChecker:
    def __init__(self, ctx: _Ctx, fn: Function, diags: Diagnostics):
        self.ctx = ctx
        self.fn = fn
        self.diags = diags
        self.env: dict[Value, Value] = {p.value: p.value for p in fn.params}
        self.literals: dict[Value, Op] = {}
        """Float literals (their const ops) by value, to check where they are used."""

    def run(self) -> Function:
        body = self.region(self.fn.body, ())
        (result,) = body.results
        if result.type is not ERROR:
            # a dim the parameters name is that dim in the result too (f32[N] -> f32[N] may
            # not return x[1:], of N-1 entries); the others bind to what is returned
            env: dict = {d: d for p in self.fn.params for d in type_dims(p.value.type)}
            declared = self.fn.result_type
            problem = unify(declared, _weak_as(self.ctx, result, declared), env)
            self._f32_overflow([result], (declared,), self.fn.result_span)
            if problem:
                self.diags.error(f"'{self.fn.name}' is declared to return {self.fn.result_type} "
                                 f"but returns {result.type}", self.fn.result_span)
        return replace(self.fn, body=body)

    def new(self, old: Value, t: Type) -> Value:
        v = old.retyped(t)
        self.env[old] = v
        return v

    def region(self, region: Region, arg_types: tuple[Type, ...]) -> Region:
        args = tuple(self.new(a, t) for a, t in zip(region.args, arg_types))
        ops = tuple(self.op(op) for op in region.ops)
        return Region(args, ops, tuple(self.env[r] for r in region.results))

    def op(self, op: Op) -> Op:
        args = [self.env[v] for v in op.operands]
        if op.name == "if":
            return self.if_op(op, args)
        if op.name == "for":
            return self.for_op(op, args)
        if op.name in ("expect", "samples"):
            return self.expect_op(op)
        if op.name == "checkpoint":
            body = self.region(op.regions[0], ())
            results = tuple(self.new(r, v.type) for r, v in zip(op.results, body.results))
            return replace(op, results=results, regions=(body,))
        if op.name == "argmin":
            return self.argmin_op(op, args)
        if op.name == "grad":
            return self.grad_op(op, args)
        types: tuple[Type, ...]
        if op.name == "error" or any(a.type is ERROR for a in args):
            types = (ERROR,) * len(op.results)
        elif op.name not in R.DIST_CONSUMERS and any(isinstance(a.type, DistType) for a in args):
            self.diags.error("a distribution can only be sampled (z ~ d) or passed to log_prob, "
                             "mean, entropy or kl", op.span)
            types = (ERROR,) * len(op.results)
        elif op.name not in TREE_CONSUMERS and any(isinstance(a.type, TreeType) for a in args):
            tree = next(a for a in args if isinstance(a.type, TreeType))
            self.diags.error(f"{f'tree {tree.hint!r}' if tree.hint else 'a tree'} is opaque (its "
                             f"structure is known only at run time): it can only be passed to a "
                             f"function with a tree parameter (a jax fn), to sum_squares, "
                             f"global_norm or map_leaves, or returned", op.span)
            types = (ERROR,) * len(op.results)
        else:
            try:
                t = RULES[op.name](self.ctx, op, args)
                types = t if isinstance(t, tuple) else (t,)
            except ShapeError as exc:
                self.diags.error(str(exc), dict(op.arg_spans).get(exc.arg, op.span))
                types = (ERROR,) * len(op.results)
        results = tuple(self.new(r, t) for r, t in zip(op.results, types))
        if op.name == "const" or (op.name in _WEAK_PROPAGATING and args
                                  and all(a in self.ctx.weak for a in args)):
            self.ctx.weak.update(results)
        if op.name == "const" and isinstance(op.params.value, float):
            self.literals[results[0]] = op
        self._f32_overflow(args, tuple(r.type for r in results), op.span)
        return replace(op, operands=tuple(args), results=results)

    def _f32_overflow(self, args: list[Value], types: tuple[Type, ...], span) -> None:
        """A float literal beyond float32's range used in an f32 computation (one whose
        result `types` include f32: an op's, a function's result, a branch's) would be inf."""
        if not any(isinstance(t, TensorType) and t.dtype is DType.F32 for t in types):
            return
        for a in args:
            lit = self.literals.get(a)
            if lit is not None and not abs(lit.params.value) <= F32_MAX:
                self.diags.error(f"the literal {lit.params.value:g} is beyond float32's range "
                                 f"(largest {F32_MAX:.3g}) in this f32 computation, where it "
                                 f"would be inf; use a smaller value, or f64 operands",
                                 lit.span or span)
                del self.literals[a]

    def if_op(self, op: Op, args: list[Value]) -> Op:
        then, orelse = (self.region(r, ()) for r in op.regions)
        (a,), (b,) = then.results, orelse.results
        cond = args[0].type
        result: Type = ERROR
        if ERROR not in (cond, a.type, b.type):
            try:
                result = self._if_type(args[0], a, b)
            except ShapeError as exc:
                self.diags.error(str(exc), op.span)
        results = (self.new(op.results[0], result),)
        self._f32_overflow([a, b], (result,), op.span)
        return replace(op, operands=tuple(args), results=results, regions=(then, orelse))

    def _if_type(self, c: Value, a: Value, b: Value) -> Type:
        ct = _tensor(c, "condition of if")
        if ct.dtype is not DType.BOOL:
            raise ShapeError(f"the condition of if must be bool, got {ct}")
        if isinstance(a.type, TensorType) and isinstance(b.type, TensorType):
            shape = broadcast(ct.shape, a.type.shape, b.type.shape)
            return TensorType(_promote_values(self.ctx, [a, b]), shape)
        if ct.rank != 0:
            raise ShapeError("an if with a tensor condition needs tensor branches")
        if a.type != b.type:
            raise ShapeError(f"the branches of if have different types: {a.type} and {b.type}")
        return a.type

    def expect_op(self, op: Op) -> Op:
        """`expect`: the mean over draws, typed like its value; `samples`: stacked values."""
        region = self.region(op.regions[0], ())
        n = op.params.samples
        types: list[Type] = []
        for v in region.results:
            t = ERROR
            if v.type is not ERROR:
                try:
                    t = R.stacked(n, v.type)
                except ShapeError as exc:
                    self.diags.error(str(exc), op.span)
            types.append(t.with_shape(t.shape[1:]) if op.name == "expect" and t is not ERROR else t)
        results = tuple(self.new(r, t) for r, t in zip(op.results, types))
        return replace(op, results=results, regions=(region,))

    def argmin_op(self, op: Op, args: list[Value]) -> Op:
        """The region's argument has the declared type; the start value must have it too (a
        tree variable starts from a tree, whose structure the solution keeps); the
        objective must be a float scalar, each constraint a float tensor; the result has the
        declared type (and the solver's report, when asked for)."""
        declared = op.regions[0].args[0].type
        what = "argmax" if op.params.maximize else "argmin"
        body, *constraints = (self.region(r, (declared,)) for r in op.regions)
        (objective,) = body.results
        ok = declared is not ERROR
        if args[0].type is not ERROR and ok:
            problem = unify(declared, _weak_as(self.ctx, args[0], declared), {})
            if problem:
                self.diags.error(f"the start value of {what} has type {args[0].type}, but the "
                                 f"variable is declared {declared}", op.span)
                ok = False
        t = objective.type
        if t is not ERROR and not (isinstance(t, TensorType) and t.rank == 0 and t.dtype.is_float):
            self.diags.error(f"the objective of an inner problem must be a float scalar, got {t}",
                             op.span)
            ok = False
        for c in (c for region in constraints for c in region.results):
            if c.type is not ERROR and not (isinstance(c.type, TensorType) and c.type.dtype.is_float):
                self.diags.error(f"a constraint must compare float tensors, got {c.type}", op.span)
                ok = False
        if declared is not ERROR and not is_float_tree(declared):
            self.diags.error(f"the variable of an inner problem must be a float tensor or a "
                             f"struct of them, got {declared}", op.span)
            ok = False
        types = (declared, SOLVER_REPORT)[:len(op.results)] if ok else (ERROR,) * len(op.results)
        results = tuple(self.new(r, t) for r, t in zip(op.results, types))
        return replace(op, operands=tuple(args), results=results, regions=(body, *constraints))

    def grad_op(self, op: Op, args: list[Value]) -> Op:
        """`grad(f, wrt=[...])(args)`: the region's arguments are typed as the parameters they
        are passed for; f must return a float scalar and each wrt parameter be a float tensor
        or a struct of them. The gradient has each wrt parameter's type (a tuple of them for
        several); `value_and_grad` puts the value first."""
        p: O.GradParams = op.params
        call = next(o for o in walk(op.regions[0]) if o.name == "call_fn")
        fn = self.ctx.module.function(call.params.callee)
        declared = {a: q.value.type for a, q in zip(call.operands, fn.params)}
        types = tuple(ERROR if a.type is ERROR else _weak_as(self.ctx, a, declared[r])
                      for a, r in zip(args, op.regions[0].args))
        body = self.region(op.regions[0], types)
        (objective,) = body.results
        ok = objective.type is not ERROR and all(types[i] is not ERROR for i in p.argnums)
        t = objective.type
        what = "value_and_grad" if p.value else "grad"
        if ok and not (isinstance(t, TensorType) and t.rank == 0 and t.dtype.is_float):
            self.diags.error(f"{what} differentiates a float scalar; '{fn.name}' returns {t}",
                             op.span)
            ok = False
        for w, i in zip(p.wrt, p.argnums):
            if ok and not is_float_tree(types[i]):
                self.diags.error(f"{what} with respect to '{w}' needs a float tensor or a struct "
                                 f"of them; it is {types[i]}", op.span)
                ok = False
        grads = tuple(types[i] for i in p.argnums)
        result: Type = grads[0] if len(grads) == 1 else TupleType(grads)
        if p.value:
            result = TupleType((t, result))
        results = (self.new(op.results[0], result if ok else ERROR),)
        return replace(op, operands=tuple(args), results=results, regions=(body,))

    def for_op(self, op: Op, args: list[Value]) -> Op:
        p: O.ForParams = op.params
        carry_types = tuple(a.type for a in args)
        body = self.region(op.regions[0], (scalar(DType.I32),) + carry_types)
        ok = all(t is not ERROR for t in carry_types)
        for name, init, new in zip(p.carries, args, body.results):
            if ok and new.type is not ERROR and _weak_as(self.ctx, new, init.type) != init.type:
                self.diags.error(f"carry '{name}' starts as {init.type} but the loop body makes "
                                 f"it {new.type}; give the initial value the same type", op.span)
                ok = False
        types = carry_types if ok else (ERROR,) * len(op.results)
        results = tuple(self.new(r, t) for r, t in zip(op.results, types))
        return replace(op, operands=tuple(args), results=results, regions=(body,))


TREE_CONSUMERS = frozenset({"call_fn", "call_jax", "map_leaves", "sum_squares", "global_norm"})
"""The ops that take a tree operand (a tree is opaque to every other)."""

_WEAK_PROPAGATING = set(O.UNARY_FLOAT.split() + O.UNARY_SAME.split() + O.BINARY_ARITH.split())
"""Ops whose result stays weakly typed when all operands are (e.g. `-1.0`, `2 * 3`)."""
