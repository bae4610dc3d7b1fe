"""Labelled codes: codes drawn from the generator's prior (or real images brought in by its
encoder), synthesised and labelled by an attribute classifier (the labeller); which of them are an
edit's source and target; and the cache of labelled codes every editor fitted on one
generator/labeller pair shares."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from factory.errors import FactoryError
from factory.latent.editors.common import ARTEFACT_VERSION, COUNT_DERIVED, _atomic, model_fingerprint


@dataclass
class LabelledCodes:
    """Codes and the labeller's view of their images.

    ``probs`` (n, k): probability of each attribute; ``count`` (n,): the most
    likely count; ``count_probs`` (n, C): probability of each of ``counts``.
    """

    z: np.ndarray
    probs: np.ndarray
    count: np.ndarray
    count_probs: np.ndarray
    attributes: tuple[str, ...]
    counts: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.z)

    @property
    def labels(self) -> np.ndarray:
        return self.probs > 0.5

    def attribute_index(self, name: int | str) -> int:
        if isinstance(name, (int, np.integer)):
            return int(name)
        if name not in self.attributes:
            raise FactoryError(f"unknown attribute {name!r}: the labelled codes have {', '.join(self.attributes)}")
        return self.attributes.index(name)

    def confident(self, confidence: float, columns: list[int] | None = None, count: bool = False) -> np.ndarray:
        """Codes the labeller is sure of (max(p, 1-p) > confidence) on every attribute in ``columns``
        (all by default), and on the count too when ``count``."""
        cols = list(range(self.probs.shape[1])) if columns is None else columns
        p = self.probs[:, cols]
        ok = (np.maximum(p, 1 - p) > confidence).all(1)
        if count:
            ok &= self.count_probs.max(1) > confidence
        return ok

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for a in (self.z, self.probs, self.count, self.count_probs):
            h.update(np.ascontiguousarray(a).tobytes())
        h.update(json.dumps([self.attributes, self.counts]).encode())
        return h.hexdigest()

    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save_file

        path = Path(path)
        arrays = {"z": self.z.astype(np.float32), "probs": self.probs.astype(np.float32),
                  "count": self.count.astype(np.int64), "count_probs": self.count_probs.astype(np.float32)}
        meta = {"attributes": list(self.attributes), "counts": list(self.counts), "n": len(self)}
        _atomic(path.with_suffix(".safetensors"), lambda tmp: save_file(arrays, str(tmp)))
        _atomic(path.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(meta)))

    @classmethod
    def load(cls, path: str | Path) -> "LabelledCodes":
        from safetensors.numpy import load_file

        path = Path(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        a = load_file(str(path.with_suffix(".safetensors")))
        return cls(a["z"], a["probs"], a["count"], a["count_probs"], tuple(meta["attributes"]), tuple(meta["counts"]))


def fit_seeds(seed: int, n: int) -> list[int]:
    """The prior seeds the fitting codes come from: a hash of the fit seed and an index,
    apart from the seeds of a `latents` source (plain integers from 0)."""
    from factory.sample import sample_seed

    return [sample_seed(seed, f"edit-fit-{i}") % (2**31) for i in range(n)]


def label_latents(generator, labeller, n: int, seed: int = 0, batch: int = 256) -> LabelledCodes:
    """Sample ``n`` codes from the generator's prior, synthesise them and label the images."""
    seeds = fit_seeds(seed, n)
    return _label_codes(labeller, (np.asarray(generator.sample_latents(seeds[i: i + batch]), dtype=np.float32)
                                   for i in range(0, n, batch)), generator)


def label_encoded(generator, labeller, images: np.ndarray, batch: int = 256) -> LabelledCodes:
    """Codes of real images by the generator's encoder, labelled on their reconstructions G(E(x)).

    For generators whose prior draws poorly (the shipped latent-ae's samples often hold digit
    fragments, which the labeller is rarely sure of the count of): edits are then fitted
    where the codes to be edited live, on inverted real images."""
    if not generator.has_encoder:
        raise FactoryError(f"{generator.model_id} has no encoder to bring fit_data images into its latent "
                           f"space: leave fit_data unset to fit on codes sampled from its prior")

    def codes():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(np.ascontiguousarray(images[i: i + batch])).permute(0, 3, 1, 2).float() / 255
            with torch.no_grad():
                yield generator.encode(x.to(generator.device)).cpu().numpy().astype(np.float32)

    return _label_codes(labeller, codes(), generator)


def _label_codes(labeller, batches, generator) -> LabelledCodes:
    """Synthesise each batch of codes and label the images."""
    from factory.latent.attributes import ATTRIBUTES, COUNTS

    zs, probs, counts, cprobs = [], [], [], []
    for z in batches:
        with torch.no_grad():
            images = generator.synthesize(torch.from_numpy(z).to(generator.device))
        out = labeller.predict(images)
        zs.append(z)
        probs.append(out["probs"])
        counts.append(np.asarray(out["count"]))
        cprobs.append(out["count_probs"])
    attrs = tuple(getattr(labeller, "config", {}).get("attributes", ATTRIBUTES))
    cnts = tuple(getattr(labeller, "config", {}).get("counts", COUNTS))
    return LabelledCodes(np.concatenate(zs), np.concatenate(probs).astype(np.float32),
                         np.concatenate(counts).astype(np.int64), np.concatenate(cprobs).astype(np.float32),
                         attrs, cnts)


# --- which codes are source and target -----------------------------------------------


@dataclass
class Split:
    """Source and target codes of one edit, among the confident ones, and the attribute
    columns that should not change (balanced for directions, preserved by the map)."""

    source: np.ndarray  # indices into the codes
    target: np.ndarray
    others: list[int]
    stats: dict = field(default_factory=dict)


def split_codes(codes: LabelledCodes, attribute: int | str, direction: int = 1,
                transition: tuple[int, int] | None = None, confidence: float = 0.9) -> Split:
    """Source/target codes of an attribute edit (off -> on for direction +1) or of a count
    transition (n -> m); only codes confident on every attribute that matters (and on the count)."""
    if attribute == "count":
        if transition is None:
            raise FactoryError("a count edit needs a transition (source count, target count)")
        others = [i for i, a in enumerate(codes.attributes) if a not in COUNT_DERIVED]
        ok = codes.confident(confidence, others, count=True)
        src = np.flatnonzero(ok & (codes.count == transition[0]))
        tgt = np.flatnonzero(ok & (codes.count == transition[1]))
        what = f"count {transition[0]} -> {transition[1]}"
    else:
        a = codes.attribute_index(attribute)
        others = [i for i in range(codes.probs.shape[1]) if i != a]
        ok = codes.confident(confidence)
        on = codes.labels[:, a]
        pos, neg = np.flatnonzero(ok & on), np.flatnonzero(ok & ~on)
        src, tgt = (neg, pos) if direction > 0 else (pos, neg)
        what = f"{codes.attributes[a]} {'off -> on' if direction > 0 else 'on -> off'}"
    p = codes.probs
    sure = {a: round(float((np.maximum(p[:, i], 1 - p[:, i]) > confidence).mean()), 4)
            for i, a in enumerate(codes.attributes)}
    if attribute == "count":
        sure["count"] = round(float((codes.count_probs.max(1) > confidence).mean()), 4)
    stats = {"edit": what, "n_codes": len(codes), "n_confident": int(ok.sum()), "confidence": confidence,
             "n_source": len(src), "n_target": len(tgt), "confident_share": sure}
    if min(len(src), len(tgt)) < 2:
        # Say which attribute keeps codes out: one the labeller is rarely sure of
        # empties the set for every edit, and the fix is there, not in n_fit.
        shares = ", ".join(f"{a} {v:.0%}" for a, v in sure.items())
        raise FactoryError(
            f"too few confident codes for {what}: {len(src)} source and {len(tgt)} target codes among "
            f"{int(ok.sum())} of {len(codes)} with confidence > {confidence} on every attribute (share sure of "
            f"each: {shares}); raise n_fit, lower confidence, or retrain the labeller on the attribute it is "
            f"rarely sure of")
    return Split(src, tgt, others, stats)


def _cells(labels: np.ndarray) -> np.ndarray:
    """One integer per code: its combination of binary labels (a cell of the contingency table)."""
    if labels.shape[1] == 0:
        return np.zeros(len(labels), np.int64)
    return (labels.astype(np.int64) << np.arange(labels.shape[1])).sum(1)


def labelled_codes(generator_ref: str, labeller_ref: str, n: int, seed: int, cache_dir: str | Path,
                   device: str = "cpu", batch: int = 256, data: str | None = None) -> LabelledCodes:
    """Labelled codes of a generator/labeller pair, labelled once and cached beside the artefacts:
    every editor and attribute fitted on the same pair reuses them. Codes are ``n`` prior
    samples, or with ``data`` (a training-data spec: world:SPLIT:N, a shard folder, fsc147:PATH)
    up to ``n`` of its images brought in by the generator's encoder."""
    from factory.latent.attributes import AttributeClassifier
    from factory.latent.generator import load_generator

    what = {"generator": model_fingerprint(generator_ref), "labeller": model_fingerprint(labeller_ref),
            "n": int(n), "seed": int(seed), "version": ARTEFACT_VERSION}
    if data:
        what["data"] = data if data.startswith(("world:", "fsc147:")) else f"{data}@{model_fingerprint(data)}"
    blob = json.dumps(what, sort_keys=True)
    folder = Path(os.path.expanduser(str(cache_dir)))
    stem = folder / f"codes-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"
    if stem.with_suffix(".json").is_file() and stem.with_suffix(".safetensors").is_file():
        return LabelledCodes.load(stem)
    generator = load_generator(generator_ref, device)
    labeller = AttributeClassifier.from_pretrained(labeller_ref, device)
    if data:
        from factory.train.data import load_training_set

        # At the generator's side: FSC147 images are 384 px high of varying width.
        images = load_training_set(data, limit=n, size=generator.image_size).images[:n]
        codes = label_encoded(generator, labeller, images, batch)
    else:
        codes = label_latents(generator, labeller, n, seed, batch)
    folder.mkdir(parents=True, exist_ok=True)
    codes.save(stem)
    return codes


def count_transitions(codes: LabelledCodes, change: int, confidence: float = 0.9,
                      min_codes: int = 20) -> list[tuple[int, int]]:
    """The transitions n -> n+change with at least ``min_codes`` confident codes on both sides."""
    others = [i for i, a in enumerate(codes.attributes) if a not in COUNT_DERIVED]
    ok = codes.confident(confidence, others, count=True)
    have = {c: int((ok & (codes.count == c)).sum()) for c in codes.counts}
    return [(n, n + change) for n in codes.counts
            if have.get(n, 0) >= min_codes and have.get(n + change, 0) >= min_codes]
