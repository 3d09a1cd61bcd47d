"""Variational-inference steps: gradlang against hand-written JAX and NumPyro.

    python benchmarks/vi.py [--quick] [--sections gaussian,discrete,compare] [--rounds 100]
                            [--calls 10] [--compare-rounds 40] [--compare-calls 5]
                            [--var-keys 200] [--relax-steps 1000] [--json results.json]

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
     minus the others' mean): what `score(credit=whole)` compiles,
   - gradlang `with score(baseline=loo)`, `expect(..., samples=8)`, the batched program as a user
     writes it: the compiler proves that each data point's latents reach only that point's loss
     (passes/elements.py) and credits each point's score term with its own loss, as the reference,
   - the same with `score(baseline=loo, credit=whole)` (`step_whole`): batch credit, the
     compiler's estimator before that analysis,
   - gradlang, the `step` export `jax.vmap`-ed over the data points (a batch of one each, one key
     each): per-data-point credit by hand, the workaround before that analysis,
   - gradlang `with score(baseline=none)`, 1 and 8 samples,
   - gradlang `with score(baseline=none)`, 8 samples, the KL by Monte Carlo at the draw (log q -
     log p, as TraceGraph_ELBO estimates it; `step_plain8_mc`), batched and `jax.vmap`-ed per
     point: the vmapped row is NumPyro's estimator, the LIKE-FOR-LIKE row,
   - NumPyro `TraceGraph_ELBO(num_particles=8)` (vectorized particles). NumPyro 0.22's
     TraceGraph_ELBO has NO baselines (Pyro's decaying-average baselines are not in NumPyro): it
     is REINFORCE with Rao-Blackwellized, per-data-point credit from the `plate`, and a Monte
     Carlo KL (the other gradlang and hand-written rows use the closed-form KL). NumPyro has no
     OneHotCategorical: its latents are `Categorical` class indices, one-hot encoded by the
     decoder (the same distribution and score).
   Which rows compare what: gradlang's like-for-like row against NumPyro compares the libraries
   (the same estimator; its time ratio is the libraries' cost, its variance ratio about 1); the
   hand-written rows against gradlang's closed-form-KL rows compare the compiler with the same
   estimator written by hand; every other pair compares estimators (KL, baseline, credit, S).
   Reported: time per step, the total variance (sum over coordinates) of the encoder gradient at
   fixed parameters over `--var-keys` independent keys, and variance x time: the variance left
   after averaging estimates for one second of compute (lower is better).

3. Estimator comparison (`gradlang verify --compare` on the discrete VAE, against Storchastic's
   estimator list and NumPyro): three discrete VAEs on the same data, each with one draw left to
   the automatic rule in benchmarks/vi_models/estimators_*.grad (categorical.grad holds the
   categorical parts, shared with vae_discrete.grad; binary.grad the binary ones):
   - categorical: the VAE of section 2 (L=4 OneHotCategorical latents x C=10),
   - binary: K=16 Bernoulli latents, a Bernoulli(1/2) prior (closed-form KL), tanh MLP encoder
     and decoder, and RELAX's control variate r(psi, s), a tanh MLP of the relaxed latents,
   - single categorical: one OneHotCategorical latent x C=10 per data point (the categorical
     model with L=1), written for a batch of one so that its draw has one element and enum,
     swor and unordered apply.
   Every estimator name `gradlang verify --compare` tries (`gradlang.verify.compare
   .site_candidates`: each score-function baseline, default options; without `auto`, which is
   score(loo) here), plus `relax(control=r)` where the file has r and `swor(k=4,
   baseline=normalized)`, is written on the draw as its `with ...` annotation by verify's source
   edits (`gradlang.verify.variants`) and compiled; what the compiler rejects is listed with its
   one-line reason. Each compiled export is `jax.vmap`-ed over the B data points (a batch of one
   each, one key each: per-data-point credit, as NumPyro's plate gives TraceGraph_ELBO; section 2
   shows what batch credit costs), S=4 samples per step; enum, swor(k=4) and unordered(k=4) at
   one sample (exact for enum; 4 evaluations for the others, as S=4 for the score function).
   NumPyro `TraceGraph_ELBO(num_particles=4)` runs on each model (per-point credit, Monte Carlo
   KL, no baseline; categorical latents as class indices), and so does its estimator compiled by
   gradlang, the LIKE-FOR-LIKE row `with score(baseline=none), Monte Carlo KL`
   (estimators_categorical_mc.grad, estimators_binary_mc.grad): that row compares the libraries;
   every other gradlang row uses the closed-form KL and compares gradlang's estimators with
   NumPyro's only one.
   Measured at fixed parameters: the encoder gradient's total variance over `--var-keys` keys,
   a state threaded from call to call as in training (a moving-average baseline, per data
   point, after 50 warm-up calls; RELAX's psi, shared, trained `--relax-steps` calls first,
   starting at r = 0, i.e. REBAR with eta = 1, each call one SGD step of the compiler's on the
   estimate's second moment; both warm-ups run at OTHER parameters, the model's init with seed
   WARM_SEED, so that the state is not fitted to the parameters where it is measured);
   agreement with the EXACT gradient, the -ELBO with its reconstruction term summed over every
   latent value (10^4, 2^16 and 10 values per data point) in float64, differentiated by JAX:
   the largest per-coordinate z (gradlang verify's statistic, z = 5) and |mean - exact| /
   |exact| beside its noise level; the mean loss against the exact -ELBO; interleaved time per
   step (`--compare-rounds` x `--compare-calls`) against NumPyro; variance x time. Estimators
   biased by design (gumbel, st_gumbel, grpo, swor baseline=normalized) are marked. Last,
   Storchastic's estimators (`storch.method`) with the gradlang annotation of each (or "not in
   gradlang") and what was measured here.

`--quick` is a smoke test (about a minute on 2 idle cores; XLA compiles dominate): section 3 on
the single-categorical model only, 4 rounds of 2 calls, 20 keys, 20 RELAX steps. Section 3 at
the defaults (`--sections compare`) takes 4-5 minutes there.

Random bits: the benchmark sets `jax_threefry_partitionable=False` (`--partitionable-threefry`
keeps JAX's default, True). With jax 0.10.2's default on this CPU, draws of rank >= 3 compile and
run far slower: `jax.random.normal(key, (8, 4, 128, 10))` takes 21 s to compile and 6.2 ms to
run, against 0.5 s and 0.7 ms with False (rank 1, 40960 values: 1.0 s and 0.8 ms either way);
every VAE step here draws [S, L, B, C]-shaped noise, and the discrete steps then take 20-30 s
each to compile. Estimates are statistically the same either way.

Timing is INTERLEAVED as in benchmarks/overhead.py: each round times every variant once (the
order rotates every round), a sample being `--calls` consecutive calls, each followed by
`block_until_ready`; reported: median time per call and the median over rounds of the per-round
ratio to the group's reference. All inputs are device-resident; the key is fixed while timing.

Numerics: (a) deterministic: gradlang's `step_eps` (the loss at given noise eps) equals the
hand-written loss and gradient at the same eps, and NumPyro's model/guide log densities
(`numpyro.infer.util.log_density`) at the same latents give the same loss and gradient; the
discrete loss at fixed one-hot latents likewise (gradlang `loss_at`, closed-form KL, and
`loss_at_mc`, Monte Carlo KL as NumPyro's); (b) stochastic: over
`--check-keys` independent keys, every variant's expected loss agrees with the reference's within
5 standard errors, and the mean gradients agree coordinate-wise (chi^2 per coordinate of the
difference of means, about 1 when both estimators are unbiased for the same gradient).
"""

from __future__ import annotations

import argparse
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from timing import interleaved, machine, parse_timing_args, timing_args, write_json

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


def init_discrete(x, seed: int = 2, latents: int = L):
    """The categorical VAE's parameters (categorical.grad) with `latents` latents of C classes."""
    import numpy as np
    rng = np.random.default_rng(seed)
    enc = {"hidden": _dense(rng, D, H),
           "w": (rng.normal(size=(latents, H, C)) * 2.0 / np.sqrt(H)).astype(np.float32),
           "b": (0.1 * rng.normal(size=(latents, 1, C))).astype(np.float32)}
    dec = {"w": (rng.normal(size=(latents, C, H)) * np.sqrt(1.0 / latents)).astype(np.float32),
           "b": (0.01 * rng.normal(size=H)).astype(np.float32),
           "logits": _dense(rng, H, D)}
    dec["logits"]["b"] = _decoder_logits_bias(x)
    return enc, dec


# ----------------------------------------------------------------------------- hand-written JAX

def jit_step(loss):
    """`loss(p, x, key)` with p = {"enc", "dec"} -> jitted (enc, dec, x, key) -> (loss, grads)."""
    import jax
    vg = jax.value_and_grad(loss)
    return jax.jit(lambda enc, dec, x, key: vg({"enc": enc, "dec": dec}, x, key))


def _lin(p, x):
    return x @ p["w"] + p["b"]


def gauss_encode(enc, x):
    import jax.numpy as jnp
    h = jnp.tanh(_lin(enc["hidden"], x))
    return _lin(enc["loc"], h), jnp.exp(_lin(enc["log_scale"], h))


def mlp(p, x):
    """A tanh MLP with layers "hidden" and "logits": the Gaussian and binary VAEs' decoder (pixel
    logits from latents) and the binary VAE's encoder (latent logits from pixels)."""
    import jax.numpy as jnp
    return _lin(p["logits"], jnp.tanh(_lin(p["hidden"], x)))


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
    log_lik = bernoulli_log_lik(mlp(p["dec"], z), x)
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

    return jit_step(loss)


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

    return jit_step(loss)


# ----------------------------------------------------------------------------- NumPyro

def numpyro_step(elbo, model, guide):
    """Jitted (enc, dec, x, key) -> (loss, grads) of `elbo.loss / B` for model/guide(enc, dec, x)."""
    def loss(p, x, key):
        return elbo.loss(key, {}, model, guide, p["enc"], p["dec"], x) / x.shape[0]

    return jit_step(loss)


def numpyro_loss_at(model, guide, p, x, latents: dict):
    """-(log p(x, z) - log q(z|x)) / B at given latents, from the model/guide log densities."""
    from numpyro.infer.util import log_density

    args = (p["enc"], p["dec"], x)
    log_joint, _ = log_density(model, args, {}, latents)
    log_q, _ = log_density(guide, args, {}, latents)
    return -(log_joint - log_q) / x.shape[0]


def numpyro_gaussian(samples: int, closed_kl: bool):
    """(step, loss_at_eps): jitted value_and_grad of Trace_ELBO / TraceMeanField_ELBO .loss / B."""
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import Trace_ELBO, TraceMeanField_ELBO

    def model(enc, dec, x):
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Normal(jnp.zeros(Z), 1.0).to_event(1))
            numpyro.sample("x", dist.Bernoulli(logits=mlp(dec, z)).to_event(1), obs=x)

    def guide(enc, dec, x):
        loc, scale = gauss_encode(enc, x)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("z", dist.Normal(loc, scale).to_event(1))

    elbo = (TraceMeanField_ELBO if closed_kl else Trace_ELBO)(num_particles=samples,
                                                              vectorize_particles=True)

    def loss_at_eps(p, x, eps):  # what Trace_ELBO computes for one particle, at given noise
        loc, scale = gauss_encode(p["enc"], x)
        return numpyro_loss_at(model, guide, p, x, {"z": loc + scale * eps})

    return numpyro_step(elbo, model, guide), jax.jit(jax.value_and_grad(loss_at_eps))


def numpyro_discrete(samples: int):
    """(step, loss_at): TraceGraph_ELBO(num_particles=samples).loss / B, and the (Monte Carlo KL)
    loss at fixed one-hot latents z [L, B, C] from the model/guide log densities. L and C are
    read from the encoder's shapes."""
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import TraceGraph_ELBO

    def model(enc, dec, x):
        latents, _, classes = enc["w"].shape
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(logits=jnp.zeros((latents, classes)))
                               .expand([x.shape[0], latents]).to_event(1))    # [B, L] classes
            logits = disc_decode_blc(dec, jax.nn.one_hot(z, classes))
            numpyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(enc, dec, x):
        q = jnp.transpose(disc_encode(enc, x), (1, 0, 2))  # [B, L, C]
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("z", dist.Categorical(logits=q).to_event(1))

    elbo = TraceGraph_ELBO(num_particles=samples, vectorize_particles=True)

    def loss_at(p, x, z):
        zb = jnp.argmax(jnp.transpose(z, (1, 0, 2)), -1)  # one-hot [L, B, C] -> classes [B, L]
        return numpyro_loss_at(model, guide, p, x, {"z": zb})

    return numpyro_step(elbo, model, guide), jax.jit(jax.value_and_grad(loss_at))


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

def flat(tree):
    """The leaves of a pytree raveled into one float64 vector."""
    import jax
    import numpy as np
    return np.concatenate([np.ravel(a) for a in jax.tree.leaves(tree)]).astype(np.float64)


def estimates(call, n: int, seed: int, state=()):
    """Losses [n] and the flattened gradients of each part ("enc", "dec": float64 [n, size]) of
    `call(key, state) -> (loss, grads, state)` over n independent keys; the state (a baseline or
    control variate, `()` when none) is threaded from one call to the next, as in training."""
    import jax
    import numpy as np

    losses, parts = [], {"enc": [], "dec": []}
    for key in jax.random.split(jax.random.PRNGKey(seed), n):
        v, grads, state = call(key, state)
        v, grads = jax.device_get((v, grads))
        losses.append(float(v))
        for name, rows in parts.items():
            rows.append(flat(grads[name]))
    return np.asarray(losses), {k: np.stack(r) for k, r in parts.items()}


def moments(step, args: tuple, n: int, seed: int) -> dict:
    """Loss mean/SE and per-coordinate mean/variance of the flattened gradients of
    `step(*args, key) -> (loss, grads)` (the timed, already compiled function) over n keys."""
    losses, parts = estimates(lambda key, state: (*step(*args, key), state), n, seed)
    out = {"n": n, "loss_mean": float(losses.mean()),
           "loss_se": float(losses.std(ddof=1) / math.sqrt(n))}
    for name, g in parts.items():
        out[f"{name}_mean"], out[f"{name}_var"] = g.mean(0), g.var(0, ddof=1)
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

NUMPYRO_DISC = f"NumPyro TraceGraph_ELBO, S={DISC_S}"
LIKE_FOR_LIKE_DISC = f"gradlang score(none), S={DISC_S}, Monte Carlo KL, vmap per point"
"""Section 2's like-for-like row: NumPyro TraceGraph_ELBO's estimator (no baseline, the KL by Monte
Carlo at the draw, per-data-point credit) compiled by gradlang; the other gradlang rows differ
from NumPyro's in the estimator too (closed-form KL, baselines, batch credit)."""

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
    import numpy as np

    import gradlang

    exports = ("step", "step_whole", "step_plain8", "step_plain8_mc")
    assert all(_source_samples(DISC_SRC, e) == DISC_S for e in exports)
    m = gradlang.compile_file(DISC_SRC)
    enc, dec = init_discrete(x)
    args = jax.device_put((enc, dec, x))
    key = jax.random.PRNGKey(0)
    np_step, np_at = numpyro_discrete(DISC_S)

    def point_credit(step):  # batch-of-one steps vmapped over the data points, without state
        call = per_point(step, None)
        return jax.jit(lambda enc, dec, x, key: call(enc, dec, x, key, ())[:2])

    ref = "hand-written RLOO, per-point credit"
    variants = {
        ref: hand_disc_step(DISC_S, "datapoint"),
        "hand-written RLOO, batch credit": hand_disc_step(DISC_S, "batch"),
        "gradlang score(loo), S=8": jax.jit(m.step),
        "gradlang score(loo), S=8, credit=whole": jax.jit(m.step_whole),
        "gradlang score(loo), S=8, vmap per point": point_credit(m.step),
        "gradlang score(none), S=1": jax.jit(m.step_plain1),
        "gradlang score(none), S=8": jax.jit(m.step_plain8),
        "gradlang score(none), S=8, Monte Carlo KL": jax.jit(m.step_plain8_mc),
        LIKE_FOR_LIKE_DISC: point_credit(m.step_plain8_mc),
        NUMPYRO_DISC: np_step,
    }
    samples_of = {n: (1 if "S=1" in n else DISC_S) for n in variants}

    # (a) deterministic: the loss and gradient at fixed one-hot latents
    p = {"enc": args[0], "dec": args[1]}
    z = jax.nn.one_hot(jax.random.randint(jax.random.PRNGKey(7), (L, x.shape[0]), 0, C), C)
    exact = {"gradlang loss_at": check_close(
        "gradlang loss_at", jax.jit(m.loss_at)(*args, z),
        jax.jit(jax.value_and_grad(hand_disc_loss_at))(p, args[2], z))}
    want_mc = jax.jit(jax.value_and_grad(hand_disc_mc_loss_at))(p, args[2], z)
    exact["gradlang loss_at_mc (Monte Carlo KL)"] = check_close(
        "gradlang loss_at_mc", jax.jit(m.loss_at_mc)(*args, z), want_mc)
    exact["NumPyro log_density (Monte Carlo KL)"] = check_close(
        "NumPyro loss_at", np_at(p, args[2], z), want_mc)

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
    none8, loo8 = timing["gradlang score(none), S=8"], timing["gradlang score(loo), S=8"]
    pp = timing["gradlang score(loo), S=8, vmap per point"]
    same, numpyro = timing[LIKE_FOR_LIKE_DISC], timing[NUMPYRO_DISC]
    whole, ref_row = timing["gradlang score(loo), S=8, credit=whole"], timing[ref]
    summary = {
        "loo_variance_reduction_at_equal_samples": none8["enc_grad_total_var"] / loo8["enc_grad_total_var"],
        "per_point_vs_batch_credit_variance_reduction": loo8["enc_grad_total_var"] / pp["enc_grad_total_var"],
        "per_element_vs_whole_credit_variance_reduction":
            whole["enc_grad_total_var"] / loo8["enc_grad_total_var"],
        "batched_var_x_time_vs_ref": loo8["var_x_time"] / ref_row["var_x_time"],
        "batched_time_vs_ref": loo8["median_s"] / ref_row["median_s"],
        "numpyro_var_x_time_vs_batched": numpyro["var_x_time"] / loo8["var_x_time"],
        "like_for_like_time_vs_numpyro": same["median_s"] / numpyro["median_s"],
        "like_for_like_variance_vs_numpyro":
            same["enc_grad_total_var"] / numpyro["enc_grad_total_var"]}
    return {"variants": timing, "exact": exact, "var_keys": var_keys, "reference": ref,
            "summary": summary}


# ----------------------------------------------------------------------------- estimator comparison

CMP_S = 4          # samples per step of the comparison models (estimators_*.grad), as written there
BIN_K, CTRL_G = 16, 32  # binary latents; hidden units of RELAX's control variate r
SET_ESTIMATORS = ("enum", "swor", "unordered")
"""Estimators that evaluate several distinct values of the draw per sample: measured at one sample
per step (enum is then exact; swor and unordered take k = 4 values, as many evaluations as the
CMP_S samples of the others)."""
BASELINE_WARMUP = 50  # calls that start a moving-average baseline before it is measured
FLOAT32_FLOOR = 1e-5
"""Differences from the (float64) exact gradient below FLOAT32_FLOOR x its RMS, per coordinate,
are float32 rounding, not bias: what decides for an estimator without variance (enum differs
by at most 4e-6 x RMS on the single-categorical model)."""
NUMPYRO = f"NumPyro TraceGraph_ELBO, S={CMP_S}"
LIKE_FOR_LIKE = "with score(baseline=none), Monte Carlo KL"
"""The comparison's like-for-like row: NumPyro's estimator compiled by gradlang
(CompareModel.mc_src). Every other gradlang row differs from NumPyro's in the estimator as well:
the KL in closed form, a baseline or another estimator."""
WARM_SEED = 10
"""Parameters (the models' init with this seed) on which the moving averages and RELAX's control
variate are warmed before the variance is measured at the models' own parameters: in training
the state lags the parameters; warmed where it is measured, it would be fitted to them."""


def init_binary(x, seed: int = 3):
    """The binary VAE's parameters (estimators_binary.grad): BIN_K Bernoulli latents."""
    import numpy as np
    rng = np.random.default_rng(seed)
    enc = {"hidden": _dense(rng, D, H), "logits": _dense(rng, H, BIN_K)}
    dec = {"hidden": _dense(rng, BIN_K, H), "logits": _dense(rng, H, D)}
    dec["logits"]["b"] = _decoder_logits_bias(x)
    return enc, dec


def init_control(seed: int = 4) -> dict:
    """psi of estimators_binary.grad's r: a random hidden layer and a zero output layer, so that
    r = 0 at the start (RELAX starts as REBAR with eta = 1)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    return {"hidden": _dense(rng, BIN_K, CTRL_G),
            "out": {"w": np.zeros((CTRL_G, 1), np.float32), "b": np.zeros(1, np.float32)}}


def kl_half(q):
    """KL(Bernoulli(logits=q) || Bernoulli(1/2)), summed over the latents, per data point."""
    import jax
    import jax.numpy as jnp
    p = jax.nn.sigmoid(q)
    return jnp.sum(p * jax.nn.log_sigmoid(q) + (1 - p) * jax.nn.log_sigmoid(-q) + math.log(2.0), -1)


def pairwise_log_lik(logits, x):
    """log p(x_b | pixel logits_n) for every data point b and latent value n: [B, N]."""
    import jax
    import jax.numpy as jnp
    return x @ logits.T - jnp.sum(jax.nn.softplus(logits), -1)


def expected_neg_elbo(log_w, log_lik, kl):
    """-mean_b (sum_n q(n|x_b) log p(x_b|n) - KL_b): the -ELBO summed over every latent value n."""
    import jax.numpy as jnp
    return -jnp.mean(jnp.sum(jnp.exp(log_w) * log_lik, 1) - kl)


def exact_categorical(enc, dec, x):
    """The categorical VAE's -ELBO (closed-form KL) with the reconstruction term summed over all
    C^L joint values of the latents: exact, differentiable."""
    import itertools

    import jax
    import jax.numpy as jnp
    import numpy as np
    latents, _, classes = enc["w"].shape
    z = jax.nn.one_hot(np.array(list(itertools.product(range(classes), repeat=latents))), classes)
    q = disc_encode(enc, x)                                            # [L, B, C]
    log_w = jnp.einsum("lbc,nlc->bn", jax.nn.log_softmax(q, -1), z)     # [B, C^L]
    return expected_neg_elbo(log_w, pairwise_log_lik(disc_decode_blc(dec, z), x), kl_uniform(q))


def exact_binary(enc, dec, x):
    """The binary VAE's -ELBO (closed-form KL) summed over all 2^K latent values: exact."""
    import jax
    import numpy as np
    k = enc["logits"]["w"].shape[1]
    z = ((np.arange(2 ** k)[:, None] >> np.arange(k)) & 1).astype(x.dtype)  # [2^K, K]
    q = mlp(enc, x)                                                           # [B, K]
    log_w = jax.nn.log_sigmoid(q) @ z.T + jax.nn.log_sigmoid(-q) @ (1 - z).T  # [B, 2^K]
    return expected_neg_elbo(log_w, pairwise_log_lik(mlp(dec, z), x), kl_half(q))


def numpyro_binary(samples: int):
    """TraceGraph_ELBO(num_particles=samples).loss / B of the binary VAE (Bernoulli latents under
    the data plate: per-data-point credit, a Monte Carlo KL)."""
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import TraceGraph_ELBO

    def model(enc, dec, x):
        k = enc["logits"]["w"].shape[1]
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Bernoulli(logits=jnp.zeros(k)).expand([x.shape[0], k])
                               .to_event(1))
            numpyro.sample("x", dist.Bernoulli(logits=mlp(dec, z)).to_event(1), obs=x)

    def guide(enc, dec, x):
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("z", dist.Bernoulli(logits=mlp(enc, x)).to_event(1))

    return numpyro_step(TraceGraph_ELBO(num_particles=samples, vectorize_particles=True), model, guide)


@dataclass(frozen=True)
class CompareModel:
    """A discrete VAE of the comparison: its source, the source of NumPyro's estimator in gradlang
    (the like-for-like row), parameters `init(x, seed=...)`, exact loss and NumPyro step."""

    key: str
    title: str
    src: Path
    mc_src: Path
    init: Callable
    exact: Callable
    numpyro: Callable


COMPARE_MODELS = (
    CompareModel("categorical", f"categorical VAE: L={L} OneHotCategorical latents x C={C} classes",
                 MODELS / "estimators_categorical.grad", MODELS / "estimators_categorical_mc.grad",
                 init_discrete, exact_categorical, lambda s: numpyro_discrete(s)[0]),
    CompareModel("binary", f"binary VAE: K={BIN_K} Bernoulli latents",
                 MODELS / "estimators_binary.grad", MODELS / "estimators_binary_mc.grad",
                 init_binary, exact_binary, numpyro_binary),
    CompareModel("single", f"single categorical: one OneHotCategorical latent x C={C} classes",
                 MODELS / "estimators_onehot.grad", MODELS / "estimators_categorical_mc.grad",
                 lambda x, seed=2: init_discrete(x, seed, latents=1), exact_categorical,
                 lambda s: numpyro_discrete(s)[0]),
)


@dataclass(frozen=True)
class Variant:
    """One estimator of a model's draw: a jitted per-data-point step
    `call(enc, dec, x, key, state) -> (loss, grads, state)` with its initial state, or why it
    does not apply (the compiler's message)."""

    label: str
    call: Callable | None = None
    state: object = ()
    kind: str | None = None
    """What the state is: "baseline" (a moving average), "control" (RELAX's psi) or None."""
    evals: int = 0
    """Evaluations of the objective per data point and step."""
    biased: str | None = None
    """Why it is biased by design (None: meant to be unbiased)."""
    reason: str | None = None


def candidates(text: str) -> list:
    """`gradlang verify --compare`'s candidates (every estimator, the score function with each
    baseline, default options) without `auto` (the automatic rule: score with leave-one-out
    here); RELAX with the file's control variate `r` where it has one; and swor's normalized
    and built-in-baseline variants."""
    from gradlang.ops import Annotation
    from gradlang.verify.compare import site_candidates

    out = []
    for c in site_candidates():
        if c.name == "relax" and re.search(r"^fn r\(", text, re.M):
            c = Annotation("relax", (("control", "r"),))
        out += [] if c.name == "auto" else [c]
        if c.name == "swor":
            out += [Annotation("swor", (("k", 4), ("baseline", b))) for b in ("normalized", "builtin")]
    return out


def per_point(step, kind: str | None):
    """`step` vmapped over single data points (a batch of one each, one key each), the loss and
    gradients averaged: per-data-point credit. A moving-average baseline is kept per data point
    ([B]); a RELAX control variate's psi is shared, its per-point steps averaged (one step on
    the mean of the per-point second moments)."""
    import jax
    import jax.numpy as jnp

    def mean0(tree):
        return jax.tree.map(lambda a: jnp.mean(a, 0), tree)

    def call(enc, dec, x, key, s):
        keys = jax.random.split(key, x.shape[0])
        if kind is None:
            v, g = jax.vmap(step, in_axes=(None, None, 0, 0))(enc, dec, x[:, None], keys)
            return jnp.mean(v), mean0(g), s
        shared = kind == "control"
        v, g, new = jax.vmap(step, in_axes=(None, None, 0, None if shared else 0, 0))(
            enc, dec, x[:, None], s, keys)
        return jnp.mean(v), mean0(g), mean0(new) if shared else new

    return jax.jit(call)


def initial_state(kind: str | None, per_entry: bool = False):
    """A moving average of 0 per data point (per entry of its batch of one, when the compiler
    credits the draw per entry), RELAX's init_control(), or no state."""
    import numpy as np
    if kind == "baseline":
        return np.zeros((B, 1) if per_entry else B, np.float32)
    return init_control() if kind == "control" else ()


def biased_by_design(case, site) -> str | None:
    """What `gradlang verify` says (gumbel, st_gumbel, grpo), and swor's normalized weights."""
    if case.biased_by_design:
        return case.biased_by_design
    if site.estimator.name == "swor" and site.estimator.option("baseline") == "normalized":
        return "swor's normalized weights (self-normalized importance sampling)"
    return None


def compile_variants(src: Path) -> list[Variant]:
    """Every candidate estimator written on the draw of `src` (an override of its annotation,
    as `gradlang verify --compare` does; set estimators also at one sample): compiled and
    vmapped per data point, or not applicable with the compiler's message."""
    import gradlang
    from gradlang.diagnostics import SourceFile
    from gradlang.passes.overrides import Overrides
    from gradlang.verify.variants import Origin

    source = SourceFile(str(src), src.read_text())
    origin = Origin(source, src.parent, {})
    found = origin.compile(Overrides())
    assert not isinstance(found, str), found
    (site,), (export,) = found.facts.estimators, found.exports
    out = []
    for c in candidates(source.text):
        one = {export.span: 1} if c.name in SET_ESTIMATORS else {}
        compiled = origin.compile(Overrides(draws={site.span: c}, samples=one))
        out.append(Variant(f"with {c}", reason=compiled) if isinstance(compiled, str)
                   else measured_variant(gradlang.CompiledModule(compiled), f"with {c}"))
    return out


def measured_variant(compiled, label: str) -> Variant:
    """The variant of a compiled file with one export and one draw: its step vmapped per data
    point, its initial state, cost and bias by design."""
    from gradlang.verify.case import classify

    (export,), (chosen,) = compiled.ir.exports, compiled.ir.facts.estimators
    case, step = classify(compiled.ir, export), getattr(compiled, export.name)
    kind = step.signature.params[-2][0] if step.signature.stateful else None
    per_entry = kind == "baseline" and step.signature.params[-2][1].rank > 0
    return Variant(label, per_point(step, kind), initial_state(kind, per_entry), kind,
                   case.cost().forward, biased_by_design(case, chosen))


def like_for_like_variant(model: CompareModel) -> Variant:
    """NumPyro TraceGraph_ELBO's estimator written in gradlang (model.mc_src): no baseline, the KL
    by Monte Carlo at the draw, per-data-point credit: the row that compares the libraries."""
    import gradlang

    assert _source_samples(model.mc_src, "step") == CMP_S
    return measured_variant(gradlang.compile_file(model.mc_src), LIKE_FOR_LIKE)


def numpyro_variant(model: CompareModel) -> Variant:
    """NumPyro's TraceGraph_ELBO on the model, in the variants' calling convention."""
    import jax
    step = model.numpyro(CMP_S)
    return Variant(NUMPYRO, jax.jit(lambda enc, dec, x, key, s: (*step(enc, dec, x, key), s)),
                   evals=CMP_S)


def warm(v: Variant, args: tuple, relax_steps: int, seed: int) -> Variant:
    """The variant with its state after calls at `args`: BASELINE_WARMUP for a moving-average
    baseline (it settles), `relax_steps` for RELAX (its control variate is trained); stateless
    variants as they are. The caller passes parameters other than those where the variance is
    measured (WARM_SEED's), so that the state is not fitted to them."""
    import dataclasses

    import jax
    if v.kind is None:
        return v
    state = v.state
    calls = relax_steps if v.kind == "control" else BASELINE_WARMUP
    for key in jax.random.split(jax.random.PRNGKey(seed), calls):
        state = v.call(*args, key, state)[2]
    return dataclasses.replace(v, state=state)


def exact_reference(model: CompareModel, args: tuple) -> tuple[float, object]:
    """The exact -ELBO and flattened encoder gradient, computed in float64."""
    import jax
    import numpy as np
    with jax.enable_x64(True):
        args64 = jax.tree.map(lambda a: np.asarray(a, np.float64), args)
        loss, grad = jax.jit(jax.value_and_grad(model.exact))(*args64)
        return float(loss), flat(grad)


def against_exact(v: Variant, losses, enc_grads, exact_loss: float, exact_grad) -> dict:
    """Variance, and agreement with the exact gradient in standard errors (gradlang verify's
    per-coordinate statistics: |mean - exact| beyond a float32 floor over its standard error,
    z = 5). Not verify's chi-square test: the coordinates of one gradient are strongly
    correlated, so their chi-square has far fewer than K degrees of freedom and that test
    rejects unbiased estimators here."""
    import numpy as np
    from gradlang.verify.stats import BIASED, BY_DESIGN, CONSISTENT, Z, leaf_stats

    floor = np.full_like(exact_grad, FLOAT32_FLOOR * np.sqrt(np.mean(exact_grad ** 2)))
    st = leaf_stats("enc", exact_grad.shape, enc_grads, exact_grad, np.zeros_like(exact_grad),
                    floor, None, v.biased is not None)
    se = float(losses.std(ddof=1) / math.sqrt(len(losses)))
    verdict = CONSISTENT if st.max_z <= Z else BY_DESIGN if v.biased else BIASED
    return {"enc_grad_total_var": st.total_variance, "relative_diff": st.relative_bias,
            "noise_floor": st.noise_floor, "max_z": st.max_z, "cosine": st.cosine,
            "verdict": verdict, "loss_mean": float(losses.mean()), "loss_se": se,
            "loss_z_vs_exact": (float(losses.mean()) - exact_loss) / se if se > 0 else 0.0}


def rank_key(row: dict) -> tuple:
    """verify --compare's order: consistent first, then biased by design, then failing; by
    variance x time within each."""
    from gradlang.verify.stats import VERDICTS
    return VERDICTS.index(row["verdict"]), row["var_x_time"]


def run_compare_model(model: CompareModel, x, a) -> dict:
    """Every estimator of `model`'s draw and NumPyro: variance, bias against the exact gradient,
    interleaved time per step, variance x time."""
    import jax
    import numpy as np

    enc, dec = model.init(x)
    args = jax.device_put((enc, dec, x))
    exact_loss, exact_grad = exact_reference(model, args)
    variants = compile_variants(model.src) + [like_for_like_variant(model), numpyro_variant(model)]
    warm_args = jax.device_put((*model.init(x, seed=WARM_SEED), x))
    measured = [warm(v, warm_args, a.relax_steps, seed=3000 + i)
                for i, v in enumerate(variants) if v.call is not None]
    rows = {}
    for i, v in enumerate(measured):
        losses, parts = estimates(lambda key, s, v=v: v.call(*args, key, s), a.var_keys,
                                  seed=4000 + i, state=v.state)
        rows[v.label] = {"evals_per_point": v.evals, "biased_by_design": v.biased,
                         **against_exact(v, losses, parts["enc"], exact_loss, exact_grad)}
    timed = {v.label: (lambda *xs, v=v: v.call(*xs, v.state)) for v in measured}
    timing = interleaved(timed, (*args, jax.random.PRNGKey(0)), NUMPYRO, a.compare_rounds,
                         a.compare_calls, a.warmup)
    ref = rows[NUMPYRO]
    for n, r in rows.items():
        r.update(timing[n], var_x_time=r["enc_grad_total_var"] * timing[n]["median_s"])
    for r in rows.values():
        r["var_x_time_vs_numpyro"] = r["var_x_time"] / ref["var_x_time"]
    ranked = dict(sorted(rows.items(), key=lambda kv: rank_key(kv[1])))
    return {"title": model.title, "source": str(model.src.relative_to(ROOT)),
            "exact_loss": exact_loss, "exact_grad_norm": float(np.linalg.norm(exact_grad)),
            "rows": ranked, "not_applicable": {v.label: v.reason for v in variants if v.call is None}}


STORCHASTIC = (
    # (Storchastic's method, the paper, the gradlang annotation or None, a note)
    ("Reparameterization", "Kingma & Welling 2014", "reparam", "continuous draws only"),
    ("ScoreFunction", "Williams 1992", "score(baseline=none)", ""),
    ("ScoreFunction + MovingAverageBaseline", "Williams 1992", "score(baseline=ma)",
     "Storchastic's decay 0.95, gradlang's default 0.9 (measured)"),
    ("ScoreFunction + BatchAverageBaseline", "Kool et al. 2019; Mnih & Rezende 2016",
     "score(baseline=loo)", "the mean of the other samples: leave-one-out"),
    ("Infer", "(automatic choice)", "score(baseline=loo)",
     "gradlang's automatic rule at S = 4; Storchastic's Infer takes GumbelSoftmax for these draws"),
    ("Expect", "(exact enumeration)", "enum", ""),
    ("GumbelSoftmax", "Jang et al. 2017; Maddison et al. 2017", "gumbel", "biased by design"),
    ("GumbelSoftmax(straight_through=True)", "Bengio et al. 2013; Jang et al. 2017", "st_gumbel",
     "biased by design"),
    ("GumbelSparseMax", "Paulus et al. 2020", "gumbel_sparsemax", "biased by design"),
    ("GumbelEntmax", "Paulus et al. 2020; Peters et al. 2019", "gumbel_entmax", "biased by design"),
    ("REBAR", "Tucker et al. 2017", "rebar", "eta and tau fixed (the paper tunes them)"),
    ("RELAX", "Grathwohl et al. 2018", "relax(control=r)", "r: a tanh MLP of the relaxed draw"),
    ("LAX", "Grathwohl et al. 2018", "lax",
     "RELAX's estimator for continuous draws (a learned control variate without relaxation)"),
    ("ARM", "Yin & Zhou 2019", "arm", ""),
    ("DisARM", "Dong, Mnih & Tucker 2020", "disarm", ""),
    ("ScoreFunctionWOR(use_baseline=False, biased=False)", "Kool et al. 2019 (eq. 9)", "swor",
     "k = 4 distinct categories, Horvitz-Thompson weights p/q"),
    ("ScoreFunctionWOR(biased=True) (the default)", "Kool et al. 2019 (eq. 11)",
     "swor(k=4, baseline=normalized)",
     "close, not equal: gradlang normalizes by W = sum w, eq. 11 by W - w_s + p(s); biased"),
    ("ScoreFunctionWOR(biased=False)", "Kool et al. 2019 (eq. 10)", "swor(k=4, baseline=builtin)",
     "the unbiased built-in baseline"),
    ("UnorderedSetEstimator", "Kool et al. 2020", "unordered", "k = 4, its built-in baseline"),
    ("UnorderedSetGumbelSoftmax", "Kool et al. 2020", None, ""),
    ("RaoBlackwellSF", "Liu et al. 2019 (sum and sample)", "rao_blackwell",
     "k = 4 summed + 1 drawn, at S = 4 with leave-one-out"),
)
"""The gradient estimators of Storchastic (van Krieken et al. 2021), as `storch.method` exports
them (MovingAverageBaseline and BatchAverageBaseline from `storch.method.baseline`)."""
NOT_IN_STORCHASTIC = ("score(baseline=grpo)", "mvd", "score(baseline=vimco)", "dreg")


def storchastic_rows(models: dict) -> list[dict]:
    """Storchastic's estimators against gradlang's, with what this run measured for each model:
    var x time relative to NumPyro, 'n/a' (the compiler rejects it here) or 'not in gradlang'."""
    out = []
    for method, paper, annotation, note in STORCHASTIC:
        cells = {}
        for key, m in models.items():
            label = f"with {annotation}"
            if annotation is None:
                cells[key] = "not in gradlang"
            elif label in m["rows"]:
                r = m["rows"][label]
                cells[key] = ("exact" if r["enc_grad_total_var"] == 0 else
                              f"{r['var_x_time_vs_numpyro']:.3g}x"
                              + (" (biased)" if r["biased_by_design"] else ""))
            else:
                cells[key] = "n/a"
        out.append({"method": method, "paper": paper, "gradlang": annotation, "note": note,
                    "measured": cells})
    return out


def _g(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def print_compare_model(m: dict) -> None:
    print(f"\n#### {m['title']} ({m['source']}; exact -ELBO {m['exact_loss']:.4f}, "
          f"|exact encoder gradient| {m['exact_grad_norm']:.4g})\n")
    print("| rank | estimator | evals/point | total var | time/step | time vs NumPyro | var x time "
          "| vs NumPyro | rel. diff | noise | max z | E[loss] z | verdict |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for i, (n, r) in enumerate(m["rows"].items(), 1):
        print(f"| {i} | {n} | {r['evals_per_point']} | {r['enc_grad_total_var']:.4g} | "
              f"{r['median_s'] * 1e3:.2f} ms | {r['median_ratio']:.2f} | {r['var_x_time']:.3g} | "
              f"{r['var_x_time_vs_numpyro']:.3g} | {_g(r['relative_diff'])} | "
              f"{_g(r['noise_floor'])} | {r['max_z']:.2f} | {r['loss_z_vs_exact']:+.2f} | "
              f"{r['verdict']} |")
    print("\nnot applicable (the compiler's reason):")
    for n, why in m["not_applicable"].items():
        print(f"- `{n}`: {why}")


def print_compare(cmp: dict) -> None:
    print(f"\n3. Estimator comparison on discrete VAEs: every estimator the compiler accepts at the "
          f"draw, each step\n   vmapped over the {B} data points (per-data-point credit), S={CMP_S} "
          f"samples (enum, swor, unordered: one); encoder-gradient\n   variance over "
          f"{cmp['var_keys']} keys at fixed parameters; agreement with the exact gradient (summed "
          f"over every latent value);\n   time per step interleaved ({cmp['rounds']} rounds x "
          f"{cmp['calls']} calls); RELAX's control variate trained {cmp['relax_steps']} steps "
          f"first, moving averages {BASELINE_WARMUP},\n   both on other parameters (seed "
          f"{cmp['warm_seed']}'s). `{LIKE_FOR_LIKE}`: NumPyro's estimator in gradlang, the row "
          f"that compares the libraries;\n   the other rows compare estimators.\n"
          f"   rel. diff: |mean - exact| / |exact|; "
          f"noise: the standard error of that difference, sqrt(sum var / keys) / |exact| (rel. diff\n"
          f"   about noise: unbiased); max z: the largest per-coordinate |mean - exact| / SE "
          f"(verdict: consistent when <= 5); E[loss] z:\n   the mean loss against the exact "
          f"-ELBO, in standard errors (gumbel's forward is relaxed). vs NumPyro: ratios to its row.")
    if cmp["var_keys"] < 100:
        print(f"   (only {cmp['var_keys']} keys: the per-coordinate z of heavy-tailed estimators "
              f"exceeds 5 by chance; the verdicts need about 200)")
    for m in cmp["models"].values():
        print_compare_model(m)
    print("\n#### Storchastic's estimators (var x time relative to NumPyro TraceGraph_ELBO, "
          "measured above)\n")
    keys = list(cmp["models"])
    print(f"| Storchastic | paper | gradlang | {' | '.join(keys)} | note |")
    print("|---|---|---|" + "---|" * len(keys) + "---|")
    for r in cmp["storchastic"]:
        cells = " | ".join(r["measured"][k] for k in keys)
        print(f"| {r['method']} | {r['paper']} | {r['gradlang'] and '`' + r['gradlang'] + '`' or '-'} "
              f"| {cells} | {r['note']} |")
    print(f"\ngradlang estimators not in Storchastic: {', '.join(NOT_IN_STORCHASTIC)} "
          f"(grpo: biased by design; mvd: Normal and a Bernoulli draw with one element; vimco: "
          f"logmeanexp scopes; dreg: pathwise draws).")


def run_compare(x, a) -> dict:
    """Section 3 on every comparison model (`--quick`: the single-categorical one only)."""
    models = {m.key: run_compare_model(m, x, a) for m in COMPARE_MODELS
              if not a.quick or m.key == "single"}
    return {"samples": CMP_S, "var_keys": a.var_keys, "relax_steps": a.relax_steps,
            "rounds": a.compare_rounds, "calls": a.compare_calls,
            "baseline_warmup": BASELINE_WARMUP, "warm_seed": WARM_SEED, "models": models,
            "storchastic": storchastic_rows(models)}


# ----------------------------------------------------------------------------- report

def _time_table(rows: dict) -> None:
    w = max(len(n) for n in rows) + 2
    print(f"  {'variant':<{w}}{'median/step':>14}{'p25-p75':>22}{'ratio vs hand':>15}{'ratio p25-p75':>16}")
    for n, r in rows.items():
        iqr = f"{r['p25_s'] * 1e6:.0f}-{r['p75_s'] * 1e6:.0f} us"
        riqr = f"{r['ratio_p25']:.3f}-{r['ratio_p75']:.3f}"
        print(f"  {n:<{w}}{r['median_s'] * 1e6:>11.0f} us{iqr:>22}{r['median_ratio']:>15.3f}{riqr:>16}")


def print_gaussian(gauss: dict) -> None:
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


def print_discrete(disc: dict) -> None:
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
    loo8, pp = rows["gradlang score(loo), S=8"], rows["gradlang score(loo), S=8, vmap per point"]
    print("  (vs none,S=1: total variance of gradlang score(none), S=1 / this row's. vs ref: var x time\n"
          "   / the reference's, lower is better. z: expected loss vs the reference's, in standard\n"
          "   errors. chi2/coord: squared difference of the mean encoder gradient from the reference's,\n"
          "   per coordinate, in units of its variance: about 1 when both are unbiased. NumPyro's loss\n"
          "   uses a Monte Carlo KL: same expectation.)")
    s = disc["summary"]
    print(f"  like for like, {LIKE_FOR_LIKE_DISC} against {NUMPYRO_DISC} (the same\n"
          f"   estimator: no baseline, Monte Carlo KL, per-point credit): time x "
          f"{s['like_for_like_time_vs_numpyro']:.3g}, "
          f"variance x {s['like_for_like_variance_vs_numpyro']:.3g}")
    print(f"  gradlang score(loo), S={DISC_S} as written (batched, credit per data point found by the\n"
          f"   compiler) vs the hand-written per-point reference: var x time x "
          f"{s['batched_var_x_time_vs_ref']:.3g}, time x {s['batched_time_vs_ref']:.3g}; vs its "
          f"credit=whole: variance / {s['per_element_vs_whole_credit_variance_reduction']:.4g};\n"
          f"   {NUMPYRO_DISC}'s var x time / gradlang's: {s['numpyro_var_x_time_vs_batched']:.4g}")
    print(f"  gradlang leave-one-out at S={DISC_S}: variance / "
          f"{disc['summary']['loo_variance_reduction_at_equal_samples']:.4g} vs no baseline at the "
          f"same S;\n  gradlang vmap per point vs batched (credit per point either way): variance / "
          f"{disc['summary']['per_point_vs_batch_credit_variance_reduction']:.4g}, var x time / "
          f"{loo8['var_x_time'] / pp['var_x_time']:.4g}")
    for n, c in disc["exact"].items():
        print(f"  ok at fixed one-hot latents: {n} vs hand-written: |loss diff| "
              f"{c['loss_abs_diff']:.1e}, max |grad diff| {c['grad_max_abs_diff']:.1e}")
    bad = [n for n, r in rows.items() if abs(r["loss_z_vs_ref"]) > 5]
    print(f"  expected losses agree within 5 standard errors: {'yes' if not bad else 'NO: ' + ', '.join(bad)}")


SECTIONS = ("gaussian", "discrete", "compare")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    timing_args(ap, 100, 10, 20, "a smoke test (about a minute): the comparison on the "
                                 "single-categorical model only (unless --sections says otherwise), "
                                 "4 rounds of 2 calls, 20 keys, 20 RELAX steps")
    ap.add_argument("--compare-rounds", type=int, default=40,
                    help="interleaved rounds of the comparison (section 3; default 40)")
    ap.add_argument("--compare-calls", type=int, default=5,
                    help="calls per timed sample in the comparison (default 5)")
    ap.add_argument("--var-keys", type=int, default=200,
                    help="independent keys for the discrete gradient variance (default 200)")
    ap.add_argument("--check-keys", type=int, default=400,
                    help="independent keys for the Gaussian expectation checks (default 400)")
    ap.add_argument("--relax-steps", type=int, default=1000,
                    help="steps that train RELAX's control variate before it is measured (default 1000)")
    ap.add_argument("--sections", default=None,
                    help=f"comma-separated sections to run (default {','.join(SECTIONS)}; with "
                         f"--quick, compare)")
    ap.add_argument("--partitionable-threefry", action="store_true",
                    help="keep JAX's default jax_threefry_partitionable=True (on CPU, draws of rank "
                         ">= 3 then compile and run 5-20x slower; see the docstring)")
    args = parse_timing_args(ap, argv)
    if args.quick:
        args.var_keys, args.check_keys, args.relax_steps = 20, 20, 20
        args.compare_rounds, args.compare_calls = args.rounds, args.calls
    sections = (args.sections or ("compare" if args.quick else ",".join(SECTIONS))).split(",")
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")

    import jax
    import numpyro

    jax.config.update("jax_threefry_partitionable", args.partitionable_threefry)
    t_start = time.perf_counter()
    info, line = machine()
    x, data_source = load_data()
    print(f"gradlang VI benchmark: VAE steps (loss and gradient, no optimizer update), B={B} D={D}")
    print(f"{line}, numpyro {numpyro.__version__}, "
          f"jax_threefry_partitionable={args.partitionable_threefry}")
    print(f"data: {data_source}; interleaved timing: {args.rounds} rounds x {args.calls} calls "
          f"per variant (section 3: {args.compare_rounds} x {args.compare_calls}), {args.warmup} "
          f"warm-up calls\n")
    result = {"dims": {"B": B, "D": D, "H": H, "Z": Z, "L": L, "C": C, "K": BIN_K},
              "samples": {"gaussian": GAUSS_S, "discrete": DISC_S, "compare": CMP_S},
              "rounds": args.rounds, "calls": args.calls, **info,
              "numpyro": numpyro.__version__, "data": data_source,
              "threefry_partitionable": args.partitionable_threefry}
    if "gaussian" in sections:
        result["gaussian"] = run_gaussian(x, args.rounds, args.calls, args.warmup, args.check_keys)
        print_gaussian(result["gaussian"])
    if "discrete" in sections:
        result["discrete"] = run_discrete(x, args.rounds, args.calls, args.warmup, args.var_keys)
        print_discrete(result["discrete"])
    if "compare" in sections:
        result["compare"] = run_compare(x, args)
        print_compare(result["compare"])
    result["wall_s"] = time.perf_counter() - t_start
    print(f"\ntotal wall time {result['wall_s']:.0f} s")
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
