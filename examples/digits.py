"""Shared by the VAE examples: the data set, an image grid for plots, per-image evaluation.

The data: scikit-learn's 8x8 handwritten digits, binarized. `sklearn.datasets.load_digits`
ships inside the scikit-learn package (1797 images of 8x8 pixels with gray levels 0..16, no
download). A pixel is 1 where its gray level is above 7.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def load_binary_digits(seed: int = 0, test_fraction: float = 0.2):
    """(x_train, x_test, y_train, y_test): binary float32 images [N, 64] and int32 labels,
    split at random (fixed seed)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - the examples extra installs it
        raise SystemExit("the VAE examples need scikit-learn for their data set: "
                         "pip install -e '.[examples]' (or pip install scikit-learn)") from e
    digits = load_digits()
    x = (digits.images.reshape(len(digits.images), -1) > 7).astype(np.float32)
    y = digits.target.astype(np.int32)
    perm = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    test, train = perm[:n_test], perm[n_test:]
    return x[train], x[test], y[train], y[test]


def tile(images: np.ndarray, cols: int, side: int = 8) -> np.ndarray:
    """Images [N, side * side] laid out on a grid `cols` wide, one NaN pixel between them (show
    it with a colormap whose `set_bad` color marks the gaps)."""
    rows = -(-len(images) // cols)
    grid = np.full((rows * (side + 1) - 1, cols * (side + 1) - 1), np.nan)
    for n, img in enumerate(images):
        r, c = divmod(n, cols)
        grid[r * (side + 1):r * (side + 1) + side, c * (side + 1):c * (side + 1) + side] = (
            np.asarray(img).reshape(side, side))
    return grid


class PerImageMean:
    """The mean over images of `fn(*params, x_i[None], key_i)`, one image (and one key) at a
    time, evaluated under `jax.jit` in chunks of a fixed size (the last one padded and masked):
    one compilation serves data sets of any size. `fn` is an export that takes a batch and a
    key last; `extra` arguments go between the images and the key."""

    def __init__(self, fn, chunk: int = 128):
        self.chunk = chunk

        def total(params, x, mask, keys, *extra):
            values = jax.vmap(lambda xi, k: fn(*params, xi[None], *extra, k))(x, keys)
            return jnp.sum(jnp.where(mask, values, 0.0))

        self._total = jax.jit(total)

    def __call__(self, params, x, key, *extra) -> float:
        n = len(x)
        padded = n + (-n % self.chunk)
        x = jnp.concatenate([jnp.asarray(x), jnp.zeros((padded - n,) + x.shape[1:], x.dtype)])
        mask = jnp.arange(padded) < n
        keys = jax.random.split(key, padded)
        total = sum(self._total(params, x[i:i + self.chunk], mask[i:i + self.chunk],
                                keys[i:i + self.chunk], *extra)
                    for i in range(0, padded, self.chunk))
        return float(total) / n
