"""Staged samples: finished samples wait under the output until their shard is whole.

Rows of one shard can finish on different actors and nodes, in any order. The
last stage writes each batch's rows of a shard as one *piece* under
``_staging/shard-NNNNNN/`` in the output (a temporary name, then a rename, so
a piece is whole or absent), and returns only a small completion record to the
driver. When every row of a shard is staged, a writer actor reads the pieces
back in plan order and writes the tar (:mod:`factory.shard_writer`). Sample
bytes go worker -> output -> writer and never through the driver.

A piece is a small self-describing file: ``FSP1``, a 4-byte header length, a
JSON header (per row: pos, key, status and its members' extensions and sizes),
then the rows' member bytes, each row's contiguous so a writer reads a row in
one call. JSON and raw bytes rather than pickle: an output folder may be shared,
and reading it must not run code.
"""
from __future__ import annotations

import hashlib
import json
import struct

STAGING = "_staging"
MAGIC = b"FSP1"


def staging_dir(out, shard: int) -> str:
    return out.path(f"{STAGING}/shard-{shard:06d}")


def piece_bytes(rows: list[tuple[int, str, dict | None, dict]]) -> bytes:
    """One piece from rows ``(pos, key, members or None, status)``."""
    header, blobs, offset = [], [], 0
    for pos, key, members, status in rows:
        sizes = [[ext, len(data)] for ext, data in (members or {}).items()]
        header.append({"pos": pos, "key": key, "status": status, "offset": offset, "members": sizes})
        for _, data in (members or {}).items():
            blobs.append(data)
            offset += len(data)
    head = json.dumps({"rows": header}, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<I", len(head)) + head + b"".join(blobs)


def write_piece(out, shard: int, rows: list) -> str:
    """Stage rows of one shard. The name is a digest of their positions, so a batch that is
    retried (its actor died after writing) writes the same piece again instead of a second one."""
    data = piece_bytes(rows)
    positions = ",".join(str(r[0]) for r in rows)
    name = f"p{rows[0][0]:06d}-{len(rows)}-{hashlib.sha256(positions.encode()).hexdigest()[:12]}.piece"
    folder = staging_dir(out, shard)
    out.fs.makedirs(folder, exist_ok=True)
    path = f"{folder}/{name}"
    with out.fs.open(path + ".tmp", "wb") as f:
        f.write(data)
    out.fs.mv(path + ".tmp", path)
    return path


class StagedShard:
    """The staged pieces of one shard, read back as rows in plan order."""

    def __init__(self, out, shard: int):
        self.out, self.shard = out, shard
        self.folder = staging_dir(out, shard)
        self.index: dict[int, tuple[str, dict, int]] = {}  # pos -> (piece, row header, data start)
        for path in sorted(out.fs.glob(f"{self.folder}/*.piece")):
            with out.fs.open(path, "rb") as f:
                magic, (n,) = f.read(4), struct.unpack("<I", f.read(4))
                if magic != MAGIC:
                    raise ValueError(f"{path} is not a staged piece")
                head = json.loads(f.read(n))
            for row in head["rows"]:
                self.index.setdefault(row["pos"], (path, row, 8 + n))

    def missing(self, expected: int) -> list[int]:
        return [p for p in range(expected) if p not in self.index]

    def rows(self, expected: int):
        """``(key, members, status)`` for positions 0..expected-1."""
        handles = {}
        try:
            for pos in range(expected):
                path, row, start = self.index[pos]
                if path not in handles:
                    handles[path] = self.out.fs.open(path, "rb")
                f = handles[path]
                members = None
                if row["members"]:
                    f.seek(start + row["offset"])
                    data = f.read(sum(size for _, size in row["members"]))
                    members, at = {}, 0
                    for ext, size in row["members"]:
                        members[ext] = data[at: at + size]
                        at += size
                yield row["key"], members, row["status"]
        finally:
            for f in handles.values():
                f.close()

    def remove(self) -> None:
        if self.out.fs.exists(self.folder):
            self.out.fs.rm(self.folder, recursive=True)


def remove_staging(out, shards: range | None = None) -> None:
    """Remove staged pieces: all of them, or those of a range of shards."""
    root = out.path(STAGING)
    if not out.fs.exists(root):
        return
    for p in out.fs.ls(root, detail=False):
        name = p.rstrip("/").rsplit("/", 1)[-1]
        if shards is None or (name.startswith("shard-") and int(name[6:]) in shards):
            out.fs.rm(p, recursive=True)
    if shards is None:  # the whole plan: no other run can be staging here
        out.fs.rm(root, recursive=True)


def remove_empty_staging(out) -> None:
    """Remove the staging folder once nothing is staged (a run that completed the plan)."""
    try:
        out.fs.rmdir(out.path(STAGING))
    except (OSError, NotImplementedError):
        pass  # absent, or not empty: a live run of another range still stages there
