"""Which digit is each labelled object? A small classifier of object crops.

The world labels every object's digit, so two questions become measurable:
does an inversion or an edit keep each object's identity (its digit), and
does a generated object read as a digit at all (legibility)? Both need a
reader that never saw a generator: this classifier is trained on crops of
real train-pool scenes only (:mod:`factory.train.digits`).

A crop is colour-free: the ink map (distance from the background colour,
scaled by the image's ink contrast) in a square around the object, resized
to 16 x 16, so the same digit reads the same in any colour pair. Besides the
ten digits it has a *not a digit* class, trained on what a generator gets
wrong: half a digit, two digits in one crop, a digit blurred into a blob.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from factory.errors import FactoryError
from factory.models.folder import WEIGHTS, read_kind_config, resolve_model_folder, save_model_folder
from factory.world.pixel_counter import background_colour

KIND = "digit-classifier"
CROP = 16  # px side of a crop fed to the network
MARGIN = 2  # px around the object's box in the source image
POINT_SIDE = 18  # px side of a crop around a point when the label has no box
NOT_A_DIGIT = 10
# An object is legible when its top digit holds at least half the probability, more than every
# other reading together ("not a digit" included): 99.3 % of real test-pool objects are, and
# none of the negatives (shifted, paired, blurred crops) of the training recipe.
CONFIDENT = 0.5


def ink_map(image: np.ndarray) -> np.ndarray:
    """(H, W) float32: 0 at the background colour, 1 at full ink contrast."""
    dist = np.linalg.norm(image.astype(np.float32) - background_colour(image), axis=-1)
    contrast = max(float(np.percentile(dist, 99.5)), 30.0)
    return np.clip(dist / contrast, 0, 1)


def crop_square(ink: np.ndarray, cx: float, cy: float, side: float) -> np.ndarray:
    """A side x side square of ``ink`` centred on (cx, cy), zero outside the image, resized to CROP."""
    h, w = ink.shape
    s = max(int(round(side)), 4)
    x0, y0 = int(round(cx - s / 2)), int(round(cy - s / 2))
    out = np.zeros((s, s), np.float32)
    xs, ys = max(x0, 0), max(y0, 0)
    xe, ye = min(x0 + s, w), min(y0 + s, h)
    if xe > xs and ye > ys:
        out[ys - y0: ye - y0, xs - x0: xe - x0] = ink[ys:ye, xs:xe]
    t = torch.from_numpy(out)[None, None]
    return nn.functional.interpolate(t, size=(CROP, CROP), mode="bilinear", antialias=True,
                                     align_corners=False)[0, 0].numpy()


def object_crops(image: np.ndarray, boxes=None, points=None) -> np.ndarray:
    """(n, CROP, CROP) crops of the labelled objects: around each box (grown by MARGIN, made
    square) when the label has boxes, else a POINT_SIDE square around each point."""
    ink = ink_map(image)
    if boxes is not None and len(boxes):
        out = [crop_square(ink, (b[0] + b[2]) / 2, (b[1] + b[3]) / 2, max(b[2] - b[0], b[3] - b[1]) + 2 * MARGIN)
               for b in boxes]
    elif points is not None and len(points):
        out = [crop_square(ink, x, y, POINT_SIDE) for x, y in points]
    else:
        return np.zeros((0, CROP, CROP), np.float32)
    return np.stack(out).astype(np.float32)


class DigitClassifier(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.config = {"kind": KIND, "width": width, "crop": CROP, "classes": 11}

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.ReLU(inplace=True)]

        self.net = nn.Sequential(
            *block(1, width), *block(width, width), nn.MaxPool2d(2),
            *block(width, 2 * width), *block(2 * width, 2 * width), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * (CROP // 4) ** 2, 128), nn.ReLU(inplace=True), nn.Dropout(0.2),
            nn.Linear(128, 11),
        )

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """crops (n, CROP, CROP) ink maps in [0, 1] -> logits (n, 11); class 10 is 'not a digit'."""
        return self.net(crops[:, None] * 2 - 1)

    @torch.no_grad()
    def probabilities(self, crops: np.ndarray) -> np.ndarray:
        if len(crops) == 0:
            return np.zeros((0, 11), np.float32)
        was = self.training
        self.eval()
        device = next(self.parameters()).device
        p = self.forward(torch.from_numpy(np.asarray(crops, np.float32)).to(device)).softmax(-1).cpu().numpy()
        self.train(was)
        return p

    def read_objects(self, image: np.ndarray, boxes=None, points=None) -> list[dict]:
        """Per labelled object: the digit read, its probability, and whether it is legible."""
        probs = self.probabilities(object_crops(image, boxes, points))
        return [reading(p) for p in probs]

    def save_pretrained(self, folder: str | Path) -> None:
        save_model_folder(folder, self.config, self.state_dict())

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str = "cpu") -> "DigitClassifier":
        from safetensors.torch import load_file

        folder = resolve_model_folder(folder, "digit classifier")
        cfg = read_kind_config(folder, KIND, "digit-classifier", KIND, "train one with `factory train digits`")
        if cfg.get("crop") != CROP:
            raise FactoryError(f"{folder} reads {cfg.get('crop')} px crops, this version makes {CROP} px crops: "
                               f"retrain it with `factory train digits`")
        model = cls(cfg["width"])
        model.load_state_dict(load_file(str(folder / WEIGHTS)))
        return model.to(device).eval()


def reading(p: np.ndarray) -> dict:
    """One object's verdict from its 11 class probabilities."""
    digit = int(p[:10].argmax())
    return {"digit": digit, "p": round(float(p[digit]), 4), "not_a_digit": round(float(p[NOT_A_DIGIT]), 4),
            "legible": bool(p[digit] >= CONFIDENT)}
