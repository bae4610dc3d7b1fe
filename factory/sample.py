"""One sample as it flows through the stages, and its on-disk members (DESIGN §3).

Between stages a sample travels as a row of plain columns (Ray Data moves
Arrow tables): the image, density and mask as raw bytes with their shapes in
the metadata, the labels as a JSON string. Arrow's tensor extensions would need
one shape per column and no missing values; raw bytes need neither.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from . import masks

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
_SHAPES = "_arrays"  # metadata entry with array shapes/dtypes, never written to disk
JPEG_QUALITY = 95


@dataclass
class Sample:
    """A sample: its key, its seed, image, density map, labels (``meta``) and instance mask.

    ``meta`` is the JSON of DESIGN §3 minus ``key`` and ``seed``, which are
    fields here. ``mask`` (H×W uint8/uint16, :mod:`factory.masks`) holds object
    ids: 0 background, i the i-th of ``meta["points"]``; None where unknown. A sample that failed or was filtered keeps its reason in
    ``meta["failed"]`` / ``meta["filtered"]`` and is counted, not written.
    """

    key: str
    seed: int
    image: np.ndarray | None = None
    density: np.ndarray | None = None
    meta: dict = field(default_factory=dict)
    shard: int = -1
    pos: int = -1
    mask: np.ndarray | None = None  # last: positional callers pass (key, seed, image, density, meta)

    @property
    def alive(self) -> bool:
        return not (self.meta.get("failed") or self.meta.get("filtered"))

    def fail(self, stage: str, reason: str) -> None:
        self.meta["failed"] = {"stage": stage, "reason": reason}

    def filter(self, stage: str, reason: str) -> None:
        self.meta["filtered"] = {"stage": stage, "reason": reason}

    def add_op(self, name: str, **params) -> None:
        self.meta.setdefault("ops", []).append({"op": name, **params})


def stage_seed(seed: int, stage: str) -> int:
    """The seed a stage uses for one sample: a hash of the sample's seed and the stage."""
    digest = hashlib.sha256(f"{seed}/{stage}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sample_seed(recipe_seed: int, key: str) -> int:
    digest = hashlib.sha256(f"{recipe_seed}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# --- rows: what Ray Data carries between stages ------------------------------

ROW_COLUMNS = ("key", "seed", "shard", "pos", "image", "density", "mask", "meta")


def _array_bytes(a: np.ndarray | None) -> tuple[bytes, list | None]:
    if a is None:
        return b"", None
    a = np.ascontiguousarray(a)
    return a.tobytes(), [list(a.shape), a.dtype.str]


def _array_from(buf, spec) -> np.ndarray | None:
    if spec is None:
        return None
    shape, dtype = spec
    return np.frombuffer(buf, dtype=np.dtype(dtype)).reshape(shape).copy()


def to_batch(samples: list[Sample]) -> dict[str, np.ndarray]:
    cols: dict[str, list] = {c: [] for c in ROW_COLUMNS}
    for s in samples:
        img, img_spec = _array_bytes(s.image)
        den, den_spec = _array_bytes(s.density)
        mask, mask_spec = _array_bytes(s.mask)
        meta = dict(s.meta)
        meta[_SHAPES] = {"image": img_spec, "density": den_spec, "mask": mask_spec}
        cols["key"].append(s.key)
        cols["seed"].append(s.seed)
        cols["shard"].append(s.shard)
        cols["pos"].append(s.pos)
        cols["image"].append(img)
        cols["density"].append(den)
        cols["mask"].append(mask)
        cols["meta"].append(json.dumps(meta))
    out = {c: np.asarray(v, dtype=object) for c, v in cols.items()}
    for c in ("seed", "shard", "pos"):
        out[c] = np.asarray(cols[c], dtype=np.int64)
    return out


def from_batch(batch: dict) -> list[Sample]:
    out = []
    # A batch made before masks existed (or by other code) may lack the column.
    mask_col = batch.get("mask")
    for i in range(len(batch["key"])):
        meta = json.loads(batch["meta"][i])
        shapes = meta.pop(_SHAPES, {}) or {}
        out.append(
            Sample(
                key=str(batch["key"][i]),
                seed=int(batch["seed"][i]),
                image=_array_from(batch["image"][i], shapes.get("image")),
                density=_array_from(batch["density"][i], shapes.get("density")),
                meta=meta,
                shard=int(batch["shard"][i]),
                pos=int(batch["pos"][i]),
                mask=_array_from(mask_col[i], shapes.get("mask")) if mask_col is not None else None,
            )
        )
    return out


# --- members: what a shard holds -------------------------------------------

def encode_image(image: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    pil = Image.fromarray(image)
    if fmt == "png":
        # Fixed compression level: the same pixels always give the same bytes.
        pil.save(buf, format="PNG", compress_level=6)
    else:
        pil.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buf.getvalue()


def label_json(sample: Sample) -> dict:
    """The JSON member: DESIGN §3's top level first, then the rest of the labels."""
    meta = {k: v for k, v in sample.meta.items() if not k.startswith("_")}
    head = {
        "key": sample.key,
        "source_key": meta.pop("source_key", sample.key),
        "seed": sample.seed,
        "caption": meta.pop("caption", ""),
        "ops": meta.pop("ops", []),
        "checks": meta.pop("checks", {}),
    }
    return {**head, **meta}


def encode_members(sample: Sample, image_format: str = "png") -> dict[str, bytes]:
    """The tar members of one sample, keyed by extension."""
    labels = label_json(sample)
    members = {
        image_format: encode_image(sample.image, image_format),
        "txt": labels["caption"].encode(),
        "json": json.dumps(labels, sort_keys=False, separators=(",", ":")).encode(),
    }
    if sample.density is not None:
        buf = io.BytesIO()
        np.save(buf, sample.density.astype(np.float32), allow_pickle=False)
        members["density.npy"] = buf.getvalue()
    if sample.mask is not None:
        members[masks.MEMBER] = masks.encode_mask(sample.mask)
    return members


def decode_members(key: str, members: dict[str, bytes]) -> Sample:
    """The inverse of :func:`encode_members`; raises ValueError on a corrupt member."""
    image = None
    for ext in IMAGE_EXTENSIONS:
        if ext in members:
            with Image.open(io.BytesIO(members[ext])) as im:
                image = np.asarray(im.convert("RGB"))
            break
    if image is None:
        raise ValueError(f"sample {key!r} has no image member ({', '.join(IMAGE_EXTENSIONS)})")
    meta = json.loads(members["json"]) if "json" in members else {}
    if "txt" in members and not meta.get("caption"):
        meta["caption"] = members["txt"].decode()
    density = None
    if "density.npy" in members:
        density = np.load(io.BytesIO(members["density.npy"]), allow_pickle=False)
    mask = None
    if masks.MEMBER in members:
        mask = masks.decode_mask(members[masks.MEMBER])
        points = meta.get("points")
        masks.check_mask(mask, image.shape, len(points) if isinstance(points, list) else None)
    seed = int(meta.pop("seed", 0))
    meta.pop("key", None)
    return Sample(key=key, seed=seed, image=image, density=density, meta=meta, mask=mask)
