"""Interop: a training step through gradlang around a Flax model against the same in JAX + optax.

    python benchmarks/interop.py [--quick] [--sections step,vae] [--rounds 300] [--calls 5]
                                 [--var-keys 200] [--json out.json]

Needs flax (`pip install -e '.[models]'`); the `vae` section also NumPyro (`.[bench]`).

1. `step`. Two Flax linen classifiers, float32, fixed seeds:

- `mlp`: Dense(512) - ReLU - Dense(512) - ReLU - Dense(10) on [B=256, 784] inputs;
- `cnn`: Conv 3x3 (16) - ReLU - avg pool 2 - Conv 3x3 (32) - ReLU - avg pool 2 - Dense(10) on
  [B=64, 28, 28, 1] images.

The gradlang arm: a `.grad` file (written by `grad_source` from the model's params) declares
the model as `jax fn net(p: Params, x) -> f32[B, 10]`, `Params` a struct with the fields of the
Flax `params` dict (one struct per layer, its kernel and bias), and exports
`value_and_grad(loss, wrt=[p])` of the mean cross-entropy of `net(p, x)`; it is compiled with
`functions={"net": lambda p, x: model.apply({"params": p}, x)}`, so the model is traced inline.
The hand-written arm: `jax.value_and_grad` of the same loss written in JAX (the builtin's
formula: log_softmax, the label's entry, mean). Each arm's step is that gradient followed by an
optax Adam update, the whole step under one `jax.jit`, on the same device-resident arguments.

Reported per model: the time per step of each arm (interleaved, `benchmarks/timing.py`: every
round times both arms in rotating order, a sample being `--calls` consecutive calls each
followed by `block_until_ready`; warm-up excluded) and the median over rounds of the per-round
ratio gradlang / hand-written; XLA's compiled memory of each step
(`jax.jit(f).lower(...).compile().memory_analysis()`: argument, temp, output bytes and total =
argument + temp + output - alias) and its ratio; whether the two optimized HLO modules hold the
same instructions (each instruction's opcode, shape and attributes, computations included,
counted; names, operand identities, scheduling order and source metadata aside) and their
instruction counts; and the largest difference of the two steps' losses and new parameters.
The issue's target: time ratio <= 1.02 and the same compiled memory.

2. `vae`: the discrete VAE of examples/flax_vae (its Flax `Encoder` and `Decoder` bound to
   vae.grad's `jax fn`s, their params `tree`s) against NumPyro `TraceGraph_ELBO` on the same
   networks: benchmarks/vi.py's categorical VAE (B=128 binarized digits, D=64, H=128, L=4
   latents x C=10 classes, its fixed-seed untrained weights, laid out as the Flax modules'
   kernels by examples/flax_vae's `as_flax`: the same functions), S=4 samples per step, loss and
   gradients without an optimizer update. vi.py's helpers set NumPyro up (`numpyro_discrete`:
   Categorical class indices one-hot encoded by the decoder) and vmap a gradlang export over
   the data points (`per_point`: a batch of one each, one key each, per-data-point credit as
   NumPyro's plate gives). vi.py's caveat holds: NumPyro 0.22's TraceGraph_ELBO has no
   baseline and estimates the KL by Monte Carlo at the draw, so only the LIKE-FOR-LIKE rows
   (its estimator compiled by gradlang: `with score(baseline=none)`, the KL by Monte Carlo)
   compare the libraries; the automatic rows (vae.grad's `step`: score function, leave-one-out
   baseline, closed-form KL) compare gradlang's default estimator with NumPyro's only one. Each
   estimator runs twice, its networks as `jax fn`s (Flax) and written in `.grad` (vi.py's
   vi_models/estimators_categorical*.grad), so that each pair's time ratio is the cost of the
   `jax fn`; both of a pair draw the same latents for a key, and their losses and gradients at
   one key are compared (largest difference relative to the largest entry). Reported: time
   per step (interleaved, as above, against NumPyro), the encoder gradient's total variance
   (sum over coordinates, `--var-keys` keys, vi.py's `moments`) and variance x time, each
   against NumPyro's. As vi.py does, the section sets `jax_threefry_partitionable=False` (with
   JAX's default, the [S, L, B, C] draws compile 20-30 s per step on CPU).
"""

from __future__ import annotations

import argparse
import collections
import functools
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradlang
from timing import (compiled_memory, interleaved, machine, parse_timing_args, timing_args,
                    write_json)

try:
    import flax.linen as nn
except ImportError as e:  # pragma: no cover - the models extra installs it
    raise SystemExit("this benchmark needs flax: pip install -e '.[models]'") from e

GRADLANG, HAND = "gradlang (jax fn)", "hand-written JAX + optax"
SECTIONS = ("step", "vae")
ROOT = Path(__file__).resolve().parent.parent


class MLP(nn.Module):
    """Two ReLU hidden layers of `hidden` units and 10 class scores."""
    hidden: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Dense(self.hidden)(x))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(10)(x)


class CNN(nn.Module):
    """Two 3x3 convolutions (`channels`, 2 x `channels`), ReLU, 2x2 average pooling, 10 scores."""
    channels: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.avg_pool(nn.relu(nn.Conv(self.channels, (3, 3))(x)), (2, 2), (2, 2))
        x = nn.avg_pool(nn.relu(nn.Conv(2 * self.channels, (3, 3))(x)), (2, 2), (2, 2))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def f32_type(shape: tuple[int, ...]) -> str:
    return f"f32[{', '.join(map(str, shape))}]"


def grad_source(params: dict, x_shape: tuple[int, ...]) -> str:
    """The .grad objective around a Flax model whose params are {layer: {leaf: array}}: a struct
    per layer with its leaves' shapes, a struct Params of the layers (the params dict's
    fields), the model as `jax fn net`, and the value and gradient of its cross-entropy."""
    lines = []
    for layer, leaves in params.items():
        fields = ", ".join(f"{k}: {f32_type(v.shape)}" for k, v in leaves.items())
        lines.append(f"struct {layer}_t {{ {fields} }}")
    lines.append(f"struct Params {{ {', '.join(f'{k}: {k}_t' for k in params)} }}")
    x = f32_type(("B", *x_shape[1:]))
    lines += [f"jax fn net(p: Params, x: {x}) -> f32[B, 10]",
              f"fn loss(p: Params, x: {x}, y: i32[B]) -> f32 {{",
              "  return cross_entropy(net(p, x), y)", "}",
              "export step = value_and_grad(loss, wrt=[p])"]
    return "\n".join(lines) + "\n"


def training_steps(model: nn.Module, params: dict, x_shape: tuple[int, ...], opt):
    """(gradlang's step, the hand-written step): each (params, opt_state, x, y) -> (params,
    opt_state, loss), the gradient followed by the optax update, not yet jitted."""
    def apply(p, x):
        return model.apply({"params": p}, x)

    m = gradlang.compile_source(grad_source(params, x_shape), "interop.grad",
                                functions={"net": apply}, strict=True)

    def hand_loss(p, x, y):
        logp = jax.nn.log_softmax(apply(p, x), axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0])

    def update(params, opt_state, loss, grads):
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def gradlang_step(params, opt_state, x, y):
        loss, grads = m.step(params, x, y)
        return update(params, opt_state, loss, grads["p"])

    def hand_step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(hand_loss)(params, x, y)
        return update(params, opt_state, loss, grads)

    return gradlang_step, hand_step


NAME = re.compile(r"%[\w.\-]+|\b[A-Za-z_][\w\-]*(?:\.\d+)+\b")
"""An HLO instruction or computation name: `%fusion.12`, `%wrapped_reduce`, `param_0.3`."""
DEBUG_TABLES = {"FileNames", "FunctionNames", "FileLocations", "StackFrames"}
"""The blocks of HLO text that record the Python source of each instruction."""


def hlo_instructions(text: str) -> collections.Counter:
    """The optimized HLO's instructions (computations included) with every name erased and
    without metadata, counted: two modules that differ only in naming, scheduling order and
    source locations give the same counts (so would two that wire the same instructions
    differently: the steps' results are compared separately)."""
    out = collections.Counter()
    for block in text.split("\n\n"):
        lines = block.strip("\n").splitlines()
        if not lines or lines[0] in DEBUG_TABLES:
            continue
        for line in lines:
            if line.startswith("HloModule") or line.lstrip().startswith("//"):
                continue
            out[NAME.sub("%", re.sub(r",?\s*metadata=\{[^}]*\}", "", line)).strip()] += 1
    return out


def opcodes(instructions: collections.Counter) -> collections.Counter:
    """How many instructions of each opcode."""
    ops = collections.Counter()
    for line, n in instructions.items():
        if " = " in line:
            found = re.search(r"\s([a-z][\w\-]*)\(", line.split(" = ", 1)[1])
            if found:
                ops[found.group(1)] += n
    return ops


def max_abs_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
               for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def measure(name: str, model: nn.Module, x_shape: tuple[int, ...], a) -> dict:
    """Both arms of one model: compiled memory, HLO comparison, agreement and timing."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=x_shape).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 10, size=x_shape[0]).astype(np.int32))
    params = model.init(jax.random.key(0), x[:1])["params"]
    opt = optax.adam(1e-3)
    args = jax.device_put((params, opt.init(params), x, y))
    jax.block_until_ready(args)
    steps = dict(zip((GRADLANG, HAND), training_steps(model, params, x_shape, opt)))
    compiled = {arm: jax.jit(f).lower(*args).compile() for arm, f in steps.items()}
    mem = {arm: compiled_memory(c) for arm, c in compiled.items()}
    hlo = {arm: hlo_instructions(c.as_text()) for arm, c in compiled.items()}
    ops = {arm: opcodes(h) for arm, h in hlo.items()}
    results = {arm: c(*args) for arm, c in compiled.items()}
    times = interleaved(compiled, args, HAND, a.rounds, a.calls, a.warmup)
    return {"model": name, "params": sum(int(np.size(v)) for v in jax.tree.leaves(params)),
            "x_shape": list(x_shape), "bytes": mem, "times": times,
            "hlo_same": hlo[GRADLANG] == hlo[HAND],
            "hlo_instructions": {arm: sum(o.values()) for arm, o in ops.items()},
            "opcode_difference": {k: ops[GRADLANG][k] - ops[HAND][k]
                                  for k in ops[GRADLANG] | ops[HAND]
                                  if ops[GRADLANG][k] != ops[HAND][k]},
            "loss_abs_diff": abs(float(results[GRADLANG][2]) - float(results[HAND][2])),
            "params_max_abs_diff": max_abs_diff(results[GRADLANG][0], results[HAND][0])}


def mib(n: float) -> float:
    return n / 2**20


def report(rows: list[dict]) -> None:
    print("| model | params | arm | ms / step | time / hand (IQR) | temp MiB | total MiB "
          "| temp / hand | total / hand | HLO instructions |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ref = r["bytes"][HAND]
        for arm in (HAND, GRADLANG):
            t, b = r["times"][arm], r["bytes"][arm]
            print(f"| {r['model']} | {r['params']:,} | {arm} | {1e3 * t['median_s']:.2f} "
                  f"| {t['median_ratio']:.3f} ({t['ratio_p25']:.3f}-{t['ratio_p75']:.3f}) "
                  f"| {mib(b['temp']):.2f} | {mib(b['total']):.2f} "
                  f"| {b['temp'] / max(ref['temp'], 1):.3f} | {b['total'] / ref['total']:.3f} "
                  f"| {r['hlo_instructions'][arm]} |")
    print()
    for r in rows:
        same = ("the same instructions (names, order, metadata aside)" if r["hlo_same"] else
                f"different (opcode counts gradlang - hand: {r['opcode_difference'] or 'none'})")
        print(f"{r['model']}: optimized HLO {same}; |loss difference| {r['loss_abs_diff']:.1e}, "
              f"max |new params difference| {r['params_max_abs_diff']:.1e}")


# ----------------------------------------------------------------------------- 2. discrete VAE

VAE_S = 4  # samples per step: vae.grad's and vi_models/estimators_categorical*.grad's
NUMPYRO_ROW = f"NumPyro TraceGraph_ELBO, S={VAE_S}"
LIKE_FOR_LIKE_JAX = "like for like: score(baseline=none), Monte Carlo KL; Flax jax fn"
LIKE_FOR_LIKE_GRAD = "like for like: score(baseline=none), Monte Carlo KL; .grad networks"
AUTO_JAX = "automatic: score + leave-one-out, closed-form KL; Flax jax fn (vae.grad)"
AUTO_GRAD = "automatic: score + leave-one-out, closed-form KL; .grad networks"
PAIRS = ((LIKE_FOR_LIKE_JAX, LIKE_FOR_LIKE_GRAD), (AUTO_JAX, AUTO_GRAD))

LIKE_FOR_LIKE_SRC = f"""
# vae.grad (examples/flax_vae) with NumPyro TraceGraph_ELBO's estimator: no baseline, the KL by
# Monte Carlo at the draw (log q(z|x) - log p(z), the uniform prior; its logits are written
# 0 * q because C, a dim only the encoder's result has, cannot be named in an expression).
use std.vi

jax fn encoder(p: tree, x: f32[B, D]) -> f32[L, B, C]
jax fn decoder(p: tree, z: f32[L, B, C]) -> f32[B, D]

fn neg_elbo(enc: tree, dec: tree, x: f32[B, D]) -> f32 {{
  let q = encoder(enc, x)
  z ~ OneHotCategorical(logits=q) with score(baseline=none)
  let log_q = sum(log_prob(OneHotCategorical(logits=q), z), axis=0)
  let log_p = sum(log_prob(OneHotCategorical(logits=0.0 * q), z), axis=0)
  return -mean(bernoulli_log_lik(decoder(dec, z), x) + log_p - log_q)
}}

export step = value_and_grad(expect(neg_elbo, samples={VAE_S}), wrt=[enc, dec])
"""


def vae_steps(x) -> tuple[dict, dict]:
    """The section's jitted steps, each `(key) -> (loss, {"enc", "dec"} gradients)` on its own
    device-resident parameters and the batch x (NumPyro and the .grad networks in vi.py's
    layout, the Flax networks in theirs), and the largest relative difference of each pair's
    loss and gradients at one key."""
    import gradlang
    from vi import MODELS, init_discrete, numpyro_discrete, per_point

    sys.path.insert(0, str(ROOT / "examples" / "flax_vae"))
    from vae import Decoder, Encoder, as_flax  # examples/ is not a package

    enc, dec = init_discrete(x)
    latents, hidden, classes = enc["w"].shape
    encoder, decoder = Encoder(latents, classes, hidden), Decoder(x.shape[1], hidden)
    functions = {"encoder": lambda p, v: encoder.apply({"params": p}, v),
                 "decoder": lambda p, z: decoder.apply({"params": p}, z)}
    flax_vae = gradlang.compile_file(ROOT / "examples" / "flax_vae" / "vae.grad", strict=True,
                                     functions=functions)
    like = gradlang.compile_source(LIKE_FOR_LIKE_SRC, "like_for_like.grad", strict=True,
                                   functions=functions)
    in_grad = {src: gradlang.compile_file(MODELS / f"estimators_categorical{src}.grad")
               for src in ("", "_mc")}

    def point_credit(step):  # vmapped over the data points, as vi.py's discrete section
        call = per_point(step, None)
        return jax.jit(lambda enc, dec, x, key: call(enc, dec, x, key, ())[:2])

    grad_args = jax.device_put((enc, dec, x))
    flax_args = jax.device_put((*as_flax(enc, dec), x))
    steps = {NUMPYRO_ROW: (numpyro_discrete(VAE_S)[0], grad_args),
             LIKE_FOR_LIKE_JAX: (point_credit(like.step), flax_args),
             LIKE_FOR_LIKE_GRAD: (point_credit(in_grad["_mc"].step), grad_args),
             AUTO_JAX: (point_credit(flax_vae.step), flax_args),
             AUTO_GRAD: (point_credit(in_grad[""].step), grad_args)}
    bound = {name: functools.partial(f, *args) for name, (f, args) in steps.items()}
    key = jax.random.key(7)
    agreement = {}
    for jax_fn, in_grad_row in PAIRS:
        (v1, g1), (v2, g2) = bound[jax_fn](key), bound[in_grad_row](key)
        g2 = dict(zip(("enc", "dec"), as_flax(g2["enc"], g2["dec"])))
        agreement[jax_fn] = {"loss": abs(float(v1) - float(v2)) / abs(float(v2)), **{
            part: max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                      for a, b in zip(jax.tree.leaves(g1[part]), jax.tree.leaves(g2[part])))
            for part in ("enc", "dec")}}
    return bound, agreement


def run_vae(a) -> dict:
    """Section 2: time, encoder-gradient variance and variance x time of each step against
    NumPyro's."""
    try:
        import numpyro
    except ImportError as e:  # pragma: no cover - the bench extra installs it
        raise SystemExit("the vae section needs NumPyro: pip install -e '.[bench]'") from e
    from vi import load_data, moments

    jax.config.update("jax_threefry_partitionable", False)
    x, data = load_data()
    bound, agreement = vae_steps(x)
    times = interleaved(bound, (jax.random.key(0),), NUMPYRO_ROW, a.rounds, a.calls, a.warmup)
    rows = {}
    for i, (name, step) in enumerate(bound.items()):
        s = moments(step, (), a.var_keys, seed=3000 + i)
        var = float(np.sum(s["enc_var"]))
        rows[name] = {**times[name], "enc_grad_total_var": var,
                      "var_x_time": var * times[name]["median_s"],
                      "loss_mean": s["loss_mean"], "loss_se": s["loss_se"]}
    ref = rows[NUMPYRO_ROW]
    for r in rows.values():
        r["var_vs_numpyro"] = r["enc_grad_total_var"] / ref["enc_grad_total_var"]
        r["var_x_time_vs_numpyro"] = r["var_x_time"] / ref["var_x_time"]
    return {"numpyro": numpyro.__version__, "data": data, "batch": int(x.shape[0]),
            "samples": VAE_S, "var_keys": a.var_keys, "rows": rows, "pair_agreement": agreement}


def report_vae(vae: dict) -> None:
    print(f"\n## 2. Discrete VAE step, B={vae['batch']}, S={vae['samples']}: Flax networks as "
          f"jax fns "
          f"against NumPyro TraceGraph_ELBO (numpyro {vae['numpyro']}; data: {vae['data']})\n")
    print("| step | ms / step | time / NumPyro (IQR) | encoder grad variance | variance / NumPyro "
          "| var x time / NumPyro | E[-ELBO] |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in vae["rows"].items():
        print(f"| {name} | {1e3 * r['median_s']:.2f} | {r['median_ratio']:.3f} "
              f"({r['ratio_p25']:.3f}-{r['ratio_p75']:.3f}) | {r['enc_grad_total_var']:.4g} "
              f"| {r['var_vs_numpyro']:.3g} | {r['var_x_time_vs_numpyro']:.3g} "
              f"| {r['loss_mean']:.2f} +- {r['loss_se']:.2f} |")
    print(f"\n(variance: sum over the encoder's coordinates over {vae['var_keys']} keys, at fixed "
          f"untrained parameters; var x time: the variance left after averaging estimates for the "
          f"same compute, lower is better. NumPyro's loss estimates the KL by Monte Carlo, the "
          f"automatic rows' in closed form: the same expectation.)")
    rows = vae["rows"]
    for jax_fn, in_grad in PAIRS:
        d = vae["pair_agreement"][jax_fn]
        print(f"{jax_fn.split(';')[0]}: Flax jax fn / .grad networks median time "
              f"{rows[jax_fn]['median_s'] / rows[in_grad]['median_s']:.3f}; at one key, relative "
              f"differences: loss {d['loss']:.1e}, encoder gradient {d['enc']:.1e}, decoder "
              f"gradient {d['dec']:.1e}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    timing_args(ap, 300, 5, 10, "small models, a few rounds, 20 keys (smoke test)")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated sections to run (default {','.join(SECTIONS)})")
    ap.add_argument("--var-keys", type=int, default=200,
                    help="keys for the VAE's gradient variance (default 200)")
    a = parse_timing_args(ap, argv)
    sections = a.sections.split(",")
    if unknown := set(sections) - set(SECTIONS):
        ap.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if a.quick:
        a.var_keys = 20
    models = ([("mlp", MLP(64), (32, 64)), ("cnn", CNN(8), (16, 12, 12, 1))] if a.quick else
              [("mlp", MLP(512), (256, 784)), ("cnn", CNN(16), (64, 28, 28, 1))])
    t0 = time.perf_counter()
    info, line = machine()
    print("# gradlang interop benchmark: Flax models inside .grad objectives\n")
    print(f"{line}; {a.rounds} rounds x {a.calls} calls per arm, {a.warmup} warm-up calls\n")
    out = {**info, "rounds": a.rounds, "calls": a.calls}
    if "step" in sections:
        print("## 1. A Flax model's training step through a .grad objective vs JAX + optax\n")
        out["models"] = [measure(*m, a) for m in models]
        report(out["models"])
    if "vae" in sections:
        out["vae"] = run_vae(a)
        report_vae(out["vae"])
    out["wall_s"] = time.perf_counter() - t0
    print(f"\ntotal wall time {out['wall_s']:.0f} s")
    write_json(out, a.json)
    return out


if __name__ == "__main__":
    main()
