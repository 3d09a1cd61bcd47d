"""Parameter trees (`p: tree`): any JAX pytree of float arrays passed to `jax fn`s, used as a
`wrt` target (its gradient comes back in the same structure), reduced (`sum_squares`,
`global_norm`) and mapped leaf by leaf with a backward rule (`map_leaves`).

Gradients through a Flax model's `params` and a plain nested tree match `jax.grad` of the same
Python code; value_and_grad, expect (score function and pathwise draws), descend, by=spsa|es,
checkpoint, jax.jit and jax.vmap take trees; an artifact records the tree's structure and runs
in a fresh process without the function; every bad tree is an ArgumentError naming the
argument and the leaf. Type errors are in the diagnostics corpus (tests/diagnostics/
tree_misuse.grad); the other export forms with a tree are in tests/test_tree_exports.py."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradlang
from gradlang.ir_parser import parse_module
from gradlang.printer import print_module
from gradlang.runtime.artifact import ArtifactError
from gradlang.verify import VerifyError
from stats import assert_close, assert_unbiased, estimates

B, D, H, C = 32, 8, 16, 4
RNG = np.random.default_rng(0)
X = RNG.normal(size=(B, D)).astype(np.float32)
Y = RNG.integers(0, C, size=B).astype(np.int32)


class Layer(NamedTuple):
    w: np.ndarray
    b: np.ndarray


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Head:
    w: jax.Array
    b: jax.Array


def layer(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    return ((RNG.normal(size=(n_in, n_out)) / np.sqrt(n_in)).astype(np.float32),
            (0.1 * RNG.normal(size=n_out)).astype(np.float32))


# a nested tree of every kind of node: a dict holding a list of a NamedTuple, a registered
# dataclass and None (where Equinox's eqx.filter leaves a module's non-arrays)
PARAMS = {"body": [Layer(*layer(D, H))], "head": Head(*layer(H, C)), "frozen": None}


def mlp(p, x):
    """The binding: a two-layer MLP reading the tree's nodes as Python does."""
    first = p["body"][0]
    return jnp.tanh(x @ first.w + first.b) @ p["head"].w + p["head"].b


def cross_entropy(logits, y):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def sum_squares(p):
    return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(p))


SOURCE = """
jax fn mlp(p: tree, x: f32[B, D]) -> f32[B, C]

fn loss(p: tree, x: f32[B, D], y: i32[B]) -> f32 {
  return cross_entropy(mlp(p, x), y) + 0.01 * sum_squares(p)
}
fn checkpointed(p: tree, x: f32[B, D], y: i32[B]) -> f32 {
  let logits = checkpoint { mlp(p, x) }
  return cross_entropy(logits, y) + 0.01 * sum_squares(p)
}
export value = loss
export g = grad(loss, wrt=[p])
export vg = value_and_grad(loss, wrt=[p])
export step = descend(loss, wrt=[p], lr=0.5)
export g_checkpointed = grad(checkpointed, wrt=[p])
"""


def reference_loss(p, x, y):
    return cross_entropy(mlp(p, x), y) + 0.01 * sum_squares(p)


# Both sides are float32 and compute the same algebra in a different order. One side's error
# per entry: the forward pass's sums over D, H and C terms and three transcendentals (tanh,
# exp, log: 4 each), the backward pass's sums over C and H, the weight gradients' sum over the
# batch (B terms) and the weight decay's sum over the D H + H + H C + C entries (its gradient
# is exact, 2 p, but it enters the value): D + 2H + 2C + B + 12 roundings plus the decay's
# sum for the value; doubled for the two sides.
OPS = 2 * (D + 2 * H + 2 * C + B + 12)
VALUE_OPS = OPS + 2 * (D * H + H + H * C + C)


@pytest.fixture(scope="module")
def compiled():
    return gradlang.compile_source(SOURCE, "mlp.grad", functions={"mlp": mlp})


def test_the_gradient_of_a_tree_is_jax_grad_of_the_same_code_in_the_same_structure(compiled):
    got = compiled.g(PARAMS, X, Y)["p"]
    assert jax.tree.structure(got) == jax.tree.structure(PARAMS)  # NamedTuple, dataclass kept
    assert_close(got, jax.grad(reference_loss)(PARAMS, X, Y), ops=OPS)
    value, grads = compiled.vg(PARAMS, X, Y)
    want_value, want_grads = jax.value_and_grad(reference_loss)(PARAMS, X, Y)
    assert_close(value, want_value, ops=VALUE_OPS)
    assert_close(grads["p"], want_grads, ops=OPS)
    assert_close(compiled.g_checkpointed(PARAMS, X, Y)["p"], want_grads, ops=OPS)


def test_a_flax_linen_model_params_tree():
    flax = pytest.importorskip("flax")

    class Mlp(flax.linen.Module):
        @flax.linen.compact
        def __call__(self, x):
            return flax.linen.Dense(C)(jnp.tanh(flax.linen.Dense(H)(x)))

    model = Mlp()
    params = model.init(jax.random.key(0), X)["params"]
    m = gradlang.compile_source(
        SOURCE, functions={"mlp": lambda p, x: model.apply({"params": p}, x)})

    def reference(p):
        return cross_entropy(model.apply({"params": p}, X), Y) + 0.01 * sum_squares(p)

    value, grads = m.vg(params, X, Y)
    want_value, want_grads = jax.value_and_grad(reference)(params)
    assert_close(value, want_value, ops=VALUE_OPS)
    assert_close(grads["p"], want_grads, ops=OPS)  # {'Dense_0': {'kernel', 'bias'}, ...}


def test_an_equinox_modules_arrays_are_a_tree():
    """An Equinox model split into its arrays (the tree, with None where the activation is)
    and its static rest, recombined inside the jax fn: the gradient comes back as the same
    partition, equal to Equinox's own filter_value_and_grad."""
    eqx = pytest.importorskip("equinox")
    model = eqx.nn.MLP(D, C, H, depth=1, activation=jnp.tanh, key=jax.random.key(0))
    arrays, static = eqx.partition(model, eqx.is_array)
    m = gradlang.compile_source(
        SOURCE, functions={"mlp": lambda p, x: jax.vmap(eqx.combine(p, static))(x)})

    @eqx.filter_value_and_grad
    def reference(model):
        params = eqx.filter(model, eqx.is_array)
        return cross_entropy(jax.vmap(model)(X), Y) + 0.01 * sum_squares(params)

    value, grads = m.vg(arrays, X, Y)
    want_value, want_grads = reference(model)
    assert jax.tree.structure(grads["p"]) == jax.tree.structure(arrays)
    assert_close(value, want_value, ops=VALUE_OPS)
    assert_close(grads["p"], eqx.filter(want_grads, eqx.is_array), ops=OPS)


def test_descend_returns_the_updated_tree_in_the_same_structure(compiled):
    grads = jax.grad(reference_loss)(PARAMS, X, Y)
    want = jax.tree.map(lambda t, g: t - 0.5 * g, PARAMS, grads)
    fresh = jax.tree.map(jnp.array, PARAMS)  # descend consumes (donates) the arrays passed
    got = compiled.step(fresh, X, Y)["p"]
    assert jax.tree.structure(got) == jax.tree.structure(PARAMS)
    # one update's rounding (a multiply and a subtract) on top of the gradient's, relative
    # to the parameters' scale
    assert_close(got, want, ops=OPS + 2)


def test_jit_and_vmap_of_an_export_take_trees(compiled):
    assert_close(jax.jit(compiled.vg)(PARAMS, X, Y), compiled.vg(PARAMS, X, Y), ops=OPS)
    stacked = jax.tree.map(lambda a: np.stack([a, 2 * a]), PARAMS)
    values = jax.vmap(compiled.value, in_axes=(0, None, None))(stacked, X, Y)
    for i in range(2):
        one = jax.tree.map(lambda a: a[i], stacked)
        assert_close(values[i], reference_loss(one, X, Y), ops=VALUE_OPS)


CONTROL = """
jax fn net(p: tree, x: f32[D]) -> f32[D]
jax fn halve(p: tree) -> tree
fn inner(p: tree, x: f32[D]) -> f32 {
  let w = argmin v: f32[D] = zeros([D]) { sum((v - net(p, x)) ^ 2) } via gd(steps = 50, lr = 0.3)
            with unrolled
  let u = argmin v: f32[D] = zeros([D]) { sum((v - net(p, x)) ^ 2) } via gd(steps = 50, lr = 0.3)
            with implicit(cg)
  return sum(w * w) + sum(u * u)
}
fn looped(p: tree, x: f32[D]) -> f32 {
  let q = for i in range(3) carry (t = p) { halve(t) }
  return sum(net(q, x) * net(q, x))
}
fn chosen(p: tree, q: tree, x: f32[D], c: bool) -> f32 {
  return sum(net(if c then p else q, x))
}
export g_inner = grad(inner, wrt=[p])
export g_looped = grad(looped, wrt=[p])
export g_chosen = grad(chosen, wrt=[p, q])
"""


def test_trees_through_loops_conditionals_and_inner_problems():
    """Hypergradients into a tree the inner problem reads (its minimizer is net(p, x), so
    both methods give 2 jax.grad of sum(net^2)), a loop carrying a tree a jax fn returns, and
    an if choosing between trees."""
    w = RNG.normal(size=(3, 3)).astype(np.float32)
    p = Layer(w, np.zeros(3, np.float32))
    x = RNG.normal(size=3).astype(np.float32)

    def net(p, x):
        return jnp.tanh(p.w @ x + p.b)

    def halve(p):
        return jax.tree.map(lambda a: 0.5 * a, p)

    m = gradlang.compile_source(CONTROL, functions={"net": net, "halve": halve})
    want = jax.grad(lambda p: 2 * jnp.sum(net(p, x) ** 2))(p)
    # gd contracts the error by 1 - 2 lr = 0.4 a step, so its 50 steps' roundings add up to
    # about 4 / (1 - 0.4) of one step's (its 4 ops); the Hessian is 2 I, so CG is exact after
    # one iteration. Per side: net's sum over D = 3 and tanh (4), the square and the sums
    # (2 + 3), the backward's as many, doubled for the two sides
    assert_close(m.g_inner(p, x)["p"], want, ops=2 * (2 * (3 + 4 + 5) + 7))
    thrice = jax.grad(lambda p: jnp.sum(net(halve(halve(halve(p))), x) ** 2))(p)
    assert_close(m.g_looped(p, x)["p"], thrice, ops=2 * 2 * (3 + 4 + 5 + 3))
    got = m.g_chosen(p, halve(p), x, False)
    assert jax.tree.structure(got["p"]) == jax.tree.structure(p)
    np.testing.assert_array_equal(flat(got["p"]), np.zeros(flat(p).size))
    assert_close(got["q"], jax.grad(lambda q: jnp.sum(net(q, x)))(halve(p)), ops=2 * 2 * 8)


# ---- draws and black-box estimators

DRAWS = """
jax fn policy(p: tree, x: f32[D]) -> f32[K]
fn scored(p: tree, x: f32[D], r: f32[K]) -> f32 {
  a ~ Categorical(logits = policy(p, x)) with score(baseline=none)
  return sum(one_hot(a, K) * r)
}
fn reparam(p: tree, x: f32[D]) -> f32 {
  z ~ Normal(policy(p, x), 1.0)
  return sum(z * z)
}
export g_score = grad(expect(scored, samples=1), wrt=[p])
export g_reparam = grad(expect(reparam, samples=1), wrt=[p])
"""
K = 3
POLICY = {"w": (RNG.normal(size=(D, K)) / np.sqrt(D)).astype(np.float32),
          "scale": [np.float32(2.0) * np.ones(K, np.float32)]}
XD = RNG.normal(size=D).astype(np.float32)
R = np.array([1.0, -0.5, 2.0], np.float32)


def policy(p, x):
    return jnp.tanh(x @ p["w"]) * p["scale"][0]


def flat(tree, samples: bool = False) -> np.ndarray:
    """A tree as one vector, leaves in flattening order; with `samples`, a tree of stacked
    estimates as one vector per estimate."""
    leaves = jax.tree.leaves(tree)
    if samples:
        return np.concatenate([np.reshape(x, (np.shape(x)[0], -1)) for x in leaves], axis=1)
    return np.concatenate([np.ravel(x) for x in leaves])


def test_draws_with_a_tree_parameter_get_unbiased_estimators():
    """E[r_a] = softmax(policy) . r and E[sum z^2] = sum(policy^2) + K: the score-function
    and the pathwise (chosen automatically) estimates average to jax.grad of those closed
    forms, leaf by leaf."""
    m = gradlang.compile_source(DRAWS, functions={"policy": policy})
    assert {s.site: s.estimator.name for s in m.ir.facts.estimators} == {"a": "score",
                                                                          "z": "reparam"}
    exact_score = jax.grad(lambda p: jax.nn.softmax(policy(p, XD)) @ R)(POLICY)
    exact_reparam = jax.grad(lambda p: jnp.sum(policy(p, XD) ** 2))(POLICY)
    score = estimates(m.g_score, (POLICY, XD, R))["p"]
    reparam = estimates(m.g_reparam, (POLICY, XD))["p"]
    assert jax.tree.structure(score) == jax.tree.structure(POLICY)
    assert_unbiased(flat(score, samples=True), flat(exact_score))
    assert_unbiased(flat(reparam, samples=True), flat(exact_reparam))


BLACK_BOX = """
jax fn f(p: tree, a: f32[N, N]) -> f32
fn objective(p: tree, a: f32[N, N]) -> f32 { return f(p, a) }
export g_spsa = grad(objective, wrt=[p], by=spsa(eps=0.5))
export g_es = grad(objective, wrt=[p], by=es(sigma=0.5, pop=8))
export step_spsa = descend(objective, wrt=[p], lr=0.1, by=spsa(eps=0.5))
"""
A = RNG.normal(size=(5, 5)).astype(np.float32)
A = (A @ A.T / 5).astype(np.float32)
THETA = {"s": RNG.normal(size=5).astype(np.float32), "q": (RNG.normal(size=5).astype(np.float32),)}


def smooth_objective(p, a):
    """sum(sin(s)) + 1/2 q^T A q: its Gaussian smoothing E f(p + sigma z) has the gradient
    cos(s) exp(-sigma^2 / 2) in s and A q in q."""
    return jnp.sum(jnp.sin(p["s"])) + 0.5 * p["q"][0] @ (a @ p["q"][0])


def test_black_box_estimators_perturb_every_leaf():
    m = gradlang.compile_source(BLACK_BOX, functions={"f": smooth_objective})
    smoothed = {"s": np.cos(THETA["s"]) * np.exp(-0.5 ** 2 / 2), "q": (A @ THETA["q"][0],)}
    for name in ("g_spsa", "g_es"):
        samples = estimates(m[name], (THETA, A), n=8000)["p"]
        assert jax.tree.structure(samples) == jax.tree.structure(THETA)
        assert_unbiased(flat(samples, samples=True), flat(smoothed))
    key = jax.random.key(3)
    moved = m.step_spsa(jax.tree.map(jnp.array, THETA), A, key)["p"]
    # the update is theta - lr * (the estimate for the same key): a multiply and a subtract
    want = jax.tree.map(lambda t, g: t - 0.1 * g, THETA, m.g_spsa(THETA, A, key)["p"])
    assert_close(moved, want, ops=2, scale=1.0)


# ---- leaf-wise operations

LEAFWISE = """
struct P { w: f32[8, 16], b: f32[16] }
fn q4(w: f32[R, K]) -> f32[R, K] { return quest(w, 4) with trust }
fn on_tree(p: tree) -> f32 { return sum_squares(map_leaves(p, q4)) + global_norm(p) }
fn on_struct(p: P) -> f32 { return sum_squares(map_leaves(p, q4)) + global_norm(p) }
fn by_hand(p: P) -> f32 {
  let w = q4(p.w)
  return sum(w * w) + sum(p.b * p.b) + sqrt(sum(p.w * p.w) + sum(p.b * p.b))
}
export g_tree = value_and_grad(on_tree, wrt=[p])
export g_struct = value_and_grad(on_struct, wrt=[p])
export g_hand = value_and_grad(by_hand, wrt=[p])
"""


def test_map_leaves_applies_the_function_and_its_rule_to_each_leaf_of_its_rank():
    """Every 2-D leaf (w) is quantized with QuEST and the trust estimator's backward, the 1-D
    bias is left as it is: the tree, the struct and the same computation written by hand
    agree in value and gradient."""
    m = gradlang.compile_source(LEAFWISE)
    w, b = layer(8, 16)
    p = {"w": w, "b": b}
    hand_value, hand = m.g_hand(p)
    # the same ops on the same leaves, summed in another order: the sum of squares over
    # 8 * 16 + 16 entries and the norm's sum over as many, a sqrt and a few adds
    ops = 2 * (8 * 16 + 16) + 8
    for name in ("g_tree", "g_struct"):
        value, grads = m[name](p)
        assert_close(value, hand_value, ops=ops)
        assert_close(grads["p"], hand["p"], ops=ops)


def test_sum_squares_and_global_norm_of_a_tree():
    m = gradlang.compile_source("""
fn norm(p: tree) -> f32 { return global_norm(p) }
fn squares(p: tree) -> f32 { return sum_squares(p) }
export norm = norm
export squares = squares
export g_norm = grad(norm, wrt=[p])
""")
    total = sum(float(np.sum(np.square(x, dtype=np.float64))) for x in jax.tree.leaves(PARAMS))
    n = sum(x.size for x in jax.tree.leaves(PARAMS))
    # a float32 sum of n squares against float64
    assert_close(m.squares(PARAMS), total, ops=n + 1)
    assert_close(m.norm(PARAMS), np.sqrt(total), ops=n + 2)
    # d |p| / dp = p / |p|: the norm's error, a divide
    assert_close(m.g_norm(PARAMS)["p"], jax.tree.map(lambda x: x / np.sqrt(total), PARAMS),
                 ops=n + 4)


# ---- bad trees, artifacts

def test_a_tree_whose_leaves_are_not_float_arrays_is_refused(compiled):
    cases = [
        ({"body": [Layer(PARAMS["body"][0].w.astype(np.int32), PARAMS["body"][0].b)],
          "head": PARAMS["head"]},
         "a tree's leaves must be float arrays; its leaf ['body'][0].w is an array of dtype int32"),
        ({"w": 1.0}, "a tree's leaves must be float arrays; its leaf ['w'] is a float"),
        ("weights", "a tree's leaves must be float arrays; it is a str"),
    ]
    for tree, message in cases:
        with pytest.raises(gradlang.ArgumentError) as info:
            compiled.g(tree, X, Y)
        assert str(info.value) == f"g(): argument 'p': {message}"


def test_a_result_dim_fixed_by_the_tree_must_agree_with_the_callers():
    m = gradlang.compile_source("""
jax fn net(p: tree, x: f32[B, D]) -> f32[B, C]
fn loss(p: tree, x: f32[B, D], t: f32[B, C]) -> f32 { return mse(net(p, x), t) }
export g = grad(loss, wrt=[p])
""", "net.grad", functions={"net": lambda p, x: x @ p["w"]})
    p, x = {"w": np.ones((3, 4), np.float32)}, np.ones((2, 3), np.float32)
    # mse over 8 entries of x @ w - t = 3 - 1: its gradient, 2 (3 - 1) / 8 per entry, summed
    # over the batch of 2 and times x = 1: exact in float32
    np.testing.assert_array_equal(m.g(p, x, np.ones((2, 4), np.float32))["p"]["w"],
                                  np.ones((3, 4), np.float32))
    with pytest.raises(gradlang.ArgumentError) as info:
        m.g(p, x, np.ones((2, 5), np.float32))
    assert str(info.value) == ("'net' at net.grad:3:66 returns f32[B, C] with C = 4, but C = 5 "
                               "here (from an argument or an earlier result)")


def test_verify_cannot_generate_a_tree(compiled):
    with pytest.raises(VerifyError) as info:
        compiled.verify("g")
    assert str(info.value) == ("parameter 'p' is a tree, whose structure only a value gives: "
                               "give the arguments (args=... in Python, --at FILE.npz with "
                               "keys 'p.a.b' for nested dicts)")


SAVED = {"body": [(PARAMS["body"][0].w, PARAMS["body"][0].b)],
         "head": {"w": PARAMS["head"].w, "b": PARAMS["head"].b}, "frozen": None}
"""The tree as an artifact records it: dicts, lists and tuples (no NamedTuple, no dataclass)."""


def saved_mlp(p, x):
    w, b = p["body"][0]
    return jnp.tanh(x @ w + b) @ p["head"]["w"] + p["head"]["b"]


def test_saving_needs_an_example_of_each_tree_and_a_structure_it_can_record(tmp_path):
    m = gradlang.compile_source(SOURCE, functions={"mlp": saved_mlp})
    cases = [
        ({}, "export 'value' takes the tree 'p', whose structure is known only from a value: "
             "pass an example, example_args={'p': value}, to save or stablehlo from Python "
             "(the command line has none)"),
        ({"q": SAVED}, "example_args['q']: no export takes a tree 'q' (trees: p)"),
        ({"p": PARAMS}, "example_args['p']: an artifact records trees of dicts, lists, tuples, "
                        "None and float arrays only; ['body'][0] is a Layer"),
        ({"p": {1: SAVED["head"]}}, "example_args['p']: a saved tree's dict keys must be "
                                    "strings; the tree has the key 1"),
    ]
    for examples, message in cases:
        with pytest.raises(ArtifactError) as info:
            m.save(tmp_path / "mlp.gx", example_args=examples)
        assert str(info.value) == message


CHILD = """
import json, sys
import numpy as np
import gradlang
m = gradlang.load(sys.argv[1])
with np.load(sys.argv[2]) as f:
    p = {"body": [(f["w1"], f["b1"])], "head": {"w": f["w2"], "b": f["b2"]}, "frozen": None}
    x, y = f["x"], f["y"]
value, grads = m.vg(p, x, y)
(w1, b1), = grads["p"]["body"]
np.savez(sys.argv[3], value=value, w1=w1, b1=b1, w2=grads["p"]["head"]["w"],
         b2=grads["p"]["head"]["b"])
try:
    m.vg({**p, "body": [(p["body"][0][0],)]}, x, y)
except gradlang.ArgumentError as e:
    print(e)
print(json.dumps(m.header["exports"][0]["params"][0]))
"""


def test_an_artifact_records_the_tree_and_runs_in_a_fresh_process(tmp_path):
    m = gradlang.compile_source(SOURCE, functions={"mlp": saved_mlp})
    # the tree's leaves have the example's shapes, so the dim they fix (D) is fixed too
    path = m.save(tmp_path / "mlp.gx", dims={"D": D}, example_args={"p": SAVED})
    (w1, b1), = SAVED["body"]
    np.savez(tmp_path / "in.npz", x=X, y=Y, w1=w1, b1=b1, w2=SAVED["head"]["w"],
             b2=SAVED["head"]["b"])
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), str(tmp_path / "in.npz"),
                           str(tmp_path / "out.npz")], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    refused, param = proc.stdout.splitlines()
    assert refused == ("vg(): argument 'p': not the tree structure the artifact was saved for "
                       "(4 leaves); it has no leaf ['body'][0][1]")
    assert json.loads(param) == {"name": "p", "type": {"tree": {"dict": {
        "body": {"list": [{"tuple": [{"dtype": "float32", "shape": [D, H]},
                                     {"dtype": "float32", "shape": [H]}]}]},
        "frozen": None, "head": {"dict": {"b": {"dtype": "float32", "shape": [C]},
                                          "w": {"dtype": "float32", "shape": [H, C]}}}}}}}
    # format 4: a gradlang that predates trees says it cannot read the file
    data = path.read_bytes()
    n = int.from_bytes(data[12:16], "little")
    assert json.loads(data[16:16 + n])["format_version"] == 4
    value, grads = m.vg(SAVED, X, Y)
    with np.load(tmp_path / "out.npz") as out:
        np.testing.assert_array_equal(out["value"], value)
        (w1, b1), = grads["p"]["body"]
        for k, want in {"w1": w1, "b1": b1, "w2": grads["p"]["head"]["w"],
                        "b2": grads["p"]["head"]["b"]}.items():
            np.testing.assert_array_equal(out[k], want)


def test_a_loaded_tree_is_checked_against_the_saved_one(tmp_path):
    m = gradlang.compile_source(SOURCE, functions={"mlp": saved_mlp})
    loaded = gradlang.load(m.save(tmp_path / "mlp.gx", dims={"D": D}, example_args={"p": SAVED}))
    (w1, b1), = SAVED["body"]
    cases = [
        ({**SAVED, "body": [[w1, b1]]},
         "not the tree structure the artifact was saved for (4 leaves); its nodes differ: saved "
         "PyTreeDef({'body': [(*, *)], 'frozen': None, 'head': {'b': *, 'w': *}}), got "
         "PyTreeDef({'body': [[*, *]], 'frozen': None, 'head': {'b': *, 'w': *}})"),
        ({**SAVED, "extra": b1}, "not the tree structure the artifact was saved for (4 leaves); "
                                 "it has a leaf ['extra'], which the saved tree does not"),
        ({**SAVED, "body": [(w1, b1[:4])]},
         "leaf ['body'][0][1] has shape [4], but the artifact was saved for [16]"),
    ]
    for tree, message in cases:
        with pytest.raises(gradlang.ArgumentError) as info:
            loaded.vg(tree, X, Y)
        assert str(info.value) == f"vg(): argument 'p': {message}"


def test_a_damaged_tree_layout_is_refused_at_load(tmp_path):
    m = gradlang.compile_source(SOURCE, functions={"mlp": saved_mlp})
    data = m.artifact(dims={"D": D}, platforms=["cpu"], example_args={"p": SAVED})
    start = len(b"GRADLANG-GX\0") + 4
    (n,) = np.frombuffer(data[start - 4:start], "<u4")
    header = json.loads(data[start:start + n])
    first = header["exports"][0]["params"][0]["type"]["tree"]["dict"]["body"]["list"][0]
    first["tuple"][1]["dtype"] = "int32"  # the first layer's bias
    header = json.dumps(header).encode()
    path = tmp_path / "damaged.gx"
    path.write_bytes(data[:start - 4] + np.uint32(len(header)).tobytes() + header
                     + data[start + n:])
    with pytest.raises(ArtifactError) as info:
        gradlang.load(path)
    assert str(info.value) == (
        f"{path}: corrupt header: export 'value' parameter 'p'['body'][0][1]: a tree leaf's "
        f"dtype must be one of float16, bfloat16, float32, float64, got 'int32'")


def test_the_ir_of_a_tree_program_prints_and_parses_back():
    ir = gradlang.compile_source(LEAFWISE).ir
    text = print_module(ir)
    assert "func @on_tree(%p: tree) -> f32 {" in text
    assert "map_leaves @q4(%p) : tree" in text
    assert print_module(parse_module(text)) == text


def test_explain_and_the_verify_command_see_through_map_leaves(tmp_path, capsys):
    """explain follows map_leaves into its function (QuEST's backward rule is named, the
    program is not called smooth), and so does `gradlang verify`, which takes a tree of nested
    dicts from `--at FILE.npz` (and without it says why it needs one)."""
    from gradlang.cli import main
    path = tmp_path / "leafwise.grad"
    path.write_text(LEAFWISE)
    assert main(["explain", str(path)]) == 0
    out = capsys.readouterr().out
    assert "trust" in out and "on_tree: exact reverse-mode gradient; the program is smooth" not in out
    code = main(["verify", str(path), "--export", "g_tree"])
    err = capsys.readouterr().err
    assert code == 2 and "parameter 'p' is a tree, whose structure only a value gives" in err
    w, b = layer(8, 16)
    np.savez(tmp_path / "p.npz", **{"p.w": w, "p.b": b})
    code = main(["verify", str(path), "--export", "g_tree", "--at", str(tmp_path / "p.npz")])
    out = capsys.readouterr().out
    # the trust rule inside map_leaves's function is seen: biased by design, not a failure
    assert "case: non_smooth; estimator: trust(bound=1.0) at quest (q4, line 3)" in out
    assert "p.b " in out and "verdict: biased by design (p.w:" in out and code == 0
