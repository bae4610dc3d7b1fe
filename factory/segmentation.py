"""From a foreground mask to instance masks, and how far a predicted mask is from the truth.

A mask model (ReDO, :mod:`factory.models.redo`, or the object-slot model,
:mod:`factory.models.slots`, whose objects' alphas cover the foreground) says *which* pixels are object, not *which
object*: the labelled points do that. :func:`split_instances` grows each point's object over
the foreground it sits on (a watershed seeded at the points), so ids follow the points, as
every mask's ids do (:mod:`factory.masks`). The metrics are ReDO's (pixel accuracy and IoU of
the foreground) plus the per-object IoU after the split, against the renderer's exact masks.

:func:`border_colour_foreground` is the model-free reference: ink is what lies more than half
the ink contrast away from the border's colour (the pixel counter's rule). The reference world
is built so that this rule counts objects (DESIGN §4), so on real scenes it is close to exact;
a learned mask is measured against it, and is worth having where the rule's premise (a plain
background at the border) does not hold.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

MAKE_MASK_MODEL = ("train one with `factory train redo` (ReDO) or `factory train slots` (the object-slot model, "
                   "whose objects' alphas are its masks)")


def mask_model_config(folder) -> dict:
    """The config of a mask-model folder: a ReDO mask network (kind redo-mask) or an object-slot
    scene model (kind slot-scene); any other folder is refused with how to make one."""
    import json
    from pathlib import Path

    from .errors import FactoryError
    from .models import redo, slots
    from .models.folder import CONFIG

    cfg_path = Path(folder) / CONFIG
    kind = json.loads(cfg_path.read_text()).get("kind") if cfg_path.is_file() else None
    if kind == slots.KIND:
        return slots.read_config(folder)
    if kind == redo.KIND or kind is None:  # a missing config gets ReDO's message
        return redo.read_config(folder)
    raise FactoryError(f"{folder} holds a {kind} model, not a mask model: {MAKE_MASK_MODEL}")


def load_mask_model(folder, device: str = "cpu"):
    """A mask model with ``image_size`` and ``foreground(images) -> (B, H, W) float32``."""
    from .models import redo, slots

    if mask_model_config(folder)["kind"] == slots.KIND:
        return slots.SlotSceneModel.from_pretrained(folder, device)
    return redo.MaskNetwork.from_pretrained(folder, device)


# A labelled point may sit off its object's ink (the hole of a 0, beside a thin stroke): it
# seeds the nearest foreground pixel within this many px; farther, its object is empty.
SNAP = 6.0
# Foreground no seed reaches (a stroke broken off its digit) joins the nearest object within
# this many px; foreground farther from every object is no labelled object and stays background.
REACH = 4.0


def border_colour_foreground(image: np.ndarray) -> np.ndarray:
    """(H, W) float32 in [0, 1]: 1 where the pixel counter calls a pixel ink (distance from the
    border's median colour above half the ink contrast). Binary, so it thresholds like a probability."""
    from .world.pixel_counter import ink_mask

    return ink_mask(image).astype(np.float32)


def split_instances(foreground: np.ndarray, points, probability: np.ndarray | None = None,
                    snap: float = SNAP, reach: float = REACH) -> np.ndarray:
    """Instance ids (H, W) int64: 0 background, i + 1 on the foreground that belongs to points[i].

    Each point seeds the foreground pixel nearest to it (within ``snap`` px); the seeds then
    flood the foreground, strongest pixels first (a watershed on 1 - ``probability``), so two
    objects fused into one blob are cut where the foreground is weakest between them, and a
    point never takes pixels it cannot reach through foreground. Foreground no seed reached
    joins the nearest object within ``reach`` px.
    """
    from skimage.segmentation import watershed

    fg = np.asarray(foreground, bool)
    h, w = fg.shape
    ids = np.zeros((h, w), np.int64)
    if not fg.any() or not len(points):
        return ids
    ys, xs = np.nonzero(fg)
    markers = np.zeros((h, w), np.int64)
    for i, (px, py) in enumerate(points, start=1):
        # Points are in pixel coordinates (a pixel's centre at +0.5): the nearest foreground pixel,
        # unless another point already seeded it (two points on one pixel: the first keeps it).
        d = np.hypot(xs + 0.5 - px, ys + 0.5 - py)
        for j in np.argsort(d)[:4]:
            if d[j] > snap:
                break
            if markers[ys[j], xs[j]] == 0:
                markers[ys[j], xs[j]] = i
                break
    if not markers.any():
        return ids
    elevation = 1.0 - (np.asarray(probability, np.float32) if probability is not None else fg.astype(np.float32))
    ids = watershed(elevation, markers, mask=fg, connectivity=2)
    leftover = fg & (ids == 0)
    if leftover.any():
        dist, (iy, ix) = ndimage.distance_transform_edt(ids == 0, return_indices=True)
        near = leftover & (dist <= reach)
        ids[near] = ids[iy[near], ix[near]]
    return ids.astype(np.int64)


def foreground_scores(pred: np.ndarray, truth: np.ndarray) -> dict:
    """ReDO's measures over a batch of (N, H, W) boolean masks: pixel accuracy and IoU of the
    foreground, each the mean over images (an image with no foreground in either counts IoU 1)."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    acc = (pred == truth).mean(axis=(1, 2))
    inter = (pred & truth).sum(axis=(1, 2))
    union = (pred | truth).sum(axis=(1, 2))
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return {"accuracy": round(float(acc.mean()), 4), "iou": round(float(iou.mean()), 4),
            "foreground_share": round(float(pred.mean()), 4)}


def instance_ious(pred_ids: np.ndarray, true_ids: np.ndarray, n: int) -> list[float]:
    """IoU of each object 1..n of one image between two instance masks."""
    out = []
    for i in range(1, n + 1):
        p, t = pred_ids == i, true_ids == i
        union = (p | t).sum()
        out.append(float((p & t).sum() / union) if union else 1.0)
    return out


def points_on_ink(ids: np.ndarray, ink: np.ndarray, n: int, min_share: float = 0.5) -> list[bool]:
    """Per labelled object 1..n: its instance mask is non-empty and at least ``min_share`` of it
    lies on ``ink`` (a boolean map of the image's ink from pixels)."""
    out = []
    for i in range(1, n + 1):
        m = ids == i
        out.append(bool(m.any() and (ink[m].mean() >= min_share)))
    return out
