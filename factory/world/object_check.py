"""A model-free object check: does each labelled object show as one whole ink blob?

The pixel counter (:mod:`.pixel_counter`) counts ink components; a count can
match while two objects fused into one blob and a third broke in two. This
check matches the components to the label's points (and boxes, where the
label has them) one to one, the way a reader would:

- a component *holds* a labelled point when the point lies inside the
  component's box (grown by ``margin`` px: a digit's centre can sit in its
  own hole, as in a 0, or just off a thin stroke);
- a component that holds no point but overlaps a labelled object's box is a
  *fragment* of that object (a stroke broken off); one that overlaps none is
  *extra* (speckle, a spurious object);
- an object is *merged* when its component holds another object's point too,
  *split* when more than one component belongs to it, *missing* when none does.

A sample passes when every labelled object has exactly one component and
every component holds exactly one labelled point. Components are the pixel
counter's (ink after closing one-pixel breaks; the world keeps digits at
least 3 px apart, so closing never joins two real digits), so a passing
sample's component count is also the pixel counter's count.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage

from .pixel_counter import MIN_AREA, ink_mask

MARGIN = 2.0  # px a point may lie outside its component's box and still be held by it


@dataclass
class Component:
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) of the closed ink blob
    area: int


@dataclass
class ObjectCheck:
    """Per-sample result: counts of each failure kind and the verdict."""

    objects: int
    components: int
    matched: int  # objects with exactly one component that holds only their point
    merged: int  # objects whose component holds another object's point too
    split: int  # objects with more than one component
    missing: int  # objects with no component
    extra: int  # components that belong to no object
    passed: bool
    # Per object: the indices of its components (for the gallery and debugging).
    owners: list[list[int]] = field(default_factory=list, repr=False)

    def as_label(self) -> dict:
        """The JSON stored under ``checks.objects`` (``exact``: the count matches, for `inspect`)."""
        d = asdict(self)
        d.pop("owners")
        d["pass"] = d.pop("passed")
        d["exact"] = self.components == self.objects
        return d

    @property
    def reason(self) -> str:
        parts = [f"{n} {kind}" for kind, n in (("merged", self.merged), ("split", self.split),
                                               ("missing", self.missing), ("extra", self.extra)) if n]
        return (f"pixel object check: {', '.join(parts)} "
                f"({self.components} ink components for {self.objects} labelled objects)")


def ink_components(image: np.ndarray) -> tuple[np.ndarray, list[Component]]:
    """The pixel counter's components: labels image and (box, area) of each kept blob."""
    # Strokes of a small digit can break by a pixel; closing them with a 3x3
    # dilation never merges two digits that are >= 3 px apart.
    ink = ndimage.binary_dilation(ink_mask(image), structure=np.ones((3, 3)))
    labels, n = ndimage.label(ink, structure=np.ones((3, 3)))
    comps: list[Component] = []
    if n == 0:
        return labels, comps
    areas = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, n + 1))
    keep = np.zeros(n + 1, np.int32)
    for i, (sl, area) in enumerate(zip(ndimage.find_objects(labels), areas), start=1):
        if area >= MIN_AREA:
            comps.append(Component((sl[1].start, sl[0].start, sl[1].stop, sl[0].stop), int(area)))
            keep[i] = len(comps)
    return keep[labels], comps


def _holds(box, point, margin: float) -> bool:
    x0, y0, x1, y1 = box
    x, y = point
    return x0 - margin <= x <= x1 + margin and y0 - margin <= y <= y1 + margin


def _overlap(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0) * max(h, 0)


def check_objects(image: np.ndarray, points, boxes=None, margin: float = MARGIN) -> ObjectCheck:
    """Match the image's ink components to the labelled objects (see the module docstring).

    ``points`` are (x, y) pixel centres, one per object; ``boxes`` (x0, y0, x1, y1),
    when given, must be one per object, in the same order (exemplar boxes of a few
    objects only are not per-object labels: leave them out).
    """
    pts = np.asarray(points if points is not None else [], np.float64).reshape(-1, 2)
    if boxes is not None and len(boxes) != len(pts):
        boxes = None
    _, comps = ink_components(image)
    n = len(pts)
    holders = [[i for i in range(n) if _holds(c.box, pts[i], margin)] for c in comps]
    owners: list[list[int]] = [[] for _ in range(n)]
    extra = 0
    for j, (c, held) in enumerate(zip(comps, holders)):
        if held:
            for i in held:
                owners[i].append(j)
            continue
        # A blob that holds no point: a fragment of the object whose box it overlaps
        # most (grown by one pixel, as the closing grows the blob), else extra ink.
        if boxes is not None:
            grown = [(b[0] - 1, b[1] - 1, b[2] + 1, b[3] + 1) for b in boxes]
            ov = [_overlap(c.box, g) for g in grown]
            best = int(np.argmax(ov)) if ov else -1
            if best >= 0 and ov[best] > 0:
                owners[best].append(j)
                continue
        else:
            # Without boxes: a fragment lies within a digit's reach (half the largest
            # glyph) of the nearest point.
            cx, cy = (c.box[0] + c.box[2]) / 2, (c.box[1] + c.box[3]) / 2
            if n:
                d = np.hypot(pts[:, 0] - cx, pts[:, 1] - cy)
                if d.min() <= 8.0:
                    owners[int(d.argmin())].append(j)
                    continue
        extra += 1
    merged = sum(1 for i in range(n) if any(len(holders[j]) > 1 for j in owners[i]))
    split = sum(1 for i in range(n) if len(owners[i]) > 1)
    missing = sum(1 for i in range(n) if not owners[i])
    matched = sum(1 for i in range(n) if len(owners[i]) == 1 and holders[owners[i][0]] == [i])
    return ObjectCheck(
        objects=n, components=len(comps), matched=matched, merged=merged, split=split, missing=missing,
        extra=extra, passed=matched == n and extra == 0 and len(comps) == n, owners=owners,
    )
