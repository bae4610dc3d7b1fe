"""Training loaders: factory output folders as torch datasets, and real/synthetic mixing.

    ShardDataset(dir)                       one folder's samples, as tensors and labels
    MixingDataset(real, synthetic, p0)      real samples, each replaced with probability p0
                                            by one of its synthetic variants
    make_loader(real_dir, synthetic_dir)    either of them in a torch DataLoader with `collate`

Tar reading, sample grouping, decoding, shard splitting and shuffling are
webdataset's; what is written here is only what it does not do (each place
says why): splitting the samples of a shard when there are fewer shards than
readers, opening fsspec URIs, and random access to one sample of a tar.

Work is split over ``world_size × num_workers`` readers (DDP ranks × DataLoader
workers, as webdataset's ``pytorch_worker_info`` sees them), so every sample
is read by exactly one of them. Readers may get different numbers of samples;
under DDP, end an epoch with ``Join`` or a fixed number of steps, as with any
WebDataset. ``set_epoch(n)`` reaches the workers only when they are started
anew each epoch (the DataLoader default, ``persistent_workers=False``).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import posixpath
import random
import tarfile
from collections import Counter
from typing import Callable, Iterable, Iterator

import fsspec
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset
from webdataset.autodecode import Decoder, ImageHandler
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander, tar_file_iterator

from .masks import MEMBER as MASK
from .masks import decode_mask
from .sample import IMAGE_EXTENSIONS
from .shards import INDEX

DENSITY = "density.npy"
STACKED = ("image", "density", "mask")  # same shape in a batch -> one tensor
SCALARS = {"count": torch.long, "synthetic": torch.bool}
_TAR_BLOCK = 512


# --- where the shards are ----------------------------------------------------

def shard_urls(source) -> tuple[list[str], int | None]:
    """The tar urls of a source and its sample count (None when unknown).

    A source is a factory output folder (or fsspec URI), its ``index.json``, a
    tar url or brace pattern (``dir/shard-{000000..000009}.tar``), or a list of
    tar urls.
    """
    if isinstance(source, (list, tuple)):
        return [str(u) for u in source], None
    source = str(source)
    if source.endswith(".tar") or "{" in source or "::" in source:
        return wds.shardlists.expand_urls(source), None
    if source.endswith(".json"):
        index_url, base = source, posixpath.dirname(source)
    else:
        base = source.rstrip("/")
        index_url = f"{base}/{INDEX}"
    fs, path = fsspec.core.url_to_fs(index_url)
    if not fs.exists(path):
        tars = sorted(fs.glob(f"{fs._strip_protocol(base)}/*.tar"))
        if not tars:
            raise FileNotFoundError(f"{source!r} has no {INDEX} and no .tar shards: is it a factory output folder?")
        return [_join(base, posixpath.basename(t)) for t in tars], None
    with fs.open(path) as f:
        shardlist = json.load(f)["shardlist"]
    urls = [_join(base, s["url"]) for s in shardlist]
    return urls, sum(int(s.get("nsamples", 0)) for s in shardlist)


def _join(base: str, url: str) -> str:
    if "://" in url or url.startswith("/"):
        return url
    return f"{base}/{url}"


def open_shard(url: str):
    """A readable stream for a shard url.

    webdataset's ``gopen`` knows local paths, pipes, http(s), gs and a few
    more, but not the fsspec URIs the factory writes to (s3://, memory://, …);
    those are opened with fsspec.
    """
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme and scheme != "file" and scheme not in wds.gopen_schemes:
        return fsspec.open(url, "rb").open()
    return wds.gopen(url, "rb")


def _open_shards(src: Iterable[dict]) -> Iterator[dict]:
    for item in src:
        yield {**item, "stream": open_shard(item["url"])}


# --- who reads what ----------------------------------------------------------

def reader_info() -> tuple[int, int]:
    """This reader's index and the number of readers (ranks × DataLoader workers)."""
    rank, world_size, worker, num_workers = wds.utils.pytorch_worker_info()
    return rank * num_workers + worker, world_size * num_workers


def assign_shards(urls: list[str]) -> list[tuple[str, int, int]]:
    """This reader's shards, each as (url, k, r): keep the samples whose index in
    the shard is r modulo k.

    With at least as many shards as readers, webdataset's ``split_by_node`` and
    ``split_by_worker`` give each reader whole shards (k = 1). With fewer,
    they would leave readers idle or, without a splitter, duplicate samples;
    so the readers are spread over the shards and those sharing a shard take
    every k-th sample of it.
    """
    reader, readers = reader_info()
    n = len(urls)
    if n >= readers:
        mine = wds.split_by_worker(wds.split_by_node(iter(urls)))
        return [(u, 1, 0) for u in mine]
    if n == 0:
        return []
    shard = reader % n
    k = len(range(shard, readers, n))
    return [(urls[shard], k, reader // n)]


def _take_slices(samples: Iterable[dict], slices: dict[str, tuple[int, int]]) -> Iterator[dict]:
    seen: Counter = Counter()
    for s in samples:
        url = s["__url__"]
        i = seen[url]
        seen[url] += 1
        k, r = slices[url]
        if i % k == r:
            yield s


# --- one folder --------------------------------------------------------------

class ShardDataset(IterableDataset):
    """The samples of a factory output folder as dicts of tensors and labels.

    Each sample: ``image`` (float 3×H×W in [0, 1]), ``density`` (float H×W,
    where the sample has one and ``decode_density``), ``mask`` (long H×W object
    ids: 0 background, i the i-th point; where the sample has one), ``count``
    (int), ``points`` (float N×2), ``boxes`` (float N×4, pixel xyxy) where the
    sample is a counting sample, ``caption``, ``attributes``, ``key``, ``source_key``
    and ``json`` (all the labels). ``transform`` maps each such dict.

    ``shuffle`` > 0 shuffles the order of this reader's shards and then the
    samples in a buffer of that size, from ``seed`` and the epoch.
    """

    def __init__(self, url_or_dir, shuffle: int = 0, decode_density: bool = True,
                 transform: Callable[[dict], dict] | None = None, seed: int = 0):
        self.source = url_or_dir
        self.urls, self.nsamples = shard_urls(url_or_dir)
        self.shuffle = int(shuffle)
        self.decode_density = decode_density
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self._decoder = Decoder([ImageHandler("torchrgb")])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def raw_samples(self) -> Iterator[dict]:
        """This reader's share of the samples, undecoded (``__key__``, ``__url__``, member bytes)."""
        reader, _ = reader_info()
        rng = random.Random(f"{self.seed}/{self.epoch}/{reader}")
        mine = assign_shards(self.urls)
        if self.shuffle > 0:
            rng.shuffle(mine)
        slices = {u: (k, r) for u, k, r in mine}
        stages = [
            lambda: iter([{"url": u} for u, _, _ in mine]),
            _open_shards,
            tar_file_expander,
            group_by_keys,
            lambda src: _take_slices(src, slices),
        ]
        if self.shuffle > 0:
            stages.append(wds.shuffle(self.shuffle, initial=self.shuffle, rng=rng))
        yield from wds.DataPipeline(*stages)

    def decode(self, raw: dict) -> dict:
        """One undecoded sample -> the dict described in the class docstring."""
        if not self.decode_density:
            raw = {k: v for k, v in raw.items() if k != DENSITY}
        # Decoded here, not by webdataset: its image handler would read the ids as RGB intensities.
        mask = raw.get(MASK)
        d = self._decoder({k: v for k, v in raw.items() if k != MASK})
        labels = d.get("json") or {}
        image = next((d[e] for e in IMAGE_EXTENSIONS if e in d), None)
        if image is None:
            raise ValueError(f"sample {d['__key__']!r} in {d.get('__url__')} has no image member")
        key = d["__key__"]
        caption = labels.get("caption") or d.get("txt", "")
        out = {
            "image": image,
            "key": key,
            "source_key": labels.get("source_key", key),
            "caption": caption,
            "attributes": labels.get("attributes", {}),
            "json": labels,
        }
        if DENSITY in d:
            out["density"] = torch.from_numpy(np.asarray(d[DENSITY], dtype=np.float32))
        if mask is not None:
            ids = decode_mask(mask)
            if ids.shape != tuple(image.shape[-2:]):
                raise ValueError(f"sample {key!r} in {d.get('__url__')}: mask {ids.shape} does not match "
                                 f"the image {tuple(image.shape[-2:])}")
            out["mask"] = torch.from_numpy(ids.astype(np.int64))
        if "count" in labels:
            out["count"] = int(labels["count"])
        if "points" in labels:
            out["points"] = torch.tensor(labels["points"], dtype=torch.float32).reshape(-1, 2)
        if "boxes" in labels:
            out["boxes"] = torch.tensor(labels["boxes"], dtype=torch.float32).reshape(-1, 4)
        return self.transform(out) if self.transform else out

    def __iter__(self) -> Iterator[dict]:
        for raw in self.raw_samples():
            yield self.decode(raw)


# --- synthetic variants by source ---------------------------------------------

class VariantIndex:
    """source_key -> where its synthetic variants lie: (shard, first byte, end byte).

    Built once from the tar headers and the JSON members; holds three int64
    arrays and a dict of offsets into them, not images. A variant is loaded on
    demand by reading its byte range. webdataset reads tars as streams only,
    so the random access (offsets from ``tarfile``) is ours; the bytes read
    are parsed back into a sample by webdataset.
    """

    def __init__(self, urls: list[str]):
        self.urls = list(urls)
        groups: dict[str, list[tuple[int, int, int]]] = {}
        for i, url in enumerate(self.urls):
            for source_key, start, end in self._scan(url):
                groups.setdefault(source_key, []).append((i, start, end))
        self.groups: dict[str, tuple[int, int]] = {}
        locs: list[tuple[int, int, int]] = []
        for source_key, g in groups.items():
            self.groups[source_key] = (len(locs), len(g))
            locs.extend(g)
        table = np.asarray(locs, dtype=np.int64).reshape(-1, 3)
        self.shard, self.start, self.end = (np.ascontiguousarray(table[:, j]) for j in range(3))

    @staticmethod
    def _scan(url: str) -> Iterator[tuple[str, int, int]]:
        spans: dict[str, list[int]] = {}
        source: dict[str, str] = {}
        with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for m in tar:
                if not m.isreg():
                    continue
                key, ext = base_plus_ext(m.name)
                if key is None:
                    continue
                end = m.offset_data + math.ceil(m.size / _TAR_BLOCK) * _TAR_BLOCK
                span = spans.setdefault(key, [m.offset, end])
                span[0], span[1] = min(span[0], m.offset), max(span[1], end)
                if ext.lower() == "json":
                    labels = json.loads(tar.extractfile(m).read())
                    source[key] = labels.get("source_key", key)
        for key, (start, end) in spans.items():
            yield source.get(key, key), start, end

    def __len__(self) -> int:
        return len(self.shard)

    def count(self, source_key: str) -> int:
        return self.groups.get(source_key, (0, 0))[1]

    def load(self, source_key: str, i: int) -> dict:
        """The i-th variant of a source, undecoded, as webdataset would have yielded it."""
        first, n = self.groups[source_key]
        j = first + i % n
        url = self.urls[int(self.shard[j])]
        start, end = int(self.start[j]), int(self.end[j])
        with fsspec.open(url, "rb") as f:
            f.seek(start)
            chunk = f.read(end - start)
        files = tar_file_iterator(io.BytesIO(chunk + b"\0" * (2 * _TAR_BLOCK)))
        files = ({**x, "__url__": url} for x in files)
        samples = list(group_by_keys(files))
        if len(samples) != 1:
            raise ValueError(f"{url} bytes {start}-{end}: expected one sample, found {len(samples)}")
        return samples[0]


# --- real and synthetic ------------------------------------------------------

def check_p0(p0) -> float:
    try:
        p = float(p0)
    except (TypeError, ValueError):
        raise ValueError(f"p0 must be a probability in [0, 1], got {p0!r}") from None
    if not 0.0 <= p <= 1.0:  # also refuses NaN
        raise ValueError(
            f"p0 must be a probability in [0, 1] (the chance that a real sample is replaced by one of "
            f"its synthetic variants), got {p0!r}"
        )
    return p


def _draws(seed: int, epoch: int, key: str) -> tuple[float, int]:
    """Two draws for one real sample: a uniform in [0, 1) and an integer.

    A hash of (seed, epoch, key), not a running RNG: the choice does not depend
    on the order samples arrive in, on the number of workers or on shuffling.
    """
    h = hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=16).digest()
    u = int.from_bytes(h[:8], "little") / 2.0**64
    return u, int.from_bytes(h[8:], "little")


class MixingDataset(IterableDataset):
    """Real samples, each replaced with probability ``p0`` by one of its synthetic variants.

    ``real`` and ``synthetic`` are ShardDatasets or anything ShardDataset takes
    (then built with ``shuffle``, ``decode_density``, ``transform``, ``seed``).
    Variants are found by their JSON ``source_key``; a real sample with none
    stays real. Which samples are replaced, and by which variant, depends only
    on ``seed``, the epoch (``set_epoch``) and the real sample's key. Every
    sample says ``synthetic``: True or False.
    """

    def __init__(self, real, synthetic, p0: float = 0.5, seed: int = 0, shuffle: int = 0,
                 decode_density: bool = True, transform: Callable[[dict], dict] | None = None):
        self.p0 = check_p0(p0)
        kw = dict(shuffle=shuffle, decode_density=decode_density, transform=transform, seed=seed)
        self.real = real if isinstance(real, ShardDataset) else ShardDataset(real, **kw)
        self.synthetic = synthetic if isinstance(synthetic, ShardDataset) else ShardDataset(synthetic, **kw)
        self.seed = seed
        self.epoch = 0
        self.variants = VariantIndex(self.synthetic.urls)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.real.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict]:
        for raw in self.real.raw_samples():
            key = raw["__key__"]
            u, pick = _draws(self.seed, self.epoch, key)
            if u < self.p0 and self.variants.count(key):
                sample = self.synthetic.decode(self.variants.load(key, pick))
                sample["synthetic"] = True
            else:
                sample = self.real.decode(raw)
                sample["synthetic"] = False
            yield sample


# --- batches -----------------------------------------------------------------

def collate(samples: list[dict]) -> dict:
    """A batch: images, densities and masks stacked when all have one shape, ``count`` and
    ``synthetic`` as tensors when every sample has them, everything else (points,
    boxes, captions, labels, and images of mixed sizes) as lists."""
    keys = list(dict.fromkeys(k for s in samples for k in s))
    batch = {}
    for k in keys:
        vals = [s.get(k) for s in samples]
        if (k in STACKED and all(isinstance(v, torch.Tensor) for v in vals)
                and len({tuple(v.shape) for v in vals}) == 1):
            batch[k] = torch.stack(vals)
        elif k in SCALARS and all(v is not None for v in vals):
            batch[k] = torch.tensor(vals, dtype=SCALARS[k])
        else:
            batch[k] = vals
    return batch


def make_loader(real_dir, synthetic_dir=None, p0: float = 0.5, batch_size: int = 32, num_workers: int = 0,
                shuffle: int = 0, seed: int = 0, decode_density: bool = True,
                transform: Callable[[dict], dict] | None = None, **loader_kw) -> DataLoader:
    """A DataLoader over ``real_dir``, mixed with ``synthetic_dir`` at rate ``p0`` when given.

    Call ``loader.dataset.set_epoch(n)`` before each epoch for a new shuffle
    and a new choice of replacements; extra keywords go to the DataLoader.
    """
    kw = dict(shuffle=shuffle, decode_density=decode_density, transform=transform, seed=seed)
    if synthetic_dir is None:
        dataset = ShardDataset(real_dir, **kw)
    else:
        dataset = MixingDataset(real_dir, synthetic_dir, p0=p0, **kw)
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate, **loader_kw)


__all__ = [
    "ShardDataset", "MixingDataset", "VariantIndex", "collate", "make_loader", "shard_urls",
    "assign_shards", "check_p0",
]
