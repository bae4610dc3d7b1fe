"""Instance masks: one object id per pixel (DESIGN §3's ``<key>.mask.png``).

0 is the background and i the i-th object of the sample's ``points`` (1-based),
so a mask needs no table of its own: its ids index the labels already there.
The renderer knows masks exactly; stages that move pixels move the mask with
them (nearest neighbour: ids are names, not intensities, and must never blend);
stages that make a new image without knowing where its objects are drop the
mask (:func:`drop_mask`) rather than keep one that no longer holds.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

MEMBER = "mask.png"
MAX_ID = np.iinfo(np.uint16).max
# Fixed compression level, as for images: the same ids always give the same bytes.
PNG_LEVEL = 6


def as_mask(ids: np.ndarray) -> np.ndarray:
    """Ids as a mask's dtype: uint8 while every id fits (up to 255 objects), else uint16."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"an instance mask is 2-D (height, width), got shape {ids.shape}")
    if ids.dtype.kind not in "iub":
        raise ValueError(f"an instance mask holds integer ids, got dtype {ids.dtype}")
    top = int(ids.max()) if ids.size else 0
    if (ids.size and int(ids.min()) < 0) or top > MAX_ID:
        raise ValueError(f"instance ids must lie in [0, {MAX_ID}], got [{int(ids.min())}, {top}]")
    return np.ascontiguousarray(ids, dtype=np.uint8 if top <= 255 else np.uint16)


def encode_mask(mask: np.ndarray) -> bytes:
    """The PNG of a mask: 8-bit greyscale, or 16-bit when an id exceeds 255."""
    buf = io.BytesIO()
    Image.fromarray(as_mask(mask)).save(buf, format="PNG", compress_level=PNG_LEVEL)
    return buf.getvalue()


def decode_mask(data: bytes) -> np.ndarray:
    """The inverse of :func:`encode_mask`; a PNG of another kind (colour, palette) is refused:
    its values would not be object ids."""
    with Image.open(io.BytesIO(data)) as im:
        if im.mode not in ("L", "I;16", "I"):
            raise ValueError(f"{MEMBER} must be 8- or 16-bit greyscale object ids, got a PNG of mode {im.mode}")
        return as_mask(np.asarray(im))


def check_mask(mask: np.ndarray, image_shape, n_objects: int | None) -> None:
    """A mask must cover its image pixel for pixel and name only objects the labels have."""
    if mask.shape != tuple(image_shape[:2]):
        raise ValueError(f"mask of shape {mask.shape} does not match the image {tuple(image_shape[:2])}")
    top = int(mask.max()) if mask.size else 0
    if n_objects is not None and top > n_objects:
        raise ValueError(f"mask names object {top}, but the sample has {n_objects} points")


def renumber(mask: np.ndarray, kept: list[int]) -> np.ndarray:
    """The mask after a list of objects was cut to ``kept`` (old 0-based positions, in their new
    order): object kept[j] becomes id j + 1, objects not kept become background."""
    table = np.zeros(int(mask.max(initial=0)) + 1, np.int64)
    for new, old in enumerate(kept, start=1):
        if old + 1 < len(table):
            table[old + 1] = new
    return as_mask(table[mask])


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize to (height, width), sampling at pixel centres as the bilinear
    image resize does, so each id stays over the pixels its object moved to."""
    h, w = mask.shape
    rows = np.minimum(((np.arange(size[0]) + 0.5) * h / size[0]).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * w / size[1]).astype(np.int64), w - 1)
    return np.ascontiguousarray(mask[rows[:, None], cols[None, :]])


def extent(mask: np.ndarray) -> list[int] | None:
    """The box (x0, y0, x1, y1, exclusive) around every object's pixels, or None when there are none."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def drop_mask(sample) -> list[str]:
    """Remove a sample's mask (its image was made anew); returns ["mask"] if it had one, for the
    op's ``labels_dropped``."""
    had = getattr(sample, "mask", None) is not None
    sample.mask = None
    return ["mask"] if had else []
