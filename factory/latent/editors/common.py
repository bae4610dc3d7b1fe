"""What every editor family shares: where fitted edits are cached, model fingerprints, the latent
ball, and :class:`EditorFamily`, the row of the ``EDITORS`` table (its name, its hyper-parameter
defaults, how it is fitted and how a fitted artefact steps codes)."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

# Attributes that are a function of the count (many_objects = 7 or more): a count
# edit is meant to change them, so they are neither balanced nor preserved there.
COUNT_DERIVED = ("many_objects",)
ARTEFACT_VERSION = 1
DEFAULT_CACHE = "~/.cache/factory/edits"
# Files in a model folder that do not decide its outputs (training curves, logs):
# left out of its fingerprint so a log line does not invalidate every fitted edit.
_NOT_WEIGHTS = (".jsonl", ".log", ".md", ".txt.log")


@dataclass(frozen=True)
class EditorFamily:
    """One row of the ``EDITORS`` table: a recipe's ``editor:`` name and the module that holds it.

    ``hyper``: its hyper-parameters and their defaults (a spec carries them all, so the cache key
    changes whenever one does). ``fit(spec, codes) -> (tensors, stats)``: fitted on labelled codes;
    a family that is not ``labelled`` (the continuous controls, fitted on the generator alone)
    is fitted by ``fit(spec, None, device)``.
    ``step(artefact, z, target, check, place_check) -> (D(z), reasons, moves)``: the per-unit-alpha
    step of a batch of codes, and per code why it was left unchanged and what the edit did (None
    for editors that move every code and say nothing of where objects went).
    """

    name: str
    module: str
    hyper: dict
    fit: Callable
    step: Callable
    labelled: bool = True


def project_to_ball(z: torch.Tensor, radius: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes outside the generator's latent ball scaled back onto it, and which were."""
    if radius is None:
        return z, torch.zeros(len(z), dtype=torch.bool, device=z.device)
    norms = z.norm(dim=1, keepdim=True)
    out = norms[:, 0] > radius
    return torch.where(out[:, None], z * (radius / norms.clamp_min(1e-12)), z), out


def model_fingerprint(ref: str) -> str:
    """A hash of a model folder's weight and config files (contents; size + mtime above 256 MB);
    a hub id that is not a local path stands for itself."""
    p = Path(os.path.expanduser(str(ref)))
    if not p.exists():
        return f"ref:{ref}"
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and not f.name.endswith(_NOT_WEIGHTS))
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        st = f.stat()
        if st.st_size > 256 * 2**20:
            h.update(f"{st.st_size}/{st.st_mtime_ns}".encode())
            continue
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(2**20), b""):
                h.update(chunk)
    return h.hexdigest()


def _atomic(path: Path, write) -> None:
    """Write through a temporary name in the same folder and rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")
