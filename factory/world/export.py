"""Write reference-world scenes to disk: as shards (the sample format of
generated data, so one loader reads both) or as a folder laid out as the real
FSC147 (JPEGs 384 px high of varying width, its annotation, split and class
files, adaptive density maps), so the reader of that format is exercised on
what FSC147 really is."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..sample import JPEG_QUALITY, Sample, encode_members
from ..shards import OutputDir, ShardAssembler
from ..sources import (FSC_ANNOTATIONS, FSC_CAPTIONS, FSC_CLASSES, FSC_DENSITY, FSC_IMAGES, FSC_SPLITS,
                       fsc147_density)
from .palette import PALETTE
from .scenes import make_scene, rng_for


def scene_sample(split: str, index: int, world_seed: int = 0) -> Sample:
    key = f"{split}_{index:06d}"
    scene = make_scene(split, index, world_seed)
    meta = {"source_key": key, "caption": scene.caption, "ops": [], "checks": {}, **scene.labels()}
    return Sample(key, world_seed, scene.image, scene.density, meta, mask=scene.mask)


def write_world_shards(split: str, n: int, out: str, start: int = 0, world_seed: int = 0,
                       shard_size: int = 1000, image_format: str = "png") -> dict:
    outdir = OutputDir(out)
    spec = {"world": {"split": split, "n": n, "start": start, "world_seed": world_seed,
                      "shard_size": shard_size, "image_format": image_format}}
    # A world export is a run like any other: the same manifest claim, with the
    # export's parameters as its "recipe" and a hash of them.
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    outdir.claim_spec(spec, f"world-{digest}", f"world export {split}")
    outdir.remove_partial()
    num_shards = (n + shard_size - 1) // shard_size
    done = outdir.completed()
    expected = {s: min(shard_size, n - s * shard_size) for s in range(num_shards)}
    writer = ShardAssembler(outdir, expected, image_format)
    for pos in range(n):
        shard = pos // shard_size
        if shard in done:
            continue
        s = scene_sample(split, start + pos, world_seed)
        writer.add(shard, pos % shard_size, s.key, encode_members(s, image_format), {})
    return outdir.write_index(num_shards)


FSC_HEIGHT = 384  # FSC147 resized every photo to this height, keeping its aspect
FSC_ASPECTS = (1.0, 1.8)  # width / height of an exported image, drawn per scene
FSC_SPLIT_KEYS = ("train", "val", "test", "test_coco", "val_coco")  # the real split file's keys


@dataclass
class FSC147Image:
    """A reference-world scene as FSC147 has its photos: 384 px high, of its own width."""

    image: np.ndarray  # (384, W, 3) uint8
    points: list[list[float]]  # (x, y) in the 384-px image's pixels
    boxes: list[list[int]]  # x0, y0, x1, y1 (exclusive) of each digit's ink, same pixels
    density: np.ndarray  # (384, W) float32, adaptive Gaussians, sum == len(points)
    original: tuple[int, int]  # (H, W) before the resize: the padded 64-px scene
    caption: str


def fsc147_image(split: str, index: int, world_seed: int = 0) -> FSC147Image:
    """Scene ``index`` padded left and right with its background to an aspect drawn from its
    index (in FSC_ASPECTS), then scaled uniformly to 384 px high: digits are not stretched, and
    points and boxes move with the pad and the scale."""
    s = make_scene(split, index, world_seed)
    rng = rng_for("fsc147-aspect", world_seed, split, index)
    h = s.image.shape[0]
    width = max(h, int(round(h * float(rng.uniform(*FSC_ASPECTS)))))
    left = int(rng.integers(0, width - s.image.shape[1] + 1))
    padded = np.empty((h, width, 3), np.uint8)
    padded[:] = np.asarray(PALETTE[s.bg], np.uint8)  # the scene's flat background
    padded[:, left: left + s.image.shape[1]] = s.image
    k = FSC_HEIGHT / h
    out_w = int(round(width * k))
    image = np.asarray(Image.fromarray(padded).resize((out_w, FSC_HEIGHT), Image.BICUBIC))
    points = [[round((x + left) * k, 3), round(y * k, 3)] for x, y in s.points]
    boxes = [[int(round((b[0] + left) * k)), int(round(b[1] * k)), int(round((b[2] + left) * k)),
              int(round(b[3] * k))] for b in s.boxes]
    return FSC147Image(image, points, boxes, fsc147_density(points, image.shape[:2]), (h, width), s.caption)


def write_fsc147(split: str, n: int, out: str, start: int = 0, world_seed: int = 0) -> Path:
    """A folder laid out as the real FSC147 (FSC147_384_V2): JPEGs 384 px high of varying width,
    the annotation file with FSC147's keys (H and W the size before the resize, ratio_h/ratio_w
    the resize's factors, points and three exemplar boxes as corner quads in the resized image's
    pixels, img_path and density_path, here relative to the folder), the split file, the class
    list, and adaptive-Gaussian density maps at the image's size (sum = number of points). Also
    captions.json, which FSC147 does not have (the scenes' captions). FSC147's box_examples_path
    and density_path_fixed name files its download does not hold, so they are left out."""
    root = Path(out)
    (root / FSC_IMAGES).mkdir(parents=True, exist_ok=True)
    (root / FSC_DENSITY).mkdir(exist_ok=True)
    annotations, classes, captions, names = {}, [], {}, []
    for i in range(start, start + n):
        s = fsc147_image(split, i, world_seed)
        stem = f"{split}_{i:06d}"
        name = f"{stem}.jpg"
        names.append(name)
        Image.fromarray(s.image).save(root / FSC_IMAGES / name, quality=JPEG_QUALITY)
        np.save(root / FSC_DENSITY / f"{stem}.npy", s.density)
        (h0, w0), (h, w) = s.original, s.image.shape[:2]
        annotations[name] = {
            "H": h0, "W": w0,
            # FSC147 gives three exemplar boxes per image as corner quads.
            "box_examples_coordinates": [[[b[0], b[1]], [b[0], b[3]], [b[2], b[3]], [b[2], b[1]]]
                                         for b in s.boxes[:3]],
            "density_path": f"{FSC_DENSITY}/{stem}.npy",
            "img_path": f"{FSC_IMAGES}/{name}",
            "points": s.points,
            "ratio_h": h / h0, "ratio_w": w / w0,
        }
        classes.append(f"{name}\tdigits")
        captions[name] = s.caption
    (root / FSC_ANNOTATIONS).write_text(json.dumps(annotations))
    splits = {k: [] for k in FSC_SPLIT_KEYS}
    splits[split if split in splits else "train"] = names
    (root / FSC_SPLITS).write_text(json.dumps(splits))
    (root / FSC_CLASSES).write_text("\n".join(classes) + "\n")
    (root / FSC_CAPTIONS).write_text(json.dumps(captions))
    return root
