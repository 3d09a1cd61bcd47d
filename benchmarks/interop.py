"""Interop: a training step through gradlang around a Flax model against the same in JAX + optax.

    python benchmarks/interop.py [--quick] [--rounds 300] [--calls 5] [--json out.json]

Needs flax (`pip install -e '.[models]'`). Two Flax linen classifiers, float32, fixed seeds:

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
"""

from __future__ import annotations

import argparse
import collections
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradlang
from timing import interleaved, machine, parse_timing_args, timing_args, write_json

try:
    import flax.linen as nn
except ImportError as e:  # pragma: no cover - the models extra installs it
    raise SystemExit("this benchmark needs flax: pip install -e '.[models]'") from e

GRADLANG, HAND = "gradlang (jax fn)", "hand-written JAX + optax"


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


def memory(compiled) -> dict:
    """XLA's compiled memory in bytes; total = argument + temp + output - alias."""
    ma = compiled.memory_analysis()
    out = {"argument": ma.argument_size_in_bytes, "temp": ma.temp_size_in_bytes,
           "output": ma.output_size_in_bytes, "alias": ma.alias_size_in_bytes}
    out["total"] = out["argument"] + out["temp"] + out["output"] - out["alias"]
    return out


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
    mem = {arm: memory(c) for arm, c in compiled.items()}
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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    timing_args(ap, 300, 5, 10, "small models, a few rounds (smoke test)")
    a = parse_timing_args(ap, argv)
    models = ([("mlp", MLP(64), (32, 64)), ("cnn", CNN(8), (16, 12, 12, 1))] if a.quick else
              [("mlp", MLP(512), (256, 784)), ("cnn", CNN(16), (64, 28, 28, 1))])
    t0 = time.perf_counter()
    info, line = machine()
    print("# gradlang interop benchmark: a Flax model's training step through a .grad "
          "objective vs JAX + optax\n")
    print(f"{line}; {a.rounds} rounds x {a.calls} calls per arm, {a.warmup} warm-up calls\n")
    rows = [measure(*m, a) for m in models]
    report(rows)
    out = {**info, "rounds": a.rounds, "calls": a.calls, "models": rows,
           "wall_s": time.perf_counter() - t0}
    print(f"\ntotal wall time {out['wall_s']:.0f} s")
    write_json(out, a.json)
    return out


if __name__ == "__main__":
    main()
