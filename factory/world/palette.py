"""Named colours of the reference world and the pairs that may share a scene.

A pair is allowed only when foreground and background are at least
``MIN_CONTRAST`` apart in RGB (Euclidean): with low-contrast pairs (yellow on
orange) a pixel counter cannot separate touching strokes from the background,
and the world's promise is that every count can be checked from pixels.
"""
from __future__ import annotations

import itertools

import numpy as np

MIN_CONTRAST = 120.0

PALETTE: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 180),
    "pink": (245, 150, 200),
    "brown": (120, 70, 30),
    "cyan": (60, 210, 230),
}

# Colour families give the attribute classifiers of later stages a binary,
# pixel-checkable attribute ("warm" vs "cool" objects).
WARM = frozenset({"red", "orange", "yellow", "pink", "brown"})


def contrast(a: str, b: str) -> float:
    return float(np.linalg.norm(np.subtract(PALETTE[a], PALETTE[b], dtype=float)))


def allowed_pairs() -> list[tuple[str, str]]:
    """All (foreground, background) pairs with enough contrast, in a fixed order."""
    return [
        (fg, bg)
        for fg, bg in itertools.permutations(PALETTE, 2)
        if contrast(fg, bg) >= MIN_CONTRAST
    ]


def colours_in(text: str) -> list[str]:
    """Palette names in the order they appear in ``text`` (word match)."""
    words = [w.strip(".,;:!?") for w in text.lower().split()]
    return [w for w in words if w in PALETTE]
