"""Train the digit classifier on crops of real scenes (``factory train digits``).

Positives are every object of train-pool scenes, cropped around its box with
small jitter in centre and scale, mild blur and noise (generated objects are
slightly soft). Negatives, the *not a digit* class, are what a reader should
refuse to call a digit: a crop shifted half a digit off its object, two
neighbouring digits in one crop, and a digit blurred into a blob.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..models.digit_classifier import CONFIDENT, MARGIN, NOT_A_DIGIT, DigitClassifier, crop_square, ink_map
from ..world.scenes import make_scene
from .diffusion import _log
from .loop import TrainConfig, train

NEGATIVE_SHARE = 0.3


@dataclass
class Objects:
    inks: np.ndarray  # (S, 64, 64) ink maps of the scenes
    scene: np.ndarray  # (n,) scene of each object
    boxes: np.ndarray  # (n, 4)
    digits: np.ndarray  # (n,)

    def __len__(self) -> int:
        return len(self.digits)


def load_objects(split: str, n: int, start: int = 0) -> Objects:
    scenes = [make_scene(split, i) for i in range(start, start + n)]
    inks = np.stack([ink_map(s.image) for s in scenes]).astype(np.float32)
    idx = [(k, b, d) for k, s in enumerate(scenes) for b, d in zip(s.boxes, s.digits)]
    return Objects(inks, np.array([k for k, _, _ in idx]), np.array([b for _, b, _ in idx], np.float32),
                   np.array([d for _, _, d in idx]))


def _geometry(box) -> tuple[float, float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, max(box[2] - box[0], box[3] - box[1]) + 2 * MARGIN


def positive(objs: Objects, i: int, rng: np.random.Generator, jitter: bool = True) -> np.ndarray:
    cx, cy, side = _geometry(objs.boxes[i])
    ink = objs.inks[objs.scene[i]]
    if not jitter:
        return crop_square(ink, cx, cy, side)
    cx, cy = cx + rng.uniform(-1.5, 1.5), cy + rng.uniform(-1.5, 1.5)
    side *= rng.uniform(0.85, 1.25)
    if rng.random() < 0.5:
        ink = ndimage.gaussian_filter(ink, rng.uniform(0.3, 1.0))
    return crop_square(ink, cx, cy, side)


def negative(objs: Objects, i: int, rng: np.random.Generator) -> np.ndarray:
    cx, cy, side = _geometry(objs.boxes[i])
    ink = objs.inks[objs.scene[i]]
    same = np.flatnonzero(objs.scene == objs.scene[i])
    others = [j for j in same if j != i]
    kind = rng.integers(3)
    if kind == 1 and others:  # two neighbours in one crop
        centres = np.array([_geometry(objs.boxes[j])[:2] for j in others])
        j = others[int(np.argmin(np.hypot(centres[:, 0] - cx, centres[:, 1] - cy)))]
        b = np.concatenate([objs.boxes[[i, j]].min(0)[:2], objs.boxes[[i, j]].max(0)[2:]])
        ux, uy, uside = _geometry(b)
        return crop_square(ink, ux, uy, uside)
    if kind == 2:  # a blob where a digit was
        return crop_square(ndimage.gaussian_filter(ink, rng.uniform(1.8, 3.0)), cx, cy, side)
    # Half a digit: the crop slides off its object (but not onto another one's centre).
    for _ in range(10):
        angle, shift = rng.uniform(0, 2 * np.pi), rng.uniform(0.45, 0.8) * side
        nx, ny = cx + shift * np.cos(angle), cy + shift * np.sin(angle)
        if all(np.hypot(*(np.array(_geometry(objs.boxes[j])[:2]) - (nx, ny))) > 0.6 * side for j in others):
            return crop_square(ink, nx, ny, side)
    return crop_square(ndimage.gaussian_filter(ink, 2.5), cx, cy, side)


def evaluate_digits(model: DigitClassifier, objs: Objects, rng: np.random.Generator | None = None) -> dict:
    rng = rng or np.random.default_rng(0)
    crops = np.stack([positive(objs, i, rng, jitter=False) for i in range(len(objs))])
    p = model.probabilities(crops)
    digit = p[:, :10].argmax(1)
    confident = p[np.arange(len(p)), digit] >= CONFIDENT
    neg = np.stack([negative(objs, i, rng) for i in range(0, len(objs), 3)])
    pn = model.probabilities(neg)
    return {"digit_accuracy": round(float(np.mean(digit == objs.digits)), 4),
            "legible": round(float(np.mean(confident)), 4),
            "accuracy_when_legible": round(float(np.mean((digit == objs.digits)[confident])), 4),
            "not_a_digit_recall": round(float(np.mean(pn.argmax(1) == NOT_A_DIGIT)), 4),
            "negatives_called_legible": round(float(np.mean(pn[:, :10].max(1) >= CONFIDENT)), 4)}


def train_digits(cfg: TrainConfig, data: str, folder: Path, batch: int = 128, test: str = "world:test:300") -> None:
    log = _log(cfg.out)
    torch.manual_seed(cfg.seed)
    model = DigitClassifier()
    split, n, start = _world_spec(data)
    objs = load_objects(split, n, start)
    t_split, t_n, t_start = _world_spec(test)
    held_out = load_objects(t_split, t_n, t_start)
    log(f"digits: {sum(p.numel() for p in model.parameters())} params, {len(objs)} objects in {n} {split} scenes, "
        f"{len(held_out)} test objects")

    def loss_fn(rng, step):
        idx = rng.integers(len(objs), size=batch)
        neg = rng.random(batch) < NEGATIVE_SHARE
        crops = np.stack([negative(objs, i, rng) if m else positive(objs, i, rng) for i, m in zip(idx, neg)])
        noise = rng.normal(0, rng.uniform(0, 0.05), crops.shape).astype(np.float32)
        x = torch.from_numpy(np.clip(crops + noise, 0, 1))
        y = torch.from_numpy(np.where(neg, NOT_A_DIGIT, objs.digits[idx])).long()
        return F.cross_entropy(model(x), y, label_smoothing=0.05)

    train(cfg, [model], loss_fn, evaluate=lambda step: evaluate_digits(model, held_out),
          export=lambda: model.save_pretrained(folder), log=log)
    log(f"saved {folder}")


def _world_spec(spec: str) -> tuple[str, int, int]:
    from ..errors import FactoryError

    parts = spec.split(":")
    try:
        if parts[0] != "world":
            raise ValueError
        return parts[1], int(parts[2]), int(parts[3]) if len(parts) > 3 else 0
    except (IndexError, ValueError):
        raise FactoryError(f"the digit classifier trains on reference-world scenes, which label every digit: "
                           f"write --data world:train:N[:START], not {spec!r}") from None
