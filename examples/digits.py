"""The data set of the VAE examples: scikit-learn's 8x8 handwritten digits, binarized.

`sklearn.datasets.load_digits` ships inside the scikit-learn package (1797 images of 8x8
pixels with gray levels 0..16, no download). A pixel is 1 where its gray level is above 7.
"""

from __future__ import annotations

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
