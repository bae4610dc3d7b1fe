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

    def __init__(self, params=None, device=None):
        super().__init__(params, device)
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
