"""Source readers: list a source's samples for the plan, load one for the stages.

Three kinds (see :mod:`factory.recipe`): the reference world (rendered on the
fly), shards in this project's format, and FSC147 folders. Listing is
cheap and happens on the driver; loading happens in the first pipeline stage,
on the workers. World scenes carry exact instance masks, shards theirs where
they have a mask member; FSC147 has none (its annotations are points).

An FSC147 folder is laid out as the real dataset's FSC147_384_V2 (Ranjan et al.,
CVPR 2021): JPEGs 384 px high of varying width in ``images_384_VarV2/``, per image
its points and three exemplar boxes (4-corner quads) in the 384-px image's pixels
in ``annotation_FSC147_384.json``, the split lists in ``Train_Test_Val_FSC_147.json``,
a density map per image (``gt_density_map_adaptive_384_VarV2/<stem>.npy``, the
image's size, sum = number of points) and ``ImageClasses_FSC147.txt``. A density
map that disagrees with its points fails that sample, with both numbers.
"""
from __future__ import annotations

import io
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import PurePosixPath

import fsspec
import numpy as np
from PIL import Image

from .errors import FactoryError
from .sample import Sample, decode_members
from .stage import Stage
from .world import make_scene

FSC_ANNOTATIONS = "annotation_FSC147_384.json"
FSC_SPLITS = "Train_Test_Val_FSC_147.json"
FSC_IMAGES = "images_384_VarV2"
FSC_DENSITY = "gt_density_map_adaptive_384_VarV2"
FSC_CLASSES = "ImageClasses_FSC147.txt"
FSC_CAPTIONS = "captions.json"  # not in FSC147 itself: the reference world's export adds it
FSC_REQUIRED = (FSC_ANNOTATIONS, FSC_SPLITS, FSC_IMAGES)
FSC_HOLDS = (f"an FSC147 folder (as FSC147_384_V2) holds {FSC_ANNOTATIONS} (points and three exemplar boxes "
             f"per image), {FSC_SPLITS} (the train/val/test image lists), {FSC_IMAGES}/ (the images, 384 px "
             f"high) and optionally {FSC_DENSITY}/ (density maps; made from the points where absent), "
             f"{FSC_CLASSES} and {FSC_CAPTIONS}; `factory world --format fsc147` writes one")


def check_fsc147_folder(path: str) -> None:
    """A FactoryError naming every file an FSC147 folder lacks (and what one holds)."""
    fs, root = fsspec.core.url_to_fs(path)
    root = root.rstrip("/")
    if not fs.isdir(root):
        raise FactoryError(f"{path!r} is not an FSC147 folder: it is not a folder; {FSC_HOLDS}")
    missing = [name for name in FSC_REQUIRED if not fs.exists(f"{root}/{name}")]
    if missing:
        raise FactoryError(f"{path!r} is not an FSC147 folder: {' and '.join(missing)} "
                           f"{'is' if len(missing) == 1 else 'are'} missing there; {FSC_HOLDS}")


# FSC147's density maps are Gaussians with an adaptive window: each point's from the distance to
# its nearest neighbour (sigma a quarter of it), capped at a quarter of the image's height (also
# the window of a lone point). Each kernel is normalised over the image, so a map sums to its
# number of points even where a kernel is cut by the border.
FSC_DENSITY_TOLERANCE = (0.5, 0.02)  # a density map may differ from its point count by max(0.5, 2 %)


def fsc147_density(points, shape: tuple[int, int]) -> np.ndarray:
    """An adaptive-Gaussian density map of ``shape`` (height, width): sum = len(points)."""
    h, w = shape
    out = np.zeros((h, w), np.float64)
    if not len(points):
        return out.astype(np.float32)
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    cap = h / 4.0
    if len(pts) > 1:
        d = np.sqrt(((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1))
        np.fill_diagonal(d, np.inf)
        nearest = np.minimum(d.min(1), cap)
    else:
        nearest = np.array([cap])
    xs, ys = np.arange(w) + 0.5, np.arange(h) + 0.5  # pixel centres, as points are continuous
    for (x, y), dist in zip(pts, nearest):
        sigma = max(dist / 4.0, 1.0)
        gx = np.exp(-((xs - x) ** 2) / (2 * sigma**2))
        gy = np.exp(-((ys - y) ** 2) / (2 * sigma**2))
        if gx.sum() > 0 and gy.sum() > 0:  # (a point far outside the image has no kernel in it)
            out += np.outer(gy / gy.sum(), gx / gx.sum())
    return out.astype(np.float32)


def safe_id(text: str) -> str:
    """A key fragment: letters, digits and underscores (no dots, no dashes)."""
    return re.sub(r"[^A-Za-z0-9_]", "_", text)


@dataclass
class SourceRef:
    """One source sample: its id (goes into keys), its own key, and where it is."""

    id: str
    source_key: str
    where: dict


# --- listing (driver) --------------------------------------------------------

def list_source(spec) -> tuple[list[SourceRef], list[str]]:
    """(refs, warnings) of one recipe source, in a fixed order: every ref at once, for small
    sources (training sets). Runs read a source a shard at a time (:mod:`factory.listing`)."""
    from .listing import source_table

    table = source_table(spec)
    return table.refs(0, len(table)), table.warnings


def list_fsc147(path: str, split: str) -> list[SourceRef]:
    """Every ref of an FSC147 folder's split (for small sets; runs read it a shard at a time)."""
    from .listing import FSC147Table
    from .recipe import FSC147Source

    check_fsc147_folder(path)  # a FactoryError, before the source's own validation says it less plainly
    table = FSC147Table(FSC147Source(kind="fsc147", path=path, split=split))
    return table.refs(0, len(table))


def shard_urls(path: str) -> list[str]:
    """The tars of a shard set: index.json's list, or every *.tar in the folder, or one tar."""
    fs, root = fsspec.core.url_to_fs(path)
    if root.endswith(".tar"):
        return [path]
    index = f"{root.rstrip('/')}/index.json"
    if fs.exists(index):
        with fs.open(index) as f:
            shardlist = json.load(f)["shardlist"]
        return [_join(path, s["url"]) for s in shardlist]
    tars = sorted(fs.glob(f"{root.rstrip('/')}/*.tar"))
    if not tars:
        raise FactoryError(f"no shards in {path!r}: expected index.json or *.tar files there")
    return [fs.unstrip_protocol(t) if "://" in path else t for t in tars]


def _join(base: str, url: str) -> str:
    return url if ("://" in url or url.startswith("/")) else f"{base.rstrip('/')}/{url}"


def tar_members(url: str) -> tuple[dict[str, dict[str, tuple[int, int]]], str | None]:
    """{key: {ext: (offset, size)}} of a tar, and the error that stopped the listing, if any."""
    out: dict[str, dict[str, tuple[int, int]]] = {}
    error = None
    try:
        with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                name = PurePosixPath(m.name).name
                key, _, ext = name.partition(".")
                out.setdefault(key, {})[ext] = (m.offset_data, m.size)
    except (tarfile.TarError, OSError, EOFError) as e:
        error = f"{url}: {type(e).__name__}: {e}"
    return out, error


# --- loading (workers) -------------------------------------------------------

class SourceReader(Stage):
    """The first stage of every run: turns a source reference into a sample.

    A source sample that cannot be read (a corrupt member, a missing image)
    fails alone with its reason, and the run goes on.
    """

    name = "read"

    def __init__(self, params=None, device=None, context=None):
        super().__init__(params, device, context)
        self._tars: dict[str, dict] = {}
        self._fsc: dict[str, tuple[dict, dict]] = {}

    def process_one(self, sample: Sample, rng) -> None:
        where = sample.meta.pop("_source")
        loaded = getattr(self, f"_load_{where['kind']}")(where)
        sample.image, sample.density, sample.mask = loaded.image, loaded.density, loaded.mask
        ops = sample.meta.get("ops", [])
        sample.meta = {**loaded.meta, **sample.meta, "ops": loaded.meta.get("ops", []) + ops}

    def _load_world(self, where: dict) -> Sample:
        scene = make_scene(where["split"], where["index"], where["world_seed"])
        meta = {"source_key": f"{where['split']}_{where['index']:06d}", "caption": scene.caption, **scene.labels()}
        return Sample("", 0, scene.image, scene.density, meta, mask=scene.mask)

    def _load_latents(self, where: dict) -> Sample:
        # No image yet: `sample_latent` draws the code from this seed and synthesises it.
        return Sample("", 0, None, None, {"source_key": f"seed_{where['seed']:06d}", "latent_seed": where["seed"]})

    def _load_shards(self, where: dict) -> Sample:
        url, key = where["url"], where["key"]
        if url not in self._tars:
            self._tars[url] = tar_members(url)[0]
        members = {}
        with fsspec.open(url, "rb") as f:
            for ext, (offset, size) in self._tars[url][key].items():
                f.seek(offset)
                data = f.read(size)
                if len(data) != size:
                    raise ValueError(f"member {key}.{ext} is truncated ({len(data)} of {size} bytes)")
                members[ext] = data
        s = decode_members(key, members)
        s.meta["source_key"] = key
        return s

    def _fsc147_tables(self, path: str) -> tuple[dict, dict]:
        if path not in self._fsc:
            check_fsc147_folder(path)
            fs, root = fsspec.core.url_to_fs(path)
            with fs.open(f"{root}/{FSC_ANNOTATIONS}") as f:
                ann = json.load(f)
            captions = {}
            if fs.exists(f"{root}/{FSC_CAPTIONS}"):
                with fs.open(f"{root}/{FSC_CAPTIONS}") as f:
                    captions = json.load(f)
            elif fs.exists(f"{root}/{FSC_CLASSES}"):
                with fs.open(f"{root}/{FSC_CLASSES}", "r") as f:
                    for line in f:
                        name, _, cls = line.rstrip("\n").partition("\t")
                        captions[name] = f"a photo of {cls}" if cls else ""
            self._fsc[path] = (ann, captions)
        return self._fsc[path]

    def _load_fsc147(self, where: dict) -> Sample:
        path, name = where["path"], where["image"]
        ann, captions = self._fsc147_tables(path)
        fs, root = fsspec.core.url_to_fs(path)
        if name not in ann:
            raise ValueError(f"{name} is in {FSC_SPLITS} but not in {FSC_ANNOTATIONS}")
        with fs.open(f"{root}/{FSC_IMAGES}/{name}", "rb") as f:  # JPEG (as FSC147's) or PNG
            image = np.asarray(Image.open(io.BytesIO(f.read())).convert("RGB"))
        a = ann[name]
        points = [[float(x), float(y)] for x, y in a["points"]]
        boxes = []
        for quad in a.get("box_examples_coordinates", []):
            xs, ys = [p[0] for p in quad], [p[1] for p in quad]
            boxes.append([min(xs), min(ys), max(xs), max(ys)])
        stem = PurePosixPath(name).stem
        density_file = f"{root}/{FSC_DENSITY}/{stem}.npy"
        if fs.exists(density_file):
            with fs.open(density_file, "rb") as f:
                density = np.load(io.BytesIO(f.read())).astype(np.float32)
            if density.shape != image.shape[:2]:
                raise ValueError(f"density map {density_file} has shape {density.shape}, "
                                 f"but its image {name} is {image.shape[:2]}")
            total, count = float(density.sum()), len(points)
            tolerance = max(FSC_DENSITY_TOLERANCE[0], FSC_DENSITY_TOLERANCE[1] * count)
            if not abs(total - count) <= tolerance:  # (a NaN disagrees too)
                raise ValueError(f"density map {density_file} sums to {total:.3f}, but {FSC_ANNOTATIONS} gives "
                                 f"{name} {count} points (they may differ by {tolerance:.2f}): the density "
                                 f"map and the points disagree")
        else:
            density = fsc147_density(points, image.shape[:2])
        meta = {"source_key": stem, "caption": captions.get(name, ""), "count": len(points),
                "points": points, "boxes": boxes}
        return Sample("", 0, image, density, meta)


def source_captions(spec: dict) -> list[tuple[str, str, str]]:
    """(source key, caption, category) of every sample of a source: the caption pool
    that caption swaps draw from. Reads captions only, not images, where it can."""
    kind = spec["kind"]
    if kind == "world":
        from .world.scenes import make_scene

        return [(f"{spec['split']}_{i:06d}", make_scene(spec["split"], i, spec.get("world_seed", 0)).caption, "digits")
                for i in range(spec.get("start", 0), spec.get("start", 0) + spec["n"])]
    if kind == "latents":  # codes have no captions
        return [(f"seed_{i:06d}", "", "") for i in range(spec.get("start", 0), spec.get("start", 0) + spec["n"])]
    if kind == "shards":
        out = []
        for url in shard_urls(spec["path"]):
            members, _ = tar_members(url)
            with fsspec.open(url, "rb") as f:
                for key, exts in members.items():
                    if "txt" in exts:
                        off, size = exts["txt"]
                        f.seek(off)
                        out.append((key, f.read(size).decode(errors="replace"), ""))
        return out[: spec.get("limit") or None]
    if kind == "fsc147":
        reader = SourceReader()
        _, captions = reader._fsc147_tables(spec["path"])
        fs, root = fsspec.core.url_to_fs(spec["path"])
        classes = {}
        if fs.exists(f"{root}/{FSC_CLASSES}"):
            with fs.open(f"{root}/{FSC_CLASSES}", "r") as f:
                classes = dict(line.rstrip("\n").split("\t", 1) for line in f if "\t" in line)
        from .listing import fsc147_names

        names = fsc147_names(spec["path"], spec.get("split", "train"))
        return [(PurePosixPath(n).stem, captions.get(n, ""), classes.get(n, "")) for n in names]
    raise FactoryError(f"unknown source kind {kind!r}")
