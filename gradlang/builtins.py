"""Signatures of the builtin functions: which IR op each becomes and how arguments bind.

An argument is either a tensor operand or a static value folded into the op's params at
resolution time. Static kinds:
- `axis`: an integer literal (negative counts from the end);
- `axes`: an integer, a list of integers, or omitted (all axes);
- `bool`: `true` / `false`;
- `shape`: a list of integer literals and dimension names, e.g. `[B, 10]` (`-1` allowed in reshape);
- `dim`: an integer literal or a dimension name;
- `fn`: the name of a function (it becomes the op's callee);
- `string`: a string literal, e.g. einsum's `"ij,jk->ik"`;
- `padding`: `"SAME"`, `"VALID"` or a list of (low, high) pairs of integers, one per spatial
  axis, e.g. `[(1, 1), (0, 2)]`.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import ops

REQUIRED = object()


@dataclass(frozen=True)
class Arg:
    name: str
    kind: str
    """"tensor", "tensors", "axis", "axes", "bool", "shape", "dim", "fn", "string" or
    "padding"."""
    """An optional tensor (default None) is recorded in the op's params as given or not."""
    default: object = REQUIRED
    example: str = ""
    """A string argument's example, for its error message."""

    @property
    def static(self) -> bool:
        return self.kind not in ("tensor", "tensors")


@dataclass(frozen=True)
class Builtin:
    name: str
    op: str
    args: tuple[Arg, ...]
    doc: str

    @property
    def signature(self) -> str:
        parts = []
        for a in self.args:
            parts.append(a.name if a.default is REQUIRED else f"{a.name}={_show(a.default)}")
        return f"{self.name}({', '.join(parts)})"


def _show(v: object) -> str:
    if isinstance(v, str):
        return f'"{v}"'
    return "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def _b(name: str, args: str, doc: str, op: str | None = None,
       examples: dict[str, str] | None = None) -> Builtin:
    """Parse a compact spec: "x:tensor axis:axes=None keepdims:bool=False" (a string default
    as written: "padding:string=SAME"); `examples` give string arguments' examples."""
    parsed = []
    for spec in args.split():
        head, _, default = spec.partition("=")
        arg_name, kind = head.split(":")
        example = (examples or {}).get(arg_name, default)
        if not default:
            parsed.append(Arg(arg_name, kind, example=example))
        elif kind in ("string", "padding"):
            parsed.append(Arg(arg_name, kind, default, example))
        else:
            parsed.append(Arg(arg_name, kind, _DEFAULTS[default] if default in _DEFAULTS else int(default)))
    return Builtin(name, op or name, tuple(parsed), doc)


_DEFAULTS = {"None": None, "False": False, "True": True}

_UNARY_DOCS = {
    "exp": "e^x", "log": "natural logarithm", "log1p": "log(1 + x), accurate near 0",
    "expm1": "e^x - 1, accurate near 0", "sqrt": "square root", "tanh": "hyperbolic tangent",
    "sigmoid": "1 / (1 + e^-x)", "softplus": "log(1 + e^x)", "relu": "max(x, 0)",
    "gelu": "x Phi(x), the Gaussian error linear unit (the tanh approximation, as jax.nn.gelu)",
    "silu": "x sigmoid(x) (swish)",
    "abs": "absolute value", "sin": "sine", "cos": "cosine",
}
_REDUCE_DOCS = {
    "sum": "sum", "mean": "arithmetic mean", "max": "maximum", "min": "minimum",
    "logsumexp": "log of the sum of exponentials, computed stably", "var": "population variance",
}

BUILTINS: dict[str, Builtin] = {
    b.name: b
    for b in [
        *[_b(n, "x:tensor", d) for n, d in _UNARY_DOCS.items()],
        _b("maximum", "x:tensor y:tensor", "elementwise maximum (broadcasting)"),
        _b("minimum", "x:tensor y:tensor", "elementwise minimum (broadcasting)"),
        _b("where", "cond:tensor x:tensor y:tensor", "x where cond is true, else y (broadcasting)"),
        _b("clip", "x:tensor lo:tensor hi:tensor", "x clamped to [lo, hi]"),
        _b("stop_gradient", "x:tensor", "x, with zero derivative"),
        *[_b(n, "x:tensor axis:axes=None keepdims:bool=False", f"{d} over `axis` (all axes by default)")
          for n, d in _REDUCE_DOCS.items()],
        _b("reshape", "x:tensor shape:shape", "x with a new shape of the same size; one entry may be -1"),
        _b("transpose", "x:tensor axes:axes=None", "permute axes (reverse them by default)"),
        _b("concat", "xs:tensors axis:axis=0", "join a list of tensors along an existing axis"),
        _b("stack", "xs:tensors axis:axis=0", "join a list of tensors along a new axis"),
        _b("broadcast_to", "x:tensor shape:shape", "x broadcast to `shape`"),
        _b("zeros", "shape:shape", "f32 tensor of zeros"),
        _b("ones", "shape:shape", "f32 tensor of ones"),
        _b("full", "shape:shape value:tensor", "tensor filled with a scalar `value` (its dtype)"),
        _b("arange", "start:dim stop:dim=None", "i32 range [0, start) or [start, stop)"),
        _b("eye", "n:dim", "f32 n x n identity matrix"),
        _b("softmax", "x:tensor axis:axis=-1", "softmax along `axis`"),
        _b("log_softmax", "x:tensor axis:axis=-1", "log of softmax along `axis`, computed stably"),
        _b("one_hot", "labels:tensor num_classes:dim", "f32 one-hot encoding of integer labels (new last axis)"),
        _b("layer_norm", "x:tensor scale:tensor=None offset:tensor=None",
           "(x - mean) / sqrt(var + 1e-5) over the last axis [D], times `scale` [D] plus "
           "`offset` [D] when given"),
        _b("rms_norm", "x:tensor scale:tensor=None",
           "x / sqrt(mean(x^2) + 1e-6) over the last axis [D], times `scale` [D] when given"),
        _b("einsum", "subscripts:string x:tensor y:tensor=None",
           "Einstein summation of one or two tensors, as numpy.einsum: the subscripts a string "
           "literal checked against the operands' ranks and dims (no ellipsis); without `->` "
           "the output is the letters used once, in alphabetical order",
           examples={"subscripts": "ij,jk->ik"}),
        _b("conv", "x:tensor w:tensor stride:axes=1 padding:padding=SAME dilation:axes=1 "
                   "groups:dim=1",
           "convolution of x [B, W, C] or [B, H, W, C] with the kernel w [K, C / groups, O] "
           "or [KH, KW, C / groups, O]: `stride` and `dilation` an integer or one per spatial "
           "axis, `padding` \"SAME\", \"VALID\" or (low, high) zeros per spatial axis, e.g. "
           "[(1, 1), (1, 1)], `groups` feature groups; [B, W', O] or [B, H', W', O]"),
        _b("conv_transpose", "x:tensor w:tensor stride:axes=1 padding:padding=SAME "
                             "dilation:axes=1",
           "the transposed convolution of x [B, W, C] or [B, H, W, C] with the kernel w "
           "[K, C, O] or [KH, KW, C, O], as jax.lax.conv_transpose (and Flax's ConvTranspose): "
           "x dilated by `stride`, then convolved; with \"SAME\" padding each spatial size "
           "times the stride, with \"VALID\" that plus max(K - stride, 0), with explicit "
           "(low, high) pairs (n - 1) stride + 1 + low + high - K + 1 (K dilated)"),
        _b("avg_pool", "x:tensor window:axes stride:axes=None padding:padding=VALID",
           "the mean over each window of x [B, W, C] or [B, H, W, C] (`window` and `stride` an "
           "integer or one per spatial axis; the stride the window by default); with "
           "\"SAME\" padding the padded zeros count, as Flax's avg_pool"),
        _b("max_pool", "x:tensor window:axes stride:axes=None padding:padding=VALID",
           "the maximum over each window of x [B, W, C] or [B, H, W, C], as avg_pool"),
        _b("dot_product_attention", "q:tensor k:tensor v:tensor mask:tensor=None "
                                    "causal:bool=False",
           "softmax(q k^T / sqrt(D)) v per head, as jax.nn.dot_product_attention: q [B, T, H, "
           "D], k and v [B, S, K, D] (K heads of keys and values, each shared by H / K query "
           "heads); `mask` bool, [B, S] (key padding) or broadcasting to [B, H, T, S], true "
           "where a query may attend; `causal` masks the future; [B, T, H, D]"),
        _b("group_norm", "x:tensor groups:dim scale:tensor=None offset:tensor=None",
           "x [B, ..., C] normalized over its non-batch axes within each of `groups` groups "
           "of channels (eps 1e-5, as Flax's GroupNorm), times `scale` [C] plus `offset` [C] "
           "when given"),
        _b("leaky_relu", "x:tensor slope:tensor",
           "x where x >= 0, else slope x (the slope a scalar, e.g. 0.01)"),
        _b("dropout", "x:tensor rate:tensor",
           "x with each entry zeroed with probability `rate` and the rest scaled by 1 / (1 - "
           "rate): a random choice (the function takes a key), its gradient pathwise through "
           "the kept entries"),
        _b("take_along_axis", "x:tensor indices:tensor axis:axis=-1",
           "the entries of x at the integer `indices` along `axis` (same rank as x; the other "
           "axes broadcast), as numpy.take_along_axis; an index out of range gives NaN "
           "(float x)"),
        _b("segment_sum", "data:tensor segment_ids:tensor segments:dim",
           "[segments, ...]: the sum of the rows of data [N, ...] with each segment id "
           "(i32 [N]); ids out of [0, segments) are dropped"),
        _b("cross_entropy", "logits:tensor labels:tensor",
           "mean over the batch of -log_softmax(logits)[label]; labels are integer classes [B] "
           "or probabilities shaped like logits"),
        _b("mse", "pred:tensor target:tensor", "mean of (pred - target)^2 (broadcasting)"),
        _b("dot", "x:tensor y:tensor", "dot product of vectors; matrix-vector and matrix products as @"),
        _b("outer", "x:tensor y:tensor", "outer product of two vectors"),
        _b("solve", "a:tensor b:tensor", "x with a @ x = b, for square a [N, N] and b [N] or [N, K]"),
        _b("cholesky", "a:tensor", "lower-triangular L with L @ transpose(L) = a"),
        _b("sign", "x:tensor", "-1, 0 or 1 by the sign of x (non-smooth)"),
        _b("round", "x:tensor", "nearest integer, halves to even (non-smooth)"),
        _b("floor", "x:tensor", "largest integer <= x (non-smooth)"),
        _b("ceil", "x:tensor", "smallest integer >= x (non-smooth)"),
        _b("step", "x:tensor", "Heaviside step: 1 where x > 0, else 0 (f32; non-smooth)"),
        _b("binarize", "x:tensor", "+1 where x >= 0, else -1 (f32; sign with sign(0) = 1; non-smooth)"),
        _b("argmax", "x:tensor axis:axis=-1", "one-hot f32 of the largest entry along `axis` (first on ties; non-smooth)"),
        _b("topk", "x:tensor k:dim axis:axis=-1", "f32 0/1 mask of the `k` largest entries along `axis` (non-smooth)"),
        _b("sort", "x:tensor axis:axis=-1", "x sorted ascending along `axis`"),
        _b("quantize", "x:tensor bits:dim scale:tensor=None axis:axes=None symmetric:bool=True",
           "b-bit uniform quantization; scale from max |x| (symmetric), max - min (not), or "
           "mean |x| at 1 bit, per tensor or per channel along `axis`, unless given (non-smooth)"),
        _b("quest", "x:tensor bits:dim",
           "QuEST quantizer: Hadamard-rotate the last axis, quantize with the MSE-optimal scale "
           "for Gaussian inputs (per row), rotate back (non-smooth)"),
        _b("hadamard", "x:tensor", "orthonormal fast Walsh-Hadamard transform of the last axis "
           "(a power of two)"),
        _b("sliced_wasserstein", "x:tensor y:tensor projections:dim p:dim=2",
           "SW_p^p of the point clouds x [N, D] and y [N, D]: the mean over `projections` random "
           "directions of the 1-D Wasserstein distance W_p^p of the projections (draws; "
           "`with control_variate(gaussian_lower | gaussian_upper | none)`)"),
        _b("stochastic_round", "x:tensor", "floor(x + u), u ~ Uniform[0, 1): unbiased rounding "
           "(draws; its backward is the identity, exact for the expectation)"),
        _b("log_prob", "d:tensor x:tensor", "log density (or mass) of `x` under distribution `d`, "
           "per batch element"),
        _b("entropy", "d:tensor", "entropy of distribution `d`, per batch element"),
        _b("kl", "p:tensor q:tensor", "KL(p || q) in closed form, per batch element"),
        _b("sum_squares", "t:tensor", "the sum of the squares of every entry of a tree's (or "
           "a struct's, or a tensor's) float leaves, e.g. for weight decay"),
        _b("global_norm", "t:tensor", "sqrt(sum_squares(t)): the L2 norm of all the leaves "
           "together"),
        _b("map_leaves", "t:tensor f:fn", "the tree t with the function f applied to each leaf "
           "of the rank of f's one parameter (others unchanged), e.g. map_leaves(p, quantized) "
           "with fn quantized(w: f32[R, C]) -> f32[R, C] { return quest(w, 4) with trust }"),
    ]
}


def _check() -> None:
    for b in BUILTINS.values():
        assert b.op in ops.OPS, b.op


_check()
