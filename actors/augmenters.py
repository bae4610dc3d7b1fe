"""Classic label-preserving augmentations: flip, crop, resize, colour jitter.

Each transforms the density map, points, boxes and instance mask with the
image, so the count (the density's sum) and every position stay exact; the
mask moves by nearest neighbour, so its ids never blend. Crops are chosen to
contain every object's box and mask pixels (without a mask, every point with
an exemplar's size around it), so no object is cut, the count cannot change
and every mask id keeps naming the same point. ``resize`` brings any image
(an FSC147 one is 384 px high, of its own width) to size x size: each axis is
scaled by its own factor, and points and boxes with it.
"""
from __future__ import annotations

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from factory.masks import extent, resize_mask
from factory.sample import Sample
from factory.stage import Resources, Stage, register


class AugmentParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hflip: float = Field(0.5, ge=0, le=1, description="probability of a horizontal flip")
    vflip: float = Field(0.0, ge=0, le=1, description="probability of a vertical flip")
    crop: float = Field(1.0, gt=0, le=1, description="smallest crop side as a fraction of the image (1 = no crop)")
    resize: int | None = Field(None, gt=0, description="output side in pixels (None keeps the size)")
    colour_jitter: float = Field(0.0, ge=0, le=0.5, description="max relative change of brightness and contrast")


def _flip(sample: Sample, horizontal: bool) -> None:
    """Mirror the image, density and mask, and every point and box with them."""
    h, w = sample.image.shape[:2]
    axis = 1 if horizontal else 0  # numpy axis: columns for a horizontal flip
    sample.image = np.ascontiguousarray(np.flip(sample.image, axis=axis))
    if sample.density is not None:
        sample.density = np.ascontiguousarray(np.flip(sample.density, axis=axis))
    if sample.mask is not None:
        sample.mask = np.ascontiguousarray(np.flip(sample.mask, axis=axis))
    m = sample.meta
    if horizontal:
        m["points"] = [[w - x, y] for x, y in m.get("points", [])]
        m["boxes"] = [[w - b[2], b[1], w - b[0], b[3]] for b in m.get("boxes", [])]
    else:
        m["points"] = [[x, h - y] for x, y in m.get("points", [])]
        m["boxes"] = [[b[0], h - b[3], b[2], h - b[1]] for b in m.get("boxes", [])]


def _crop_window(rng, h, w, scale, boxes) -> tuple[int, int, int, int]:
    ch, cw = max(1, round(h * scale)), max(1, round(w * scale))
    if boxes:
        b = np.asarray(boxes, dtype=float)
        x0, y0 = int(np.floor(b[:, 0].min())), int(np.floor(b[:, 1].min()))
        x1, y1 = int(np.ceil(b[:, 2].max())), int(np.ceil(b[:, 3].max()))
    else:
        x0, y0, x1, y1 = w, h, 0, 0
    cw, ch = max(cw, x1 - x0), max(ch, y1 - y0)
    # The window must contain [x0, x1): its left edge lies in [x1 - cw, x0].
    lo_x, hi_x = max(0, x1 - cw), min(x0, w - cw) if boxes else w - cw
    lo_y, hi_y = max(0, y1 - ch), min(y0, h - ch) if boxes else h - ch
    left = int(rng.integers(lo_x, max(lo_x, hi_x) + 1))
    top = int(rng.integers(lo_y, max(lo_y, hi_y) + 1))
    return left, top, cw, ch


def _kept_extents(sample: Sample) -> list:
    """What a crop must keep whole: every box, the extent of the mask's objects (boxes may be a
    few exemplars, as in FSC147; the mask names every object it has), and, without a mask, every
    point with half an exemplar around it (FSC147's exemplars say how large its objects are), so
    no object is cut and the density mass a crop keeps is every object's."""
    boxes = list(sample.meta.get("boxes", []))
    around = extent(sample.mask) if sample.mask is not None else None
    kept = boxes + [around] if around else boxes
    points = sample.meta.get("points", [])
    if sample.mask is None and points and sample.image is not None:
        h, w = sample.image.shape[:2]
        b = np.asarray(boxes, dtype=float).reshape(-1, 4)
        hw = float(np.mean(b[:, 2] - b[:, 0])) / 2 if len(b) else 0.0
        hh = float(np.mean(b[:, 3] - b[:, 1])) / 2 if len(b) else 0.0
        kept += [[max(0.0, x - hw), max(0.0, y - hh), min(float(w), x + hw), min(float(h), y + hh)]
                 for x, y in points]
    return kept


def resize_density(density: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize to (height, width) that keeps the map's sum (the count)."""
    if density.shape == tuple(size):
        return density.astype(np.float32)
    total = float(density.sum())
    d = Image.fromarray(density.astype(np.float32), mode="F").resize((size[1], size[0]), Image.BILINEAR)
    return _keep_mass(np.asarray(d), total)


def _keep_mass(density: np.ndarray, total: float) -> np.ndarray:
    s = float(density.sum())
    return (density * (total / s)).astype(np.float32) if s > 0 else density.astype(np.float32)


@register
class LabelPreservingAugmenter(Stage):
    name = "augment"
    Params = AugmentParams
    resources = Resources(num_cpus=0.25)
    batch_size = 64

    def process_one(self, sample: Sample, rng: np.random.Generator) -> None:
        p = self.params
        done: dict = {}
        if rng.random() < p.hflip:
            _flip(sample, horizontal=True)
            done["hflip"] = True
        if rng.random() < p.vflip:
            _flip(sample, horizontal=False)
            done["vflip"] = True
        if p.crop < 1:
            done["crop"] = self._crop(sample, rng, float(rng.uniform(p.crop, 1.0)))
        if p.resize and sample.image.shape[:2] != (p.resize, p.resize):
            self._resize(sample, p.resize)
            done["resize"] = p.resize
        if p.colour_jitter > 0:
            b, c = (float(v) for v in rng.uniform(1 - p.colour_jitter, 1 + p.colour_jitter, size=2))
            img = sample.image.astype(np.float32)
            mean = img.mean(axis=(0, 1), keepdims=True)
            sample.image = np.clip(np.rint(((img - mean) * c + mean) * b), 0, 255).astype(np.uint8)
            done["brightness"], done["contrast"] = round(b, 4), round(c, 4)
        sample.add_op("augment", **done)

    def _crop(self, sample: Sample, rng, scale: float) -> list[int]:
        h, w = sample.image.shape[:2]
        left, top, cw, ch = _crop_window(rng, h, w, scale, _kept_extents(sample))
        sample.image = np.ascontiguousarray(sample.image[top : top + ch, left : left + cw])
        if sample.density is not None:
            total = float(sample.density.sum())
            sample.density = _keep_mass(sample.density[top : top + ch, left : left + cw], total)
        if sample.mask is not None:
            sample.mask = np.ascontiguousarray(sample.mask[top : top + ch, left : left + cw])
        m = sample.meta
        m["points"] = [[p[0] - left, p[1] - top] for p in m.get("points", [])]
        m["boxes"] = [[b[0] - left, b[1] - top, b[2] - left, b[3] - top] for b in m.get("boxes", [])]
        return [left, top, left + cw, top + ch]

    def _resize(self, sample: Sample, size: int) -> None:
        h, w = sample.image.shape[:2]
        sx, sy = size / w, size / h
        sample.image = np.asarray(Image.fromarray(sample.image).resize((size, size), Image.BILINEAR))
        if sample.density is not None:
            sample.density = resize_density(sample.density, (size, size))
        if sample.mask is not None:
            sample.mask = resize_mask(sample.mask, (size, size))
        m = sample.meta
        m["points"] = [[round(p[0] * sx, 3), round(p[1] * sy, 3)] for p in m.get("points", [])]
        m["boxes"] = [[round(b[0] * sx, 3), round(b[1] * sy, 3), round(b[2] * sx, 3), round(b[3] * sy, 3)]
                      for b in m.get("boxes", [])]
