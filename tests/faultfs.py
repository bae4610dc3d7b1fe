"""``faulty://``: the local filesystem, with write faults injected on demand (for the write-fault tests).

Rules come from the JSON file named by ``FAULTFS_RULES``, read at every operation
so a test can arm and clear them while a run goes on: a list of
``{"match": "<substring of the path>", "op": "write" | "mv" | "rm", "error": "ENOSPC" | "EACCES" | "store"}``.
``write`` fails the first write to a matching file (after it was created, as a
full disk does), ``mv`` a rename onto a matching path. ``store`` raises the
kind of error an object store's client does (not an OSError).

Registered with fsspec through an entry point (``fsspec.specs``), which the
tests install by putting a tiny ``.dist-info`` on PYTHONPATH, so Ray's worker
processes find it as they would a real filesystem package.
"""
from __future__ import annotations

import errno
import json
import os

from fsspec.implementations.local import LocalFileSystem


class ObjectStoreError(Exception):
    """What an object store's client raises: not an OSError, a status and a message."""


def _rules() -> list[dict]:
    path = os.environ.get("FAULTFS_RULES")
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)


def _fault(op: str, path: str) -> Exception | None:
    for rule in _rules():
        if rule["op"] == op and rule["match"] in path:
            kind = rule["error"]
            if kind == "ENOSPC":
                return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
            if kind == "EACCES":
                return PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
            return ObjectStoreError(f"503 SlowDown: please reduce your request rate (PUT {path})")
    return None


class FaultyFileSystem(LocalFileSystem):
    protocol = ("faulty",)

    def _open(self, path, mode="rb", block_size=None, **kwargs):
        f = super()._open(path, mode, block_size, **kwargs)
        if "r" not in mode:
            fault = _fault("write", self._strip_protocol(path))
            if fault is not None:
                def write(*args, **kw):
                    raise fault
                f.write = write
        return f

    def mv(self, path1, path2, recursive: bool = True, **kwargs):
        fault = _fault("mv", self._strip_protocol(path2))
        if fault is not None:
            raise fault
        return super().mv(path1, path2, recursive=recursive, **kwargs)

    def rm(self, path, recursive=False, maxdepth=None):
        fault = _fault("rm", str(path))
        if fault is not None:
            raise fault
        return super().rm(path, recursive=recursive, maxdepth=maxdepth)


def install(site: "os.PathLike") -> str:
    """Make ``faulty://`` installable: this module and a dist-info with the entry point, in ``site``
    (put it on PYTHONPATH). Returns the folder."""
    import shutil
    from pathlib import Path

    site = Path(site)
    info = site / "faultfs-0.1.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    shutil.copy(__file__, site / "faultfs.py")
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: faultfs\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[fsspec.specs]\nfaulty = faultfs:FaultyFileSystem\n")
    return str(site)
