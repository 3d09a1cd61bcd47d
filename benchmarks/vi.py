"""Variational-inference steps: gradlang against hand-written JAX and NumPyro.

    python benchmarks/vi.py [--rounds 100] [--calls 10] [--json results.json]

Data: 128 binarized 8x8 digits (sklearn.datasets.load_digits, pixel > 7; a fixed-seed synthetic
binary batch of the same shape when sklearn is missing). Parameters: fixed-seed, untrained.
Every loss is a negative ELBO in nats per data point (a mean over the batch); every step is
`jax.jit`-ed and returns (loss, {"enc": ..., "dec": ...}) without any optimizer update.

1. Gaussian VAE (D=64, H=128, Z=8; q(z|x) Normal, p(z) = Normal(0, 1), Bernoulli decoder), one
   step = value and gradient of the S=4-sample estimate, pathwise:
   - gradlang: benchmarks/vi_models/vae_gaussian.grad, `jax.jit(m.step)` (the estimator is
     chosen automatically: reparam),
   - hand-written JAX: `jax.jit(jax.value_and_grad(...))`, reparameterized, the S samples vmapped,
   - NumPyro: `Trace_ELBO(num_particles=S).loss` (vectorized particles) of a model/guide whose
     networks take the parameters as arguments, under `jax.jit(jax.value_and_grad(...))`.
   All three estimate the KL by Monte Carlo (log q - log p at the draw), as Trace_ELBO does. A
   second group computes the KL in closed form: gradlang `step_kl`, hand-written, and NumPyro's
   `TraceMeanField_ELBO`.

2. Discrete VAE (L=4 independent OneHotCategorical latents with C=10 classes, uniform prior, the
   same decoder taking the one-hot latents), score-function gradient, S=8 samples:
   - hand-written RLOO with per-data-point credit (each data point's score term is multiplied by
     its own ELBO minus the mean of the other samples' ELBOs for that data point): the reference,
   - hand-written RLOO with batch credit (each sample's summed log q times the batch-mean loss
     minus the others' mean): the estimator gradlang compiles (README: each score-function draw
     is credited with the whole objective of its sample),
   - gradlang `with score(baseline=loo)`, `expect(..., samples=8)`,
   - gradlang, the same export `jax.vmap`-ed over the data points (a batch of one each, one key
     each): per-data-point credit, as stdlib/vi.grad suggests,
   - gradlang `with score(baseline=none)`, 1 and 8 samples,
   - NumPyro `TraceGraph_ELBO(num_particles=8)` (vectorized particles). NumPyro 0.22's
     TraceGraph_ELBO has NO baselines (Pyro's decaying-average baselines are not in NumPyro): it
     is REINFORCE with Rao-Blackwellized, per-data-point credit from the `plate`, and a Monte
     Carlo KL (the gradlang and hand-written rows use the closed-form KL). NumPyro has no
     OneHotCategorical: its latents are `Categorical` class indices, one-hot encoded by the
     decoder (the same distribution and score).
   Reported: time per step, the total variance (sum over coordinates) of the encoder gradient at
   fixed parameters over `--var-keys` independent keys, and variance x time: the variance left
   after averaging estimates for one second of compute (lower is better).

Timing is INTERLEAVED as in benchmarks/overhead.py: each round times every variant once (the
order rotates every round), a sample being `--calls` consecutive calls, each followed by
`block_until_ready`; reported: median time per call and the median over rounds of the per-round
ratio to the group's reference. All inputs are device-resident; the key is fixed while timing.

Numerics: (a) deterministic: gradlang's `step_eps` (the loss at given noise eps) equals the
hand-written loss and gradient at the same eps, and NumPyro's model/guide log densities
(`numpyro.infer.util.log_density`) at the same latents give the same loss and gradient; the
discrete loss at fixed one-hot latents likewise (gradlang `loss_at`); (b) stochastic: over
`--check-keys` independent keys, every variant's expected loss agrees with the reference's within
5 standard errors, and the mean gradients agree coordinate-wise (chi^2 per coordinate of the
difference of means, about 1 when both estimators are unbiased for the same gradient).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import time
from pathlib import Path

from timing import interleaved

ROOT = Path(__file__).resolve().parent.parent
MODELS = Path(__file__).resolve().parent / "vi_models"
GAUSS_SRC = MODELS / "vae_gaussian.grad"
DISC_SRC = MODELS / "vae_discrete.grad"
GAUSS_S = 4  # samples per step, as in vae_gaussian.grad
DISC_S = 8   # samples per step, as in vae_discrete.grad (the loo and plain8 exports)
B, D, H, Z, L, C = 128, 64, 128, 8, 4, 10


# ----------------------------------------------------------------------------- data and params

def load_data(b: int = B, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    try:
        from sklearn.datasets import load_digits
        images = load_digits().data  # [1797, 64], values 0..16
        x = (images[rng.choice(len(images), size=b, replace=False)] > 7).astype(np.float32)
        return x, "sklearn load_digits, binarized (pixel > 7)"
    except ImportError:
        probs = rng.uniform(0.05, 0.6, size=(1, D))
        x = (rng.uniform(size=(b, D)) < probs).astype(np.float32)
        return x, "synthetic fixed-seed binary data (sklearn not importable)"


def _dense(rng, i, o, bias=0.0):
    import numpy as np
    return {"w": (rng.normal(size=(i, o)) * np.sqrt(2.0 / (i + o))).astype(np.float32),
            "b": np.full(o, bias, np.float32) + (0.01 * rng.normal(size=o)).astype(np.float32)}


def _decoder_logits_bias(x):
    import numpy as np
    p = np.clip(x.mean(0), 0.02, 0.98)
    return np.log(p / (1 - p)).astype(np.float32)


def init_gaussian(x, seed: int = 1):
    import numpy as np
    rng = np.random.default_rng(seed)
    enc = {"hidden": _dense(rng, D, H), "loc": _dense(rng, H, Z), "log_scale": _dense(rng, H, Z, -0.5)}
    dec = {"hidden": _dense(rng, Z, H), "logits": _dense(rng, H, D)}
    dec["logits"]["b"] = _decoder_logits_bias(x)
    return enc, dec


def init_discrete(x, seed: int = 2):
    import numpy as np
    rng = np.random.default_rng(seed)
    enc = {"hidden": _dense(rng, D, H),
           "w": (rng.normal(size=(L, H, C)) * 2.0 / np.sqrt(H)).astype(np.float32),
           "b": (0.1 * rng.normal(size=(L, 1, C))).astype(np.float32)}
    dec = {"w": (rng.normal(size=(L, C, H)) * np.sqrt(1.0 / L)).astype(np.float32),
           "b": (0.01 * rng.normal(size=H)).astype(np.float32),
           "logits": _dense(rng, H, D)}
    dec["logits"]["b"] = _decoder_logits_bias(x)
    return enc, dec


# ----------------------------------------------------------------------------- hand-written JAX

def _lin(p, x):
    return x @ p["w"] + p["b"]


def gauss_encode(enc, x):
    import jax.numpy as jnp
    h = jnp.tanh(_lin(enc["hidden"], x))
    return _lin(enc["loc"], h), jnp.exp(_lin(enc["log_scale"], h))


def gauss_decode(dec, z):
    import jax.numpy as jnp
    return _lin(dec["logits"], jnp.tanh(_lin(dec["hidden"], z)))


def bernoulli_log_lik(logits, x):
    """sum_d log Bernoulli(x_d | logits_d), per row."""
    import jax
    import jax.numpy as jnp
    return jnp.sum(x * logits - jax.nn.softplus(logits), axis=-1)


def normal_log_prob(z, loc, scale):
    import jax.numpy as jnp
    return -0.5 * ((z - loc) / scale) ** 2 - jnp.log(scale) - 0.5 * math.log(2 * math.pi)


def hand_gauss_loss_at(p, x, eps, closed_kl: bool = False):
    """-ELBO (batch mean) at z = loc + scale * eps."""
    import jax.numpy as jnp
    loc, scale = gauss_encode(p["enc"], x)
    z = loc + scale * eps
    log_lik = bernoulli_log_lik(gauss_decode(p["dec"], z), x)
    if closed_kl:
        kl = jnp.sum(-jnp.log(scale) + 0.5 * (scale ** 2 + loc ** 2) - 0.5, axis=-1)
        return -jnp.mean(log_lik - kl)
    log_p = jnp.sum(normal_log_prob(z, 0.0, 1.0), -1)
    log_q = jnp.sum(normal_log_prob(z, loc, scale), -1)
    return -jnp.mean(log_lik + log_p - log_q)


def hand_gauss_step(samples: int, closed_kl: bool):
    import jax
    import jax.numpy as jnp

    def loss(p, x, key):
        eps = jax.random.normal(key, (samples,) + x.shape[:1] + (Z,))
        return jnp.mean(jax.vmap(lambda e: hand_gauss_loss_at(p, x, e, closed_kl))(eps))

    vg = jax.value_and_grad(loss)
    return jax.jit(lambda enc, dec, x, key: vg({"enc": enc, "dec": dec}, x, key))


def disc_encode(enc, x):
    """Encoder logits [L, B, C]."""
    import jax.numpy as jnp
    return jnp.tanh(_lin(enc["hidden"], x)) @ enc["w"] + enc["b"]


def disc_log_lik(dec, z, x):
    """log p(x|z) per data point; z one-hot [L, B, C]."""
    import jax.numpy as jnp
    h = jnp.tanh(jnp.einsum("lbc,lch->bh", z, dec["w"]) + dec["b"])
    return bernoulli_log_lik(_lin(dec["logits"], h), x)


def kl_uniform(q):
    """KL(Categorical(logits=q) || uniform), summed over the L latents, per data point."""
    import jax
    import jax.numpy as jnp
    logp = jax.nn.log_softmax(q, -1)
    return jnp.sum(jnp.exp(logp) * (logp + math.log(q.shape[-1])), axis=(0, 2))


def hand_disc_loss_at(p, x, z):
    """-ELBO (batch mean, closed-form KL) at fixed one-hot latents z [L, B, C]."""
    import jax.numpy as jnp
    q = disc_encode(p["enc"], x)
    return -jnp.mean(disc_log_lik(p["dec"], z, x) - kl_uniform(q))


def hand_disc_step(samples: int, credit: str):
    """RLOO score-function estimator, closed-form KL; credit 'datapoint' or 'batch'."""
    import jax
    import jax.numpy as jnp
    sg = jax.lax.stop_gradient

    def one_sample(p, x, key):
        q = disc_encode(p["enc"], x)
        z = jax.nn.one_hot(jax.random.categorical(key, sg(q), axis=-1), q.shape[-1])
        log_q = jnp.sum(z * jax.nn.log_softmax(q, -1), axis=(0, 2))  # [B]
        v = -(disc_log_lik(p["dec"], z, x) - kl_uniform(q))            # loss per data point [B]
        return log_q, v

    def loss(p, x, key):
        log_q, v = jax.vmap(one_sample, in_axes=(None, None, 0))(p, x, jax.random.split(key, samples))
        if credit == "batch":
            log_q, v = jnp.sum(log_q, 1), jnp.mean(v, 1)  # [S]: the whole sample's score and loss
        others = (jnp.sum(v, 0, keepdims=True) - v) / (samples - 1)
        score = jnp.mean(log_q * sg(v - others))  # per point: also averaged over the batch
        return jnp.mean(v) + score - sg(score)

    vg = jax.value_and_grad(loss)
    return jax.jit(lambda enc, dec, x, key: vg({"enc": enc, "dec": dec}, x, key))


# ----------------------------------------------------------------------------- NumPyro

def numpyro_gaussian(samples: int, closed_kl: bool):
    """(step, loss_at_eps): jitted value_and_grad of Trace_ELBO / TraceMeanField_ELBO .loss / B."""
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import Trace_ELBO, TraceMeanField_ELBO
    from numpyro.infer.util import log_density

    def model(enc, dec, x):
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Normal(jnp.zeros(Z), 1.0).to_event(1))
            numpyro.sample("x", dist.Bernoulli(logits=gauss_decode(dec, z)).to_event(1), obs=x)

    def guide(enc, dec, x):
        loc, scale = gauss_encode(enc, x)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("z", dist.Normal(loc, scale).to_event(1))

    elbo = (TraceMeanField_ELBO if closed_kl else Trace_ELBO)(num_particles=samples,
                                                              vectorize_particles=True)

    def loss(p, x, key):
        return elbo.loss(key, {}, model, guide, p["enc"], p["dec"], x) / x.shape[0]

    def loss_at_eps(p, x, eps):  # what Trace_ELBO computes for one particle, at given noise
        loc, scale = gauss_encode(p["enc"], x)
        z = loc + scale * eps
        args = (p["enc"], p["dec"], x)
        log_joint, _ = log_density(model, args, {}, {"z": z})
        log_q, _ = log_density(guide, args, {}, {"z": z})
        return -(log_joint - log_q) / x.shape[0]

    vg = jax.value_and_grad(loss)
    step = jax.jit(lambda enc, dec, x, key: vg({"enc": enc, "dec": dec}, x, key))
    return step, jax.jit(jax.value_and_grad(loss_at_eps))


def numpyro_discrete(samples: int):
    """(step, loss_at): TraceGraph_ELBO(num_particles=samples).loss / B, and the (Monte Carlo KL)
    loss at fixed one-hot latents z [L, B, C] from the model/guide log densities."""
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import TraceGraph_ELBO
    from numpyro.infer.util import log_density

    def model(enc, dec, x):
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(logits=jnp.zeros((L, C)))
                               .expand([x.shape[0], L]).to_event(1))          # [B, L] classes
            logits = disc_decode_blc(dec, jax.nn.one_hot(z, C))
            numpyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(enc, dec, x):
        q = jnp.transpose(disc_encode(enc, x), (1, 0, 2))  # [B, L, C]
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("z", dist.Categorical(logits=q).to_event(1))

    elbo = TraceGraph_ELBO(num_particles=samples, vectorize_particles=True)

    def loss(p, x, key):
        return elbo.loss(key, {}, model, guide, p["enc"], p["dec"], x) / x.shape[0]

    def loss_at(p, x, z):
        args = (p["enc"], p["dec"], x)
        zb = jnp.argmax(jnp.transpose(z, (1, 0, 2)), -1)  # one-hot [L, B, C] -> classes [B, L]
        log_joint, _ = log_density(model, args, {}, {"z": zb})
        log_q, _ = log_density(guide, args, {}, {"z": zb})
        return -(log_joint - log_q) / x.shape[0]

    vg = jax.value_and_grad(loss)
    step = jax.jit(lambda enc, dec, x, key: vg({"enc": enc, "dec": dec}, x, key))
    return step, jax.jit(jax.value_and_grad(loss_at))


def disc_decode_blc(dec, z):
    """Decoder logits from one-hot latents laid out [B, L, C] (NumPyro's plate-first layout)."""
    import jax.numpy as jnp
    h = jnp.tanh(jnp.einsum("blc,lch->bh", z, dec["w"]) + dec["b"])
    return _lin(dec["logits"], h)


def hand_disc_mc_loss_at(p, x, z):
    """-ELBO at one-hot z with the KL by Monte Carlo: -(log p(x|z) + log p(z) - log q(z|x))."""
    import jax
    import jax.numpy as jnp
    q = disc_encode(p["enc"], x)
    log_q = jnp.sum(z * jax.nn.log_softmax(q, -1), axis=(0, 2))
    log_p = -L * math.log(C)
    return -jnp.mean(disc_log_lik(p["dec"], z, x) + log_p - log_q)


# ----------------------------------------------------------------------------- measurement

def moments(step, args: tuple, n: int, seed: int) -> dict:
    """Loss mean/SE and per-coordinate mean/variance of the flattened gradients over n keys."""
    import jax
    import numpy as np

    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    losses, acc = [], {}
    for i in range(n):
        v, grads = jax.device_get(step(*args, keys[i]))  # the timed (already compiled) function
        losses.append(float(v))
        for name in ("enc", "dec"):
            g = np.concatenate([np.ravel(a) for a in jax.tree.leaves(grads[name])]).astype(np.float64)
            s, s2 = acc.get(name, (0.0, 0.0))
            acc[name] = (s + g, s2 + g * g)
    losses = np.asarray(losses)
    out = {"n": n, "loss_mean": float(losses.mean()),
           "loss_se": float(losses.std(ddof=1) / math.sqrt(n))}
    for name, (s, s2) in acc.items():
        mean = s / n
        var = np.maximum(s2 / n - mean * mean, 0.0) * n / (n - 1)
        out[f"{name}_mean"], out[f"{name}_var"] = mean, var
    return out


def agreement(a: dict, b: dict, part: str = "enc") -> float:
    """chi^2 per coordinate of the difference of two mean gradients (about 1 if same mean)."""
    import numpy as np
    var = a[f"{part}_var"] / a["n"] + b[f"{part}_var"] / b["n"]
    ok = var > 1e-20
    d = a[f"{part}_mean"][ok] - b[f"{part}_mean"][ok]
    return float(np.mean(d * d / var[ok]))


def loss_z(a: dict, b: dict) -> float:
    return (a["loss_mean"] - b["loss_mean"]) / math.hypot(a["loss_se"], b["loss_se"])


def max_abs_diff(t1, t2) -> float:
    import jax
    import numpy as np
    assert jax.tree.structure(t1) == jax.tree.structure(t2), (jax.tree.structure(t1), jax.tree.structure(t2))
    return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(t1), jax.tree.leaves(t2)))


def check_close(name: str, got, want, rtol=1e-4, atol=1e-5) -> dict:
    """got/want: (loss, grads dict); asserts allclose, returns the max abs differences."""
    import jax
    import numpy as np
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=rtol, atol=atol, err_msg=name)
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol, err_msg=name)
    return {"loss_abs_diff": abs(float(got[0]) - float(want[0])),
            "grad_max_abs_diff": max_abs_diff(got[1], want[1])}


def _source_samples(path: Path, export: str) -> int:
    m = re.search(rf"export {export} = .*samples=(\d+)", path.read_text())
    return int(m.group(1))


# ----------------------------------------------------------------------------- the two studies

def run_gaussian(x, rounds, calls, warmup, check_keys) -> dict:
    import jax
    import numpy as np

    import gradlang

    assert _source_samples(GAUSS_SRC, "step") == GAUSS_S == _source_samples(GAUSS_SRC, "step_kl")
    m = gradlang.compile_file(GAUSS_SRC)
    enc, dec = init_gaussian(x)
    args = jax.device_put((enc, dec, x))
    key = jax.random.PRNGKey(0)
    np_mc, np_mc_at = numpyro_gaussian(GAUSS_S, closed_kl=False)
    np_kl, _ = numpyro_gaussian(GAUSS_S, closed_kl=True)
    groups = {
        "Monte Carlo KL (Trace_ELBO's estimator)": {
            "hand-written JAX": hand_gauss_step(GAUSS_S, closed_kl=False),
            "gradlang jax.jit(m.step)": jax.jit(m.step),
            "NumPyro Trace_ELBO": np_mc,
        },
        "closed-form KL": {
            "hand-written JAX": hand_gauss_step(GAUSS_S, closed_kl=True),
            "gradlang jax.jit(m.step_kl)": jax.jit(m.step_kl),
            "NumPyro TraceMeanField_ELBO": np_kl,
        },
    }

    # (a) deterministic: the same loss and gradient at the same noise eps
    eps = jax.random.normal(jax.random.PRNGKey(123), (x.shape[0], Z))
    p = {"enc": args[0], "dec": args[1]}
    want = jax.jit(jax.value_and_grad(hand_gauss_loss_at))(p, args[2], eps)
    exact = {"gradlang step_eps": check_close("gradlang step_eps", jax.jit(m.step_eps)(*args, eps), want),
             "NumPyro log_density": check_close("NumPyro", np_mc_at(p, args[2], eps), want)}

    # (b) stochastic: expected loss and mean gradient over independent keys
    stats = {}
    for gi, (g, variants) in enumerate(groups.items()):
        for vi, (n, f) in enumerate(variants.items()):
            stats[(g, n)] = moments(f, args, check_keys, seed=1000 + 10 * gi + vi)
    ref_stats = stats[(next(iter(groups)), "hand-written JAX")]

    timing = {}
    for g, variants in groups.items():
        timing[g] = interleaved(variants, (*args, key), "hand-written JAX", rounds, calls, warmup)
        for n in variants:
            s = stats[(g, n)]
            timing[g][n].update(
                loss_mean=s["loss_mean"], loss_se=s["loss_se"], loss_z_vs_ref=loss_z(s, ref_stats),
                enc_grad_chi2_vs_ref=agreement(s, ref_stats, "enc"),
                dec_grad_chi2_vs_ref=agreement(s, ref_stats, "dec"),
                enc_grad_total_var=float(np.sum(s["enc_var"])),
                dec_grad_total_var=float(np.sum(s["dec_var"])))
    return {"groups": timing, "exact": exact, "check_keys": check_keys}


def run_discrete(x, rounds, calls, warmup, var_keys) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import gradlang

    assert _source_samples(DISC_SRC, "step") == DISC_S == _source_samples(DISC_SRC, "step_plain8")
    m = gradlang.compile_file(DISC_SRC)
    enc, dec = init_discrete(x)
    args = jax.device_put((enc, dec, x))
    key = jax.random.PRNGKey(0)
    np_step, np_at = numpyro_discrete(DISC_S)

    def per_point(enc, dec, x, key):  # batch-of-one steps vmapped over the data points
        v, g = jax.vmap(m.step, in_axes=(None, None, 0, 0))(
            enc, dec, x[:, None, :], jax.random.split(key, x.shape[0]))
        return jnp.mean(v), jax.tree.map(lambda a: jnp.mean(a, 0), g)

    ref = "hand-written RLOO, per-point credit"
    variants = {
        ref: hand_disc_step(DISC_S, "datapoint"),
        "hand-written RLOO, batch credit": hand_disc_step(DISC_S, "batch"),
        "gradlang score(loo), S=8": jax.jit(m.step),
        "gradlang score(loo), S=8, vmap per point": jax.jit(per_point),
        "gradlang score(none), S=1": jax.jit(m.step_plain1),
        "gradlang score(none), S=8": jax.jit(m.step_plain8),
        "NumPyro TraceGraph_ELBO, S=8": np_step,
    }
    samples_of = {n: (1 if "S=1" in n else DISC_S) for n in variants}

    # (a) deterministic: the loss and gradient at fixed one-hot latents
    p = {"enc": args[0], "dec": args[1]}
    z = jax.nn.one_hot(jax.random.randint(jax.random.PRNGKey(7), (L, x.shape[0]), 0, C), C)
    exact = {"gradlang loss_at": check_close(
        "gradlang loss_at", jax.jit(m.loss_at)(*args, z),
        jax.jit(jax.value_and_grad(hand_disc_loss_at))(p, args[2], z))}
    exact["NumPyro log_density (Monte Carlo KL)"] = check_close(
        "NumPyro loss_at", np_at(p, args[2], z),
        jax.jit(jax.value_and_grad(hand_disc_mc_loss_at))(p, args[2], z))

    stats = {n: moments(f, args, var_keys, seed=2000 + i) for i, (n, f) in enumerate(variants.items())}
    timing = interleaved(variants, (*args, key), ref, rounds, calls, warmup)
    for n in variants:
        s, t = stats[n], timing[n]
        var = float(np.sum(s["enc_var"]))
        t.update(samples=samples_of[n], enc_grad_total_var=var,
                 dec_grad_total_var=float(np.sum(s["dec_var"])),
                 var_x_time=var * t["median_s"],
                 loss_mean=s["loss_mean"], loss_se=s["loss_se"],
                 loss_z_vs_ref=loss_z(s, stats[ref]),
                 enc_grad_chi2_vs_ref=agreement(s, stats[ref], "enc"))
    base = timing["gradlang score(none), S=1"]
    for n in variants:
        timing[n]["var_reduction_vs_none_S1"] = base["enc_grad_total_var"] / timing[n]["enc_grad_total_var"]
        timing[n]["var_x_time_vs_ref"] = timing[n]["var_x_time"] / timing[ref]["var_x_time"]
    return {"variants": timing, "exact": exact, "var_keys": var_keys, "reference": ref}


# ----------------------------------------------------------------------------- report

def _time_table(rows: dict) -> None:
    w = max(len(n) for n in rows) + 2
    print(f"  {'variant':<{w}}{'median/step':>14}{'p25-p75':>22}{'ratio vs hand':>15}{'ratio p25-p75':>16}")
    for n, r in rows.items():
        iqr = f"{r['p25_s'] * 1e6:.0f}-{r['p75_s'] * 1e6:.0f} us"
        riqr = f"{r['ratio_p25']:.3f}-{r['ratio_p75']:.3f}"
        print(f"  {n:<{w}}{r['median_s'] * 1e6:>11.0f} us{iqr:>22}{r['median_ratio']:>15.3f}{riqr:>16}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=100, help="interleaved rounds (default 100)")
    ap.add_argument("--calls", type=int, default=10, help="calls per timed sample (default 10)")
    ap.add_argument("--warmup", type=int, default=20, help="warm-up calls per variant")
    ap.add_argument("--var-keys", type=int, default=200,
                    help="independent keys for the discrete gradient variance (default 200)")
    ap.add_argument("--check-keys", type=int, default=400,
                    help="independent keys for the Gaussian expectation checks (default 400)")
    ap.add_argument("--json", type=Path, default=None, help="write the results to this file")
    args = ap.parse_args(argv)

    import jax
    import numpyro

    t_start = time.perf_counter()
    dev = jax.devices()[0]
    x, data_source = load_data()
    print(f"gradlang VI benchmark: VAE steps (loss and gradient, no optimizer update), B={B} D={D}")
    print(f"jax {jax.__version__}, numpyro {numpyro.__version__}, device {dev.platform}:"
          f"{dev.device_kind}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    print(f"data: {data_source}; interleaved timing: {args.rounds} rounds x {args.calls} calls "
          f"per variant, {args.warmup} warm-up calls\n")

    gauss = run_gaussian(x, args.rounds, args.calls, args.warmup, args.check_keys)
    print(f"1. Gaussian VAE (H={H}, Z={Z}), pathwise, S={GAUSS_S} samples per step")
    for g, rows in gauss["groups"].items():
        print(f" {g}:")
        _time_table(rows)
    print(" numerics, same noise eps (deterministic):")
    for n, c in gauss["exact"].items():
        print(f"  ok: {n} vs hand-written: |loss diff| {c['loss_abs_diff']:.1e}, "
              f"max |grad diff| {c['grad_max_abs_diff']:.1e}")
    print(f" numerics, {gauss['check_keys']} independent keys each (reference: hand-written, "
          f"Monte Carlo KL; chi2/coord ~1 = same mean gradient):")
    bad = []
    for gi, (g, rows) in enumerate(gauss["groups"].items()):
        for n, r in rows.items():
            tag = f"{g.split(' (')[0]} / {n}"
            is_ref = gi == 0 and n == "hand-written JAX"
            z = "    -" if is_ref else f"{r['loss_z_vs_ref']:+5.2f}"
            chi2 = "  -  " if is_ref else (f"enc {r['enc_grad_chi2_vs_ref']:.2f} "
                                           f"dec {r['dec_grad_chi2_vs_ref']:.2f}")
            print(f"  {tag:<52} E[loss] {r['loss_mean']:.4f} +- {r['loss_se']:.4f}  z {z}  "
                  f"grad chi2/coord {chi2:<17} total var enc {r['enc_grad_total_var']:.4g} "
                  f"dec {r['dec_grad_total_var']:.4g}")
            if abs(r["loss_z_vs_ref"]) > 5:
                bad.append(tag)
    print(f"  expected losses agree within 5 standard errors: {'yes' if not bad else 'NO: ' + ', '.join(bad)}")

    disc = run_discrete(x, args.rounds, args.calls, args.warmup, args.var_keys)
    rows = disc["variants"]
    print(f"\n2. Discrete VAE (L={L} OneHotCategorical latents x C={C} classes, H={H}), score function")
    _time_table(rows)
    print(f" encoder-gradient variance at fixed params over {disc['var_keys']} keys (total = sum over "
          f"coordinates); var x time = variance left after averaging estimates for 1 s of compute:")
    w = max(len(n) for n in rows) + 2
    print(f"  {'variant':<{w}}{'total var':>11}{'vs none,S=1':>13}{'var x time':>12}{'vs ref':>9}"
          f"{'E[loss]':>18}{'z':>7}{'chi2/coord':>12}")
    for n, r in rows.items():
        ref_row = n == disc["reference"]
        z = "-" if ref_row else f"{r['loss_z_vs_ref']:+.2f}"
        chi2 = "-" if ref_row else f"{r['enc_grad_chi2_vs_ref']:.2f}"
        print(f"  {n:<{w}}{r['enc_grad_total_var']:>11.4g}{r['var_reduction_vs_none_S1']:>12.4g}x"
              f"{r['var_x_time']:>12.3g}{r['var_x_time_vs_ref']:>9.3g}"
              f"{r['loss_mean']:>11.3f} +-{r['loss_se']:.3f}{z:>7}{chi2:>12}")
    none8 = rows["gradlang score(none), S=8"]
    loo8, pp = rows["gradlang score(loo), S=8"], rows["gradlang score(loo), S=8, vmap per point"]
    print("  (vs none,S=1: total variance of gradlang score(none), S=1 / this row's. vs ref: var x time\n"
          "   / the reference's, lower is better. z: expected loss vs the reference's, in standard\n"
          "   errors. chi2/coord: squared difference of the mean encoder gradient from the reference's,\n"
          "   per coordinate, in units of its variance: about 1 when both are unbiased. NumPyro's loss\n"
          "   uses a Monte Carlo KL: same expectation.)")
    print(f"  gradlang leave-one-out at S={DISC_S}: variance / "
          f"{none8['enc_grad_total_var'] / loo8['enc_grad_total_var']:.4g} vs no baseline at the same S;\n"
          f"  gradlang per-point credit (vmap) vs batch credit: variance / "
          f"{loo8['enc_grad_total_var'] / pp['enc_grad_total_var']:.4g}, var x time / "
          f"{loo8['var_x_time'] / pp['var_x_time']:.4g}")
    disc["summary"] = {
        "loo_variance_reduction_at_equal_samples": none8["enc_grad_total_var"] / loo8["enc_grad_total_var"],
        "per_point_vs_batch_credit_variance_reduction": loo8["enc_grad_total_var"] / pp["enc_grad_total_var"]}
    for n, c in disc["exact"].items():
        print(f"  ok at fixed one-hot latents: {n} vs hand-written: |loss diff| "
              f"{c['loss_abs_diff']:.1e}, max |grad diff| {c['grad_max_abs_diff']:.1e}")
    bad = [n for n, r in rows.items() if abs(r["loss_z_vs_ref"]) > 5]
    print(f"  expected losses agree within 5 standard errors: {'yes' if not bad else 'NO: ' + ', '.join(bad)}")
    total = time.perf_counter() - t_start
    print(f"\ntotal wall time {total:.0f} s")

    result = {"dims": {"B": B, "D": D, "H": H, "Z": Z, "L": L, "C": C},
              "samples": {"gaussian": GAUSS_S, "discrete": DISC_S},
              "rounds": args.rounds, "calls": args.calls, "jax": jax.__version__,
              "numpyro": numpyro.__version__, "device": f"{dev.platform}:{dev.device_kind}",
              "cpu_count": os.cpu_count(), "data": data_source,
              "gaussian": gauss, "discrete": disc, "wall_s": total}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
