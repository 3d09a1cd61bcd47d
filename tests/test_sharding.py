"""Sharding exports from their named dims (`shard=` with `mesh=`, runtime/sharding.py): the
numbers of one device, the collectives XLA inserts, and the diagnostics.

The checks on 8 devices run in subprocesses with XLA_FLAGS=--xla_force_host_platform_device_count=8
(the flag must be set before JAX starts), one subprocess per group to keep the file fast; the
checks that need no devices run here, on a mesh of this process's one CPU device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import warnings
from collections import namedtuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import gradlang
from gradlang.runtime.sharding import ShardingError, collectives, place

MLP = """
use std.nn
struct MLP { l1: Dense[I=D, O=H], l2: Dense[I=H, O=C] }

fn loss(p: MLP, x: f32[B, D], y: i32[B]) -> f32 {
  return cross_entropy(dense(p.l2, dense_tanh(p.l1, x)), y)
}

fn noisy(p: MLP, x: f32[B, D], y: i32[B]) -> f32 {
  eps ~ Normal(zeros([B, D]), 0.1)
  return loss(p, x + eps, y)
}

export step = value_and_grad(loss, wrt=[p])
export train = value_and_grad(expect(noisy, samples=2), wrt=[p])
export private = value_and_grad(loss, wrt=[p], by=dp(clip=1.0, noise=1.1))
"""

# Shared by the subprocesses: the program, the data, and the tolerance of a comparison.
PRELUDE = f"""
import re
import jax, jax.numpy as jnp, numpy as np, gradlang
from jax.sharding import Mesh, PartitionSpec as P
from gradlang.runtime.sharding import ShardingError, collectives, lower

assert len(jax.devices()) == 8
MLP = {MLP!r}
B, D, H, C = 16, 4, 8, 3
k = jax.random.split(jax.random.key(0), 4)
params = {{"l1": {{"w": 0.3 * jax.random.normal(k[0], (D, H)), "b": 0.1 * jnp.ones(H)}},
          "l2": {{"w": 0.3 * jax.random.normal(k[1], (H, C)), "b": jnp.zeros(C)}}}}
x, y = jax.random.normal(k[2], (B, D)), jax.random.randint(k[3], (B,), 0, C)
one = gradlang.compile_source(MLP)
EPS = np.finfo(np.float32).eps

def scale(p, x, y):
    # (sum_i |l_i| / B, sum_i |g_i| / B elementwise) over the examples' losses and gradients:
    # the mean loss and its gradient are these sums' signed versions, so they bound the
    # terms a reordering reorders
    per = [one.step(p, x[i:i + 1], y[i:i + 1]) for i in range(B)]
    return jax.tree.map(lambda *g: sum(np.abs(np.asarray(a)) for a in g) / B, *per)

def assert_same(a, b, bound):
    # The sharded program sums the same per-example terms in another order (each device its
    # B / n examples, then the all-reduce of the n partial sums) and may contract D and H in
    # another order; any summation order of m terms errs by at most (m - 1) eps sum |terms|
    # (Higham, Accuracy and Stability, ch. 4), so two orders differ by at most
    # 2 (B + D + H) eps sum_i |g_i| / B per entry, sum_i |g_i| / B being `bound`.
    for u, v, s in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(bound)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=0,
                                   atol=2 * (B + D + H) * EPS * np.max(s))

def leaves_bytes(tree):
    return sum(4 * np.size(v) for v in jax.tree.leaves(tree))
"""


def _run(body: str) -> None:
    """Run PRELUDE + body on 8 CPU devices, in a temporary folder; it prints 'ok' at the end."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    script = PRELUDE + textwrap.dedent(body) + "\nprint('ok')\n"
    with tempfile.TemporaryDirectory() as folder:   # for the files a script writes
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                             text=True, timeout=300, cwd=folder)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), \
        out.stdout[-2000:] + out.stderr[-4000:]


EXTERN = """
extern fn score(logits: f32[B, C]) -> f32
fn f(w: f32[D, C], x: f32[B, D]) -> f32 { return score(x @ w) }
export v = f
export mezo = grad(f, wrt=[w], by=spsa(eps=0.01))
"""

COMM = """
use std.nn
struct MLP { l1: Dense[I=D, O=H], l2: Dense[I=H, O=C] }
fn logits(p: MLP, x: f32[B, D]) -> f32[B, C] { return dense(p.l2, dense_tanh(p.l1, x)) }
fn ranks(v: f32[B]) -> f32[B] { return sort(v, axis=0) }
fn probs(h: f32[B, H]) -> f32[B, H] { return softmax(h, axis=1) }
export logits = logits
export ranks = ranks
export probs = probs
"""

SCORED = """
fn per_entry(theta: f32[B, K], t: f32[B, K]) -> f32 {
  z ~ Bernoulli(sigmoid(theta)) with score(baseline=ma)
  return mean(sum((z - t) * (z - t), axis=1))
}
export batched = grad(expect(per_entry, samples=4), wrt=[theta])
"""

SCALE_OUT = f"""
        import optax
        from gradlang.runtime.sharding import place
        mesh = Mesh(np.array(jax.devices()), ("data",))
        def specs(tree):
            return jax.tree.map(lambda a: a.sharding.spec, tree)
        def host(tree):   # on one device, as the one-device trainer keeps it
            return jax.device_put(tree, jax.devices()[0])

        # Trainer, FSDP: parameters and the momentum placed as the export places the
        # parameters, each step that of one device from the same state. The gradients differ
        # by the reordering bound of assert_same; the momentum g + 0.9 m and the step
        # p - 0.1 (g + 0.9 m) carry that difference plus their own rounding (eps per op).
        fsdp = gradlang.compile_source(MLP, mesh=mesh, shard={{"B": "data", "H": "data"}})
        want = {{"l1": {{"w": P(None, "data"), "b": P("data")}},
                "l2": {{"w": P("data"), "b": P()}}}}
        sharded, single = (gradlang.Trainer(fsdp.step, optax.sgd(0.1, momentum=0.9)),
                           gradlang.Trainer(one.step, optax.sgd(0.1, momentum=0.9)))
        state = sharded.init(params)
        for _ in range(2):
            assert specs(state.params) == want and specs(state.opt_state[0].trace) == want
            assert state.step.sharding.is_fully_replicated
            new, out = sharded.update(state, x, y)
            ref, ref_out = single.update(host(state), x, y)
            g = 2 * (B + D + H) * EPS * max(np.max(s) for s in jax.tree.leaves(
                scale(host(state.params), x, y)[1]))
            trace = g + 2 * EPS * max(np.abs(t).max() for t in jax.tree.leaves(ref.opt_state))
            for u, v in zip(jax.tree.leaves(new.opt_state), jax.tree.leaves(ref.opt_state)):
                np.testing.assert_allclose(u, v, rtol=0, atol=trace)
            for u, v in zip(jax.tree.leaves(new.params), jax.tree.leaves(ref.params)):
                np.testing.assert_allclose(u, v, rtol=0,
                                           atol=0.1 * trace + 2 * EPS * np.abs(v).max())
            state = new

        # an ES export saved with its population on a mesh loads onto a mesh of that shape
        # and runs the same computation; no mesh, or another shape, is an error naming it
        src = MLP + "export es = grad(loss, wrt=[p], by=es(sigma=0.1, pop=16))\\n"
        mesh2 = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "pop"))
        es = gradlang.compile_source(src, mesh=mesh2, shard={{"B": "data", "pop": "pop"}})
        es.save("es.gx", platforms=("cpu",))
        art = gradlang.load("es.gx", mesh=mesh2)
        assert art.header["sharding"]["shard"] == {{"B": ["data"], "pop": ["pop"]}}
        key = jax.random.key(3)
        # the same StableHLO compiled twice: XLA may fuse it differently, so the members'
        # losses may round differently, by the ES bound of the slow test above
        for u, v in zip(jax.tree.leaves(es.es(params, x, y, key)),
                        jax.tree.leaves(art.es(params, x, y, key))):
            atol = 2 * (B + D + H) * EPS * 2 * 5 / 0.1 + 2 * 8 * EPS * np.abs(u).max()
            np.testing.assert_allclose(u, v, rtol=0, atol=atol)
        for bad, message in [(None, "es.gx was saved with its population split over a mesh "
                                    "('data': 2, 'pop': 4)"),
                             (mesh, "es.gx was saved for a mesh ('data': 2, 'pop': 4), got "
                                    "('data': 8): load it onto a mesh of that shape")]:
            try:
                gradlang.load("es.gx", mesh=bad)
                raise AssertionError("no error")
            except ShardingError as e:
                assert message in str(e), e

        # an extern under data parallelism: the callback runs once per call on the whole
        # logits (gathered onto one device): one device's numbers
        seen = []
        def score(logits):
            seen.append(np.shape(logits))
            return np.float32(np.mean(np.asarray(logits) ** 2))
        src = {EXTERN!r}
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ext = gradlang.compile_source(src, externs={{"score": score}}, mesh=mesh,
                                          shard={{"B": "data"}})
        said = [str(w.message).splitlines()[0] for w in caught]
        assert len(said) == 1 and "all-gathers its argument f32[B, C] (4·B·C bytes per " \
            "device)" in said[0], said
        ref = gradlang.compile_source(src, externs={{"score": score}})
        w = 0.3 * jax.random.normal(k[0], (D, C))
        # Each logit, a D-term dot product, may round differently in the two programs (by
        # D eps (|x| @ |w|) each), its square by twice that relative to it, and NumPy's mean
        # of the B C squares by B C eps of it: at most 2 (2 D + B C) eps S apart, with
        # S = mean((|x| @ |w|)^2) bounding the squares.
        def bound(w_abs):
            return 2 * (2 * D + B * C) * EPS * float(np.mean((np.abs(x) @ w_abs) ** 2))
        seen.clear()
        np.testing.assert_allclose(ext.v(w, x), ref.v(w, x), rtol=0, atol=bound(np.abs(w)))
        assert seen == [(B, C), (B, C)], seen        # the whole logits, once per call
        # what moves: the logits, gathered whole (B C floats) onto the device that calls
        # the callback (as the warning said); its scalar result stays there
        found = collectives(lower(ext.v, w, x).compile().as_text())
        assert [(c.op, c.bytes) for c in found] == [("all-gather", 4 * B * C)], found

        # the compile-time warnings say what the compiled program communicates: tensor
        # parallel, the second layer's contraction over H all-reduces each device's f32[B/4,
        # C] of partial sums; a sort along the split B all-gathers f32[B]; a softmax along
        # the split H all-reduces its max and its sum, f32[B/4] each
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tp_mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
            comm = gradlang.compile_source({COMM!r}, "comm.grad", mesh=tp_mesh,
                                           shard={{"B": "data", "H": "model"}})
        said = [str(w.message).splitlines()[0] for w in caught]
        assert len(said) == 3 and "all-reduces f32[B/4, C] (B·C bytes per device)" in said[0] \
            and "all-gathering f32[B] (4·B bytes per device)" in said[1] \
            and "all-reduces f32[B/4] (B bytes per device) twice" in said[2], said
        found = collectives(lower(comm.logits, params, x).compile().as_text())
        assert [(c.op, c.bytes) for c in found] == [("all-reduce", B * C)], found
        found = collectives(lower(comm.ranks, x[:, 0]).compile().as_text())
        assert [(c.op, c.bytes) for c in found] == [("all-gather", 4 * B)], found
        found = collectives(lower(comm.probs, jnp.ones((B, H))).compile().as_text())
        assert [(c.op, c.bytes) for c in found] == [("all-reduce", B)] * 2, found
"""


def test_data_parallel_and_fsdp_steps_give_one_devices_numbers_with_minimal_collectives():
    """Also (one subprocess, for the suite's time): a Trainer, an ES artifact and an extern
    on the mesh, and the compile-time warnings against the compiled collectives."""
    _run("""
        bound = scale(params, x, y)
        loss0, grads0 = one.step(params, x, y)
        mesh = Mesh(np.array(jax.devices()), ("data",))

        # data parallel: B split 8 ways, the parameters replicated
        dp = gradlang.compile_source(MLP, mesh=mesh, shard={"B": "data"})
        loss, grads = dp.step(params, x, y)
        assert_same((loss0, grads0), (loss, grads), bound)
        assert all(g.sharding.is_fully_replicated for g in jax.tree.leaves(grads))
        found = collectives(lower(dp.step, params, x, y).compile().as_text())
        # The minimum: one all-reduce of the gradient (and of the loss, a mean over B). XLA's
        # all-reduce combiner puts the loss and the four gradient leaves in one tuple
        # all-reduce, exactly their bytes; nothing else moves.
        assert [c.op for c in found] == ["all-reduce"], found
        assert found[0].bytes == 4 + leaves_bytes(params), found

        # FSDP: the parameters also split along H over the same axis
        fsdp = gradlang.compile_source(MLP, mesh=mesh, shard={"B": "data", "H": "data"})
        loss, grads = fsdp.step(params, x, y)
        assert_same((loss0, grads0), (loss, grads), bound)
        specs = {"w1": grads["p"]["l1"]["w"].sharding.spec, "b1": grads["p"]["l1"]["b"].sharding.spec,
                 "w2": grads["p"]["l2"]["w"].sharding.spec, "b2": grads["p"]["l2"]["b"].sharding.spec}
        assert specs == {"w1": P(None, "data"), "b1": P("data"), "w2": P("data"), "b2": P()}, specs
        found = collectives(lower(fsdp.step, params, x, y).compile().as_text())
        # each split parameter (l1.w [D, H], l1.b [H], l2.w [H, C]) gathered once: the
        # minimum. The gradient: the minimum is a reduce-scatter of the split leaves (1/8 of
        # their bytes per device) and an all-reduce of l2.b and the loss; XLA on CPU
        # all-reduces the whole gradient and cuts the split leaves locally (its pipeline
        # has no pass turning an all-reduce and a slice into a reduce-scatter; GPU's has),
        # though the gradients are constrained to their parameters' layout.
        split = leaves_bytes([params["l1"], params["l2"]["w"]])
        gathers = [c for c in found if c.op == "all-gather"]
        assert len(gathers) == 3 and sum(c.bytes for c in gathers) == split, found
        reduced = [c for c in found if c.op != "all-gather"]
        assert [(c.op, c.bytes) for c in reduced] == [("all-reduce", 4 + leaves_bytes(params))], \
            found

        # an artifact of the data-parallel module records the mapping and the mesh's shape;
        # loaded onto a mesh of that shape it compiles to the same single all-reduce
        dp.save("dp.gx", platforms=("cpu",))
        art = gradlang.load("dp.gx", mesh=mesh)
        assert_same((loss0, grads0), art.step(params, x, y), bound)
        found = collectives(lower(art.step, params, x, y).compile().as_text())
        assert [c.op for c in found] == ["all-reduce"], found
        try:
            gradlang.load("dp.gx", mesh=Mesh(np.array(jax.devices()[:4]), ("data",)))
            raise AssertionError("no error")
        except ShardingError as e:
            assert "dp.gx was saved for a mesh ('data': 8), got ('data': 4)" in str(e), e

        # tensor parallel on a 2-D mesh: B over 'data' (4), H over 'model' (2)
        mesh2 = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
        tp = gradlang.compile_source(MLP, mesh=mesh2, shard={"B": "data", "H": "model"})
        assert_same((loss0, grads0), tp.step(params, x, y), bound)
    """ + SCALE_OUT)


@pytest.mark.slow  # the fast twin: the data-parallel and FSDP steps
def test_sampled_private_and_population_exports_sharded_give_one_devices_numbers():
    _run("""
        mesh = Mesh(np.array(jax.devices()), ("data",))
        sharded = gradlang.compile_source(MLP, mesh=mesh, shard={"B": "data"})
        bound = scale(params, x, y)
        key = jax.random.key(3)

        # expect(noisy, samples=2): the noise [B, D] is drawn from the replicated key with
        # threefry's partitionable mode, each device computing its rows: the same draws
        assert_same(one.train(params, x, y, key), sharded.train(params, x, y, key), bound)

        # DP-SGD, per-example work over the data axis: the noise N(0, (1.1 C)^2) / B is drawn
        # once from the replicated key, not per device; a different draw would differ by about
        # 1.1 / 16 = 0.07, far beyond the tolerance
        a, b = one.private(params, x, y, key), sharded.private(params, x, y, key)
        assert_same(a, b, bound)
        noise = jax.tree.map(lambda u, v: u - v, a[1], one.private(params, x, y, jax.random.key(4))[1])
        assert max(float(jnp.abs(n).max()) for n in jax.tree.leaves(noise)) > 0.01

        # an ES population split over 'pop' of a 2-D mesh, the data over 'data'
        src = MLP + "export es = grad(loss, wrt=[p], by=es(sigma=0.1, pop=16))\\n"
        mesh2 = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "pop"))
        es1 = gradlang.compile_source(src).es(params, x, y, key)
        es8 = gradlang.compile_source(src, mesh=mesh2, shard={"B": "data", "pop": "pop"}).es(
            params, x, y, key)
        # Each member's loss f (below 2 here) may round differently in the two programs, by
        # at most 2 (B + D + H) eps |f| as above; the estimate sum_j (f+_j - f-_j) z_j /
        # (2 sigma n) over n = 8 pairs carries that as 2 (B + D + H) eps |f| max|z| / sigma
        # (max|z| < 5 for these 600 normal draws), plus its own reordering, 2 n eps |g|.
        assert float(one.step(params, x, y)[0]) < 2
        for u, v in zip(jax.tree.leaves(es1), jax.tree.leaves(es8)):
            atol = 2 * (B + D + H) * EPS * 2 * 5 / 0.1 + 2 * 8 * EPS * np.abs(u).max()
            np.testing.assert_allclose(u, v, rtol=0, atol=atol)

        # a dim the mesh axis does not divide: a clear error at the call, naming the argument
        try:
            sharded.step(params, x[:12], y[:12])
            raise AssertionError("no error")
        except ShardingError as e:
            assert "step(): argument 'x' has B = 12" in str(e) and "'data' of 8 devices" in str(e), e
        # a population the axis does not divide
        try:
            gradlang.compile_source(MLP + "export es = grad(loss, wrt=[p], by=es(pop=6))\\n",
                                    mesh=mesh, shard={"pop": "data"})
            raise AssertionError("no error")
        except ShardingError as e:
            assert "3 noise draws" in str(e) and "8 devices" in str(e), e
    """)


INNER = """
fn ridge(lam: f32, x: f32[N, D], y: f32[N]) -> f32[D] {
  let w = argmin v: f32[D] = zeros([D]) {
            mean((x @ v - y) ^ 2) + exp(lam) * sum(v * v)
          } via gd(steps=50, lr=0.1) with implicit(cg, iters=10)
  return w
}
fn validation(lam: f32, x: f32[N, D], y: f32[N], xv: f32[M, D], yv: f32[M]) -> f32 {
  return mean((xv @ ridge(lam, x, y) - yv) ^ 2)
}
export hyper = value_and_grad(validation, wrt=[lam])

fn f1(w: f32[D], x: f32[N, D], y: f32[N]) -> f32 { return mean((x @ w - y) ^ 2) }
fn f2(w: f32[D], x: f32[N, D], y: f32[N]) -> f32 { return mean(abs(x @ w + y)) }
export both = minimize([f1, f2], wrt=[w], by=mgda)

fn coin(logits: f32[N], y: f32[N]) -> f32 {
  z ~ Bernoulli(logits=logits) with disarm
  return mean((z - y) ^ 2)
}
export flips = grad(expect(coin, samples=4), wrt=[logits])
"""


@pytest.mark.slow  # the fast twin: the data-parallel and FSDP steps
def test_inner_problems_minimize_and_branching_estimators_sharded_give_one_devices_numbers():
    _run(f"""
        mesh = Mesh(np.array(jax.devices()), ("data",))
        src = {INNER!r}
        one, sharded = (gradlang.compile_source(src),
                        gradlang.compile_source(src, mesh=mesh, shard={{"N": "data", "M": "data"}}))
        k = jax.random.split(jax.random.key(0), 5)
        N, D = 32, 5
        x, xv = jax.random.normal(k[0], (N, D)), jax.random.normal(k[1], (16, D))
        w = jax.random.normal(k[2], (D,))
        calls = {{"hyper": (jnp.float32(-1.0), x, x @ w, xv, xv @ w), "both": (0.5 * w, x, x @ w),
                  "flips": (jax.random.normal(k[3], (N,)), (x @ w > 0).astype(jnp.float32), k[4])}}
        for name, args in calls.items():
            a, b = one[name](*args), sharded[name](*args)
            # means over N = 32 rows of D = 5 products, reordered across 8 devices (as above);
            # the inner solve's 50 steps and 10 CG iterations each reorder one such sum, and
            # a contraction's rounding moves the fixed point by no more than the step
            for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
                scale = max(float(np.abs(u).max()), 1.0)
                np.testing.assert_allclose(u, v, rtol=0, atol=2 * (N + D) * 60 * EPS * scale)
        # The inner solve runs on the split data: what moves between devices is D-sized (each
        # gd step's gradient and each CG step's Hessian-vector product, sums over N), never
        # the [N, D] data, and nothing is gathered.
        found = collectives(lower(sharded.hyper, *calls["hyper"]).compile().as_text())
        assert found and all(c.op == "all-reduce" for c in found), found
        assert max(c.bytes for c in found) <= 4 * (2 * D + 1), found
    """)


MULTIHOST = """
import json, sys
import jax
pid, port = int(sys.argv[1]), sys.argv[2]
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid)
import numpy as np, gradlang
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

assert jax.process_count() == 2 and len(jax.devices()) == 8 and len(jax.local_devices()) == 4
mesh = Mesh(np.array(jax.devices()), ("data",))
m = gradlang.compile_file(sys.argv[3], mesh=mesh, shard={"B": "data"})
data = np.load(sys.argv[4])
params = {"l1": {"w": data["w1"], "b": data["b1"]}, "l2": {"w": data["w2"], "b": data["b2"]}}
# each process holds its half of the batch, as a data loader per host would
half = slice(16 * pid, 16 * (pid + 1))
batch = NamedSharding(mesh, P("data"))
x = jax.make_array_from_process_local_data(batch, data["x"][half])
y = jax.make_array_from_process_local_data(batch, data["y"][half])
loss, grads = m.step(params, x, y, 1e-3)
params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads["p"])
local = lambda a: np.asarray(a.addressable_data(0)).tolist()   # replicated: whole everywhere
print(json.dumps({"loss": local(loss), "grads": jax.tree.map(local, grads),
                  "params": jax.tree.map(local, params)}))
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # the default suite's time (12 min on 2 cores); run with -m slow
def test_two_processes_run_a_data_parallel_step_of_the_mlp_example_with_one_processs_numbers(
        tmp_path):
    """jax.distributed across two processes of 4 CPU devices each (gloo collectives): a step
    of examples/mlp.grad with the batch split over all 8 devices, each process feeding its
    half, gives the numbers of one process on one device."""
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "mlp.grad"
    rng = np.random.default_rng(0)
    B, D, H, C = 32, 6, 16, 3
    data = {"w1": rng.normal(size=(D, H)).astype(np.float32) / D ** 0.5,
            "b1": np.zeros(H, np.float32),
            "w2": rng.normal(size=(H, C)).astype(np.float32) / H ** 0.5,
            "b2": np.zeros(C, np.float32),
            "x": rng.normal(size=(B, D)).astype(np.float32),
            "y": rng.integers(0, C, size=B).astype(np.int32)}
    np.savez(tmp_path / "data.npz", **data)
    (tmp_path / "worker.py").write_text(MULTIHOST)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(i), port,
                               str(example), str(tmp_path / "data.npz")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=240)
        finally:
            proc.kill()
        assert proc.returncode == 0, err[-4000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert outs[0] == outs[1]   # every process holds the same replicated results

    one = gradlang.compile_file(example)
    params = {"l1": {"w": data["w1"], "b": data["b1"]}, "l2": {"w": data["w2"], "b": data["b2"]}}
    loss, grads = one.step(params, data["x"], data["y"], 1e-3)
    params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads["p"])
    per = [one.step({"l1": {"w": data["w1"], "b": data["b1"]},
                     "l2": {"w": data["w2"], "b": data["b2"]}},
                    data["x"][i:i + 1], data["y"][i:i + 1], 1e-3) for i in range(B)]
    # As in the 8-device tests: the 8 devices sum the same per-example terms in another order,
    # so they differ by at most 2 (B + D + H) eps sum_i |term_i| / B per entry; the weight
    # decay term adds one more term, within the same bound. The step moves the parameters by
    # 0.1 times the gradient: 0.1 of that bound, plus the update's own rounding.
    eps = np.finfo(np.float32).eps
    bound = 2 * (B + D + H) * eps
    loss_scale = sum(abs(float(v)) for v, _ in per) / B
    grad_scale = max(float(np.max(sum(np.abs(np.asarray(g)) for g in leaf))) / B
                     for leaf in zip(*(jax.tree.leaves(g) for _, g in per)))
    got = outs[0]
    np.testing.assert_allclose(got["loss"], loss, rtol=0, atol=bound * loss_scale)
    def arrays(tree):  # the JSON's lists as arrays
        return jax.tree.leaves(tree, is_leaf=lambda v: isinstance(v, list))

    assert len(arrays(got["grads"])) == len(arrays(got["params"])) == 4
    for u, v in zip(arrays(got["grads"]), jax.tree.leaves(grads)):
        np.testing.assert_allclose(u, v, rtol=0, atol=bound * grad_scale)
    for u, v in zip(arrays(got["params"]), jax.tree.leaves(params)):
        np.testing.assert_allclose(u, v, rtol=0,
                                   atol=0.1 * bound * grad_scale + 2 * eps * np.abs(v).max())


# ---- on this process's one device


def _mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:1]), ("data",))


def test_a_mesh_of_one_device_gives_the_same_numbers_and_composes_with_jit_and_vmap():
    one = gradlang.compile_source(MLP)
    m = gradlang.compile_source(MLP, mesh=_mesh(), shard={"B": "data", "H": "data"})
    Dense = namedtuple("Dense", "w b")
    k = jax.random.split(jax.random.key(0), 3)
    params = {"l1": Dense(jax.random.normal(k[0], (4, 8)), jnp.zeros(8)),
              "l2": {"w": jax.random.normal(k[1], (8, 3)), "b": jnp.zeros(3)}}
    x, y = jax.random.normal(k[2], (6, 4)), jnp.arange(6) % 3
    want = one.step(params, x, y)
    for got in (m.step(params, x, y), jax.jit(m.step)(params, x, y), m.step(p=params, x=x, y=y)):
        for u, v in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
            np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7)
    losses, _ = jax.vmap(m.step, in_axes=(None, 0, 0))(params, jnp.stack([x, x]), jnp.stack([y, y]))
    np.testing.assert_allclose(losses, [want[0], want[0]], rtol=1e-6)


@pytest.mark.parametrize("shard, mesh, message", [
    ({"Q": "data"}, True, "shard= names the dim 'Q', which no export's parameters declare "
                          "(their dims: D, H, C, B; 'pop' for a black-box population)"),
    ({"B": "model"}, True, "shard['B'] = 'model': the mesh has no axis 'model' (its axes: data)"),
    ({"B": 3}, True, "shard['B'] must be a mesh axis name or a tuple of them, got 3"),
    ({"pop": "data"}, True, "shard['pop'] maps a black-box population, but no export of this "
                            "module has one"),
    ({"B": "data"}, False, "shard= maps dims to mesh axes: pass the mesh too"),
])
def test_a_shard_that_does_not_fit_the_module_or_the_mesh_is_a_clear_error(shard, mesh, message):
    with pytest.raises(ShardingError) as info:
        gradlang.compile_source(MLP, mesh=_mesh() if mesh else None, shard=shard)
    assert message in str(info.value)


def test_artifacts_record_the_mapping_and_load_onto_a_mesh_of_the_shape_they_were_saved_for(
        tmp_path):
    m = gradlang.compile_source(MLP, mesh=_mesh(), shard={"B": "data"})
    path = m.save(tmp_path / "m.gx", platforms=("cpu",))
    k = jax.random.split(jax.random.key(0), 3)
    params = {"l1": {"w": jax.random.normal(k[0], (4, 8)), "b": jnp.zeros(8)},
              "l2": {"w": jax.random.normal(k[1], (8, 3)), "b": jnp.zeros(3)}}
    x, y = jax.random.normal(k[2], (6, 4)), jnp.arange(6) % 3
    want = m.step(params, x, y)
    on_mesh = gradlang.load(path, mesh=_mesh())
    assert on_mesh.header["sharding"] == {"mesh": [["data", 1]], "shard": {"B": ["data"]}}
    for art in (on_mesh, gradlang.load(path)):        # on the mesh, or on one device
        for u, v in zip(jax.tree.leaves(want), jax.tree.leaves(art.step(params, x, y))):
            np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7)
    other = Mesh(np.array(jax.devices()[:1]), ("batch",))
    with pytest.raises(ShardingError, match=r"m.gx was saved for a mesh \('data': 1\), got "
                                            r"\('batch': 1\)"):
        gradlang.load(path, mesh=other)
    gradlang.load(path, mesh=other, shard={"B": "batch"})   # a mapping for this mesh
    plain = gradlang.compile_source(MLP).save(tmp_path / "plain.gx", platforms=("cpu",))
    with pytest.raises(ShardingError, match="plain.gx was saved without shard="):
        gradlang.load(plain, mesh=_mesh())


def test_gradlang_compile_records_shard_and_mesh_in_the_artifact(tmp_path, capsys):
    from gradlang.cli import main

    (tmp_path / "m.grad").write_text(MLP)
    out = str(tmp_path / "out")
    assert main(["compile", str(tmp_path / "m.grad"), "-o", out, "--platforms", "cpu",
                 "--mesh", "data=1", "--shard", "B=data", "--shard", "H=data"]) == 0
    art = gradlang.load(tmp_path / "out" / "m.gx", mesh=_mesh())
    assert art.header["sharding"] == {"mesh": [["data", 1]],
                                      "shard": {"B": ["data"], "H": ["data"]}}
    k = jax.random.split(jax.random.key(0), 3)
    params = {"l1": {"w": jax.random.normal(k[0], (4, 8)), "b": jnp.zeros(8)},
              "l2": {"w": jax.random.normal(k[1], (8, 3)), "b": jnp.zeros(3)}}
    x, y = jax.random.normal(k[2], (6, 4)), jnp.arange(6) % 3
    placed = place(art.step, params, x, y)
    assert placed[0]["l1"]["w"].sharding.spec == jax.sharding.PartitionSpec(None, "data")
    assert placed[1].sharding.spec == jax.sharding.PartitionSpec("data")
    for u, v in zip(jax.tree.leaves(gradlang.compile_source(MLP).step(params, x, y)),
                    jax.tree.leaves(art.step(*placed))):
        np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7)
    capsys.readouterr()
    for flags, message in [(["--mesh", "data=8", "--shard", "Q=data"],
                            "gradlang: error: --shard: shard= names the dim 'Q'"),
                           (["--shard", "B=data"], "--shard and --mesh go together"),
                           (["--mesh", "data=0", "--shard", "B=data"],
                            "--mesh data=0: a size must be a positive integer"),
                           (["--mesh", "data=8", "--shard", "pop=data"],
                            "a black-box population's placement is part of the computation")]:
        assert main(["compile", str(tmp_path / "m.grad"), "-o", out, *flags]) == 2
        assert message in capsys.readouterr().err


def test_an_export_compiled_for_an_abstract_mesh_records_but_does_not_run():
    mesh = jax.sharding.AbstractMesh((8,), ("data",))
    m = gradlang.compile_source(MLP, mesh=mesh, shard={"B": "data"})
    with pytest.raises(ShardingError, match=r"export 'step' was compiled for an abstract mesh "
                                            r"\(data: 8\)"):
        m.step({"l1": {"w": np.zeros((4, 8)), "b": np.zeros(8)},
                "l2": {"w": np.zeros((8, 3)), "b": np.zeros(3)}}, np.zeros((8, 4)), np.zeros(8, int))


def test_a_damaged_sharding_in_an_artifact_header_is_an_artifact_error(tmp_path):
    import struct

    from gradlang.runtime.artifact import MAGIC, ArtifactError

    m = gradlang.compile_source(MLP, mesh=_mesh(), shard={"B": "data"})
    data = m.artifact(platforms=("cpu",))
    (n,) = struct.unpack("<I", data[len(MAGIC):len(MAGIC) + 4])
    header = json.loads(data[len(MAGIC) + 4:len(MAGIC) + 4 + n])
    header["sharding"]["shard"]["B"] = ["model"]
    text = json.dumps(header).encode()
    (tmp_path / "bad.gx").write_bytes(MAGIC + struct.pack("<I", len(text)) + text
                                      + data[len(MAGIC) + 4 + n:])
    with pytest.raises(ArtifactError, match="'shard' must map dim names to lists of the mesh's axes"):
        gradlang.load(tmp_path / "bad.gx")


def test_collectives_reads_ops_and_bytes_from_hlo_text():
    hlo = textwrap.dedent("""
        %all-reduce.5 = (f32[], f32[8]{0}, f32[8,4]{1,0}) all-reduce(%a, %b, %c), channel_id=1
        %all-gather = f32[4,8]{0,1} all-gather(%w), channel_id=2, dimensions={1}
        ROOT %rs = bf16[2,3]{1,0} reduce-scatter(%g), dimensions={0}
        %ags = (f32[2]{0}, f32[16]{0}) all-gather-start(%v), dimensions={0}
        %add = f32[8]{0} add(%all-reduce.5, %x)
    """)
    assert [(c.op, c.bytes) for c in collectives(hlo)] == [
        ("all-reduce", 4 * 41), ("all-gather", 4 * 32), ("reduce-scatter", 2 * 6),
        ("all-gather", 4 * 16)]


@pytest.mark.slow  # the fast twin: the FSDP trainer and the extern's forward export above
def test_a_trainer_with_export_state_and_a_black_box_gradient_through_an_extern_on_a_mesh():
    _run(f"""
        import optax
        mesh = Mesh(np.array(jax.devices()), ("data",))
        def host(tree):   # on one device, as the one-device trainer keeps it
            return jax.device_put(tree, jax.devices()[0])

        # the export's state (a per-example moving-average baseline, f32[B]) and the key
        src = {SCORED!r}
        dp = gradlang.compile_source(src, mesh=mesh, shard={{"B": "data"}})
        K = 3
        theta = jax.random.normal(k[0], (B, K))
        t = (jax.random.uniform(k[1], (B, K)) > 0.5).astype(jnp.float32)
        sharded, single = (gradlang.Trainer(dp.batched, optax.sgd(0.1)),
                           gradlang.Trainer(gradlang.compile_source(src).batched, optax.sgd(0.1)))
        state = sharded.init(theta, t, key=jax.random.key(1))
        for _ in range(2):
            assert state.params.sharding.spec == P("data"), state.params.sharding
            assert state.export_state.sharding.spec == P("data"), state.export_state.sharding
            assert state.key.sharding.is_fully_replicated
            new, out = sharded.update(state, t)
            ref, _ = single.update(host(state), t)
            # each gradient entry is (1 / 4B) sum over 4 draws of (f - b) (z - sigmoid), f a
            # sum of K terms in [0, 1]: each program rounds it by at most (K + 4) eps
            # (K + max|b|) / B; the baseline's average of f by (K + 4) eps (K + max|b|)
            bound = 2 * (K + 4) * EPS * (K + float(np.abs(ref.export_state).max()))
            np.testing.assert_allclose(new.export_state, ref.export_state, rtol=0, atol=bound)
            np.testing.assert_allclose(new.params, ref.params, rtol=0,
                                       atol=0.1 * bound / B + 2 * EPS * np.abs(ref.params).max())
            state = new

        # SPSA through an extern, the data split
        def score(logits):
            return np.float32(np.mean(np.asarray(logits) ** 2))
        src = {EXTERN!r}
        ext = gradlang.compile_source(src, externs={{"score": score}}, mesh=mesh,
                                      shard={{"B": "data"}})
        ref = gradlang.compile_source(src, externs={{"score": score}})
        w = 0.3 * jax.random.normal(k[0], (D, C))
        def bound(w_abs):   # as in the fast twin
            return 2 * (2 * D + B * C) * EPS * float(np.mean((np.abs(x) @ w_abs) ** 2))
        # SPSA's (f(w + eps z) - f(w - eps z)) z / (2 eps), eps = 0.01, |z| < 5: the two
        # values at |w| + 0.05 at most, each within the bound above
        key = jax.random.key(5)
        for u, v in zip(jax.tree.leaves(ext.mezo(w, x, key)),
                        jax.tree.leaves(ref.mezo(w, x, key))):
            np.testing.assert_allclose(u, v, rtol=0, atol=2 * bound(np.abs(w) + 0.05) * 5 / 0.02)
    """)


def test_compiling_with_shard_warns_of_ops_that_communicate_and_says_their_bytes(tmp_path,
                                                                               capsys):
    from gradlang.cli import main
    from gradlang.runtime.communication import ShardingWarning

    tp = jax.sharding.AbstractMesh((4, 2), ("data", "model"))
    with pytest.warns(ShardingWarning) as caught:
        gradlang.compile_source(COMM, "comm.grad", mesh=tp, shard={"B": "data", "H": "model"})
    assert [str(w.message).splitlines()[0] for w in caught] == [
        "comm.grad:4:55: warning: 'matmul' in std.nn.dense contracts H, split over 'model' "
        "(2 devices): each device sums its part, then it all-reduces f32[B/4, C] (B·C bytes "
        "per device) per call",
        "comm.grad:5:40: warning: 'sort' works along B, split over 'data' (4 devices), which "
        "XLA cannot partition: it makes B whole on every device per call, all-gathering f32[B] "
        "(4·B bytes per device), or moving the split to another dim by all-to-alls",
        "comm.grad:6:46: warning: 'softmax' reduces H, split over 'model' (2 devices): it "
        "all-reduces f32[B/4] (B bytes per device) twice per call, for the max and the sum"]
    # data parallelism and FSDP: the loss's mean over B is a scalar all-reduce, the gathers
    # of FSDP's parameters are what it is for: nothing to warn of
    dp = jax.sharding.AbstractMesh((8,), ("data",))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ShardingWarning)
        for shard in ({"B": "data"}, {"B": "data", "H": "data"}):
            gradlang.compile_source(MLP, mesh=dp, shard=shard)
    # gradlang compile reports them with the bytes of the --dim sizes
    (tmp_path / "comm.grad").write_text(COMM)
    capsys.readouterr()
    assert main(["compile", str(tmp_path / "comm.grad"), "-o", str(tmp_path / "out"),
                 "--emit", "artifact", "--platforms", "cpu", "--mesh", "data=4", "--mesh",
                 "model=2", "--shard", "B=data", "--shard", "H=model", "--dim", "B=16",
                 "--dim", "C=3"]) == 0
    err = capsys.readouterr().err
    assert "all-reduces f32[B/4, C] (48 bytes per device) per call" in err, err
    assert "all-gathering f32[B] (64 bytes per device)" in err, err
