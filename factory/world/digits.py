"""Real handwritten digits (scikit-learn's ``load_digits``), split by index.

The 1,797 8x8 scans are split by their index into a train pool and a test
pool, so test scenes use handwriting that no model saw in training.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

TRAIN_FRACTION = 0.75
SPLITS = ("train", "test")


@lru_cache(maxsize=None)
def _all_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


@lru_cache(maxsize=None)
def pool(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images in [0,1] of shape (N, 8, 8), classes) of one split's handwriting."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    images, classes = _all_digits()
    cut = int(len(images) * TRAIN_FRACTION)
    sl = slice(0, cut) if split == "train" else slice(cut, None)
    return images[sl], classes[sl]


def glyph(split: str, index: int, size: int) -> np.ndarray:
    """Alpha mask (size x size, float32 in [0,1]) of one handwritten digit.

    Bicubic upsampling of an 8x8 scan leaves soft, blurry strokes; a
    contrast stretch around mid-grey makes them crisp enough that the
    strokes of one digit stay one connected component for a pixel counter.
    """
    img = pool(split)[0][index]
    up = Image.fromarray(img, mode="F").resize((size, size), Image.BICUBIC)
    alpha = (np.asarray(up, dtype=np.float32) - 0.3) / 0.35
    return np.clip(alpha, 0.0, 1.0)


def indices_of_class(split: str, digit: int) -> np.ndarray:
    return np.flatnonzero(pool(split)[1] == digit)
