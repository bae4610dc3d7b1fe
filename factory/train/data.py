"""Training data: images, density maps and captions from any source kind.

``world:train:20000`` renders reference-world scenes; a shard folder or an
FSC147-style folder is read through the same :class:`SourceReader` the
pipeline uses, so a model trained here sees exactly what the factory reads.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import FactoryError
from ..recipe import FSC147Source, ShardsSource
from ..sample import Sample
from ..sources import SourceReader, check_fsc147_folder, list_source
from ..world.scenes import make_scene


@dataclass
class TrainingSet:
    images: np.ndarray  # (N, H, W, 3) uint8
    densities: np.ndarray  # (N, H, W) float32
    captions: list[str]
    counts: np.ndarray  # (N,) int

    def __len__(self) -> int:
        return len(self.images)


def world_scenes(spec: str) -> list:
    """``world:SPLIT:N[:START]`` as reference-world scenes (START..START+N-1 of SPLIT)."""
    parts = spec.split(":")
    split, n = parts[1], int(parts[2])
    start = int(parts[3]) if len(parts) > 3 else 0
    return [make_scene(split, i) for i in range(start, start + n)]


def scenes_training_set(scenes: list) -> TrainingSet:
    """Reference-world scenes as a training set (for callers that also need the scenes' labels)."""
    return TrainingSet(
        np.stack([s.image for s in scenes]), np.stack([s.density for s in scenes]),
        [s.caption for s in scenes], np.array([s.count for s in scenes]),
    )


def load_training_set(spec: str, limit: int | None = None, size: int | None = None) -> TrainingSet:
    """``world:SPLIT:N[:START]``, a shard folder, or ``fsc147:PATH[:SPLIT]``; with ``size``,
    every image and density map is resized to size x size (each axis by its own factor, density
    sums, points and boxes kept), as FSC147's images, 384 px high of varying width, need."""
    if spec.startswith("world:"):
        return scenes_training_set(world_scenes(spec))
    if spec.startswith("fsc147:"):
        path, _, split = spec[len("fsc147:"):].partition(":")
        check_fsc147_folder(path)
        source = FSC147Source(kind="fsc147", path=path, split=split or "train", limit=limit)
    else:
        source = ShardsSource(kind="shards", path=spec, limit=limit)
    refs, _ = list_source(source)
    reader = SourceReader()
    samples = [Sample(r.id, 0, meta={"_source": r.where}) for r in refs]
    reader.process(samples)
    ok = [s for s in samples if s.alive and s.density is not None]
    if size:
        from ..stage import get_stage

        get_stage("augment")({"hflip": 0.0, "resize": size}).process(ok)
        ok = [s for s in ok if s.alive]
    if not ok:
        failed = [s.meta["failed"]["reason"] for s in samples if s.meta.get("failed")]
        why = f" ({len(failed)} failed, e.g. {failed[0]})" if failed else ""
        raise FactoryError(f"no readable samples with density maps in {spec!r}{why}")
    shapes = {s.image.shape for s in ok}
    if len(shapes) > 1:
        raise FactoryError(f"training images in {spec!r} have several sizes {sorted(shapes)[:3]} (FSC147's are "
                           f"384 px high of varying width): resize them to one square side first (--resolution "
                           f"N for base/controlnet), or train on a set of one size")
    return TrainingSet(
        np.stack([s.image for s in ok]), np.stack([s.density for s in ok]).astype(np.float32),
        [s.meta.get("caption", "") for s in ok], np.array([s.meta.get("count", 0) for s in ok]),
    )


def scene_colours(split: str, n: int, start: int = 0) -> list[tuple[str, str]]:
    return [(s.fg, s.bg) for s in (make_scene(split, i) for i in range(start, start + n))]
