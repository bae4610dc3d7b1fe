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
from fsspec.registry import known_implementations

from .errors import FactoryError
from .recipe import Recipe

MANIFEST = "manifest.json"
LEASES = "_leases"  # see factory.lease
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
        self.fs, self.root = open_filesystem(self.url)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def claim(self, recipe: Recipe, plan: dict | None = None) -> None:
        """Write the manifest, or check that the folder already holds this recipe's run."""
        self.claim_spec(recipe.resolved(), recipe.content_hash(), recipe.name, plan)

    def claim_spec(self, spec: dict, h: str, name: str, plan: dict | None = None) -> None:
        """The manifest check for any run described by a spec and its hash (recipes, world exports)."""
        if not self.check_claim(h, name):
            self.write_manifest(spec, h, plan)

    def check_claim(self, h: str, name: str) -> bool:
        """Whether the folder already holds this run (True), is free for it (False), or else refuse.
        Reads only, so a refused run writes nothing."""
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
            return True
        if self.fs.exists(self.root) and [p for p in self.fs.ls(self.root, detail=False)
                                          if p.rstrip("/").rsplit("/", 1)[-1] != LEASES]:
            raise FactoryError(
                f"output {self.url!r} is not empty and has no {MANIFEST}: it is not a factory output. "
                f"Choose an empty or new folder."
            )
        return False

    def write_manifest(self, spec: dict, h: str, plan: dict | None = None) -> None:
        self.fs.makedirs(self.root, exist_ok=True)
        manifest = {"recipe": spec, "recipe_hash": h, "versions": package_versions()}
        if plan:  # totals, so `factory inspect` can say which shards are missing without the sources
            manifest["plan"] = plan
        self.write_json(MANIFEST, manifest)

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

    def remove_partial(self, shards: range | None = None) -> None:
        """Remove what killed runs left half-written: every temporary file, or, given the range of
        shards a run holds the lease for, only those shards' (other ranges may be live runs')."""
        from .staging import remove_staging

        for p in self.fs.glob(self.path("*.tmp")):
            shard = _shard_of(p.rsplit("/", 1)[-1])
            if shards is None or (shard is not None and shard in shards):
                self.fs.rm(p)
        remove_staging(self, shards)

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
    """Collects finished samples as they stream in, in any order, and writes each shard once
    all of its planned rows have arrived: all in one process (world exports, the bare-loop
    benchmark). Runs write shards on the workers instead (:mod:`factory.shard_writer`), with
    the same :func:`write_shard`."""

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
            write_shard(self.out, shard, [r[1:] for r in sorted(rows, key=lambda r: r[0])],
                        self.started.pop(shard))
            del self.pending[shard]
            self.written.append(shard)
            return shard
        return None


def write_shard(out: OutputDir, shard: int, rows, started: float) -> dict:
    """Write one shard from its rows ``(key, members, status)`` in plan order: tar under a
    temporary name, stats, then the rename that makes it complete. Returns its stats."""
    stats = {
        "shard": shard_name(shard),
        "planned": 0,
        "generated": 0,
        "filtered": Counter(),
        "failed": Counter(),
        "filtered_samples": [],
        "failed_samples": [],
    }
    spent = Counter()  # wall seconds per stage, summed over the shard's samples (never in labels)
    import webdataset as wds  # here, not at the top: it imports torch, which only shard writers need

    tmp = out.path(shard_name(shard) + ".tmp")
    # The writer is closed before the file even when Ctrl-C lands mid-shard: left to the
    # garbage collector, tarfile writes its trailer to the closed file and prints a traceback
    # (the .tmp it wrote is removed by the interrupt handler either way).
    with out.fs.open(tmp, "wb") as f, \
            wds.TarWriter(f, user="", group="", mode=0o644, mtime=0, encoder=False, format=TAR_FORMAT) as writer:
        for key, members, status in rows:
            stats["planned"] += 1
            for stage, seconds in status.get("seconds", {}).items():
                spent[stage] += seconds
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
    stats["seconds"] = round(time.time() - started, 3)
    stats["stage_seconds"] = {stage: round(t, 3) for stage, t in spent.items()}
    out.write_json(stats_name(shard), stats)
    out.fs.mv(tmp, out.path(shard_name(shard)))
    return stats


def _shard_of(name: str) -> int | None:
    m = re.match(r"shard-(\d+)\.", name)
    return int(m[1]) if m else None


def open_filesystem(url: str):
    """(filesystem, root) of an output URL; a filesystem that is not installed is a user error
    that names the package to install."""
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        protocol = url.split("://", 1)[0]
        impl = known_implementations.get(protocol, {})
        package = impl.get("class", "").split(".")[0] or "the fsspec filesystem for it"
        raise FactoryError(
            f"output {url!r} needs the {protocol}:// filesystem, which is not installed here ({e}). "
            f"Install it with `pip install {package}` (on every node of a cluster) and run again; "
            f"nothing was written."
        ) from None
    except ValueError as e:
        if "Protocol not known" not in str(e):
            raise
        protocol = url.split("://", 1)[0]
        raise FactoryError(
            f"output {url!r}: no fsspec filesystem is known for {protocol}:// ({e}). Check the URL's scheme "
            f"(e.g. s3://, gs://, file://) or install the package that provides it; nothing was written."
        ) from None


def _reason_class(reason: str) -> str:
    """Group reasons by their kind: numbers become N ('count 5 differs from label 6' ->
    'count N differs from label N'), and a source location in parentheses is dropped."""
    reason = re.sub(r"\s*\([\w.]+:\d+\)$", "", reason)
    return re.sub(r"-?\d+(\.\d+)?", "N", reason)[:160]
