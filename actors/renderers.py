"""Generators that draw a scene from a layout (points) and a caption.

``LayoutRenderer`` is the reference world's renderer used as a generator:
given where the objects are and a caption naming the colours, it draws the
scene with fresh handwriting, so its labels (count, points, boxes, density,
instance mask) hold exactly by construction. It is the model-free counterpart of the
density-conditioned diffusion generator.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from factory.sample import Sample
from factory.stage import Resources, Stage, register
from factory.world import digits as digit_pool
from factory.world import scenes
from factory.world.palette import PALETTE

_BG_BEFORE = {"on", "over", "plain"}


def parse_colours(caption: str) -> tuple[str | None, str | None]:
    """(object colour, background colour) named in a caption, or None where not named.

    A colour word followed by "background" or preceded by on/over/plain is the
    background; another colour word is the objects'.
    """
    words = [w.strip(".,;:!?").lower() for w in caption.split()]
    fg = bg = None
    for i, w in enumerate(words):
        if w not in PALETTE:
            continue
        nxt = words[i + 1] if i + 1 < len(words) else ""
        prev = words[i - 1] if i else ""
        if nxt == "background" or prev in _BG_BEFORE:
            bg = bg or w
        else:
            fg = fg or w
    return fg, bg


class RenderParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pool: Literal["train", "test"] = "train"
    keep_digits: bool = True  # draw the same digit classes as the source (else random)


@register
class LayoutRenderer(Stage):
    name = "render"
    Params = RenderParams
    resources = Resources(num_cpus=0.25)
    batch_size = 64

    def process_one(self, sample: Sample, rng: np.random.Generator) -> None:
        meta = sample.meta
        points = meta.get("points")
        if not points:
            raise ValueError("the source has no points: the renderer draws a layout, give a counting source")
        attrs = meta.get("attributes", {})
        fg, bg = parse_colours(meta.get("caption", ""))
        fg, bg = fg or attrs.get("object_colour"), bg or attrs.get("background_colour")
        if not fg or not bg or fg == bg:
            raise ValueError(f"caption {meta.get('caption')!r} names no distinct object and background colours")
        digits = meta.get("digits") if self.params.keep_digits and len(meta.get("digits", [])) == len(points) else None
        glyphs = place_glyphs(rng, points, _sizes(meta), digits, self.params.pool)
        scene = scenes.scene_from_glyphs(glyphs, fg, bg, self.params.pool, meta.get("caption", ""))
        sample.image, sample.density, sample.mask = scene.image, scene.density, scene.mask
        sample.meta.update(scene.labels())
        sample.add_op("render", renderer="reference-world", pool=self.params.pool, object_colour=fg,
                      background_colour=bg, keep_digits=self.params.keep_digits)


def _ink_box(alpha: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(alpha > 0.5)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def place_glyphs(rng, points, sizes, digits, split: str, tries: int = 8) -> list[scenes.Glyph]:
    """Fresh handwriting with each digit's ink centred on its point.

    New handwriting has other extents than the source's, so two neighbours can
    come closer than the world's 3 px gap, which a pixel counter cannot
    separate; a few redraws of the handwriting keep scenes checkable.
    """
    images, classes = digit_pool.pool(split)
    placed: list[tuple[int, int, int, int]] = []
    out = []
    for i, ((x, y), s) in enumerate(zip(points, sizes)):
        choices = digit_pool.indices_of_class(split, int(digits[i])) if digits is not None else np.arange(len(images))
        for _ in range(tries):
            idx = int(choices[rng.integers(len(choices))])
            ix0, iy0, ix1, iy1 = _ink_box(digit_pool.glyph(split, idx, s))
            gx, gy = int(round(x - (ix0 + ix1) / 2)), int(round(y - (iy0 + iy1) / 2))
            ink = (gx + ix0, gy + iy0, gx + ix1, gy + iy1)
            if all(_apart(ink, p) for p in placed):
                break
        placed.append(ink)
        out.append(scenes.Glyph(gx, gy, s, int(classes[idx]), idx))
    return out


def _apart(a, b) -> bool:
    gap = scenes.GAP
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _sizes(meta: dict) -> list[int]:
    """Square side per point: the source's own, or from its boxes, or the world's median."""
    n = len(meta["points"])
    if len(meta.get("sizes", [])) == n:
        return [int(s) for s in meta["sizes"]]
    boxes = meta.get("boxes", [])
    if len(boxes) == n:
        return [int(np.clip(max(b[2] - b[0], b[3] - b[1]) + 2, scenes.MIN_GLYPH, scenes.MAX_GLYPH)) for b in boxes]
    return [13] * n
