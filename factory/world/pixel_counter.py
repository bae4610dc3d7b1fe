"""A model-free object counter: connected components of non-background ink.

It is the reference world's ground-truth check (the world is built so that it
counts 99 % of real scenes exactly) and a baseline for the learned counters.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

INK_DISTANCE = 60.0  # RGB distance from the background that counts as ink
MIN_AREA = 4  # px; smaller blobs are speckle, not digits


def background_colour(image: np.ndarray) -> np.ndarray:
    """The median of the border pixels: scenes keep a plain background at the edges."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.float32)
    return np.median(border, axis=0)


def ink_mask(image: np.ndarray) -> np.ndarray:
    """Pixels more than half-way from the background to the ink colour.

    Half the contrast, not a fixed distance: resampling blurs a digit's edge
    into a halo of mixed pixels that would otherwise bridge the gap between
    two digits.
    """
    dist = np.linalg.norm(image.astype(np.float32) - background_colour(image), axis=-1)
    ink_contrast = float(np.percentile(dist, 99.5))
    return dist > max(INK_DISTANCE, 0.5 * ink_contrast)


def count_objects(image: np.ndarray) -> int:
    # Strokes of a small digit can break by a pixel; digits are >= 3 px apart,
    # so closing one-pixel breaks (a 3x3 dilation) never merges two digits.
    ink = ndimage.binary_dilation(ink_mask(image), structure=np.ones((3, 3)))
    labels, n = ndimage.label(ink, structure=np.ones((3, 3)))
    if n == 0:
        return 0
    areas = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, n + 1))
    return int((areas >= MIN_AREA).sum())
