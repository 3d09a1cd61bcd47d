"""Linear layers of the differentiated parameters: where per-example gradient norms can be
computed without forming per-example gradients (ghost clipping, for `by=dp`).

A `wrt` leaf (a float parameter, or a field of a struct parameter, named `p.l1.w`) is a
*linear layer* of an objective when every use of it is as the right operand of a matmul, `x @
w` (a matrix), as an einsum's projection (`einsum("btd,dnk->btnk", x, w)`: its contracted
letters lead its term, the others go to the output) or as the kernel of a convolution
`conv(x, w)` without feature groups (the product of x's patches and w flattened, im2col), or
every use is as an embedding table looked up, `w[ids]` (ghost norms from the token counts),
at the top level of a function body, reached from the parameter through field accesses, calls
and non-smooth ops whose backward rule is the identity (`x @ (quantize(w, 4) with ste)`: w's
gradient is the quantized weight's) only. Its per-example gradient is then x_i^T g_i (g_i the example's cotangent of x @ w),
whose norm the runtime (`runtime.ghost`) gets from x_i and g_i alone.

Anything else makes the leaf fall back to per-example gradients: a use by any other op (an
elementwise op, a reduction, `w @ x`, a struct or tuple built from it, a return), a call of a
`jax fn` (its matmuls are JAX's, out of the compiler's sight), a use inside a region (a loop, a
branch, an expectation, an inner problem: its activations would have to be collected across
iterations), or no use at all. A tree parameter is one entry, `p`, never ghost clipped: its
leaves are known only at run time. The analysis follows each call with its own
bindings, so a function called with two layers (`dense(p.l1, x)`, `dense(p.l2, h)`) sees each.
"""

from __future__ import annotations

from pathlib import Path

from gradlang.estimators.backward import rule_of
from gradlang.facts import LeafNorm
from gradlang.ir import Function, Module, Op, Region, Value
from gradlang.types import StructType, TensorType, TreeType, Type


def leaf_types(name: str, t: Type) -> dict[str, Type]:
    """The leaves of a parameter of type t by name (`p.l1.w`), in field order."""
    if isinstance(t, StructType):
        out: dict[str, Type] = {}
        for field, ft in t.fields:
            out |= leaf_types(f"{name}.{field}", ft)
        return out
    return {name: t}


def _where(op: Op, fn: Function) -> str:
    return f"{fn.name} ({Path(op.span.source.path).name}:{op.span.line})" if op.span else fn.name


class _Uses:
    """Every use of the wrt leaves in an objective and the functions it calls."""

    def __init__(self, module: Module, types: dict[str, Type]):
        self.module = module
        self.types = types
        self.found: dict[str, list[tuple[bool, str]]] = {leaf: [] for leaf in types}

    def under(self, path: str) -> list[str]:
        """The leaves at or below `path` (a leaf, or a struct holding leaves)."""
        return [leaf for leaf in self.types if leaf == path or leaf.startswith(path + ".")]

    def other(self, path: str, what: str) -> None:
        for leaf in self.under(path):
            self.found[leaf].append((False, what))

    def function(self, fn: Function, bound: dict[Value, str], inside: str | None) -> None:
        self.region(fn, fn.body, bound, inside)
        for v in fn.body.results:
            if v in bound:
                self.other(bound[v], f"returned from {fn.name}")

    def region(self, fn: Function, region: Region, bound: dict[Value, str],
               inside: str | None) -> None:
        for op in region.ops:
            self.op(fn, op, bound, inside)
            for r in op.regions:
                self.region(fn, r, bound, inside or f"inside {op.name} in {_where(op, fn)}")

    def op(self, fn: Function, op: Op, bound: dict[Value, str], inside: str | None) -> None:
        used = [(i, bound[v]) for i, v in enumerate(op.operands) if v in bound]
        if not used:
            return
        if op.name == "getfield":
            bound[op.result] = f"{used[0][1]}.{op.params.name}"
        elif _identity_backward(op) and [i for i, _ in used] == [0]:
            bound[op.result] = used[0][1]  # its gradient is the result's, unchanged
        elif op.name == "call_fn":
            callee = self.module.function(op.params.callee)
            if any(o.name == "call_jax" for o in callee.body.ops):  # a jax fn: JAX's matmuls
                for _, path in used:
                    self.other(path, f"passed to jax fn '{callee.name}' "
                                     f"{inside or 'in ' + _where(op, fn)}, whose matmuls the "
                                     f"compiler cannot see (no ghost clipping through it)")
            else:
                self.function(callee, {callee.params[i].value: path for i, path in used}, inside)
        else:
            for i, path in used:
                t = self.types.get(path)
                linear = inside is None and isinstance(t, TensorType) and t.rank >= 2 and (
                    (op.name == "matmul" and i == 1 and t.rank == 2) or _projection(op, i)
                    or (_lookup(op) and i == 0 and t.rank == 2)
                    or (op.name == "conv" and i == 1 and op.params.groups == 1))
                if linear:
                    what = {"matmul": "x @ w", "index": "a lookup w[ids]",
                            "conv": "a convolution conv(x, w)"}.get(op.name) or (
                        f"einsum \"{op.params.subscripts}\"")
                    self.found[path].append((True, f"{what} in {_where(op, fn)}"))
                else:
                    role = (" (its left operand)" if op.name == "matmul" and i == 0 else
                            " (with feature groups: a product per group)"
                            if op.name == "conv" and i == 1 and inside is None else "")
                    self.other(path, f"used by {op.name}{role} {inside or 'in ' + _where(op, fn)}")


def _identity_backward(op: Op) -> bool:
    """A non-smooth op of the same shape whose backward rule is the identity (`sign(w) with
    ste`, `quantize(w, 4) with ste`): reverse mode sees its operand as its result."""
    return (op.name == "straight_through" and op.operands[0].type == op.results[0].type
            and rule_of(op.params.rule).identity)


def _lookup(op: Op) -> bool:
    """Whether op is a lookup `table[ids]` (an integer tensor as its one subscript)."""
    return (op.name == "index" and len(op.params.items) == 1
            and op.params.items[0].kind == "dynamic" and isinstance(op.operands[1].type, TensorType)
            and op.operands[1].type.rank >= 1)


def _projection(op: Op, i: int) -> bool:
    """Whether operand i of an einsum is a weight it projects by (`EinsumParams.projects`)."""
    return op.name == "einsum" and len(op.operands) == 2 and op.params.projects(i)


def linear_layers(module: Module, fn: Function, wrt: tuple[str, ...]) -> tuple[LeafNorm, ...]:
    """For each leaf of fn's `wrt` parameters, whether it is a linear layer, and why."""
    params = [p for p in fn.params if p.name in wrt]
    types: dict[str, Type] = {}
    for p in params:
        types |= leaf_types(p.name, p.value.type)
    uses = _Uses(module, types)
    uses.function(fn, {p.value: p.name for p in params}, None)
    out = []
    for leaf, found in uses.found.items():
        bad = [what for ok, what in found if not ok]
        if isinstance(types[leaf], TreeType):
            first = f": {bad[0]}" if bad else ""
            out.append(LeafNorm(leaf, False, f"a tree: per-example gradients of every leaf (its "
                                             f"leaves are known only at run time){first}"))
        elif bad:
            out.append(LeafNorm(leaf, False, bad[0]))
        elif not found:
            out.append(LeafNorm(leaf, False, "not used (its gradient is zero)"))
        elif len({w.startswith("a lookup") for _, w in found}) > 1:
            out.append(LeafNorm(leaf, False, "both looked up (w[ids]) and multiplied: its "
                                             "per-example norm has no one ghost form"))
        else:
            out.append(LeafNorm(leaf, True, "; ".join(dict.fromkeys(w for _, w in found))))
    return tuple(out)
