"""Latent editors: balanced-centroid directions, the latent Wasserstein editor, classifier guidance.

All three learn from *labelled codes*: codes drawn from the generator's prior,
synthesised, and labelled by an attribute classifier (the labeller) with the
probability of each binary attribute and of each count (:func:`label_latents`).

- :func:`balanced_centroid_direction`: keep the codes the labeller is sure of
  on every attribute, draw positive and negative halves with the *same*
  distribution of the other attributes, u = normalised difference of their
  centroids. :func:`centroid_direction` is the unbalanced baseline; when
  attributes are correlated in the prior (dark backgrounds with warm objects,
  say) its direction drags the correlated attributes along.
- :class:`WassersteinEditor` (:func:`fit_wasserstein_map`): an affine map H so that z + alpha*H(z) of the
  source codes (attribute off, or n objects) matches the target codes under a
  Sinkhorn divergence, with per-sample weights, an attribute-preservation term,
  a step penalty and early stopping on a validation split.
- :class:`ClassifierGuidedEditor` (:func:`classifier_edit`): the Latent-Transformer-style baseline; a latent
  classifier fitted on the labelled codes, and z' found by gradient descent on
  BCE(classifier(z'), target) + lambda*||z' - z||^2.

Every fitted direction/map is an :class:`EditArtefact`, saved once under a
cache folder by :func:`fit_or_load` and keyed by a hash of everything that
decides it (the spec, and the generator's and labeller's file hashes).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import nn

from factory.errors import FactoryError

EDITORS = ("balanced_centroid", "centroid", "wasserstein", "classifier", "clone")
# Attributes that are a function of the count (many_objects = 7 or more): a count
# edit is meant to change them, so they are neither balanced nor preserved there.
COUNT_DERIVED = ("many_objects",)
ARTEFACT_VERSION = 1
DEFAULT_CACHE = "~/.cache/factory/edits"
# Files in a model folder that do not decide its outputs (training curves, logs):
# left out of its fingerprint so a log line does not invalidate every fitted edit.
_NOT_WEIGHTS = (".jsonl", ".log", ".md", ".txt.log")

# Hyper-parameters of each editor, with their defaults; a spec carries them all
# so the cache key changes whenever one does.
HYPER_DEFAULTS = {
    "balanced_centroid": {},
    "centroid": {},
    "wasserstein": {
        # Sinkhorn blur in units of spread*sqrt(d) (about the typical distance between codes).
        # Smaller blurs are dominated by sampling noise in 128 dimensions: two samples
        # of 512 codes from one Gaussian are 94 apart at blur 0.5 (in spread units),
        # while a shift of 2 adds only 2; at 0.5*sqrt(d) they are 3.3 apart and the
        # shift adds 2.0. Covariance changes barely register at any blur here: the
        # affine part refines a map whose bulk is the translation.
        "blur": 0.5,
        # Weight of the other-attribute preservation term. On synthetic codes (d=128) with
        # a correlated pair, 5 cut the drift of an independent attribute from 0.45 to 0.11
        # (in its latent units) at the same target rate and validation divergence as 0.
        "preserve": 5.0,
        "l2": 0.01,            # weight of the mean squared step (per dimension, in spread units)
        "lr": 0.01,
        "batch": 256,          # the cost matrix is batch^2: 512 costs 5x more a step on a CPU core
        "max_steps": 1500,
        "eval_every": 10,
        "patience": 8,         # evaluations without a better validation divergence
        "val_fraction": 0.2,
        "max_seconds": 45.0,
    },
    "classifier": {
        "hidden": 0,           # 0: logistic regression on codes; >0: a one-hidden-layer MLP
        "lam": 0.5,            # proximity weight, per dimension in spread units
        "steps": 100,
        "lr": 0.05,
    },
    # Count edits only, on generators with a spatial grid in the code (factory.latent.clone).
    "clone": {
        "max_box": 4,          # largest object copied, in grid cells a side (4 cells = 32 px on the latent-ae)
        # Least chessboard distance, in cells, from the copy to another object's cells. 1 (cells may
        # touch) added an object as often as 2 on the latent-ae (0.81 vs 0.78 for 1 -> 2) and
        # finds room more often: a digit rarely fills its cells to the edge.
        "gap": 1,
        # Quiet cells around the object copied with it (never over another object's cells):
        # a stroke's faint edge falls below the threshold; 1 added an object 3-7 points more often.
        "margin": 1,
        # Edits tried per code when the stage can check them (count edits: the labeller counts
        # each synthesised try, and the code takes the try it is surest has the target count).
        # 1: the editor's first choice, unchecked. See clone_edit for why 16.
        "tries": 16,
        # px of background the decoded copy must keep from every other object's ink (the world's
        # gap; the pixel check reads two blobs closer than that as one). 0: no pixel check.
        "pixel_gap": 3,
    },
}


# --- labelled codes ------------------------------------------------------------------


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


def _allocate(weights: np.ndarray, total: int, caps: np.ndarray | None) -> np.ndarray:
    """Integer quotas proportional to ``weights`` summing to ``total`` (largest remainders), within ``caps``."""
    quota = np.zeros(len(weights), np.int64)
    left = total
    active = weights > 0
    while left > 0 and active.any():
        share = weights * active / (weights * active).sum() * left
        add = np.floor(share).astype(np.int64)
        rest = left - add.sum()
        order = np.argsort(-(share - add), kind="stable")
        add[order[:rest]] += 1
        if caps is not None:
            add = np.minimum(add, caps - quota)
            active &= quota + add < caps
        quota += add
        if add.sum() == 0:
            break
        left = total - quota.sum()
    return quota


def balanced_sample(codes: LabelledCodes, split: Split, n0: int = 1000, oversample: bool = False,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """N0 codes, half source and half target, with the same counts in every cell of the
    other attributes on both sides.

    Without oversampling a cell's quota is its smaller side (scaled down to N0/2 in
    all); with it, quotas follow the cells' share of the confident codes and the
    side short of its quota is drawn with replacement. Cells empty on one side
    cannot be balanced and are left out (reported).
    """
    rng = np.random.default_rng(seed)
    labels = codes.labels[:, split.others]
    cs, ct = _cells(labels[split.source]), _cells(labels[split.target])
    cells = np.union1d(cs, ct)
    ns = np.array([(cs == c).sum() for c in cells])
    nt = np.array([(ct == c).sum() for c in cells])
    usable = (ns > 0) & (nt > 0)
    half = n0 // 2
    if oversample:
        quota = _allocate((ns + nt) * usable, half, None)
    else:
        smaller = np.minimum(ns, nt) * usable
        quota = _allocate(smaller.astype(float), min(half, int(smaller.sum())), smaller)
    src, tgt = [], []
    for c, q in zip(cells, quota):
        if q == 0:
            continue
        for pool, out in ((split.source[cs == c], src), (split.target[ct == c], tgt)):
            out.append(rng.choice(pool, size=q, replace=len(pool) < q))
    src = np.concatenate(src) if src else np.zeros(0, np.int64)
    tgt = np.concatenate(tgt) if tgt else np.zeros(0, np.int64)
    names = [codes.attributes[i] for i in split.others]
    table = [{"cell": {n: bool(c >> j & 1) for j, n in enumerate(names)}, "source": int(a), "target": int(b),
              "quota": int(q)} for c, a, b, q in zip(cells, ns, nt, quota)]
    stats = {"n0": n0, "oversample": oversample, "used_source": len(src), "used_target": len(tgt),
             "unique_source": len(np.unique(src)), "unique_target": len(np.unique(tgt)),
             "cells": len(cells), "cells_unbalanceable": int((~usable).sum()), "table": table}
    return src, tgt, stats


@dataclass
class Direction:
    """A unit direction u in code space (source -> target) and how it was found."""

    u: np.ndarray
    stats: dict


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    if n == 0 or not np.isfinite(n):
        raise FactoryError("the source and target centroids coincide: the labeller does not separate them; "
                           "check the labeller or raise n_fit")
    return (v / n).astype(np.float32)


def balanced_centroid_direction(codes: LabelledCodes, attribute_index: int | str, n0: int = 1000,
                                confidence: float = 0.9, oversample: bool = False, seed: int = 0,
                                direction: int = 1, transition: tuple[int, int] | None = None) -> Direction:
    """u = normalised (mean(target half) - mean(source half)) of a balanced sample of N0 confident codes.

    ``attribute_index`` is an attribute's index or name, or "count" with a
    ``transition`` (n, m). For direction +1 the target half has the attribute.
    """
    split = split_codes(codes, attribute_index, direction, transition, confidence)
    src, tgt, bstats = balanced_sample(codes, split, n0, oversample, seed)
    if min(len(src), len(tgt)) == 0:
        raise FactoryError(f"no cell of the other attributes has codes on both sides of {split.stats['edit']}: "
                           f"raise n_fit, lower confidence or use oversample: true")
    u = _unit(codes.z[tgt].mean(0) - codes.z[src].mean(0))
    return Direction(u, {**split.stats, **bstats, "method": "balanced_centroid"})


def centroid_direction(codes: LabelledCodes, attribute_index: int | str, confidence: float = 0.9,
                       direction: int = 1, transition: tuple[int, int] | None = None) -> Direction:
    """The unbalanced baseline: difference of the centroids of all confident target and source codes."""
    split = split_codes(codes, attribute_index, direction, transition, confidence)
    u = _unit(codes.z[split.target].mean(0) - codes.z[split.source].mean(0))
    return Direction(u, {**split.stats, "used_source": len(split.source), "used_target": len(split.target),
                         "method": "centroid"})


# --- latent classifiers --------------------------------------------------------------


class LatentClassifier(nn.Module):
    """Logistic regression (hidden=0) or a one-hidden-layer MLP on codes.

    Inputs are standardised with the fitting codes' mean and spread (stored as
    buffers), so the same learning rate suits generators of any code scale.
    """

    def __init__(self, dim: int, outputs: int, hidden: int = 0):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(()))
        self.net = nn.Linear(dim, outputs) if hidden == 0 else nn.Sequential(
            nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, outputs))
        self.hidden = hidden

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net((z - self.mean) / self.scale)


def fit_latent_classifier(z: np.ndarray, targets: np.ndarray, multiclass: bool = False, hidden: int = 0,
                          steps: int = 300, seed: int = 0) -> LatentClassifier:
    """Fit on soft labels: per-output BCE (binary attributes) or cross-entropy (counts, ``targets`` (n, C))."""
    g = torch.Generator().manual_seed(seed)
    zt, yt = torch.as_tensor(z, dtype=torch.float32), torch.as_tensor(targets, dtype=torch.float32)
    clf = LatentClassifier(zt.shape[1], yt.shape[1], hidden)
    clf.mean.copy_(zt.mean(0))
    clf.scale.copy_(zt.std(0).pow(2).mean().sqrt().clamp_min(1e-6))
    with torch.no_grad():  # a seeded init, independent of the global torch RNG
        for p in clf.net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.01 if p.ndim > 1 else 0.0))
    opt = torch.optim.Adam(clf.net.parameters(), lr=0.05 if hidden == 0 else 0.01, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        logits = clf(zt)
        loss = (nn.functional.cross_entropy(logits, yt) if multiclass
                else nn.functional.binary_cross_entropy_with_logits(logits, yt))
        loss.backward()
        opt.step()
    return clf.eval()


def _binary_kl(p_new: torch.Tensor, p_old: torch.Tensor) -> torch.Tensor:
    """KL(p_old || p_new) per element for Bernoulli probabilities: zero when nothing changed."""
    eps = 1e-6
    p_new, p_old = p_new.clamp(eps, 1 - eps), p_old.clamp(eps, 1 - eps)
    return p_old * (p_old / p_new).log() + (1 - p_old) * ((1 - p_old) / (1 - p_new)).log()


def classifier_edit(classifier: LatentClassifier, z: torch.Tensor, target: torch.Tensor, column: int | None = None,
                    lam: float = 0.5, steps: int = 100, lr: float = 0.05) -> torch.Tensor:
    """z' minimising BCE(classifier(z')[column], target) + lam * mean((z'-z)/spread)^2, from z.

    ``column`` None: the classifier is a count head and ``target`` the class indices
    (cross-entropy). Spread is the classifier's code scale, so lam is scale-free.
    """
    classifier = classifier.eval()
    for p in classifier.parameters():
        p.requires_grad_(False)
    scale = float(classifier.scale)
    z = z.detach().float()
    delta = torch.zeros_like(z, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr * scale)
    for _ in range(steps):
        opt.zero_grad()
        logits = classifier(z + delta)
        if column is None:
            fit = nn.functional.cross_entropy(logits, target.long(), reduction="none")
        else:
            fit = nn.functional.binary_cross_entropy_with_logits(logits[:, column], target.float(), reduction="none")
        loss = (fit + lam * (delta / scale).pow(2).mean(1)).sum()
        loss.backward()
        opt.step()
    return (z + delta).detach()


# --- the latent Wasserstein editor ---------------------------------------------------


def sinkhorn(blur: float):
    from geomloss import SamplesLoss

    # Tensorized: a few thousand codes fit in memory, and KeOps needs a compiler we do not ship.
    return SamplesLoss("sinkhorn", p=2, blur=blur, scaling=0.5, debias=True, backend="tensorized")


def _normalised(w: np.ndarray | torch.Tensor) -> torch.Tensor:
    w = torch.as_tensor(w, dtype=torch.float32).clamp_min(0)
    return w / w.sum()


def fit_wasserstein_map(source: np.ndarray, target: np.ndarray, source_w: np.ndarray | None = None,
                        target_w: np.ndarray | None = None, alpha: float = 2.0,
                        preserve_model: LatentClassifier | None = None, seed: int = 0,
                        **hyper) -> tuple[np.ndarray, np.ndarray, dict]:
    """An affine map H(z) = A z + b so that z + alpha*H(z) of the source codes matches the target codes.

    Loss: the Sinkhorn divergence between the (weighted) moved source and target
    codes, plus ``preserve`` * KL of ``preserve_model``'s predictions before and
    after the move, plus ``l2`` * the mean squared step. Codes are divided by
    their spread first, and ``blur`` is in units of spread*sqrt(d). Stops early when the
    validation divergence has not improved for ``patience`` evaluations. Returns
    (A, b, stats) in the codes' own units.
    """
    h = {**HYPER_DEFAULTS["wasserstein"], **hyper}
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    src, tgt = np.asarray(source, np.float32), np.asarray(target, np.float32)
    sw = np.ones(len(src)) if source_w is None else np.asarray(source_w, np.float64)
    tw = np.ones(len(tgt)) if target_w is None else np.asarray(target_w, np.float64)
    scale = float(np.sqrt(np.concatenate([src, tgt]).var(0).mean())) or 1.0

    def parts(n):
        idx = rng.permutation(n)
        k = max(1, int(round(n * h["val_fraction"])))
        return idx[k:], idx[:k]

    (s_tr, s_va), (t_tr, t_va) = parts(len(src)), parts(len(tgt))
    xs, xt = torch.from_numpy(src / scale), torch.from_numpy(tgt / scale)
    sw_t, tw_t = torch.as_tensor(sw, dtype=torch.float32), torch.as_tensor(tw, dtype=torch.float32)
    d = xs.shape[1]
    loss_fn = sinkhorn(h["blur"] * math.sqrt(d))

    # Start at the weighted centroid translation: the editor begins where the
    # centroid editor ends, and the Sinkhorn term only has to refine it.
    mu_s = (sw_t[s_tr, None] * xs[s_tr]).sum(0) / sw_t[s_tr].sum()
    mu_t = (tw_t[t_tr, None] * xt[t_tr]).sum(0) / tw_t[t_tr].sum()
    A = torch.zeros(d, d, requires_grad=True)
    b = ((mu_t - mu_s) / alpha).clone().requires_grad_(True)
    # Adam moves every entry by about lr a step: A has d^2 entries whose random-sign
    # steps add up to a spectral norm of lr*sqrt(steps)*2*sqrt(d), so A learns at lr/sqrt(d).
    opt = torch.optim.Adam([{"params": [A], "lr": h["lr"] / math.sqrt(d)}, {"params": [b], "lr": h["lr"]}])

    def moved(x):
        # A acts on codes centred at the source centroid, so A and b do not fight
        # over where the codes' (non-zero) mean goes.
        return x + alpha * ((x - mu_s) @ A.T + b)

    def preservation(x, x_new, w):
        if preserve_model is None or h["preserve"] == 0:
            return torch.zeros(())
        before = torch.sigmoid(preserve_model(x * scale)).detach()
        after = torch.sigmoid(preserve_model(x_new * scale))
        return (w * _binary_kl(after, before).mean(1)).sum()

    def val_div():
        with torch.no_grad():
            return float(loss_fn(_normalised(sw_t[s_va]), moved(xs[s_va]), _normalised(tw_t[t_va]), xt[t_va]))

    with torch.no_grad():
        identity = float(loss_fn(_normalised(sw_t[s_va]), xs[s_va], _normalised(tw_t[t_va]), xt[t_va]))
    translation = val_div()
    best, best_state, bad, step, stopped = translation, (A.detach().clone(), b.detach().clone()), 0, 0, "max_steps"
    n_b = int(h["batch"])
    for step in range(1, int(h["max_steps"]) + 1):
        bs = s_tr[torch.randint(len(s_tr), (min(n_b, len(s_tr)),), generator=g).numpy()] if len(s_tr) > n_b else s_tr
        bt = t_tr[torch.randint(len(t_tr), (min(n_b, len(t_tr)),), generator=g).numpy()] if len(t_tr) > n_b else t_tr
        ws, wt = _normalised(sw_t[bs]), _normalised(tw_t[bt])
        x = xs[bs]
        x_new = moved(x)
        loss = (loss_fn(ws, x_new, wt, xt[bt]) + h["preserve"] * preservation(x, x_new, ws)
                + h["l2"] * (ws * (x_new - x).pow(2).mean(1)).sum())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % int(h["eval_every"]) == 0:
            v = val_div()
            if v < best - 1e-6 * max(1.0, abs(best)):
                best, best_state, bad = v, (A.detach().clone(), b.detach().clone()), 0
            else:
                bad += 1
            if bad >= h["patience"]:
                stopped = "early_stopping"
                break
            if time.perf_counter() - t0 > h["max_seconds"]:
                stopped = "max_seconds"
                break
    A_best, b_best = best_state
    stats = {"method": "wasserstein", "scale": scale, "blur": h["blur"], "alpha": alpha,
             "val_divergence_identity": identity, "val_divergence_translation": translation,
             "val_divergence": best, "steps": step, "stopped": stopped,
             "train_source": len(s_tr), "train_target": len(t_tr), "val_source": len(s_va), "val_target": len(t_va),
             "seconds": round(time.perf_counter() - t0, 2), "hyper": h}
    # x = z/scale, so H(z) = scale * (A (z/scale - mu_s) + b) = A z + scale*(b - A mu_s).
    b_out = (b_best - A_best @ mu_s) * scale
    return A_best.numpy().astype(np.float32), b_out.numpy().astype(np.float32), stats


def _confidence_weights(codes: LabelledCodes, idx: np.ndarray, attribute: int | str, transition) -> np.ndarray:
    """How sure the labeller is that each code has its side's label: its per-sample weight."""
    if attribute == "count":
        col = list(codes.counts).index(int(codes.count[idx[0]])) if len(idx) else 0
        return codes.count_probs[idx, col].astype(np.float64)
    a = codes.attribute_index(attribute)
    p = codes.probs[idx, a].astype(np.float64)
    return np.maximum(p, 1 - p)


def _match_cells(codes: LabelledCodes, split: Split, tw: np.ndarray) -> np.ndarray:
    """Reweight target codes so their other-attribute cells are as common as among the source codes.

    Without this, when the target half has, say, more dark backgrounds than the
    source half (correlated attributes), the map would learn to darken the
    background too: the reweighting is the balanced sampling of the centroid
    editor, done with weights instead of draws.
    """
    labels = codes.labels[:, split.others]
    cs, ct = _cells(labels[split.source]), _cells(labels[split.target])
    w = tw.copy()
    for c in np.unique(ct):
        in_t = ct == c
        share_s = (cs == c).mean()
        share_t = tw[in_t].sum() / tw.sum()
        w[in_t] *= share_s / share_t if share_t > 0 else 0.0
    if w.sum() == 0:  # no cell in common: fall back to the confidence weights
        return tw
    return w


def wasserstein_map(codes: LabelledCodes, attribute: int | str, direction: int = 1,
                    transition: tuple[int, int] | None = None, confidence: float = 0.9, alpha: float = 2.0,
                    seed: int = 0, **hyper) -> tuple[np.ndarray, np.ndarray, dict]:
    """The latent Wasserstein editor for one attribute edit or count transition, from labelled codes."""
    split = split_codes(codes, attribute, direction, transition, confidence)
    sw = _confidence_weights(codes, split.source, attribute, transition)
    tw = _match_cells(codes, split, _confidence_weights(codes, split.target, attribute, transition))
    preserve = None
    if split.others:
        # The labeller's other attributes through a latent logistic model fitted on all
        # labelled codes: differentiable in z and cheap, unlike synthesise + labeller.
        preserve = fit_latent_classifier(codes.z, codes.probs[:, split.others], seed=seed)
    A, b, stats = fit_wasserstein_map(codes.z[split.source], codes.z[split.target], sw, tw, alpha, preserve,
                                      seed, **hyper)
    stats.update(split.stats)
    stats["preserved"] = [codes.attributes[i] for i in split.others]
    return A, b, stats


class WassersteinEditor:
    """The latent Wasserstein editor as an object: ``fit`` on labelled codes, then ``edit``.

    z' = z + alpha*H(z) with H(z) = A z + b; at the alpha it was fitted with,
    the source codes' distribution is carried onto the target codes'.
    """

    def __init__(self, alpha: float = 2.0, confidence: float = 0.9, seed: int = 0, **hyper):
        unknown = set(hyper) - set(HYPER_DEFAULTS["wasserstein"])
        if unknown:
            raise FactoryError(f"unknown wasserstein hyper-parameters {sorted(unknown)}; "
                               f"known: {sorted(HYPER_DEFAULTS['wasserstein'])}")
        self.alpha, self.confidence, self.seed = alpha, confidence, seed
        self.hyper = {**HYPER_DEFAULTS["wasserstein"], **hyper}
        self.A = self.b = None
        self.stats: dict = {}

    def fit(self, codes: LabelledCodes, attribute: int | str, direction: int = 1,
            transition: tuple[int, int] | None = None) -> "WassersteinEditor":
        A, b, self.stats = wasserstein_map(codes, attribute, direction, transition, self.confidence, self.alpha,
                                           self.seed, **self.hyper)
        self.A, self.b = torch.from_numpy(A), torch.from_numpy(b)
        return self

    def displacement(self, z: torch.Tensor) -> torch.Tensor:
        if self.A is None:
            raise FactoryError("WassersteinEditor.edit before fit: fit it on labelled codes first")
        return z.float() @ self.A.to(z.device).T + self.b.to(z.device)

    def edit(self, z: torch.Tensor, alpha: float | None = None, radius: float | None = None):
        """(z', projected): z + alpha*H(z) (alpha defaults to the fitted one), kept in the latent ball."""
        return project_to_ball(z.float() + (self.alpha if alpha is None else alpha) * self.displacement(z), radius)


class ClassifierGuidedEditor:
    """The Latent-Transformer-style baseline as an object: a latent classifier fitted on labelled
    codes (an attribute head, or a count head over the labeller's counts), and edits by
    gradient steps on BCE(classifier(z'), target) + lam*||z' - z||^2."""

    def __init__(self, hidden: int = 0, lam: float = 0.5, steps: int = 100, lr: float = 0.05, seed: int = 0):
        self.hidden, self.lam, self.steps, self.lr, self.seed = hidden, lam, steps, lr, seed
        self.classifier: LatentClassifier | None = None
        self.column: int | None = None
        self.counts: tuple[int, ...] = ()

    def fit(self, codes: LabelledCodes, attribute: int | str) -> "ClassifierGuidedEditor":
        if attribute == "count":
            self.classifier = fit_latent_classifier(codes.z, codes.count_probs, True, self.hidden, seed=self.seed)
            self.column, self.counts = None, tuple(codes.counts)
        else:
            self.classifier = fit_latent_classifier(codes.z, codes.probs, False, self.hidden, seed=self.seed)
            self.column = codes.attribute_index(attribute)
        return self

    def edit(self, z: torch.Tensor, target, radius: float | None = None):
        """(z', projected). ``target``: 0/1 (or a tensor of them) for an attribute, the target
        count(s) for a count head."""
        if self.classifier is None:
            raise FactoryError("ClassifierGuidedEditor.edit before fit: fit it on labelled codes first")
        t = torch.as_tensor(target, device=z.device).expand(len(z))
        if self.column is None:
            unknown = sorted({int(c) for c in t} - set(self.counts))
            if unknown:
                raise FactoryError(f"target count {unknown[0]} is outside the counts "
                                   f"{self.counts[0]}-{self.counts[-1]} the labeller knows")
            t = torch.tensor([self.counts.index(int(c)) for c in t], device=z.device)
        z_new = classifier_edit(self.classifier.to(z.device), z, t, self.column, self.lam, self.steps, self.lr)
        return project_to_ball(z_new, radius)


# --- artefacts: fitted once, saved, reused --------------------------------------------


def project_to_ball(z: torch.Tensor, radius: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes outside the generator's latent ball scaled back onto it, and which were."""
    if radius is None:
        return z, torch.zeros(len(z), dtype=torch.bool, device=z.device)
    norms = z.norm(dim=1, keepdim=True)
    out = norms[:, 0] > radius
    return torch.where(out[:, None], z * (radius / norms.clamp_min(1e-12)), z), out


@dataclass
class EditArtefact:
    """A fitted edit: its spec, tensors and fitting statistics.

    Directions hold ``u``; Wasserstein maps ``A`` and ``b``; classifier editors
    the latent classifier's state (``clf.*``). :meth:`edit` applies any of them.
    """

    id: str
    spec: dict
    tensors: dict[str, torch.Tensor]
    stats: dict
    path: str | None = None
    from_cache: bool = False
    _classifier: LatentClassifier | None = field(default=None, repr=False)

    @property
    def editor(self) -> str:
        return self.spec["editor"]

    @property
    def transition(self) -> tuple[int, int] | None:
        t = self.spec.get("transition")
        return tuple(t) if t else None

    def classifier(self) -> LatentClassifier:
        if self._classifier is None:
            state = {k[4:]: v for k, v in self.tensors.items() if k.startswith("clf.")}
            clf = LatentClassifier(int(state["mean"].shape[0]), int(self.stats["outputs"]), int(self.stats["hidden"]))
            clf.load_state_dict(state)
            self._classifier = clf.eval()
        return self._classifier

    def displacement(self, z: torch.Tensor, target: torch.Tensor | None = None, check=None) -> torch.Tensor:
        """The per-unit-alpha step D(z): the edit is z + alpha*D(z).

        Direction: the unit vector u. Wasserstein: H(z) (z + alpha_fit*H(z) is the
        fitted transport). Classifier: (z* - z) / alpha_fit, z* the guided code,
        so alpha = the spec's alpha gives z* and other alphas scale the step.
        Clone: the cloned (or erased) code minus z.
        """
        return self._step(z, target, check)[0]

    def _step(self, z: torch.Tensor, target: torch.Tensor | None = None,
              check=None, place_check=None) -> tuple[torch.Tensor, list | None, list | None]:
        """D(z), and per code why the editor left it unchanged and what its edit did (clone
        only: see :meth:`clone`; None for the others, which move every code)."""
        z = z.float()
        if self.editor in ("balanced_centroid", "centroid"):
            return self.tensors["u"].to(z.device).expand_as(z), None, None
        if self.editor == "wasserstein":
            return z @ self.tensors["A"].to(z.device).T + self.tensors["b"].to(z.device), None, None
        if self.editor == "classifier":
            clf = self.classifier().to(z.device)
            h = {**HYPER_DEFAULTS["classifier"], **self.spec.get("hyper", {})}
            if self.spec["attribute"] == "count":
                if target is None:
                    raise FactoryError("a classifier count edit needs the target count of every code")
                idx = torch.as_tensor(count_columns(target, self.stats["counts"]), device=z.device)
                z_star = classifier_edit(clf, z, idx, None, h["lam"], h["steps"], h["lr"])
            else:
                want = torch.full((len(z),), 1.0 if self.spec["direction"] > 0 else 0.0, device=z.device)
                z_star = classifier_edit(clf, z, want, int(self.stats["column"]), h["lam"], h["steps"], h["lr"])
            return (z_star - z) / float(self.spec["alpha"]), None, None
        if self.editor == "clone":
            # alpha 1 is the copy (or the erasure) itself.
            cloned, reasons, moves = self.clone(z, check, place_check)
            return cloned - z, reasons, moves
        raise FactoryError(f"unknown editor {self.editor!r}; known: {', '.join(EDITORS)}")

    def clone(self, z: torch.Tensor, check=None, place_check=None) -> tuple[torch.Tensor, list[str | None], list]:
        """The clone editor's edit of each code, why a code was left unchanged (None when edited),
        and what each edit did (a :class:`~factory.latent.clone.CloneMove`, None when unchanged).

        ``check``: scores the editor's tries (:func:`count_check`: the labeller's count of each
        synthesised try); each code takes its best of ``tries`` (a hyper-parameter). Without it,
        the editor's first choice. ``place_check``: whether each try's decoded copy stands
        clear of the other objects (:func:`pixel_gap_check`); tries that fail it are dropped."""
        from factory.latent.clone import GridLayout, clone_edit

        h = {**HYPER_DEFAULTS["clone"], **self.spec.get("hyper", {})}
        change = self.transition[1] - self.transition[0]
        out, reasons, moves = clone_edit(z.detach().cpu().numpy(), GridLayout(**self.stats["layout"]),
                                         float(self.stats["threshold"]), change, int(h["max_box"]), int(h["gap"]),
                                         int(h["margin"]), int(h["tries"]), check, "the labeller", place_check,
                                         f"as one blob at least {h['pixel_gap']:g} px from the other objects' ink")
        return torch.from_numpy(out).to(z.device), reasons, moves

    def edit(self, z: torch.Tensor, alpha: float | torch.Tensor, radius: float | None = None,
             target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(z', projected): z + alpha*D(z), projected back into the latent ball of ``radius``."""
        result = self.edit_with_reasons(z, alpha, radius, target)
        return result.z, result.projected

    def edit_with_reasons(self, z: torch.Tensor, alpha: float | torch.Tensor, radius: float | None = None,
                          target: torch.Tensor | None = None, check=None, place_check=None) -> "EditResult":
        """:meth:`edit`, with per code None or why the editor left it unchanged (the clone editor
        refuses codes with no object to copy or no room, or, with a ``check``, none of whose
        tries passed it) and what the edit did (the clone editor's moves; None for the others)."""
        a = torch.as_tensor(alpha, dtype=torch.float32, device=z.device)
        a = a[:, None] if a.ndim == 1 else a
        step, reasons, moves = self._step(z, target, check, place_check)
        z_new, projected = project_to_ball(z.float() + a * step, radius)
        none = [None] * len(z)
        return EditResult(z_new, projected, reasons if reasons is not None else none,
                          moves if moves is not None else none)


class EditResult(NamedTuple):
    """An edit of a batch of codes: the edited codes, which were projected back into the latent
    ball, per code why the editor left it unchanged (None: edited), and per code what the edit
    did where the editor says (the clone editor's CloneMove; None for the affine editors)."""

    z: torch.Tensor
    projected: torch.Tensor
    reasons: list
    moves: list


def count_columns(targets, counts) -> np.ndarray:
    """The column of each target count in a count head over ``counts``, or a FactoryError
    naming the first target it does not know."""
    counts = [int(c) for c in counts]
    bad = [int(t) for t in targets if int(t) not in counts]
    if bad:
        raise FactoryError(f"target count {bad[0]} is outside the counts {counts[0]}-{counts[-1]} the labeller knows")
    return np.array([counts.index(int(t)) for t in targets], dtype=np.int64)


def count_check(generator, labeller, targets) -> Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """A check of count edits for the clone editor: synthesise each edited code and let the
    labeller (the one that labelled the fitting codes, never the independent checker) say how
    sure it is that the image holds the code's target count (``targets[row]``), and whether
    that is its count. The checker that grades the edit afterwards stays independent."""
    from factory.latent.attributes import COUNTS  # every labeller's count head: 1-12

    targets = np.asarray(targets, int)
    columns = count_columns(targets, COUNTS)

    def check(codes: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            out = labeller.predict(generator.synthesize(torch.from_numpy(codes).to(generator.device)))
        score = out["count_probs"][np.arange(len(rows)), columns[rows]]
        return score, np.asarray(out["count"]) == targets[rows]

    return check


def pixel_gap_check(generator, gap: float):
    """A place check for the clone editor: synthesise each try and keep it only where the copy
    is drawn as one blob at least ``gap`` px from every other object's ink
    (:func:`factory.latent.clone.copy_stands_clear`)."""
    from factory.latent.clone import copy_stands_clear
    from factory.latent.inversion import to_uint8

    layout = generator.grid_layout
    cell = (generator.image_size / layout.height, generator.image_size / layout.width)

    def check(codes: np.ndarray, moves: list) -> np.ndarray:
        with torch.no_grad():
            images = to_uint8(generator.synthesize(torch.from_numpy(codes).to(generator.device)))
        return np.array([copy_stands_clear(im, m, cell, gap) for im, m in zip(images, moves)], bool)

    return check


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


def check_editor_attribute(editor: str, attribute: str) -> None:
    """The clone editor edits counts only: a FactoryError for any other attribute (the recipe
    schema and library callers of :func:`make_spec` get the same message)."""
    if editor == "clone" and attribute != "count":
        raise FactoryError(f"editor clone edits counts only: set attribute: count (got {attribute!r}), or use "
                           f"balanced_centroid, centroid, wasserstein or classifier for attributes")


def make_spec(editor: str, attribute: str, *, generator: str | None = None, labeller: str | None = None,
              direction: int = 1, transition: tuple[int, int] | None = None, n_fit: int = 10000,
              fit_seed: int = 0, n0: int = 1000, confidence: float = 0.9, oversample: bool = False,
              alpha: float = 2.0, hyper: dict | None = None, fit_data: str | None = None) -> dict:
    """The full, canonical spec of one fitted edit: only what decides it, every default filled in
    (so equal edits share a cache entry and a changed hyper-parameter refits)."""
    if editor not in EDITORS:
        raise FactoryError(f"unknown editor {editor!r}; known: {', '.join(EDITORS)}")
    unknown = set(hyper or {}) - set(HYPER_DEFAULTS[editor])
    if unknown:
        known = sorted(HYPER_DEFAULTS[editor]) or "none"
        raise FactoryError(f"unknown {editor} hyper-parameters {sorted(unknown)}; known: {known}")
    spec = {"version": ARTEFACT_VERSION, "editor": editor, "generator": generator, "labeller": labeller,
            "attribute": attribute, "direction": int(direction), "n_fit": int(n_fit), "fit_seed": int(fit_seed)}
    if fit_data:  # only when set, so the keys of edits fitted on prior samples stay as they were
        spec["fit_data"] = str(fit_data)
    check_editor_attribute(editor, attribute)
    if attribute == "count" and editor != "classifier":  # a classifier's count head serves every transition
        if transition is None:
            raise FactoryError(f"a {editor} count edit is fitted per transition: give transition=(n, n+1)")
        spec["transition"] = [int(transition[0]), int(transition[1])]
    if editor != "classifier":
        spec["confidence"] = float(confidence)
    if editor == "balanced_centroid":
        spec.update(n0=int(n0), oversample=bool(oversample))
    if editor in ("wasserstein", "classifier"):
        spec["alpha"] = float(alpha)
    # Values take their default's type: a recipe's 256.0 and the default 256 are one key.
    spec["hyper"] = {k: type(v)((hyper or {}).get(k, v)) for k, v in HYPER_DEFAULTS[editor].items()}
    return spec


def artefact_key(spec: dict, codes: LabelledCodes | None = None) -> str:
    """sha256 of the spec and of what the codes come from: the generator's and labeller's
    files, or the codes themselves when they are given."""
    if codes is not None:
        inputs = {"codes": codes.fingerprint()}
    else:
        inputs = {"generator": model_fingerprint(spec["generator"]), "labeller": model_fingerprint(spec["labeller"])}
        # The files decide, not how their path was spelt: ./models/x and a copy of it share a key.
        spec = {k: v for k, v in spec.items() if k not in ("generator", "labeller")}
    blob = json.dumps({"spec": spec, "inputs": inputs}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _atomic(path: Path, write) -> None:
    """Write through a temporary name in the same folder and rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _artefact_stem(spec: dict, key: str) -> str:
    what = spec["attribute"] if "transition" not in spec else f"count{spec['transition'][0]}to{spec['transition'][1]}"
    if spec["attribute"] != "count":
        what += "+" if spec["direction"] > 0 else "-"
    return f"{spec['editor']}-{what}-{key[:16]}"


def save_artefact(art: EditArtefact, cache_dir: str | Path) -> str:
    from safetensors.torch import save_file

    folder = Path(os.path.expanduser(str(cache_dir)))
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / _artefact_stem(art.spec, art.id)
    tensors = {k: v.detach().cpu().contiguous() for k, v in art.tensors.items()}
    _atomic(stem.with_suffix(".safetensors"), lambda tmp: save_file(tensors, str(tmp)))
    # The JSON goes last: its presence says the tensors beside it are complete.
    meta = {"id": art.id, "spec": art.spec, "stats": art.stats}
    _atomic(stem.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(meta, indent=1, default=_jsonable)))
    art.path = str(stem.with_suffix(".json"))
    return art.path


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def load_artefact(path: str | Path) -> EditArtefact:
    """An artefact from its .json (the tensors lie beside it)."""
    from safetensors.torch import load_file

    path = Path(os.path.expanduser(str(path)))
    if path.suffix != ".json":
        path = path.with_suffix(".json")
    tensors_path = path.with_suffix(".safetensors")
    if not path.is_file() or not tensors_path.is_file():
        raise FactoryError(f"edit artefact {path} is missing or incomplete; delete it and fit again "
                           f"(the edit stage fits it when its cache holds none)")
    meta = json.loads(path.read_text())
    return EditArtefact(meta["id"], meta["spec"], load_file(str(tensors_path)), meta["stats"], str(path), True)


def fit_clone(spec: dict, codes: LabelledCodes) -> tuple[dict, dict]:
    """The clone editor's one fitted number, its object threshold, on the codes the labeller
    is sure of the count of; the generator's grid layout comes from its folder."""
    from factory.latent.clone import fit_threshold
    from factory.latent.generator import load_generator

    if not spec.get("generator"):
        raise FactoryError("the clone editor needs the generator in its spec: it reads the code's grid layout")
    layout = load_generator(spec["generator"]).grid_layout
    if layout is None:
        raise FactoryError(f"the clone editor needs a generator whose code has a spatial grid (the shipped "
                           f"latent-ae); {spec['generator']} has none: use editor wasserstein or classifier")
    # Near the transition's counts only: the median cell stands for the background in scenes
    # with few objects, not in crowded ones, where it may be an object's.
    ok = codes.confident(spec["confidence"], [], count=True) & (np.abs(codes.count - spec["transition"][0]) <= 2)
    if ok.sum() < 20:
        raise FactoryError(f"too few codes with a confident count ({int(ok.sum())} of {len(codes)} above "
                           f"{spec['confidence']}) to fit the clone editor's threshold: raise n_fit or lower confidence")
    threshold, stats = fit_threshold(codes.z[ok], codes.count[ok], layout)
    stats["layout"] = layout.as_dict()
    return {"threshold": torch.tensor([threshold])}, stats


def fit_artefact(spec: dict, codes: LabelledCodes, key: str) -> EditArtefact:
    """Fit the edit a spec describes on labelled codes (no caching)."""
    t0 = time.perf_counter()
    editor, attribute = spec["editor"], spec["attribute"]
    transition = tuple(spec["transition"]) if spec.get("transition") else None
    if editor == "balanced_centroid":
        d = balanced_centroid_direction(codes, attribute, spec["n0"], spec["confidence"], spec["oversample"],
                                        spec["fit_seed"], spec["direction"], transition)
        tensors, stats = {"u": torch.from_numpy(d.u)}, d.stats
    elif editor == "centroid":
        d = centroid_direction(codes, attribute, spec["confidence"], spec["direction"], transition)
        tensors, stats = {"u": torch.from_numpy(d.u)}, d.stats
    elif editor == "wasserstein":
        w = WassersteinEditor(spec["alpha"], spec["confidence"], spec["fit_seed"], **spec["hyper"])
        w.fit(codes, attribute, spec["direction"], transition)
        tensors, stats = {"A": w.A, "b": w.b}, w.stats
    elif editor == "classifier":
        h = spec["hyper"]
        c = ClassifierGuidedEditor(int(h["hidden"]), h["lam"], int(h["steps"]), h["lr"], spec["fit_seed"])
        c.fit(codes, attribute)
        with torch.no_grad():
            logits = c.classifier(torch.from_numpy(codes.z))
        if attribute == "count":
            stats = {"outputs": len(codes.counts), "counts": list(codes.counts), "column": None}
            acc = (logits.argmax(1).numpy() == codes.count_probs.argmax(1)).mean()
        else:
            stats = {"outputs": codes.probs.shape[1], "column": c.column}
            acc = ((logits[:, c.column] > 0).numpy() == codes.labels[:, c.column]).mean()
        stats.update(method="classifier", hidden=c.hidden, n_codes=len(codes), train_accuracy=float(acc))
        tensors = {f"clf.{k}": v.detach().clone() for k, v in c.classifier.state_dict().items()}
    elif editor == "clone":
        tensors, stats = fit_clone(spec, codes)
    else:
        raise FactoryError(f"unknown editor {editor!r}; known: {', '.join(EDITORS)}")
    stats["fit_seconds"] = round(time.perf_counter() - t0, 2)
    return EditArtefact(key, spec, tensors, stats)


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


def fit_or_load(spec: dict, cache_dir: str | Path = DEFAULT_CACHE, codes: LabelledCodes | None = None,
                device: str = "cpu") -> EditArtefact:
    """The artefact of ``spec`` from ``cache_dir`` if it was fitted before, else fitted and saved.

    Without ``codes`` the spec's generator and labeller label ``n_fit`` codes
    (cached too). Loading a cached artefact does no fitting and loads no model.
    """
    key = artefact_key(spec, codes)
    folder = Path(os.path.expanduser(str(cache_dir)))
    path = folder / f"{_artefact_stem(spec, key)}.json"
    if path.is_file() and path.with_suffix(".safetensors").is_file():
        return load_artefact(path)
    if codes is None:
        if not spec.get("generator") or not spec.get("labeller"):
            raise FactoryError("fitting an edit needs labelled codes, or a spec with a generator and a labeller")
        codes = labelled_codes(spec["generator"], spec["labeller"], spec["n_fit"], spec["fit_seed"], folder, device,
                               data=spec.get("fit_data"))
    art = fit_artefact(spec, codes, key)
    save_artefact(art, folder)
    return art


def count_transitions(codes: LabelledCodes, change: int, confidence: float = 0.9,
                      min_codes: int = 20) -> list[tuple[int, int]]:
    """The transitions n -> n+change with at least ``min_codes`` confident codes on both sides."""
    others = [i for i, a in enumerate(codes.attributes) if a not in COUNT_DERIVED]
    ok = codes.confident(confidence, others, count=True)
    have = {c: int((ok & (codes.count == c)).sum()) for c in codes.counts}
    return [(n, n + change) for n in codes.counts
            if have.get(n, 0) >= min_codes and have.get(n + change, 0) >= min_codes]
