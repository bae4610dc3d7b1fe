"""Independent checkers: re-score every generated sample from its pixels.

A label is only as good as its check (DESIGN §1): the count checker counts
the objects in the image with a counter that never saw the generator, stores
its count and verdict in ``checks``, and can filter samples whose count is off.
"""
from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from factory.recipe import check_model_ref
from factory.sample import Sample
from factory.stage import Resources, Stage, register
from factory.world import count_objects


class CountCheckParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    counter: str = Field("pixel", description="'pixel' (connected components) or a DensityCounter folder")
    tolerance: int | None = Field(None, ge=0, description="drop samples whose count is off by more (None keeps all)")

    @field_validator("counter")
    @classmethod
    def _counter(cls, v: str) -> str:
        return v if v == "pixel" else check_model_ref(v)


@register
class CountChecker(Stage):
    name = "check_count"
    Params = CountCheckParams
    resources = Resources(num_cpus=0.25)
    batch_size = 64

    def __init__(self, params=None, device=None, context=None):
        super().__init__(params, device, context)
        self.model = None
        if self.params.counter != "pixel":
            from factory.models.counter import DensityCounter

            self.model = DensityCounter.from_pretrained(self.params.counter, self.device)

    def process(self, samples: list[Sample]) -> None:
        counts = self._count([s.image for s in samples])
        for s, c in zip(samples, counts):
            label = s.meta.get("count")
            verdict = None if label is None else int(round(c)) == int(label)
            s.meta.setdefault("checks", {})["count"] = {
                "counter": self.params.counter, "count": round(float(c), 3), "label": label, "exact": verdict,
            }
            tol = self.params.tolerance
            if tol is not None and label is not None and abs(round(c) - label) > tol:
                s.filter(self.name, f"count {round(c)} differs from label {label} by more than {tol}")

    def _count(self, images: list[np.ndarray]) -> list[float]:
        if self.model is None:
            return [float(count_objects(im)) for im in images]
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255).to(self.device)
            return self.model.count(x).cpu().tolist()


class ClipScoreParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field("models/tiny-clip", description="OpenCLIP folder, hf-hub:ID or NAME/PRETRAINED")
    min_score: float | None = Field(None, ge=-1, le=1, description="drop samples whose image-caption cosine is lower")


@register
class ClipScoreChecker(Stage):
    """CLIP score: cosine of the image's and the caption's OpenCLIP embeddings."""

    name = "check_clip"
    Params = ClipScoreParams
    resources = Resources(num_cpus=0.25, num_gpus=0.1)
    batch_size = 64

    def __init__(self, params=None, device=None, context=None):
        super().__init__(params, device, context)
        import torch

        from factory.models import tiny_clip

        self.torch = torch
        self.model, self.preprocess, self.tokenizer = tiny_clip.load(self.params.model, self.device)

    def process(self, samples: list[Sample]) -> None:
        from PIL import Image

        torch = self.torch
        with torch.inference_mode():
            x = torch.stack([self.preprocess(Image.fromarray(s.image)) for s in samples]).to(self.device)
            v = torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1)
            t = self.tokenizer([s.meta.get("caption", "") for s in samples]).to(self.device)
            u = torch.nn.functional.normalize(self.model.encode_text(t).float(), dim=-1)
            scores = (v * u).sum(-1).cpu().tolist()
        for s, score in zip(samples, scores):
            s.meta.setdefault("checks", {})["clip"] = {"model": self.params.model, "score": round(score, 4)}
            if self.params.min_score is not None and score < self.params.min_score:
                s.filter(self.name, f"CLIP score {score:.3f} below {self.params.min_score}")
