"""Source tables: how many samples a source has up front, which ones on demand.

The plan needs a source's size to number its shards, but the refs of a shard
only when that shard is read. World and latents sources compute a ref from its
index; shard folders count their tars once (a tar at a time, keeping one
number per tar) and list a tar's members again when a shard needs them;
FSC147 folders count their split list and read it again on demand. So the
driver holds numbers per source tar, never one entry per sample.
"""
from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
import json
import re
from pathlib import PurePosixPath

import fsspec
import numpy as np

from .errors import FactoryError
from .sources import FSC_SPLITS, SourceRef, check_fsc147_folder, safe_id, shard_urls, tar_members

_FORMULA_ID = re.compile(r"(train|test|seed)_(\d{6,})")


def id_hash(source_id: str) -> int:
    """A 64-bit digest of a source id: duplicate ids are found among these, 8 bytes a sample."""
    return int.from_bytes(hashlib.blake2b(source_id.encode(), digest_size=8).digest(), "little")


class SourceTable:
    """One recipe source: ``len()``, ``refs(start, stop)`` in a fixed order, and warnings."""

    warnings: list[str] = []

    def __len__(self) -> int:
        raise NotImplementedError

    def refs(self, start: int, stop: int) -> list[SourceRef]:
        raise NotImplementedError

    def id_range(self) -> tuple[str, int, int] | None:
        """(prefix, first, stop) when ids are ``<prefix>_<index:06d>`` for a range of indices."""
        return None

    def id_hashes(self) -> np.ndarray:
        """Digests of every id (listed sources only; a transient array, 8 bytes a sample)."""
        return np.asarray([id_hash(r.id) for r in self.refs(0, len(self))], dtype=np.uint64)


class WorldTable(SourceTable):
    def __init__(self, spec):
        self.split, self.start, self.n, self.world_seed = spec.split, spec.start, spec.n, spec.world_seed
        self.warnings = []

    def __len__(self) -> int:
        return self.n

    def refs(self, start: int, stop: int) -> list[SourceRef]:
        out = []
        for i in range(self.start + start, self.start + min(stop, self.n)):
            sid = f"{self.split}_{i:06d}"
            out.append(SourceRef(sid, sid, {"kind": "world", "split": self.split, "index": i,
                                            "world_seed": self.world_seed}))
        return out

    def id_range(self):
        return self.split, self.start, self.start + self.n


class LatentsTable(SourceTable):
    def __init__(self, spec):
        self.start, self.n = spec.start, spec.n
        self.warnings = []

    def __len__(self) -> int:
        return self.n

    def refs(self, start: int, stop: int) -> list[SourceRef]:
        return [SourceRef(f"seed_{i:06d}", f"seed_{i:06d}", {"kind": "latents", "seed": i})
                for i in range(self.start + start, self.start + min(stop, self.n))]

    def id_range(self):
        return "seed", self.start, self.start + self.n


@functools.lru_cache(maxsize=8)
def _tar_keys(url: str) -> tuple[str, ...]:
    """A tar's sample keys in order; cached because consecutive shards read the same tars."""
    return tuple(tar_members(url)[0])


class ShardsTable(SourceTable):
    """A shard folder: one count per tar; a tar's keys are listed again when a shard needs them."""

    def __init__(self, spec):
        self.urls = shard_urls(spec.path)
        self.warnings = []
        counts, hashes = [], []
        for url in self.urls:  # one tar at a time: the driver keeps its count and id digests
            members, error = tar_members(url)
            if error:
                self.warnings.append(f"shard is truncated or corrupt, read what precedes the damage: {error}")
            counts.append(len(members))
            hashes.append(np.fromiter((id_hash(safe_id(k)) for k in members), dtype=np.uint64, count=len(members)))
        total = sum(counts)
        if not total:
            raise FactoryError(f"source shards at {spec.path!r} hold no samples; check the path or regenerate them")
        self.n = min(total, spec.limit) if spec.limit else total
        self.starts = list(itertools.accumulate(counts, initial=0))  # first row of each tar
        self._hashes = np.concatenate(hashes)[: self.n] if hashes else np.zeros(0, np.uint64)

    def __len__(self) -> int:
        return self.n

    def refs(self, start: int, stop: int) -> list[SourceRef]:
        stop = min(stop, self.n)
        out = []
        t = bisect.bisect_right(self.starts, start) - 1
        while start < stop and t < len(self.urls):
            url, first = self.urls[t], self.starts[t]
            keys = _tar_keys(url)[start - first: stop - first]
            out += [SourceRef(safe_id(k), k, {"kind": "shards", "url": url, "key": k}) for k in keys]
            start = self.starts[t + 1]
            t += 1
        return out

    def id_hashes(self) -> np.ndarray:
        # Made during the count above; handed over once so the plan does not keep them.
        hashes, self._hashes = self._hashes, np.zeros(0, np.uint64)
        return hashes


@functools.lru_cache(maxsize=4)
def fsc147_names(path: str, split: str) -> tuple[str, ...]:
    """The image names of an FSC147 folder's split; a FactoryError (at plan time, before any
    actor starts) when the folder lacks what FSC147 has or the split is not in its list."""
    check_fsc147_folder(path)
    fs, root = fsspec.core.url_to_fs(path)
    try:
        with fs.open(f"{root.rstrip('/')}/{FSC_SPLITS}") as f:
            splits = json.load(f)
    except ValueError as e:
        raise FactoryError(f"{path!r}: {FSC_SPLITS} is not JSON ({e})") from None
    if not isinstance(splits, dict) or split not in splits:
        has = ", ".join(splits) if isinstance(splits, dict) else "no split lists"
        raise FactoryError(f"split {split!r} is not in {FSC_SPLITS} of {path!r}; it has {has}")
    return tuple(splits[split])


class FSC147Table(SourceTable):
    def __init__(self, spec):
        self.path, self.split = spec.path, spec.split
        total = len(fsc147_names(self.path, self.split))
        self.n = min(total, spec.limit) if spec.limit else total
        self.warnings = []

    def __len__(self) -> int:
        return self.n

    def refs(self, start: int, stop: int) -> list[SourceRef]:
        names = fsc147_names(self.path, self.split)[start: min(stop, self.n)]
        return [SourceRef(safe_id(PurePosixPath(n).stem), PurePosixPath(n).stem,
                          {"kind": "fsc147", "path": self.path, "image": n}) for n in names]


TABLES = {"world": WorldTable, "latents": LatentsTable, "shards": ShardsTable, "fsc147": FSC147Table}


def source_table(spec) -> SourceTable:
    if spec.kind not in TABLES:
        raise FactoryError(f"unknown source kind {spec.kind!r}")
    return TABLES[spec.kind](spec)


def check_unique_ids(tables: list[SourceTable]) -> None:
    """Keys must be unique, so source ids must be: ranges are compared as ranges, listed ids by
    64-bit digests (one sorted array, freed on return), and listed ids that look like a range's
    ids (``train_000012``) against those ranges."""
    ranges = [r for t in tables if (r := t.id_range())]
    for (p1, a1, b1), (p2, a2, b2) in itertools.combinations(ranges, 2):
        if p1 == p2 and max(a1, a2) < min(b1, b2):
            _duplicate(f"{p1}_{max(a1, a2):06d}")
    listed = [t for t in tables if not t.id_range()]
    if not listed:
        return
    hashes = np.sort(np.concatenate([t.id_hashes() for t in listed]))
    dupes = hashes[1:][hashes[1:] == hashes[:-1]]
    if len(dupes):
        _duplicate(_id_with_hash(listed, int(dupes[0])))
    if ranges:
        for t in listed:
            for start in range(0, len(t), 10_000):
                for ref in t.refs(start, start + 10_000):
                    m = _FORMULA_ID.fullmatch(ref.id)
                    if m and any(m[1] == p and a <= int(m[2]) < b and f"{int(m[2]):06d}" == m[2]
                                 for p, a, b in ranges):
                        _duplicate(ref.id)


def _id_with_hash(tables: list[SourceTable], h: int) -> str:
    for t in tables:
        for start in range(0, len(t), 10_000):
            for ref in t.refs(start, start + 10_000):
                if id_hash(ref.id) == h:
                    return ref.id
    return "?"


def _duplicate(example: str) -> None:
    raise FactoryError(
        f"source ids occur more than once (e.g. {example!r}); keys must be unique: use distinct world "
        f"ranges (start/n) or distinct shard sets"
    )
