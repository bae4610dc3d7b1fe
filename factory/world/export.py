"""Write reference-world scenes to disk: as shards (the sample format of
generated data, so one loader reads both) or as an FSC147-style folder (so the
reader of that real-world format is exercised)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ..sample import Sample, encode_members
from ..shards import OutputDir, ShardAssembler
from .scenes import make_scene


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


def write_fsc147(split: str, n: int, out: str, start: int = 0, world_seed: int = 0) -> Path:
    """An FSC147-style folder: images, point/exemplar annotations, split lists, density maps."""
    root = Path(out)
    (root / "images_384_VarV2").mkdir(parents=True, exist_ok=True)
    (root / "gt_density_map_adaptive_384_VarV2").mkdir(exist_ok=True)
    annotations, classes, captions, names = {}, [], {}, []
    for i in range(start, start + n):
        s = make_scene(split, i, world_seed)
        name = f"{split}_{i:06d}.png"
        names.append(name)
        Image.fromarray(s.image).save(root / "images_384_VarV2" / name, compress_level=6)
        np.save(root / "gt_density_map_adaptive_384_VarV2" / f"{split}_{i:06d}.npy", s.density)
        annotations[name] = {
            "H": int(s.image.shape[0]), "W": int(s.image.shape[1]), "ratio_h": 1.0, "ratio_w": 1.0,
            "points": s.points,
            # FSC147 gives three exemplar boxes per image as corner quads.
            "box_examples_coordinates": [[[b[0], b[1]], [b[0], b[3]], [b[2], b[3]], [b[2], b[1]]] for b in s.boxes[:3]],
        }
        classes.append(f"{name}\tdigits")
        captions[name] = s.caption
    (root / "annotation_FSC147_384.json").write_text(json.dumps(annotations))
    splits = {"train": [], "val": [], "test": []}
    splits[split if split in splits else "train"] = names
    (root / "Train_Test_Val_FSC_147.json").write_text(json.dumps(splits))
    (root / "ImageClasses_FSC147.txt").write_text("\n".join(classes) + "\n")
    (root / "captions.json").write_text(json.dumps(captions))
    return root
