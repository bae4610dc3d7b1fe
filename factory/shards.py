"""The output folder: byte-reproducible shards, per-shard stats, index and manifest.

A shard is complete when its tar has its final name; it is written under a
temporary name and renamed, after its stats, so a killed run never leaves a
half-written shard that looks complete. Members are written by webdataset's
``TarWriter`` with a fixed mtime, owner and mode, samples in plan order and
members in sorted order: the same recipe gives the same bytes however many
workers ran and wherever a run was resumed.
"""
from __future__ import annotations

import json
import platform
import re
import time
from collections import Counter
from importlib.metadata import PackageNotFoundError, version

import fsspec
import webdataset as wds

from .errors import FactoryError
from .recipe import Recipe

MANIFEST = "manifest.json"
INDEX = "index.json"
TAR_FORMAT = "GNU_FORMAT"  # keys up to 100 chars plus ".density.npy" exceed ustar's 100
PACKAGES = ("factory-synth", "ray", "torch", "diffusers", "transformers", "open_clip_torch", "webdataset", "numpy", "pillow")


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def stats_name(i: int) -> str:
    return f"shard-{i:06d}.stats.json"


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            pass
    return out


class OutputDir:
    """An output folder or fsspec URI, bound to one recipe by its manifest."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def claim(self, recipe: Recipe) -> None:
        """Write the manifest, or check that the folder already holds this recipe's run."""
        self.claim_spec(recipe.resolved(), recipe.content_hash(), recipe.name)

    def claim_spec(self, spec: dict, h: str, name: str) -> None:
        """The manifest check for any run described by a spec and its hash (recipes, world exports)."""
        manifest = self.path(MANIFEST)
        if self.fs.exists(manifest):
            with self.fs.open(manifest) as f:
                old = json.load(f)
            if old.get("recipe_hash") != h:
                raise FactoryError(
                    f"output {self.url!r} holds a run of another recipe ({old.get('recipe', {}).get('name')!r}, "
                    f"hash {old.get('recipe_hash', '?')[:12]}, this one {name!r}, {h[:12]}). Nothing was changed: "
                    f"choose another --out, or delete that folder to replace its run."
                )
            return
        if self.fs.exists(self.root) and self.fs.ls(self.root):
            raise FactoryError(
                f"output {self.url!r} is not empty and has no {MANIFEST}: it is not a factory output. "
                f"Choose an empty or new folder."
            )
        self.fs.makedirs(self.root, exist_ok=True)
        self.write_json(MANIFEST, {"recipe": spec, "recipe_hash": h, "versions": package_versions()})

    def manifest(self) -> dict:
        with self.fs.open(self.path(MANIFEST)) as f:
            return json.load(f)

    def write_json(self, name: str, obj) -> None:
        self.write_bytes(name, json.dumps(obj, indent=1, sort_keys=False).encode())

    def write_bytes(self, name: str, data: bytes) -> None:
        tmp = self.path(name + ".tmp")
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
        self.fs.mv(tmp, self.path(name))

    def completed(self) -> set[int]:
        """Shards whose tar has its final name (their stats are written first)."""
        done = set()
        for p in self.fs.glob(self.path("shard-*.tar")):
            name = p.rsplit("/", 1)[-1]
            i = int(name[len("shard-"): -len(".tar")])
            if self.fs.exists(self.path(stats_name(i))):
                done.add(i)
        return done

    def remove_partial(self) -> None:
        for p in self.fs.glob(self.path("*.tmp")):
            self.fs.rm(p)

    def read_stats(self, i: int) -> dict:
        with self.fs.open(self.path(stats_name(i))) as f:
            return json.load(f)

    def write_index(self, num_shards: int) -> dict:
        shardlist = [
            {"url": shard_name(i), "nsamples": self.read_stats(i)["generated"]} for i in range(num_shards)
        ]
        index = {"shardlist": shardlist, "wids_version": 1}
        self.write_json(INDEX, index)
        return index


class ShardAssembler:
    """Collects finished samples as they stream in, in any order, and writes each
    shard once all of its planned rows have arrived."""

    def __init__(self, out: OutputDir, expected: dict[int, int], image_format: str):
        self.out = out
        self.expected = expected
        self.image_format = image_format
        self.pending: dict[int, list] = {}
        self.started: dict[int, float] = {}
        self.written: list[int] = []

    def add(self, shard: int, pos: int, key: str, members: dict | None, status: dict) -> int | None:
        """Add one row; returns the shard index if this row completed it."""
        self.started.setdefault(shard, time.time())
        rows = self.pending.setdefault(shard, [])
        rows.append((pos, key, members, status))
        if len(rows) == self.expected[shard]:
            self._write(shard, sorted(rows, key=lambda r: r[0]))
            del self.pending[shard]
            return shard
        return None

    def _write(self, shard: int, rows: list) -> None:
        stats = {
            "shard": shard_name(shard),
            "planned": len(rows),
            "generated": 0,
            "filtered": Counter(),
            "failed": Counter(),
            "filtered_samples": [],
            "failed_samples": [],
        }
        tmp = self.out.path(shard_name(shard) + ".tmp")
        # The writer is closed before the file even when Ctrl-C lands mid-shard: left to the
        # garbage collector, tarfile writes its trailer to the closed file and prints a traceback
        # (the .tmp it wrote is removed by the interrupt handler either way).
        with self.out.fs.open(tmp, "wb") as f, \
                wds.TarWriter(f, user="", group="", mode=0o644, mtime=0, encoder=False, format=TAR_FORMAT) as writer:
            for _, key, members, status in rows:
                for kind in ("failed", "filtered"):
                    if status.get(kind):
                        reason = f"{status[kind]['stage']}: {status[kind]['reason']}"
                        stats[kind][_reason_class(reason)] += 1
                        stats[f"{kind}_samples"].append({"key": key, **status[kind]})
                        break
                else:
                    writer.write({"__key__": key, **members})
                    stats["generated"] += 1
        stats["filtered"] = dict(stats["filtered"])
        stats["failed"] = dict(stats["failed"])
        stats["seconds"] = round(time.time() - self.started.pop(shard), 3)
        self.out.write_json(stats_name(shard), stats)
        self.out.fs.mv(tmp, self.out.path(shard_name(shard)))
        self.written.append(shard)


def _reason_class(reason: str) -> str:
    """Group reasons by their kind: numbers become N ('count 5 differs from label 6' ->
    'count N differs from label N'), and a source location in parentheses is dropped."""
    reason = re.sub(r"\s*\([\w.]+:\d+\)$", "", reason)
    return re.sub(r"-?\d+(\.\d+)?", "N", reason)[:160]
