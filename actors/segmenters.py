"""Segmenters: instance masks for images whose masks nobody knows (generated, edited).

The renderer knows its masks exactly; a stage that makes a new image drops them
(``labels_dropped``). ``segment`` puts them back from the pixels: a mask model trained without masks (the
object-slot model, factory.models.slots, shipped as models/slots; or ReDO,
factory.models.redo) says which pixels are foreground, and the
labelled points say which object each foreground pixel belongs to
(factory.segmentation.split_instances), so ids follow the points as every mask's do.
``model: pixel`` uses the model-free rule instead (ink = far from the border's colour).

The model's own confidence is stored beside the mask, under ``checks.segment``: the mean
foreground probability over each object's pixels, and the objects left with no pixels.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from factory.masks import as_mask
from factory.sample import Sample
from factory.segmentation import border_colour_foreground, load_mask_model, mask_model_config, split_instances
from factory.stage import Resources, Stage, register

PIXEL = "pixel"


class SegmentParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field("models/slots", validate_default=True,
                       description="mask-model folder: ReDO (`factory train redo`) or the object-slot model "
                       "(`factory train slots`, e.g. models/slots: its objects' alphas), or 'pixel' "
                       "(model-free: ink is what lies far from the border's colour)")
    image_size: int = Field(64, gt=0, description="side of the images this stage will see (the reference "
                            "world's 64; a `generate` stage's `size`): a mask model trained on another size is "
                            "refused when the recipe is checked")
    threshold: float = Field(0.5, gt=0, lt=1, description="foreground probability above which a pixel is object")
    overwrite: bool = Field(False, description="replace a mask the sample already has (a render's exact one); "
                            "by default such samples keep theirs")
    filter_empty: bool = Field(False, description="drop samples in which a labelled object got no mask pixel")

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        if v == PIXEL:
            return v
        # A mask model is a local folder (no hub model is of this kind): a missing one is refused
        # now, with how to make it, not when a worker first loads it.
        if not Path(os.path.expanduser(v)).is_dir():
            export = "" if v == "models/redo" else f" --export {v}"
            raise ValueError(
                f"mask-model folder {v!r} does not exist: train one with `factory train redo --out runs/redo"
                f"{export}` (it writes {v}), use the object-slot model (models/slots), or set model: pixel for "
                f"the model-free rule (ink is what lies far from the border's colour)")
        from factory.errors import FactoryError

        try:
            mask_model_config(os.path.expanduser(v))  # a folder of another kind is refused now, not on a worker
        except FactoryError as e:
            raise ValueError(str(e)) from None
        return v

    @model_validator(mode="after")
    def _same_size(self):
        if self.model != PIXEL:
            side = mask_model_config(os.path.expanduser(self.model))["image_size"]
            if side != self.image_size:
                raise ValueError(
                    f"the mask model {self.model} was trained on {side}x{side} images but this stage will see "
                    f"{self.image_size}x{self.image_size} images (image_size): train a mask model on "
                    f"{self.image_size}x{self.image_size} images (`factory train redo --data ...`), or resize "
                    f"the samples to {side}x{side} with an `augment` stage (resize: {side}) and set image_size: {side}")
        return self


@register
class Segmenter(Stage):
    """Instance masks from a foreground mask split at the labelled points (``<key>.mask.png``)."""

    name = "segment"
    Params = SegmentParams
    needs = frozenset({"points"})
    provides = frozenset({"mask"})
    # memory: peak RSS 704 MB with models/redo, 222 MB with the model-free rule
    # (benchmarks/stage_memory.py); declared as the model checkers (790-830 MB) are
    resources = Resources(num_cpus=0.25, memory=int(1.0 * 2**30))
    batch_size = 64

    def __init__(self, params=None, device=None, context=None):
        super().__init__(params, device, context)
        self.model = None
        if self.params.model != PIXEL:
            self.model = load_mask_model(os.path.expanduser(self.params.model), self.device)

    def unusable(self, s: Sample) -> str | None:
        if s.image is None:
            return "no image to segment"
        if "points" not in s.meta:
            return ("the sample has no points: segment splits the foreground between labelled objects (a source "
                    "or stage with per-object labels must come first)")
        side = None if self.model is None else self.model.image_size
        if side is not None and s.image.shape[:2] != (side, side):
            from factory.models.redo import size_mismatch

            return size_mismatch(side, s.image.shape[1], s.image.shape[0], f"the mask model {self.params.model}")
        return None

    def process(self, samples: list[Sample]) -> None:
        todo = [s for s in samples if self.params.overwrite or s.mask is None]
        ready = self.usable(todo)
        if not ready:
            return
        probs = self._foreground([s.image for s in ready])
        for s, p in zip(ready, probs):
            self.guarded(s, lambda s, rng, p=p: self._segment(s, p))

    def _foreground(self, images: list[np.ndarray]) -> list[np.ndarray]:
        if self.model is None:
            return [border_colour_foreground(im) for im in images]
        return list(self.model.foreground(np.stack(images)))

    def _segment(self, s: Sample, prob: np.ndarray) -> None:
        p = self.params
        points = s.meta.get("points") or []
        ids = split_instances(prob >= p.threshold, points, prob)
        confidence = [round(float(prob[ids == i].mean()), 4) if (ids == i).any() else None
                      for i in range(1, len(points) + 1)]
        empty = sum(c is None for c in confidence)
        had = s.mask is not None
        s.mask = as_mask(ids)
        s.add_op("segment", model=p.model, threshold=p.threshold, split="watershed from the labelled points",
                 **({"replaced_mask": True} if had else {}))
        s.meta.setdefault("checks", {})["segment"] = {
            "model": p.model, "object_confidence": confidence, "empty_objects": empty,
            "foreground_share": round(float((prob >= p.threshold).mean()), 4)}
        if p.filter_empty and empty:
            s.filter(self.name, f"{empty} of {len(points)} labelled objects got no mask pixel")
