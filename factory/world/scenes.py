"""Procedural scenes of the reference world, with exact labels.

A scene is 64x64 RGB: 1-12 real handwritten digits, 10-16 px each, in one
colour on a plain background of another. Every count is really placed (so
counts are uniform over 1-12): rejection sampling first, then a jittered grid
of 16 px cells when rejection cannot fit the digits with their 3 px gaps.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from ..masks import renumber
from . import digits as digit_pool
from .palette import PALETTE, WARM, allowed_pairs

SIZE = 64
MIN_COUNT, MAX_COUNT = 1, 12
MIN_GLYPH, MAX_GLYPH = 10, 16
GAP = 3  # px between the squares two digits are drawn in
CELL = 16  # the fallback grid's cell: 4x4 cells in 64x64
DENSITY_SIGMA = 1.5
REJECTION_TRIES = 400

CAPTION_TEMPLATES = (
    "{fg} handwritten digits on {a_bg} background",
    "a plain {bg} background with {fg} digits",
    "{fg} numbers written on {bg}",
    "handwritten {fg} numerals over {a_bg} background",
)


@dataclass
class Glyph:
    """One digit to draw: its square (top-left x, y and side) and handwriting."""

    x: int
    y: int
    size: int
    digit: int
    pool_index: int


@dataclass
class Scene:
    image: np.ndarray  # (64, 64, 3) uint8
    density: np.ndarray  # (64, 64) float32, sum == count
    points: list[list[float]]  # (x, y) centres, pixels
    boxes: list[list[int]]  # tight x0, y0, x1, y1 (exclusive) of each digit's ink
    digits: list[int]
    sizes: list[int]
    fg: str
    bg: str
    caption: str
    split: str
    extra: dict = field(default_factory=dict)
    # (64, 64) uint8 instance ids: 0 background, i where the i-th point's digit has ink (alpha > 0.5)
    mask: np.ndarray | None = None

    @property
    def count(self) -> int:
        return len(self.points)

    def labels(self) -> dict:
        """The JSON labels of DESIGN §3 that a scene knows exactly."""
        return {
            "count": self.count,
            "points": self.points,
            "boxes": self.boxes,
            "digits": self.digits,
            "sizes": self.sizes,
            "attributes": attributes(self.fg, self.bg, self.sizes),
        }


def attributes(fg: str, bg: str, sizes: list[int]) -> dict:
    """Attributes a pixel checker can verify: colours and their binary families."""
    luminance = float(np.dot(PALETTE[bg], (0.299, 0.587, 0.114)))
    return {
        "object_colour": fg,
        "background_colour": bg,
        "warm_objects": fg in WARM,
        "dark_background": luminance < 128,
        "large_objects": bool(sizes) and float(np.mean(sizes)) >= 13,
        "many_objects": len(sizes) >= 7,
    }


def rng_for(*parts) -> np.random.Generator:
    """A generator seeded from any parts (strings, ints): stable across runs and machines."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _rejection_layout(rng: np.random.Generator, count: int) -> list[tuple[int, int, int]] | None:
    placed: list[tuple[int, int, int]] = []
    for _ in range(REJECTION_TRIES):
        if len(placed) == count:
            break
        s = int(rng.integers(MIN_GLYPH, MAX_GLYPH + 1))
        x, y = (int(v) for v in rng.integers(0, SIZE - s + 1, size=2))
        if all(_apart((x, y, s), p) for p in placed):
            placed.append((x, y, s))
    return placed if len(placed) == count else None


def _apart(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    (ax, ay, as_), (bx, by, bs) = a, b
    return (
        ax + as_ + GAP <= bx or bx + bs + GAP <= ax or ay + as_ + GAP <= by or by + bs + GAP <= ay
    )


def _grid_layout(rng: np.random.Generator, count: int) -> list[tuple[int, int, int]]:
    # In a 16 px cell a digit of side s at offset o in [0, 16-s-GAP] stays at
    # least GAP px from its neighbours' digits whatever their offsets.
    cells = rng.permutation((SIZE // CELL) ** 2)[:count]
    out = []
    for c in sorted(cells.tolist()):
        s = int(rng.integers(MIN_GLYPH, CELL - GAP + 1))
        ox, oy = (int(v) for v in rng.integers(0, CELL - s - GAP + 1, size=2))
        out.append(((c % 4) * CELL + ox, (c // 4) * CELL + oy, s))
    return out


def layout(rng: np.random.Generator, count: int) -> list[tuple[int, int, int]]:
    """Squares (x, y, side) for ``count`` digits, pairwise at least GAP px apart."""
    if not MIN_COUNT <= count <= MAX_COUNT:
        raise ValueError(f"count must be in [{MIN_COUNT}, {MAX_COUNT}], got {count}")
    return _rejection_layout(rng, count) or _grid_layout(rng, count)


def density_map(points: list[list[float]], shape=(SIZE, SIZE), sigma=DENSITY_SIGMA) -> np.ndarray:
    """A Gaussian per point, each normalised over the image so the map sums to the count."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    out = np.zeros(shape, np.float64)
    for x, y in points:
        g = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
        out += g / g.sum()
    return out.astype(np.float32)


def draw(glyphs: list[Glyph], fg: str, bg: str, split: str):
    """Paint glyphs; returns the image, each glyph's tight ink box and centre, and the
    instance mask (id i + 1 where glyph i's alpha > 0.5, the pixels its box is made of)."""
    canvas = np.empty((SIZE, SIZE, 3), np.float32)
    canvas[:] = PALETTE[bg]
    colour = np.asarray(PALETTE[fg], np.float32)
    ids = np.zeros((SIZE, SIZE), np.int64)
    boxes, points = [], []
    for i, g in enumerate(glyphs):
        alpha = digit_pool.glyph(split, g.pool_index, g.size)
        # Clip to the image: a layout given by a caller may touch the border.
        x0, y0 = max(g.x, 0), max(g.y, 0)
        # (an empty window, not a negative one, for a glyph wholly outside)
        x1, y1 = max(min(g.x + g.size, SIZE), x0), max(min(g.y + g.size, SIZE), y0)
        a = alpha[y0 - g.y : y1 - g.y, x0 - g.x : x1 - g.x, None]
        region = canvas[y0:y1, x0:x1]
        canvas[y0:y1, x0:x1] = region * (1 - a) + colour * a
        ink = a[..., 0] > 0.5
        # Layouts keep digits apart, so no pixel is claimed twice; a caller's overlapping
        # layout gives a shared pixel to the digit drawn last, as the paint does.
        ids[y0:y1, x0:x1][ink] = i + 1
        ys, xs = np.nonzero(ink)
        if len(xs) == 0:  # a glyph clipped away entirely is not in the scene
            boxes.append(None)
            points.append(None)
            continue
        box = [x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1]
        boxes.append(box)
        points.append([(box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0])
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), boxes, points, ids


def caption_for(fg: str, bg: str, rng: np.random.Generator) -> str:
    template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
    article = "an" if bg[0] in "aeiou" else "a"
    return template.format(fg=fg, bg=bg, a_bg=f"{article} {bg}")


def scene_from_glyphs(glyphs: list[Glyph], fg: str, bg: str, split: str, caption: str) -> Scene:
    image, boxes, points, ids = draw(glyphs, fg, bg, split)
    kept = [i for i, b in enumerate(boxes) if b is not None]
    pts = [points[i] for i in kept]
    return Scene(
        image=image,
        density=density_map(pts),
        mask=renumber(ids, kept),  # ids follow the kept points, as every label does
        points=pts,
        boxes=[boxes[i] for i in kept],
        digits=[glyphs[i].digit for i in kept],
        sizes=[glyphs[i].size for i in kept],
        fg=fg,
        bg=bg,
        caption=caption,
        split=split,
    )


def random_glyphs(rng: np.random.Generator, squares, split: str, digits=None) -> list[Glyph]:
    """Handwriting for each square: a random scan of the split, of the given class if any."""
    images, classes = digit_pool.pool(split)
    out = []
    for i, (x, y, s) in enumerate(squares):
        if digits is not None:
            choices = digit_pool.indices_of_class(split, int(digits[i]))
            idx = int(choices[rng.integers(len(choices))])
        else:
            idx = int(rng.integers(len(images)))
        out.append(Glyph(x, y, s, int(classes[idx]), idx))
    return out


def make_scene(split: str, index: int, seed: int = 0, count: int | None = None) -> Scene:
    """Scene ``index`` of a split: the same arguments always give the same scene."""
    rng = rng_for("world", seed, split, index)
    n = int(rng.integers(MIN_COUNT, MAX_COUNT + 1)) if count is None else count
    pairs = allowed_pairs()
    fg, bg = pairs[int(rng.integers(len(pairs)))]
    glyphs = random_glyphs(rng, layout(rng, n), split)
    return scene_from_glyphs(glyphs, fg, bg, split, caption_for(fg, bg, rng))
