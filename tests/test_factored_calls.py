"""A JAX function called on perturbed (factored) matrices: `runtime.perturbed.call` evaluates
its jaxpr with the matrices kept factored through matmuls (`dot_general` in each layout) and
materialized for any other use; the value is the function's on the materialized matrices,
and a matmul forms no copy of the matrix."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradlang.runtime.perturbed import LowRank, Seeded, call, dense, seed_of

EPS32 = float(np.finfo(np.float32).eps)
M, N = 64, 48  # the perturbed matrix's shape: no other value in these functions has it


def normal(key: int, shape: tuple) -> jax.Array:
    return jax.random.normal(jax.random.key(key), shape, jnp.float32)


def seeded() -> Seeded:
    return Seeded(normal(0, (M, N)), seed_of(jax.random.key(1)), 0.5)


def low_rank() -> LowRank:
    return LowRank(normal(0, (M, N)), normal(2, (M, 2)), normal(3, (N, 2)), 0.5)


def walk_shapes(jaxpr) -> list[tuple]:
    """Every shape a value takes in a jaxpr (sub-jaxprs included), inputs aside."""
    found = []
    for eqn in jaxpr.eqns:
        found.extend(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
        for p in eqn.params.values():
            inner = getattr(p, "jaxpr", p)
            if isinstance(inner, jax.extend.core.Jaxpr):
                found.extend(walk_shapes(inner))
    return found


def shapes_formed(fn, args) -> list[tuple]:
    """Every shape a value takes in the traced call."""
    return walk_shapes(jax.make_jaxpr(lambda *xs: call(fn, xs))(*args).jaxpr)


# (the function, its argument other than the matrix)
MATMULS = {
    "x @ w (Flax Dense), x of rank 3": (lambda w, x: x @ w, normal(4, (3, 5, M))),
    "w @ x (Equinox Linear)": (lambda w, x: w @ x, normal(4, (N,))),
    "w @ X": (lambda w, x: w @ x, normal(4, (N, 7))),
    "w^T @ x": (lambda w, x: jnp.einsum("ij,ib->jb", w, x), normal(4, (M, 7))),
    "x @ w^T": (lambda w, x: jnp.einsum("ij,bj->bi", w, x), normal(4, (7, N))),
    "vmap of w @ x": (lambda w, x: jax.vmap(lambda v: w @ v)(x), normal(4, (9, N))),
    "inside a jit": (jax.jit(lambda w, x: jnp.tanh(x @ w)), normal(4, (6, M))),
    "through astype to its own dtype": (lambda w, x: x @ w.astype(jnp.float32),
                                        normal(4, (6, M))),
}


def matmul_tolerance(x: jax.Array, w: jax.Array) -> float:
    """The float32 rounding of a length-K sum of products (K the contraction), against its
    scale: the two sides sum the same products in other orders."""
    k = max(M, N)
    return 2 * k * EPS32 * float(jnp.abs(x).max()) * float(jnp.abs(w).max())


@pytest.mark.parametrize("factored", [seeded, low_rank], ids=["seeded", "low_rank"])
@pytest.mark.parametrize("name", list(MATMULS))
def test_a_matmul_keeps_the_matrix_factored(name, factored):
    fn, x = MATMULS[name]
    f = factored()
    got, want = call(fn, (f, x)), fn(f.dense(), x)
    np.testing.assert_allclose(got, want, rtol=0, atol=matmul_tolerance(x, f.dense()))
    assert (M, N) not in shapes_formed(fn, (f, x))


def test_an_unhandled_use_materializes_the_matrix():
    f = seeded()
    fn = lambda w: jnp.sum(w ** 2)  # noqa: E731
    np.testing.assert_allclose(call(fn, (f,)), fn(f.dense()), rtol=8 * EPS32)
    assert (M, N) in shapes_formed(fn, (f,))


def test_a_product_of_two_factored_matrices_materializes_them():
    a, b = seeded(), Seeded(normal(5, (N, M)), seed_of(jax.random.key(6)), 0.5)
    fn = lambda a, b: a @ b  # noqa: E731
    np.testing.assert_allclose(call(fn, (a, b)), fn(a.dense(), b.dense()), rtol=0,
                               atol=matmul_tolerance(a.dense(), b.dense()))


SELECTIONS = {
    "rows by index (an embedding lookup)": lambda w: w[jnp.array([3, 0, 63, 3])],
    "a slice": lambda w: w[7:8, 5:9],
    "out of bounds (filled with NaN)": lambda w: w.at[jnp.array([1, 99])].get(
        mode="fill", fill_value=jnp.nan),
}


@pytest.mark.parametrize("name", list(SELECTIONS))
def test_a_selection_regenerates_only_the_noise_it_reads(name):
    """The matrix is materialized for a selection, and XLA fuses w + s z into it: the
    compiled call holds the selected entries only, not the matrix."""
    fn, f = SELECTIONS[name], seeded()
    got, want = call(fn, (f,)), fn(f.dense())
    np.testing.assert_allclose(got, want, rtol=2 * EPS32, atol=0, equal_nan=True)
    compiled = jax.jit(lambda w, seed: call(fn, (Seeded(w, seed, f.scale),))).lower(
        f.w, f.seed).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < f.w.nbytes


def test_a_low_rank_matrix_in_a_selection():
    f = low_rank()
    fn = SELECTIONS["rows by index (an embedding lookup)"]
    np.testing.assert_allclose(call(fn, (f,)), fn(f.dense()), rtol=2 * EPS32)


def test_a_tree_of_parameters_with_factored_leaves():
    """A parameter tree (a Flax-style dict) whose matrices are factored and vectors plain; the
    result's structure is the function's."""
    params = {"dense": {"kernel": seeded(), "bias": normal(7, (N,))}}
    x = normal(8, (4, M))

    def fn(p, x):
        h = x @ p["dense"]["kernel"] + p["dense"]["bias"]
        return {"out": h, "norm": (h ** 2).sum()}

    got, want = call(fn, (params, x)), fn(dense(params), x)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    tol = matmul_tolerance(x, params["dense"]["kernel"].dense())
    np.testing.assert_allclose(got["out"], want["out"], rtol=0, atol=tol)
    assert (M, N) not in shapes_formed(fn, (params, x))


def test_without_factored_arguments_the_function_is_called_as_it_is():
    calls = []

    def fn(x):
        calls.append(type(x))
        return x * 2

    call(fn, (jnp.ones(3),))
    assert calls == [type(jnp.ones(3))]


DESCEND = """
jax fn net(p: tree, x: f32[B, D]) -> f32[B, C]

fn loss(p: tree, x: f32[B, D]) -> f32 {
  return mean(net(p, x))
}

export mezo = descend(loss, wrt=[p], by=spsa(eps=0.1), lr=0.01)
export cloud = grad(loss, wrt=[p], by=eggroll(sigma=0.1, pop=4, rank=2))
"""


@pytest.mark.parametrize("export", ["mezo", "cloud"])
def test_an_export_through_a_jax_fn_is_the_materialized_computation(export, monkeypatch):
    """The same export lowered with the perturbed matrices kept factored in the jax fn, and
    with them materialized before it (the call treated as any other op): the same noise, so
    the same result up to float32 rounding of the two forward evaluations."""
    import gradlang
    from gradlang.runtime import lower

    def net(p, x):
        return x @ p["w"] + p["b"]

    p = {"w": normal(10, (M, N)), "b": normal(11, (N,))}
    x = normal(12, (8, M))
    key = jax.random.key(0)

    def run() -> list:
        m = gradlang.compile_source(DESCEND, functions={"net": net})
        fresh = jax.tree.map(jnp.array, p)  # descend donates its parameters
        return jax.tree.leaves(getattr(m, export)(fresh, x, key))

    got = run()
    monkeypatch.setattr(lower, "_FACTORED", lower._FACTORED - {"call_jax"})
    want = run()
    # A loss differs by the rounding of a length-M dot product (|w + noise| < |w| + 6 sigma).
    # spsa: the projection divides the difference of two losses by 2 eps, and the update is
    # lr times it times z (|z| < 6). eggroll: each member's loss, over pop sigma, times its
    # A B^T / sqrt(2) (entries < 2 * 36 / sqrt(2)), summed over the pop members.
    loss_error = M * EPS32 * float(jnp.mean(jnp.abs(x) @ (jnp.abs(p["w"]) + 0.6)))
    tol = (0.01 * 2 * loss_error / 0.2 * 6 if export == "mezo"
           else loss_error / 0.1 * 72 / np.sqrt(2))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=tol)


EINSUM = """
fn loss(w: f32[M, N], x: f32[B, T, M]) -> f32 {
  return mean(tanh(einsum("btm,mn->btn", x, w)))
}
export mezo = descend(loss, wrt=[w], by=spsa(eps=0.1), lr=0.01)
"""


def test_an_einsum_keeps_the_perturbed_matrix_factored(monkeypatch):
    """MeZO through a .grad einsum: the step never forms a [M, N] value besides w's update,
    and equals the step with the matrix materialized before the einsum."""
    import gradlang
    from gradlang.runtime import lower

    w, x = normal(13, (M, N)), normal(14, (3, 4, M))
    key = jax.random.key(1)

    def step():
        m = gradlang.compile_source(EINSUM)
        formed = walk_shapes(jax.make_jaxpr(m.mezo)(w, x, key).jaxpr).count((M, N))
        return m.mezo(jnp.array(w), x, key), formed

    got, factored = step()
    monkeypatch.setattr(lower, "_FACTORED", lower._FACTORED - {"einsum"})
    want, materialized = step()
    assert factored < materialized
    loss_error = M * EPS32 * float(jnp.mean(jnp.abs(x) @ (jnp.abs(w) + 0.6)))
    np.testing.assert_allclose(got["w"], want["w"], rtol=0, atol=0.01 * 2 * loss_error / 0.2 * 6)


@pytest.mark.parametrize("subscripts, w_shape, x_shape", [
    ("btd,dnk->btnk", (8, 4, 6), (2, 3, 8)),  # a per-head projection [D, N, K]
    ("btd,dnk->bnkt", (8, 4, 6), (2, 3, 8)),  # einsum makes the matrix the left operand
    ("btnk,nkd->btd", (4, 6, 8), (2, 3, 4, 6)),  # two contracted dims, paired out of order
])
def test_an_einsum_projection_keeps_a_higher_rank_matrix_factored(subscripts, w_shape, x_shape):
    """A matrix of rank 3 whose leading dims are contracted is flattened to [C, F], factors
    and all (a Seeded matrix's noise is indexed row-major, so the reshape keeps it)."""
    w, x = normal(20, w_shape), normal(21, x_shape)
    f = Seeded(w, seed_of(jax.random.key(2)), 0.5)
    fn = lambda w, x: jnp.einsum(subscripts, x, w)  # noqa: E731
    got, want = call(fn, (f, x)), fn(f.dense(), x)
    np.testing.assert_allclose(got, want, rtol=0, atol=matmul_tolerance(x, f.dense()))
    assert w_shape not in shapes_formed(fn, (f, x))
