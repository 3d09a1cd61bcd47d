"""Fuzzing the front end: no input, however broken, makes `gradlang check` crash.

Inputs are token soup drawn from the language's vocabulary (keywords, punctuation, operators,
names, numbers, newlines), declaration-shaped soup, and valid programs mutated by deleting,
duplicating, swapping, replacing or inserting tokens, or by replacing names, numbers, operators
and dtypes with others of their kind (these mostly parse, so they reach the later passes).
Every one must give exit status 0 or 1 (never 3, an internal compiler error) and never raise.
The examples are derandomized, so every run checks the same inputs.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import re
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradlang.cli import main

KEYWORDS = ["use", "struct", "fn", "extern", "jax", "export", "let", "return", "if", "then",
            "else", "for", "in", "range", "carry", "and", "or", "not", "true", "false",
            "f32", "f64", "i32", "bool", "grad", "value_and_grad", "wrt", "pragma", "with",
            "expect", "samples", "estimator", "argmin", "argmax", "via"]
PUNCTUATION = ["(", ")", "[", "]", "{", "}", ",", ":", ";", "=", "->", ".", "+", "-", "*", "/",
               "@", "^", "==", "!=", "<", "<=", ">", ">=", "#", "%", "$", '"', "~"]
NAMES = ["x", "y", "w", "b", "f", "g", "h", "p", "P", "Dense", "B", "N", "D", "I", "O", "i",
         "acc", "sum", "mean", "exp", "tanh", "reshape", "concat", "stack", "zeros", "where",
         "cross_entropy", "one_hot", "transpose", "arange", "softmax", "axis", "shape", "keepdims",
         "std", "nn", "dense", "lib", "util", "_", "x1", "Normal", "Bernoulli", "Categorical",
         "OneHotCategorical", "MixtureNormal", "Uniform", "log_prob", "kl", "entropy", "logits",
         "probs", "reparam", "score", "baseline", "loo", "ma", "grpo", "enum", "mvd", "gumbel",
         "tau", "auto", "enum_max", "gd", "momentum", "implicit", "unrolled", "cg", "neumann",
         "steps", "lr", "iters", "sign", "round", "quantize", "ste", "reste", "trust", "quest"]
NUMBERS = ["0", "1", "2", "3", "-1", "10", "2.5", "0.0", "1e-3", "3000000000", "99999999999999999999"]
SEPARATORS = [" ", " ", " ", "\n", "\n  ", ""]

VOCABULARY = KEYWORDS + PUNCTUATION + NAMES + NUMBERS

SEEDS = [
    """
struct Lin { w: f32[D], b: f32 }
fn f(lam: f32, x: f32[N, D], y: f32[N]) -> f32 {
  let p = argmin q: Lin = Lin(w=zeros([D]), b=0.0) {
            let r = x @ q.w + q.b - y
            mean(r * r) + exp(lam) * sum(q.w * q.w)
          } via momentum(steps=50, lr=0.1, beta=0.5) with implicit(neumann, iters=20)
  let m = argmax u: f32[D] = zeros([D]) { -sum((u - lam) ^ 2) } via gd(steps=5) with unrolled
  argmin v: f32[D] = zeros([D]) { 0.5 * sum((v - p.w) ^ 2) } via adam(steps=20, tol=1e-4)
      subject to v <= lam with value_function(sigma=0.1) as (k, report)
  return sum(p.w) + p.b + sum(m) + sum(k) + report.residual + sum(argmax(x, axis=1))
}
export g = grad(f, wrt=[lam])
""",
    """
pragma estimator auto(enum_max=4)

fn coin(l: f32) -> f32 {
  b ~ Bernoulli(logits=l) with score(baseline=loo)
  return if b > 0.5 then 1.0 else -1.0
}

fn f(m: f32[3], l: f32, t: f32[4]) -> f32 {
  z ~ Normal(m, exp(l)) with reparam
  let k ~ Categorical(logits=t) with enum
  let e ~ OneHotCategorical(probs=softmax(t)) with gumbel(tau=0.5)
  let y ~ Uniform(l, l + 1.0)
  let inner = expect(coin(l) * sum(z), samples=3)
  let n = for i in range(2) carry (acc = 0.0) {
    c ~ Bernoulli(logits=l) with score(baseline=ma, decay=0.9)
    acc + c
  }
  return inner + f32(k) + sum(e) + y + n + kl(Normal(m, 1.0), Normal(0.0, 2.0))[0]
       + log_prob(MixtureNormal(t, t, exp(t)), l)
}

export g = value_and_grad(expect(f, samples=4), wrt=[m, l, t])
export d = f
""",
    """
fn f(m: f32, s: f32) -> f32 {
  z ~ Normal(m, s) with mvd
  return if z > 0.0 then z * z else 0.0
}
export g = grad(expect(f, samples=2), wrt=[m, s])
""",
    """
fn f(x: f32[B, D], w: f32[D]) -> f32 {
  let h = tanh(x @ w)
  return sum(h)
}

export g = grad(f, wrt=[w])
""",
    """
struct Layer { w: f32[I, O], b: f32[O] }
struct MLP { l1: Layer[I=D, O=H], l2: Layer[I=H, O=C] }

fn apply(l: Layer, x: f32[N, I]) -> f32[N, O] {
  return x @ l.w + l.b
}

fn loss(p: MLP, x: f32[B, D], y: i32[B]) -> f32 {
  let q = MLP(l1=p.l1, l2=Layer(w=p.l2.w * 0.5, b=p.l2.b))
  let h = relu(apply(q.l1, x))
  return cross_entropy(apply(q.l2, h), y)
}

export step = value_and_grad(loss, wrt=[p])
""",
    """
use std.nn

fn f(x: f32[B, D], w: f32[D], k: i32) -> f32 {
  let s = x @ w
  let pos = if s > 0.0 then s else 0.1 * s
  let (total, count) = for i in range(B) carry (acc = 0.0, n = 0) {
    let row = pos[i];
    (acc + row * row, n + 1)
  }
  let picked = x[k, 0]
  let t = sum(reshape(x, [B, -1]), axis=[0, -1], keepdims=true)
  let u = concat([x, x], axis=0)[1:, ::2]
  return picked * total / f32(count + B) + sum(t) + sum(u)
}

export loss = f
export vg = value_and_grad(f, wrt=[w, x])
""",
    """
fn g(t: (f32, i32)) -> f32 {
  let (a, n) = t
  return a * f32(n)
}

fn f(w: f32, c: bool[K], n: i32[K]) -> f32 {
  let h = where(c, n, 0)
  let p = not c or (n >= 1) and n != 3
  return g((w * 2.0, 3)) + f32(sum(h)) + sum(f32(p))
}

export h = f
""",
    """
use std.nn

struct Net { layer: Dense[I=D, O=C] }

fn f(net: Net, z: f32[B, D], x: f32[B, 6], y: i32[B], t: f32[2, 3, 4], reg: f32) -> f32 {
  let logits = nn.dense(net.layer, reshape(z, [B, D]))
  let a = sum(t, axis=[0, -1], keepdims=true)
  let e = transpose(t, axes=[2, 0, 1])
  let g = stack([x, x, x], axis=-1)
  let i = full([2, B], 7)
  let j = arange(1, B)
  let k = one_hot(y, 6)
  let l = log_softmax(x, axis=-2)
  let m = broadcast_to(y, [3, B])
  let o = eye(B)
  let penalty = reg * l2(net.layer.w) + sum(a) + sum(e) + sum(g) + f32(sum(i)) + f32(sum(j))
  return cross_entropy(logits, y) + penalty + sum(k * l) + f32(sum(m)) + sum(o)
}

export step = grad(f, wrt=[net, reg])
""",
    """
struct P { w: f32, v: f32 }

fn g(p: P, w: f32) -> f32 {
  let (a, b) = (p.w, w)
  let q = P(w=a, v=b).v
  let s = [a, b]
  return q * sum(stack(s))
}

fn f(w: f32) -> f32 {
  return g(P(w=w, v=w), w)
}

export e = grad(f, wrt=[w])
""",
]

_CLASSES = [NAMES, NUMBERS, ["+", "-", "*", "/", "@", "^", "==", "!=", "<", "<=", ">", ">=", "and", "or"],
            ["f32", "f64", "i32", "bool"]]
_NUMBER_LITERALS = [n for n in NUMBERS if not n.startswith("-")]

_TOKEN = re.compile(r"\s*(->|==|!=|<=|>=|[A-Za-z_][A-Za-z0-9_]*|[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?|#[^\n]*|\S)")


def tokenize(text: str) -> list[tuple[str, str]]:
    """(token, whitespace before it) pairs; rejoining them gives the text back (less the
    trailing whitespace)."""
    out = []
    for m in _TOKEN.finditer(text):
        whole, token = m.group(0), m.group(1)
        out.append((token, whole[: len(whole) - len(token)]))
    return out


def join(tokens: list[tuple[str, str]]) -> str:
    return "".join(space + token for token, space in tokens) + "\n"


@st.composite
def token_soup(draw) -> str:
    tokens = draw(st.lists(st.sampled_from(VOCABULARY), max_size=40))
    spaces = draw(st.lists(st.sampled_from(SEPARATORS), min_size=len(tokens), max_size=len(tokens)))
    return "".join(s + t for t, s in zip(tokens, spaces))


@st.composite
def declaration_soup(draw) -> str:
    """Declaration-shaped soup: a declaration keyword at the start of each line, so that
    several declaration chunks of the parser are exercised and some get past the parser."""
    lines = []
    for _ in range(draw(st.integers(1, 4))):
        head = draw(st.sampled_from(["fn f(x: f32) -> f32 {\n  return", "fn g(x: f32[N], y: f32) -> f32 {\n  let z =",
                                     "struct P {", "export e =", "use", "extern fn h(", "fn f("]))
        body = draw(st.lists(st.sampled_from(VOCABULARY), max_size=15))
        tail = draw(st.sampled_from(["", "\n}", "\n  return x\n}", ")", "}"]))
        lines.append(head + " " + " ".join(body) + tail)
    return "\n".join(lines)


@st.composite
def mutated_program(draw, similar_only: bool = False) -> str:
    """A seed program with a few tokens deleted, duplicated, swapped, replaced or inserted;
    with `similar_only`, names, numbers, operators and dtypes replaced by others of their
    kind (mostly still parses, so it exercises the later passes)."""
    tokens = tokenize(draw(st.sampled_from(SEEDS)))
    kinds = ["similar"] if similar_only else ["delete", "duplicate", "swap", "replace", "insert"]
    for _ in range(draw(st.integers(1, 4))):
        if not tokens:
            break
        kind = draw(st.sampled_from(kinds))
        i = draw(st.integers(0, len(tokens) - 1))
        if kind == "delete":
            del tokens[i]
        elif kind == "duplicate":
            tokens.insert(i, tokens[i])
        elif kind == "swap":
            j = draw(st.integers(0, len(tokens) - 1))
            (ti, si), (tj, sj) = tokens[i], tokens[j]
            tokens[i], tokens[j] = (tj, si), (ti, sj)
        elif kind == "replace":
            tokens[i] = (draw(st.sampled_from(VOCABULARY)), tokens[i][1])
        elif kind == "similar":  # a token of the same class: more programs get past the parser
            token, space = tokens[i]
            if re.fullmatch(r"[A-Za-z_]\w*", token) and token not in KEYWORDS:
                same = NAMES
            elif re.fullmatch(r"[0-9].*", token):
                same = _NUMBER_LITERALS
            else:
                same = next((c for c in _CLASSES if token in c), [token])
            tokens[i] = (draw(st.sampled_from(same)), space)
        else:
            tokens.insert(i, (draw(st.sampled_from(VOCABULARY)), " "))
    return join(tokens)


PROGRAMS = st.one_of(token_soup(), declaration_soup(), mutated_program(), mutated_program(),
                     mutated_program(similar_only=True), mutated_program(similar_only=True))
EXAMPLES = 1000  # about 8 s (the default suite's time)
_FOLDER = Path(tempfile.mkdtemp(prefix="gradlang-fuzz-"))
atexit.register(shutil.rmtree, _FOLDER, ignore_errors=True)


def check(text: str) -> tuple[int, str]:
    path = _FOLDER / "fuzz.grad"
    path.write_text(text)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main(["check", str(path)])
    return status, err.getvalue()


def test_the_seeds_are_valid_programs():
    for seed in SEEDS:
        assert check(seed) == (0, ""), check(seed)[1]


def test_tokenize_round_trips():
    for seed in SEEDS:
        assert join(tokenize(seed)) == seed.rstrip() + "\n"


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(PROGRAMS)
def test_no_input_crashes_the_compiler(text):
    status, err = check(text)
    assert status in (0, 1), f"status {status} for:\n{text}\n{err}"
    assert "internal compiler error" not in err
