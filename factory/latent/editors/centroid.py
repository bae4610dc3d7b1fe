"""Balanced-centroid directions (DESIGN §1 item 3) and the unbalanced centroid baseline.

:func:`balanced_centroid_direction`: keep the codes the labeller is sure of on every attribute,
draw positive and negative halves with the *same* distribution of the other attributes, u =
normalised difference of their centroids. :func:`centroid_direction` is the unbalanced baseline;
when attributes are correlated in the prior (dark backgrounds with warm objects, say) its
direction drags the correlated attributes along. Both edit z + alpha*u.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from factory.errors import FactoryError
from factory.latent.editors.codes import LabelledCodes, Split, _cells, split_codes
from factory.latent.editors.common import EditorFamily


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


def _fit_balanced(spec: dict, codes: LabelledCodes) -> tuple[dict, dict]:
    d = balanced_centroid_direction(codes, spec["attribute"], spec["n0"], spec["confidence"], spec["oversample"],
                                    spec["fit_seed"], spec["direction"], _transition(spec))
    return {"u": torch.from_numpy(d.u)}, d.stats


def _fit_centroid(spec: dict, codes: LabelledCodes) -> tuple[dict, dict]:
    d = centroid_direction(codes, spec["attribute"], spec["confidence"], spec["direction"], _transition(spec))
    return {"u": torch.from_numpy(d.u)}, d.stats


def _transition(spec: dict) -> tuple[int, int] | None:
    return tuple(spec["transition"]) if spec.get("transition") else None


def _step_direction(art, z: torch.Tensor, target=None, check=None, place_check=None):
    """Direction: the unit vector u, the same for every code."""
    return art.tensors["u"].to(z.device).expand_as(z), None, None


BALANCED_CENTROID = EditorFamily("balanced_centroid", __name__, {}, _fit_balanced, _step_direction)
CENTROID = EditorFamily("centroid", __name__, {}, _fit_centroid, _step_direction)
