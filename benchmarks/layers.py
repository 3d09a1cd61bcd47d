"""Networks written with gradlang's layer builtins against the same networks in JAX (and Flax).

    python benchmarks/layers.py [--quick] [--rounds R] [--calls C] [--json out.json]

One training step (value and gradient, then an optax Adam update), jitted, for:

- `cnn`: conv 3x3 (16) - relu - max pool 2 - conv 3x3 (32) - relu - max pool 2 - dense (10)
  on images [B, 28, 28, 1], written in .grad (`conv`, `max_pool`, `dense`), by hand in JAX
  (`lax.conv_general_dilated`, `lax.reduce_window`) and in Flax linen (`nn.Conv`,
  `nn.max_pool`, `nn.Dense`) when flax is installed;
- `transformer`: a token embedding, std.nn's `transformer_block` (GPT-2's pre-norm block:
  causal multi-head attention through `dot_product_attention`, a GELU MLP) and
  `next_token_loss` with the embedding tied as the output layer, on ids [B, T], in .grad and
  by hand in JAX (jax.nn.dot_product_attention, the same einsums).

Each arm's time per step is the median over interleaved rounds (benchmarks/timing.py), its
ratio to the hand-written JAX step the median of the per-round ratios (with its interquartile
range); the memory is XLA's compiled memory analysis (argument + temp + output - alias bytes).
The arms start from the same parameters and data; their losses are compared too. The issue's
target: <= 1.05x the hand-written step's time and the same compiled memory.

Then DP-SGD on the transformer (`by=dp`, noise 0 so that both arms compute the same clipped
sum): ghost clipping (the attention projections and the MLP's matrices get their per-example
norms from activations and cotangents; the norms' scales, the biases and the embedding table,
tied as the output layer, per-example gradients)
against `clipping=per_example` (every leaf's per-example gradient, vmapped), time per step and
compiled temporary memory as the sequence length and the width grow; and the same on the CNN
(its kernels ghost-clipped through their input's patches, im2col, the dense head's matrix too)
as the channels and the image grow.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradlang
from timing import (compiled_memory, interleaved, machine, parse_timing_args, timing_args,
                    write_json)

GRADLANG, HAND, FLAX = "gradlang (.grad layers)", "hand-written JAX", "Flax linen"

def cnn_source(side: int, c: int = 16) -> str:
    """The CNN on images of a static side (a pool's stride needs static spatial sizes), with
    c and 2c channels."""
    flat = 2 * c * (side // 4) ** 2
    return f"""
use std.nn
struct CNN {{ c1: Conv[KH=3, KW=3, C=1, O={c}], c2: Conv[KH=3, KW=3, C={c}, O={2 * c}],
             head: Dense[I={flat}, O=10] }}
fn loss(p: CNN, x: f32[B, {side}, {side}, 1], y: i32[B]) -> f32 {{
  let h = max_pool(conv_relu(p.c1, x), 2)
  let g = max_pool(conv_relu(p.c2, h), 2)
  return cross_entropy(dense(p.head, reshape(g, [B, {flat}])), y)
}}
export step = value_and_grad(loss, wrt=[p])
"""

LM_SOURCE = """
use std.nn
fn loss(embed: f32[V, D], block: Block, ids: i32[B, T]) -> f32 {
  let h = transformer_block(block, embed[ids])
  return next_token_loss(einsum("btd,vd->btv", h, embed), ids)
}
export step = value_and_grad(loss, wrt=[embed, block])
"""


def cross_entropy(logits, y):
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))


def cnn_hand(p, x, y):
    def conv_relu(layer, x):
        y = jax.lax.conv_general_dilated(x, layer["w"], (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jax.nn.relu(y + layer["b"])

    def pool(x):
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
                                     "VALID")

    g = pool(conv_relu(p["c2"], pool(conv_relu(p["c1"], x))))
    return cross_entropy(g.reshape(g.shape[0], -1) @ p["head"]["w"] + p["head"]["b"], y)


def lm_hand(embed, block, ids):
    """std.nn's transformer block and next-token loss in JAX."""
    def norm(x, g):
        c = x - x.mean(-1, keepdims=True)
        return c * jax.lax.rsqrt((c * c).mean(-1, keepdims=True) + 1e-5) * g

    a = block["attn"]
    x = embed[ids]
    y = norm(x, block["norm1"])
    q, k, v = (jnp.einsum("btd,dnk->btnk", y, a[n]) for n in "qkv")
    h = x + jnp.einsum("btnk,nkd->btd",
                       jax.nn.dot_product_attention(q, k, v, is_causal=True), a["o"])
    u = jax.nn.gelu(norm(h, block["norm2"]) @ block["up"]["w"] + block["up"]["b"])
    h = h + u @ block["down"]["w"] + block["down"]["b"]
    scores = jax.nn.log_softmax(jnp.einsum("btd,vd->btv", h, embed)[:, :-1])
    return -jnp.mean(jnp.take_along_axis(scores, ids[:, 1:, None], axis=2))


def flax_cnn():
    """The CNN in Flax linen, or None without flax; its params laid out as the .grad CNN's."""
    try:
        import flax.linen as nn
    except ImportError:
        return None

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            for name, features in (("c1", 16), ("c2", 32)):
                x = nn.max_pool(nn.relu(nn.Conv(features, (3, 3), name=name)(x)), (2, 2),
                                (2, 2))
            return nn.Dense(10, name="head")(x.reshape(x.shape[0], -1))

    model = CNN()

    def loss(p, x, y):
        tree = {k: {"kernel": v["w"], "bias": v["b"]} for k, v in p.items()}
        return cross_entropy(model.apply({"params": tree}, x), y)

    return loss


def normal(rng, shape, scale):
    return (scale * rng.normal(size=shape)).astype(np.float32)


def cnn_data(batch: int, side: int, c: int = 16) -> tuple[dict, np.ndarray, np.ndarray]:
    """He-scaled parameters of the CNN with c and 2c channels, images and labels."""
    rng = np.random.default_rng(0)
    flat = 2 * c * (side // 4) ** 2
    p = {"c1": {"w": normal(rng, (3, 3, 1, c), 1 / 3), "b": np.zeros(c, np.float32)},
         "c2": {"w": normal(rng, (3, 3, c, 2 * c), (9 * c) ** -0.5),
                "b": np.zeros(2 * c, np.float32)},
         "head": {"w": normal(rng, (flat, 10), flat ** -0.5), "b": np.zeros(10, np.float32)}}
    x = rng.random((batch, side, side, 1), np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    return p, x, y


def cnn_case(batch: int, side: int) -> tuple[dict, tuple, dict]:
    p, x, y = cnn_data(batch, side)
    m = gradlang.compile_source(cnn_source(side), "cnn.grad", strict=True)
    losses = {GRADLANG: lambda p, x, y: m.step(p, x, y), HAND: jax.value_and_grad(cnn_hand)}
    if (flax := flax_cnn()) is not None:
        losses[FLAX] = jax.value_and_grad(flax)
    return {"params": p}, (x, y), {
        arm: (lambda f: lambda p, x, y: _grads_of(f(p["params"], x, y)))(f)
        for arm, f in losses.items()}


def _grads_of(out):
    """(loss, gradient tree) from an export's (loss, {name: grad}) or value_and_grad's."""
    loss, grads = out
    if isinstance(grads, dict) and set(grads) == {"p"}:
        grads = grads["p"]
    return loss, {"params": grads}


def lm_case(batch: int, seq: int, vocab: int, d: int, heads: int) -> tuple[dict, tuple, dict]:
    rng = np.random.default_rng(0)
    k, f = d // heads, 4 * d
    block = {"norm1": np.ones(d, np.float32), "norm2": np.ones(d, np.float32),
             "attn": {n: normal(rng, (d, heads, k), d ** -0.5) for n in "qkv"}
             | {"o": normal(rng, (heads, k, d), d ** -0.5)},
             "up": {"w": normal(rng, (d, f), d ** -0.5), "b": np.zeros(f, np.float32)},
             "down": {"w": normal(rng, (f, d), f ** -0.5), "b": np.zeros(d, np.float32)}}
    params = {"embed": normal(rng, (vocab, d), 0.02), "block": block}
    ids = rng.integers(0, vocab, (batch, seq)).astype(np.int32)
    m = gradlang.compile_source(LM_SOURCE, "lm.grad", strict=True)

    def gradlang_step(p, ids):
        loss, g = m.step(p["embed"], p["block"], ids)
        return loss, {"embed": g["embed"], "block": g["block"]}

    def hand_step(p, ids):
        loss, (ge, gb) = jax.value_and_grad(lm_hand, argnums=(0, 1))(p["embed"], p["block"], ids)
        return loss, {"embed": ge, "block": gb}

    return params, (ids,), {GRADLANG: gradlang_step, HAND: hand_step}


DP_SOURCE = """
use std.nn
struct LM { embed: f32[V, D], block: Block }
fn loss(p: LM, ids: i32[B, T]) -> f32 {
  let h = transformer_block(p.block, p.embed[ids])
  return next_token_loss(einsum("btd,vd->btv", h, p.embed), ids)
}
export ghost = grad(loss, wrt=[p], by=dp(clip=1.0, noise=0))
export per_example = grad(loss, wrt=[p], by=dp(clip=1.0, noise=0, clipping=per_example))
"""


def clipping_arms(m, args: tuple, a) -> dict:
    """The ghost and per-example exports compiled on args: their compiled memory, interleaved
    times, and the largest difference between their clipped sums."""
    compiled = {arm: jax.jit(getattr(m, arm)).lower(*args).compile()
                for arm in ("ghost", "per_example")}
    outs = {arm: c(*args) for arm, c in compiled.items()}
    diff = max(float(np.max(np.abs(np.asarray(u) - np.asarray(w))))
               for u, w in zip(jax.tree.leaves(outs["ghost"]),
                               jax.tree.leaves(outs["per_example"])))
    times = interleaved(compiled, args, "per_example", a.rounds, max(1, a.calls // 5), a.warmup)
    return {"bytes": {arm: compiled_memory(c) for arm, c in compiled.items()},
            "times": times, "max_abs_diff": diff}


def dp_clipping(sizes: list[tuple[int, int, int]], a) -> list[dict]:
    """Ghost against per-example clipping on the transformer, for each (batch, T, d)."""
    m = gradlang.compile_source(DP_SOURCE, "dp_lm.grad")  # warns: noise 0 is not private
    rows = []
    for batch, seq, d in sizes:
        params, (ids,), _ = lm_case(batch, seq, 512, d, 4)
        p = {"embed": params["embed"], "block": params["block"]}
        args = jax.device_put((p, ids, jax.random.key(0)))
        rows.append({"batch": batch, "seq": seq, "width": d, **clipping_arms(m, args, a)})
    return rows


def dp_cnn(sizes: list[tuple[int, int, int]], a) -> list[dict]:
    """Ghost (the conv kernels through their patches, the head's matrix) against per-example
    clipping on the CNN, for each (batch, image side, channels of the first conv; the
    second has twice as many)."""
    rows = []
    for batch, side, c in sizes:
        source = cnn_source(side, c).replace(
            "export step = value_and_grad(loss, wrt=[p])",
            "export ghost = grad(loss, wrt=[p], by=dp(clip=1.0, noise=0))\n"
            "export per_example = grad(loss, wrt=[p], by=dp(clip=1.0, noise=0, "
            "clipping=per_example))")
        m = gradlang.compile_source(source, "dp_cnn.grad")
        args = jax.device_put((*cnn_data(batch, side, c), jax.random.key(0)))
        rows.append({"batch": batch, "side": side, "channels": c, **clipping_arms(m, args, a)})
    return rows


def report_dp(title: str, rows: list[dict], sizes: tuple[str, ...]) -> None:
    print(f"\n## {title}\n")
    print(f"| {' | '.join(sizes)} | ghost ms | per-example ms | time ghost / per-example (IQR) "
          "| temp MiB ghost | temp MiB per-example | temp ratio | max abs diff |")
    print("|" + "---:|" * (len(sizes) + 7))
    for r in rows:
        g, e = r["times"]["ghost"], r["times"]["per_example"]
        tg, te = (r["bytes"][k]["temp"] / 2**20 for k in ("ghost", "per_example"))
        print(f"| {' | '.join(str(r[k]) for k in sizes)} | {g['median_s'] * 1e3:.2f} "
              f"| {e['median_s'] * 1e3:.2f} | {g['median_ratio']:.3f} ({g['ratio_p25']:.3f}-"
              f"{g['ratio_p75']:.3f}) | {tg:.2f} | {te:.2f} | {tg / te:.3f} "
              f"| {r['max_abs_diff']:.2e} |")


def measure(name: str, case, a) -> dict:
    """Every arm's jitted step (gradient then Adam), its memory, its loss and its time."""
    params, data, grads = case
    opt = optax.adam(1e-3)

    def step_of(grad_fn):
        def step(params, state, *data):
            loss, g = grad_fn(params, *data)
            updates, state = opt.update(g, state, params)
            return optax.apply_updates(params, updates), state, loss
        return step

    args = jax.device_put((params, opt.init(params), *data))
    compiled = {arm: jax.jit(step_of(f)).lower(*args).compile() for arm, f in grads.items()}
    losses = {arm: float(c(*args)[2]) for arm, c in compiled.items()}
    times = interleaved(compiled, args, HAND, a.rounds, a.calls, a.warmup)
    return {"model": name, "params": sum(int(np.size(v)) for v in jax.tree.leaves(params)),
            "data_shapes": [list(np.shape(d)) for d in data],
            "bytes": {arm: compiled_memory(c) for arm, c in compiled.items()},
            "times": times, "losses": losses}


def report(rows: list[dict]) -> None:
    print("| model | params | arm | ms / step | time / hand (IQR) | temp MiB | total MiB "
          "| temp / hand | total / hand | loss |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ref = r["bytes"][HAND]
        for arm, t in r["times"].items():
            b = r["bytes"][arm]
            print(f"| {r['model']} | {r['params']:,} | {arm} | {t['median_s'] * 1e3:.3f} "
                  f"| {t['median_ratio']:.3f} ({t['ratio_p25']:.3f}-{t['ratio_p75']:.3f}) "
                  f"| {b['temp'] / 2**20:.2f} | {b['total'] / 2**20:.2f} "
                  f"| {b['temp'] / max(ref['temp'], 1):.3f} | {b['total'] / ref['total']:.3f} "
                  f"| {r['losses'][arm]:.6f} |")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    timing_args(ap, 100, 5, 5, "small networks, a few rounds (smoke test)")
    a = parse_timing_args(ap, argv)
    cases = ([("cnn", lambda: cnn_case(16, 12)), ("transformer", lambda: lm_case(4, 16, 64, 32, 4))]
             if a.quick else
             [("cnn", lambda: cnn_case(64, 28)),
              ("transformer", lambda: lm_case(16, 128, 512, 128, 4))])
    t0 = time.perf_counter()
    info, line = machine()
    print("# gradlang layers benchmark: networks written with the layer builtins\n")
    print(f"{line}; {a.rounds} rounds x {a.calls} calls per arm, {a.warmup} warm-up calls\n")
    out = {**info, "rounds": a.rounds, "calls": a.calls,
           "models": [measure(name, make(), a) for name, make in cases]}
    print("## 1. Training steps against the same networks in JAX and Flax\n")
    report(out["models"])
    dp_sizes = ([(4, 16, 32), (4, 32, 32)] if a.quick else
                [(8, 32, 64), (8, 64, 64), (8, 128, 64), (8, 64, 128), (8, 64, 256)])
    out["dp"] = dp_clipping(dp_sizes, a)
    report_dp("2. DP-SGD on the transformer: ghost clipping against per-example gradients",
              out["dp"], ("batch", "seq", "width"))
    cnn_sizes = ([(4, 12, 8)] if a.quick else
                 [(16, 28, 16), (16, 28, 32), (16, 14, 64), (16, 28, 64)])
    out["dp_cnn"] = dp_cnn(cnn_sizes, a)
    report_dp("3. DP-SGD on the CNN: ghost clipping of the conv kernels (im2col) against "
              "per-example gradients", out["dp_cnn"], ("batch", "side", "channels"))
    out["wall_s"] = time.perf_counter() - t0
    print(f"\ntotal wall time {out['wall_s']:.0f} s")
    write_json(out, a.json)
    return out


if __name__ == "__main__":
    main()
